"""Detection quality on a simulated fleet: injected faults of every kind are found within a stated
delay, and clean data raises alarms at about the configured rate.

The product scenario: a model is trained on the *same fleet's* normal history, then scores later
readings of those devices. So one fleet is simulated (``anomaly.synthetic``); its first
``TRAIN_STEPS`` readings per device (clean) train and calibrate the model (the later half of them is
the held-out calibration part); the continuation holds the injected faults. Every device gets one
fault of every kind, in turn, with clean stretches between them, so each kind is tried on 8 devices
and on every feature. Magnitudes are in each device's own noise standard deviations (sd), the unit
of :mod:`anomaly.synthetic`.

What the current design detects, and the delays asserted (in readings of the faulty device):

* spike (12 sd, 3 readings) and level shift (12 sd): at onset, within ``ONSET_DELAY`` = 3 readings;
* noise burst (5x the noise sd): within ``NOISE_DELAY`` = 30 readings;
* stuck sensor: the value repeating exactly more often than in any normal data (training sets
  ``stuck_after``, here 5) gives maximum surprise: within ``STUCK_DELAY`` = 8 readings;
* slow drift (30 sd over 400 readings): the one-step forecaster follows the drifting value, so the
  residuals stay small until the fault *ends* (the value jumps back); asserted is detection by
  ``RELEASE_DELAY`` = 3 readings after the window closes (stuck sensors too, as a floor). Detection of
  drift *inside* the window is the goal; that test is marked xfail(strict) until the design catches it.

Counts are "at least 7 of 8" (6 of 8 for the release-time checks), not "all": the normal-error model
is fitted on residuals pooled over the fleet, while devices' noise levels differ up to ~4x, so the
same fault in device sd is smaller in pooled units on a quiet device. Over simulation seeds 0-6 the
pooled detector misses at most one of 8 spikes or level shifts (SA_DETECTION_SEED selects the seed).

Clean data: the threshold is the calibrated (1 - false_alarm_rate) quantile of the decision statistic
on held-out normal readings, so on new clean readings of the same devices the share at or above it
should be about ``FALSE_ALARM_RATE``. The bound asserted, ``[rate/3, 3 rate]``, allows for the ~24
expected exceedances in 24,000 clean readings arriving in clusters (the moving average keeps a few
consecutive readings above the threshold), so only ~5-10 independent events are counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from anomaly.bundle import DetectorConfig, ModelBundle
from anomaly.detector import StreamingDetector
from anomaly.events import AnomalyEvent, ProcessResult, ReadingStatus
from anomaly.readings import ReadingBatch
from anomaly.synthetic import FleetSpec, InjectedAnomaly, simulate_fleet
from anomaly.training import fit

SEED = int(os.environ.get("SA_DETECTION_SEED", "0"))
DEVICES = 8
TRAIN_STEPS = 3000
TOTAL_STEPS = 6000
FALSE_ALARM_RATE = 1e-3

ONSET_DELAY = 3
NOISE_DELAY = 30
RELEASE_DELAY = 3
STUCK_DELAY = 8

# kind -> (magnitude, duration in readings); one slot per kind, every device runs through all of them
FAULTS: dict[str, tuple[float | None, int]] = {
    "spike": (12.0, 3),
    "level_shift": (12.0, 300),
    "noise": (5.0, 300),
    "stuck": (None, 300),
    "drift": (30.0, 400),
}
SLOT_STEPS = 560  # the longest fault (400) plus 160 clean readings for the device to settle
FIRST_SLOT = TRAIN_STEPS + 200


@dataclass(frozen=True)
class Run:
    spec: FleetSpec
    bundle: ModelBundle
    faults: list[InjectedAnomaly]
    faulty: ProcessResult
    faulty_frame: pd.DataFrame
    clean: ProcessResult
    clean_frame: pd.DataFrame


def schedule(spec: FleetSpec) -> list[InjectedAnomaly]:
    """Device d, slot j: kind (d + j) mod 5 on feature (d + j) mod 4, so kinds meet every device and feature."""
    kinds, features = list(FAULTS), spec.features
    out = []
    for d, device in enumerate(spec.device_ids()):
        for j in range(len(kinds)):
            kind = kinds[(d + j) % len(kinds)]
            magnitude, duration = FAULTS[kind]
            out.append(InjectedAnomaly(device, kind, start_step=FIRST_SLOT + j * SLOT_STEPS, duration=duration,
                                       features=features[(d + j) % len(features)], magnitude=magnitude))
    return out


def score(bundle: ModelBundle, frame: pd.DataFrame) -> ProcessResult:
    """History first, then the continuation, through one detector (as a service would see them)."""
    detector = StreamingDetector(bundle)
    batch = ReadingBatch.from_frame(frame, bundle.features, time_col="ts", device_col="device_id")
    history = frame["ts"].to_numpy() < frame["ts"].min() + TRAIN_STEPS * 1000
    first = detector.process(batch.take(np.flatnonzero(history)))
    second = detector.process(batch.take(np.flatnonzero(~history)))
    n = len(frame)
    merged = ProcessResult(scores=np.empty(n, np.float32), raw_scores=np.empty(n, np.float32),
                           status=np.empty(n, np.int8), anomalous=np.empty(n, bool),
                           expected=np.empty((n, len(bundle.features)), np.float32),
                           events=first.events + second.events)
    for part, mask in ((first, history), (second, ~history)):
        for name in ("scores", "raw_scores", "status", "anomalous", "expected"):
            getattr(merged, name)[mask] = getattr(part, name)
    return merged


@pytest.fixture(scope="module")
def run() -> Run:
    spec = FleetSpec(n_devices=DEVICES, seed=SEED, cycle_period_steps=600, clean_steps=0)
    clean = simulate_fleet(spec, TOTAL_STEPS).readings
    history = clean[clean["ts"] < spec.ts_of(TRAIN_STEPS)]
    bundle = fit(history, list(spec.features), time_col="ts", device_col="device_id", hidden_size=16, epochs=6,
                 val_fraction=0.5, detector=DetectorConfig(false_alarm_rate=FALSE_ALARM_RATE), progress=False)
    faults = schedule(spec)
    faulty = simulate_fleet(spec, TOTAL_STEPS, anomalies=faults).readings
    return Run(spec, bundle, faults, score(bundle, faulty), faulty, score(bundle, clean), clean)


def first_start(run: Run, fault: InjectedAnomaly, until_step: int) -> AnomalyEvent | None:
    """The first episode start on the fault's device from its first faulty reading until ``until_step``."""
    lo, hi = run.spec.ts_of(fault.start_step), run.spec.ts_of(until_step)
    starts = [e for e in run.faulty.events
              if e.kind == "start" and e.device_id == fault.device_id and lo <= e.ts_ms < hi]
    return min(starts, key=lambda e: e.ts_ms, default=None)


