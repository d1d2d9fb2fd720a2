"""Tests for anomaly/synthetic.py: determinism, shapes, the process's structure, and anomaly injection.

The central check for injection compares a run with anomalies against the same seed without them:
the readings must differ inside each recorded window (on the recorded features) and be bit-identical
everywhere else.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from anomaly.synthetic import (
    ANOMALY_KINDS,
    FleetSpec,
    FleetStream,
    InjectedAnomaly,
    simulate_fleet,
)

FEATURES = ["temp", "vibration", "current", "pressure"]


def _values(run, device: str) -> np.ndarray:
    """[T, F] readings of one device, in step order."""
    frame = run.readings[run.readings["device_id"] == device]
    return frame[FEATURES].to_numpy()


@pytest.fixture(scope="module")
def spec() -> FleetSpec:
    return FleetSpec(n_devices=4, seed=11, cycle_period_steps=600, clean_steps=100)


@pytest.fixture(scope="module")
def clean(spec):
    return simulate_fleet(spec, 1_200)


def test_same_seed_same_run_and_other_seed_differs(spec):
    rated = FleetSpec(n_devices=20, seed=5, cycle_period_steps=600, anomaly_rate=3.0, clean_steps=50)
    a, b = simulate_fleet(rated, 600), simulate_fleet(rated, 600)
    pd.testing.assert_frame_equal(a.readings, b.readings)
    pd.testing.assert_frame_equal(a.anomalies, b.anomalies)
    assert len(a.anomalies) > 0
    other = simulate_fleet(FleetSpec(n_devices=20, seed=6, cycle_period_steps=600), 600)
    assert not np.array_equal(a.readings[FEATURES].to_numpy(), other.readings[FEATURES].to_numpy())


def test_shapes_dtypes_and_order(spec, clean):
    r = clean.readings
    assert list(r.columns) == ["device_id", "ts", *FEATURES]
    assert len(r) == 1_200 * spec.n_devices
    assert r["ts"].dtype == np.int64
    assert all(r[f].dtype == np.float32 for f in FEATURES)
    assert np.isfinite(r[FEATURES].to_numpy()).all()
    # sorted by time, then device; every device once per step, interval_ms apart
    assert r.equals(r.sort_values(["ts", "device_id"], kind="stable"))
    assert r["ts"].iloc[0] == spec.ts_of(0)
    assert set(np.diff(r["ts"].unique())) == {spec.interval_ms}
    assert (r.groupby("ts")["device_id"].nunique() == spec.n_devices).all()
    assert list(clean.anomalies.columns) == ["device_id", "kind", "start_ms", "end_ms", "features",
                                             "magnitude", "start_step", "end_step"]
    assert clean.anomalies.empty


def test_stream_and_batch_forms_agree(spec):
    anomalies = [InjectedAnomaly("dev-00001", "drift", 200, 100, ("temp", "current"))]
    rated = FleetSpec(n_devices=6, seed=3, cycle_period_steps=600, anomaly_rate=5.0, clean_steps=50)
    run = simulate_fleet(rated, 400, anomalies=anomalies)
    stream = FleetStream(rated, anomalies=anomalies)
    ticks = [stream.next_tick() for _ in range(400)]
    ids = np.concatenate([t[0] for t in ticks])
    ts = np.concatenate([t[1] for t in ticks])
    values = np.concatenate([t[2] for t in ticks])
    assert ticks[0][2].shape == (6, 4) and ticks[0][2].dtype == np.float32 and ticks[0][1].dtype == np.int64
    np.testing.assert_array_equal(ids, run.readings["device_id"].to_numpy(dtype=object))
    np.testing.assert_array_equal(ts, run.readings["ts"].to_numpy())
    np.testing.assert_array_equal(values, run.readings[FEATURES].to_numpy())
    # the stream's truth so far equals the batch truth, except for windows the batch clipped at its end
    streamed = stream.anomalies
    assert streamed[["device_id", "kind", "start_ms", "start_step"]].equals(
        run.anomalies[["device_id", "kind", "start_ms", "start_step"]])
    assert (run.anomalies["end_step"] == streamed["end_step"].clip(upper=400)).all()


def test_daily_cycle_and_feature_coupling():
    spec = FleetSpec(n_devices=3, seed=2, cycle_period_steps=600)
    run = simulate_fleet(spec, 2_400)
    x = _values(run, "dev-00000")
    temp, vibration, current = x[:, 0], x[:, 1], x[:, 2]

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a, b)[0, 1])

    # one full period apart looks alike; half a period apart looks opposite
    assert corr(current[:-600], current[600:]) > 0.5
    assert corr(current[:-300], current[300:]) < 0
    # vibration follows current; temp follows current with a thermal lag
    assert corr(vibration, current) > 0.5
    lags = [0, 10, 20, 40, 60]
    by_lag = [corr(current[: len(current) - lag], temp[lag:]) for lag in lags]
    assert int(np.argmax(by_lag)) > 0
    # devices differ in their baseline
    other = _values(run, "dev-00001")
    assert not np.allclose(x.mean(axis=0), other.mean(axis=0), rtol=0.01)


def test_unknown_feature_names_get_a_generic_role():
    spec = FleetSpec(n_devices=2, seed=0, features=("flow", "rpm"), cycle_period_steps=100)
    run = simulate_fleet(spec, 300, anomalies=[InjectedAnomaly("dev-00000", "spike", 150, 2, "rpm")])
    assert list(run.readings.columns) == ["device_id", "ts", "flow", "rpm"]
    assert run.readings[["flow", "rpm"]].std().gt(0).all()
    assert run.anomalies["features"].tolist() == [("rpm",)]


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_each_kind_changes_its_window_and_nothing_else(spec, clean, kind):
    start, duration, feats = 500, 3 if kind == "spike" else 120, ("temp", "current")
    run = simulate_fleet(spec, 1_200, anomalies=[InjectedAnomaly("dev-00002", kind, start, duration, feats)])
    base = clean.readings[FEATURES].to_numpy()
    got = run.readings[FEATURES].to_numpy()
    changed = base != got
    expected = run.anomaly_mask()[:, None] & np.isin(FEATURES, feats)[None, :]
    np.testing.assert_array_equal(changed, expected)  # every reading in the window changed, nothing else

    a, b = _values(run, "dev-00002").astype(np.float64), _values(clean, "dev-00002").astype(np.float64)
    window = slice(start, start + duration)
    f = [FEATURES.index(n) for n in feats]
    diff = a[window][:, f] - b[window][:, f]
    sd = FleetStream(spec).noise_sd[2, f]
    if kind == "spike":
        np.testing.assert_allclose(diff, 6.0 * sd[None, :].repeat(duration, 0), rtol=1e-4)
    elif kind == "level_shift":
        np.testing.assert_allclose(diff, 4.0 * sd[None, :].repeat(duration, 0), rtol=1e-4)
    elif kind == "drift":
        ramp = np.arange(1, duration + 1)[:, None] / duration * 6.0 * sd[None, :]
        np.testing.assert_allclose(diff, ramp, rtol=1e-3, atol=1e-4)
    elif kind == "stuck":
        assert (a[window][:, f] == a[start - 1, f]).all()  # repeats the last reading: zero variance
        assert (b[window][:, f].std(axis=0) > 0).all()
    elif kind == "noise":
        ratio = diff.std(axis=0) / sd
        assert (ratio > 3.0).all() and (ratio < 7.0).all()  # extra noise sd is sqrt(5² - 1) ≈ 4.9 sd
    record = run.anomalies.iloc[0]
    assert (record["kind"], record["start_step"], record["end_step"]) == (kind, start, start + duration)
    assert record["start_ms"] == spec.ts_of(start) and record["end_ms"] == spec.ts_of(start + duration)
    assert record["features"] == feats


def test_negative_magnitude_shifts_down(spec, clean):
    run = simulate_fleet(spec, 1_200, anomalies=[InjectedAnomaly("dev-00000", "level_shift", 300, 50, "temp",
                                                                 magnitude=-4.0)])
    diff = _values(run, "dev-00000")[300:350, 0] - _values(clean, "dev-00000")[300:350, 0]
    assert (diff < 0).all()


def test_rate_based_injection_respects_clean_steps_and_its_truth_table():
    spec = FleetSpec(n_devices=40, seed=9, cycle_period_steps=600, anomaly_rate=6.0, clean_steps=400)
    run = simulate_fleet(spec, 1_500)
    clean = simulate_fleet(FleetSpec(n_devices=40, seed=9, cycle_period_steps=600, clean_steps=400), 1_500)
    truth = run.anomalies
    assert len(truth) > 10
    assert (truth["start_step"] >= 400).all()
    assert set(truth["kind"]) <= set(ANOMALY_KINDS)
    assert truth["features"].map(len).between(1, 2).all()
    # no two windows overlap on one device
    for _, group in truth.groupby("device_id"):
        g = group.sort_values("start_step")
        assert (g["start_step"].to_numpy()[1:] >= g["end_step"].to_numpy()[:-1]).all()
    # outside the recorded windows the run equals the anomaly-free run; inside, the recorded features changed
    differs = (run.readings[FEATURES].to_numpy() != clean.readings[FEATURES].to_numpy())
    inside = run.anomaly_mask()
    assert not differs[~inside].any()
    assert not differs[: 400 * spec.n_devices].any()
    index = {d: i for i, d in enumerate(spec.device_ids())}
    for rec in truth.itertuples():
        rows = np.arange(rec.start_step, rec.end_step) * spec.n_devices + index[rec.device_id]
        cols = [FEATURES.index(n) for n in rec.features]
        assert differs[np.ix_(rows, cols)].all(), rec
        others = [j for j in range(len(FEATURES)) if j not in cols]
        assert not differs[np.ix_(rows, others)].any(), rec


def test_kinds_restrict_rate_based_draws():
    spec = FleetSpec(n_devices=30, seed=4, cycle_period_steps=600, anomaly_rate=10.0, clean_steps=0,
                     anomaly_kinds=("stuck",))
    run = simulate_fleet(spec, 600)
    assert len(run.anomalies) > 0
    assert set(run.anomalies["kind"]) == {"stuck"}


def test_stream_reports_started_anomalies_once():
    spec = FleetSpec(n_devices=3, seed=1, cycle_period_steps=600)
    stream = FleetStream(spec, anomalies=[InjectedAnomaly("dev-00000", "spike", 2, 2, "temp"),
                                          InjectedAnomaly("dev-00001", "noise", 4, 10, "pressure")])
    seen = []
    for _ in range(6):
        stream.next_tick()
        seen.append([(r.device_id, r.kind, r.start_step) for r in stream.pop_started()])
    assert seen == [[], [], [("dev-00000", "spike", 2)], [], [("dev-00001", "noise", 4)], []]
    assert stream.step == 6
    assert stream.anomalies["kind"].tolist() == ["spike", "noise"]
    assert stream.records[1].end_ms == spec.ts_of(14)


def test_batch_clips_windows_and_skips_late_anomalies(spec):
    run = simulate_fleet(spec, 300, anomalies=[InjectedAnomaly("dev-00000", "drift", 250, 100, "temp"),
                                               InjectedAnomaly("dev-00001", "spike", 400, 2, "temp")])
    assert run.anomalies[["device_id", "start_step", "end_step"]].to_dict("records") == [
        {"device_id": "dev-00000", "start_step": 250, "end_step": 300}]
    assert run.anomalies["end_ms"].iloc[0] == spec.ts_of(300)


def test_default_period_is_one_day_of_readings():
    assert FleetSpec(n_devices=1).period_steps == 86_400
    assert FleetSpec(n_devices=1, interval_ms=60_000).period_steps == 1_440
    assert FleetSpec(n_devices=1, start_ms=5).ts_of(3) == 3_005


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"n_devices": 0}, "n_devices"),
    ({"n_devices": 2, "features": ()}, "features"),
    ({"n_devices": 2, "features": ("a", "a")}, "features"),
    ({"n_devices": 2, "interval_ms": 0}, "interval_ms"),
    ({"n_devices": 2, "cycle_period_steps": 1}, "cycle_period_steps"),
    ({"n_devices": 2, "anomaly_rate": -1.0}, "anomaly_rate"),
    ({"n_devices": 2, "anomaly_kinds": ("meteor",)}, "anomaly_kinds"),
    ({"n_devices": 2, "clean_steps": -1}, "clean_steps"),
])
def test_bad_spec_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FleetSpec(**kwargs)


def test_bad_anomalies_are_rejected_with_a_reason(spec):
    with pytest.raises(ValueError, match="kind"):
        InjectedAnomaly("dev-00000", "meteor", 1, 1, "temp")
    with pytest.raises(ValueError, match="duration"):
        InjectedAnomaly("dev-00000", "spike", 1, 0, "temp")
    with pytest.raises(ValueError, match="factor"):
        InjectedAnomaly("dev-00000", "noise", 1, 5, "temp", magnitude=0.5)
    with pytest.raises(ValueError, match="unknown device_id 'dev-99999'"):
        FleetStream(spec, anomalies=[InjectedAnomaly("dev-99999", "spike", 1, 1, "temp")])
    with pytest.raises(ValueError, match="unknown feature 'humidity'"):
        FleetStream(spec, anomalies=[InjectedAnomaly("dev-00000", "spike", 1, 1, "humidity")])
    with pytest.raises(ValueError, match="overlap on device 'dev-00000'"):
        FleetStream(spec, anomalies=[InjectedAnomaly("dev-00000", "level_shift", 10, 20, "temp"),
                                     InjectedAnomaly("dev-00000", "spike", 25, 2, "current")])
    with pytest.raises(ValueError, match="anomaly_rate"):
        FleetStream(spec, anomaly_rate=10_000.0)
    with pytest.raises(ValueError, match="n_steps"):
        simulate_fleet(spec, 0)