def delays(run: Run, kind: str, until: str = "window", slack: int = 0) -> list[int | None]:
    """Readings from each ``kind`` fault's start to its first episode start (None: not detected).

    ``until="window"`` looks inside the fault's window plus ``slack`` readings; ``"release"`` up to
    ``slack`` readings after the window closes (the same thing, named for the release-time checks).
    """
    out = []
    for fault in (f for f in run.faults if f.kind == kind):
        event = first_start(run, fault, fault.end_step + slack)
        out.append(None if event is None else (event.ts_ms - run.spec.ts_of(fault.start_step)) // run.spec.interval_ms)
    return out


def assert_no_stale_episode(result: ProcessResult, frame: pd.DataFrame, spec: FleetSpec, recent: int = 10) -> None:
    """An episode still open at a device's last reading must have started within its last ``recent`` readings
    (a false alarm can start at any time, the end of a run included; one that never ends is a bug)."""
    last = frame.groupby("device_id").tail(1)
    for row, device, ts in zip(last.index, last["device_id"], last["ts"], strict=True):
        if result.anomalous[row]:
            starts = [e.ts_ms for e in result.events if e.device_id == device and e.kind == "start"]
            assert starts and ts - max(starts) < recent * spec.interval_ms, (device, ts, starts[-3:])


def detected(found: list[int | None], within: int) -> int:
    return sum(d is not None and d <= within for d in found)


# ---------------------------------------------------------------------------------------------- clean data


def test_calibration_used_the_held_out_half_and_an_empirical_quantile(run):
    # 8 devices x 1,500 held-out readings: enough for an empirical 1e-3 quantile (>= 10 / rate)
    assert run.bundle.scorer.n_fit == DEVICES * TRAIN_STEPS // 2
    assert run.bundle.config.false_alarm_rate == FALSE_ALARM_RATE


def test_clean_readings_alarm_at_about_the_configured_rate(run):
    continuation = (run.clean_frame["ts"] >= run.spec.ts_of(TRAIN_STEPS)).to_numpy()
    scored = continuation & (run.clean.status == ReadingStatus.SCORED)
    threshold = StreamingDetector(run.bundle).score_threshold
    rate = float(np.mean(run.clean.scores[scored] >= threshold))
    assert scored.sum() == DEVICES * (TOTAL_STEPS - TRAIN_STEPS)
    assert FALSE_ALARM_RATE / 3 <= rate <= 3 * FALSE_ALARM_RATE, rate


def test_clean_episodes_are_rare_and_all_close(run):
    starts = [e for e in run.clean.events if e.kind == "start" and e.ts_ms >= run.spec.ts_of(TRAIN_STEPS)]
    device_hours = DEVICES * (TOTAL_STEPS - TRAIN_STEPS) * run.spec.interval_ms / 3_600_000
    # each episode needs at least one reading over the threshold: at most 3x the target rate of them
    assert len(starts) / device_hours <= 3 * FALSE_ALARM_RATE * 3600
    assert_no_stale_episode(run.clean, run.clean_frame, run.spec)


# ------------------------------------------------------------------------------------------------- faults


def test_spikes_are_detected_at_onset(run):
    found = delays(run, "spike", slack=ONSET_DELAY)
    assert detected(found, ONSET_DELAY) >= 7, found


def test_level_shifts_are_detected_at_onset(run):
    found = delays(run, "level_shift")
    assert detected(found, ONSET_DELAY) >= 7, found


def test_noise_bursts_are_detected_quickly(run):
    found = delays(run, "noise")
    assert detected(found, NOISE_DELAY) >= 7, found


def test_stuck_sensors_are_noticed_at_the_latest_when_they_recover(run):  # the floor, kept from before
    duration = FAULTS["stuck"][1]
    found = delays(run, "stuck", slack=RELEASE_DELAY)
    assert detected(found, duration + RELEASE_DELAY) >= 6, found


def test_drift_is_noticed_at_the_latest_when_it_ends(run):
    duration = FAULTS["drift"][1]
    found = delays(run, "drift", slack=RELEASE_DELAY)
    assert detected(found, duration + RELEASE_DELAY) >= 6, found


def test_stuck_sensors_are_detected_while_stuck(run):
    # the repeat counter fires once a value has repeated more often than normal data ever did
    limit = max(run.bundle.config.stuck_after or (0,))
    found = delays(run, "stuck")
    assert detected(found, STUCK_DELAY) >= 7 and limit < STUCK_DELAY, (found, run.bundle.config.stuck_after)


@pytest.mark.xfail(strict=True, reason="a slow drift adds ~0.1 sd per reading to one-step residuals; it is "
                                       "caught mostly when it ends (needs per-device residual scale or "
                                       "multi-step forecasts)")
def test_drift_is_detected_while_drifting(run):
    found = delays(run, "drift")
    assert detected(found, FAULTS["drift"][1] - 1) >= 6, found


# ------------------------------------------------------------------------------------------------- events


def test_onset_events_name_the_faulty_feature_and_show_the_jump(run):
    named, checked = 0, 0
    for fault in (f for f in run.faults if f.kind in ("spike", "level_shift")):
        event = first_start(run, fault, fault.start_step + ONSET_DELAY + 1)
        if event is None:
            continue
        checked += 1
        feature = fault.features[0]
        named += max(event.contributions, key=event.contributions.get) == feature
        assert sum(event.contributions.values()) == pytest.approx(1.0, abs=1e-4)
        assert set(event.expected) == set(event.actual) == set(run.spec.features)
        if event.ts_ms == run.spec.ts_of(fault.start_step):  # the jump itself: actual far above forecast
            assert event.actual[feature] > event.expected[feature]
    assert checked >= 14 and named >= checked - 1, (named, checked)


def test_every_episode_ends_once_the_fleet_is_clean_again(run):
    per_device: dict[str, list[str]] = {}
    for event in run.faulty.events:
        per_device.setdefault(event.device_id, []).append(event.kind)
    for device, kinds in per_device.items():
        assert kinds[::2] == ["start"] * len(kinds[::2]) and kinds[1::2] == ["end"] * len(kinds[1::2]), device
    assert_no_stale_episode(run.faulty, run.faulty_frame, run.spec)
