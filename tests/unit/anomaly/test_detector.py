"""StreamingDetector: batching equivalence (hypothesis), ordering rules, gaps, missing values, events."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomaly.bundle import ModelBundle
from anomaly.detector import StreamingDetector
from anomaly.errors import InvalidReadingError
from anomaly.events import ReadingStatus
from anomaly.readings import ReadingBatch
from anomaly.scoring import NormalErrorModel
from anomaly.snapshots import decode_states, encode_states, load_states

FEATURES = ("a", "b", "c")


def stateful_bundle(**config) -> ModelBundle:
    """A bundle whose forecasts depend on the hidden state (random head, not plain persistence)."""
    torch.manual_seed(1)
    scorer = NormalErrorModel.fit(np.random.default_rng(0).normal(scale=0.3, size=(2000, 3)))
    bundle = ModelBundle.untrained(FEATURES, hidden_size=16, num_layers=2, scorer=scorer, version="7")
    with torch.no_grad():
        bundle.model.head.weight.normal_(0, 0.3)
        bundle.model.head.bias.normal_(0, 0.1)
    settings_ = {"warmup_steps": 3, "threshold": 2.0, "cooldown": 2, "gap_factor": 5.0,
                 "nominal_interval_ms": 1000} | config
    return bundle.with_config(**settings_)


def device_series(seed: int, length: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = np.cumsum(rng.normal(scale=0.2, size=(length, 3)), axis=0).astype(np.float32)
    spikes = rng.random(length) < 0.08
    values[spikes, 0] += 6.0
    return values


def reference_scores(bundle, devices):
    """Each device's whole series in one call on a fresh detector."""
    out = {}
    for name, (ts, values) in devices.items():
        det = StreamingDetector(bundle)
        res = det.process(ReadingBatch.from_arrays([name] * len(ts), ts, values))
        out[name] = (res.scores, [(e.kind, e.ts_ms) for e in res.events], res.novelty, res.alerts, res.anomalous)
    return out


NOVELTY = {"episode_rule": "novelty", "novelty_learn_readings": 5, "novelty_refractory": 3,
           "novelty_half_life": 50.0}
"""Novelty settings that make a 40-reading device alert, open and close episodes, and decay records."""
SEASONAL = NOVELTY | {"seasonal_period": 7}
"""...with a seasonal error channel that has a reference from a device's 8th reading on."""


def seasonal_bundle(**config) -> ModelBundle:
    """:func:`stateful_bundle` with the novelty rule and a seasonal channel of period 7."""
    scorer = NormalErrorModel.fit(np.random.default_rng(2).normal(scale=0.4, size=(2000, 3)))
    return replace(stateful_bundle(), seasonal_scorer=scorer).with_config(**(SEASONAL | config))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n_devices=st.integers(1, 4))
def test_any_split_into_messages_and_batches_scores_like_one_pass(data, n_devices):
    check_any_split(data, n_devices, stateful_bundle())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n_devices=st.integers(1, 4))
def test_novelty_rule_any_split_into_messages_and_batches_scores_like_one_pass(data, n_devices):
    check_any_split(data, n_devices, stateful_bundle(**NOVELTY))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n_devices=st.integers(1, 4))
def test_seasonal_channel_any_split_into_messages_and_batches_scores_like_one_pass(data, n_devices):
    check_any_split(data, n_devices, seasonal_bundle())


def check_any_split(data, n_devices, bundle):
    devices = {}
    for d in range(n_devices):
        length = data.draw(st.integers(1, 40), label=f"length{d}")
        devices[f"dev{d}"] = (1_000_000 + np.arange(length, dtype=np.int64) * 1000, device_series(d, length))
    expected = reference_scores(bundle, devices)

    # cut every device's series into messages (runs of consecutive readings) ...
    messages = {name: [] for name in devices}
    for name, (ts, _) in devices.items():
        pos = 0
        while pos < len(ts):
            size = data.draw(st.integers(1, 12), label="message size")
            messages[name].append((pos, min(pos + size, len(ts))))
            pos += size
    # ... interleave the devices' messages in any order that keeps each device's order ...
    queue = []
    cursors = dict.fromkeys(devices, 0)
    while any(cursors[n] < len(messages[n]) for n in devices):
        live = sorted(n for n in devices if cursors[n] < len(messages[n]))
        name = data.draw(st.sampled_from(live), label="next device")
        queue.append((name, *messages[name][cursors[name]]))
        cursors[name] += 1
    # ... and group consecutive messages into batches of any size
    det = StreamingDetector(bundle)
    got = {name: ([], [], [], [], []) for name in devices}
    i = 0
    while i < len(queue):
        size = data.draw(st.integers(1, 6), label="batch size")
        chunk = queue[i:i + size]
        i += size
        ids = [n for n, a, b in chunk for _ in range(a, b)]
        ts = np.concatenate([devices[n][0][a:b] for n, a, b in chunk])
        values = np.concatenate([devices[n][1][a:b] for n, a, b in chunk])
        res = det.process(ReadingBatch.from_arrays(ids, ts, values))
        for name in devices:
            mask = np.asarray(ids, dtype=object) == name
            got[name][0].append(res.scores[mask])
            got[name][2].append(res.novelty[mask])
            got[name][3].append(res.alerts[mask])
            got[name][4].append(res.anomalous[mask])
        for e in res.events:
            got[e.device_id][1].append((e.kind, e.ts_ms))
    for name in devices:
        np.testing.assert_allclose(np.concatenate(got[name][0]), expected[name][0], atol=1e-5, equal_nan=True)
        assert got[name][1] == expected[name][1]
        np.testing.assert_allclose(np.concatenate(got[name][2]), expected[name][2], atol=1e-5, equal_nan=True)
        np.testing.assert_array_equal(np.concatenate(got[name][3]), expected[name][3])
        np.testing.assert_array_equal(np.concatenate(got[name][4]), expected[name][4])


def test_readings_are_taken_in_timestamp_order_within_a_batch():
    bundle = stateful_bundle()
    ts = 1000 * np.arange(10, dtype=np.int64)
    values = device_series(3, 10)
    in_order = StreamingDetector(bundle).process(ReadingBatch.from_arrays(["d"] * 10, ts, values))
    perm = np.random.default_rng(0).permutation(10)
    shuffled = StreamingDetector(bundle).process(ReadingBatch.from_arrays(["d"] * 10, ts[perm], values[perm]))
    np.testing.assert_allclose(shuffled.scores, in_order.scores[perm], atol=1e-6, equal_nan=True)


def test_duplicates_and_out_of_order_readings_are_dropped_and_counted():
    det = StreamingDetector(stateful_bundle())
    det.process(ReadingBatch.from_arrays(["d"] * 5, 1000 * np.arange(5), device_series(0, 5)))
    steps_before = int(det.store.steps[det.store.slot_of("d")])
    res = det.process(ReadingBatch.from_arrays(["d", "d", "d", "d"], [4000, 2000, 5000, 5000],
                                               device_series(1, 4)))
    assert [ReadingStatus(s).label for s in res.status] == ["duplicate", "out_of_order", "scored", "duplicate"]
    assert res.counts() == {"scored": 1, "warmup": 0, "duplicate": 2, "out_of_order": 1, "empty": 0, "context": 0}
    assert np.isnan(res.scores[[0, 1, 3]]).all()
    assert det.store.steps[det.store.slot_of("d")] == steps_before + 1


def test_first_readings_of_a_device_are_warmup():
    det = StreamingDetector(stateful_bundle(warmup_steps=4))
    res = det.process(ReadingBatch.from_arrays(["d"] * 6, 1000 * np.arange(6), device_series(0, 6)))
    assert res.counts()["warmup"] == 4 and np.isnan(res.scores[:4]).all() and np.isfinite(res.scores[4:]).all()
    assert np.isnan(res.expected[0]).all() and np.isfinite(res.expected[1:]).all()


@pytest.mark.parametrize("policy, warmups", [("reset", 3 + 3), ("carry", 3)])
def test_gap_policy(policy, warmups):
    det = StreamingDetector(stateful_bundle(gap_policy=policy))
    ts = np.r_[1000 * np.arange(10), 100_000 + 1000 * np.arange(10)].astype(np.int64)
    res = det.process(ReadingBatch.from_arrays(["d"] * 20, ts, device_series(0, 20)))
    assert res.counts()["warmup"] == warmups
    assert res.gap_resets == (1 if policy == "reset" else 0)


def test_gap_reset_inside_a_batch_equals_a_fresh_device():
    bundle = stateful_bundle()
    values = device_series(5, 20)
    ts = np.r_[1000 * np.arange(10), 100_000 + 1000 * np.arange(10)].astype(np.int64)
    both = StreamingDetector(bundle).process(ReadingBatch.from_arrays(["d"] * 20, ts, values))
    fresh = StreamingDetector(bundle).process(ReadingBatch.from_arrays(["d"] * 10, ts[10:], values[10:]))
    np.testing.assert_allclose(both.scores[10:], fresh.scores, atol=1e-6, equal_nan=True)


def test_missing_feature_is_filled_and_contributes_nothing():
    det = StreamingDetector(stateful_bundle())
    values = device_series(0, 12)
    det.process(ReadingBatch.from_arrays(["d"] * 11, 1000 * np.arange(11), values[:11]))
    gap = values[11:].copy()
    gap[0, 0] = np.nan
    gap[0, 1] += 50.0  # b is wildly off, a is missing
    res = det.process(ReadingBatch.from_arrays(["d"], [11_000], gap))
    assert res.counts()["scored"] == 1 and np.isfinite(res.scores[0])
    contributions = det.bundle.scorer.contributions(np.array([[np.nan, 50.0, 0.0]], dtype=np.float32))[0]
    assert contributions[0] == 0.0 and contributions[1] > 0.9


def test_events_name_expected_actual_contributions_and_model():
    det = StreamingDetector(stateful_bundle(threshold=3.0))
    values = np.zeros((30, 3), dtype=np.float32)
    values[20:25, 2] = 40.0
    res = det.process(ReadingBatch.from_arrays(["d"] * 30, 1000 * np.arange(30), values))
    kinds = [e.kind for e in res.events]
    assert kinds[0] == "start" and "end" in kinds
    start = res.events[0]
    assert start.ts_ms == 20_000 and start.row == 20 and start.model_version == "7"
    assert max(start.contributions, key=start.contributions.get) == "c"
    assert start.actual["c"] == 40.0 and set(start.expected) == set(FEATURES)
    assert start.score >= start.threshold
    assert res.anomalous[20] and not res.anomalous[19]


def test_input_contract_is_checked_at_the_boundary():
    det = StreamingDetector(stateful_bundle())
    with pytest.raises(InvalidReadingError, match="expected 3 features"):
        det.process(ReadingBatch.from_arrays(["d"], [0], [[1.0, 2.0]]))
    with pytest.raises(InvalidReadingError, match="infinite"):
        ReadingBatch.from_arrays(["d"], [0], [[1.0, np.inf, 0.0]])
    empty = det.process(ReadingBatch.empty(3))
    assert len(empty.scores) == 0 and empty.events == []


def test_huge_values_score_high_without_overflow():
    det = StreamingDetector(stateful_bundle())
    values = device_series(0, 12)
    values[-1] = 3e38
    res = det.process(ReadingBatch.from_arrays(["d"] * 12, 1000 * np.arange(12), values))
    assert np.isfinite(res.scores[-1]) and res.scores[-1] > 0.9
    assert torch.isfinite(det.store.h).all() and torch.isfinite(det.store.c).all()
    after = det.process(ReadingBatch.from_arrays(["d"], [12_000], device_series(0, 1)))
    assert np.isfinite(after.scores[0])


def test_idle_devices_are_evicted_by_event_time():
    det = StreamingDetector(stateful_bundle())
    det.process(ReadingBatch.from_arrays(["old", "new"], [0, 100_000], np.zeros((2, 3))))
    assert det.evict_idle(now_ms=100_000, ttl_ms=50_000) == ["old"]
    assert "old" not in det.store and "new" in det.store


def test_a_reading_with_every_feature_missing_is_not_scored_as_perfectly_normal():
    det = StreamingDetector(ModelBundle.untrained(["a", "b"], hidden_size=8).with_config(warmup_steps=1))
    det.process(ReadingBatch.from_arrays(["d"] * 3, [0, 1000, 2000], [[0.0, 0.0], [9.0, 9.0], [0.0, 0.0]]))
    before = float(det.store.smoothed[det.store.slot_of("d")])
    res = det.process(ReadingBatch.from_arrays(["d"], [3000], [[np.nan, np.nan]]))
    # it would otherwise score 0 (d² of an all-NaN residual is 0) and pull the smoothed score down
    assert res.status[0] == ReadingStatus.EMPTY and float(det.store.smoothed[det.store.slot_of("d")]) == before


def fleet(n_devices: int = 3, length: int = 60) -> ReadingBatch:
    """Interleaved readings of a few devices, one per second each, with spikes."""
    ids = np.repeat([f"dev{d}" for d in range(n_devices)], length)
    ts = np.tile(1_000_000 + np.arange(length, dtype=np.int64) * 1000, n_devices)
    values = np.concatenate([device_series(d, length) for d in range(n_devices)])
    order = np.argsort(ts, kind="stable")
    return ReadingBatch.from_arrays(ids[order], ts[order], values[order])


def test_novelty_rule_alerts_opens_and_closes_episodes_with_scores_in_range():
    det = StreamingDetector(stateful_bundle(**NOVELTY))
    res = det.process(fleet())
    scored = res.status == ReadingStatus.SCORED
    assert det.score_threshold == pytest.approx(0.05 / 1.05, rel=1e-6)
    assert ((res.scores[scored] >= 0) & (res.scores[scored] <= 1)).all()
    assert ((res.novelty[scored] >= 0) & (res.novelty[scored] < 1)).all() and np.isnan(res.novelty[~scored]).all()
    assert res.alerts.any() and not res.alerts[~scored].any()
    # the alert score reaches the threshold exactly where the detector alerts
    np.testing.assert_array_equal(res.scores[scored] >= np.float32(det.score_threshold), res.alerts[scored])
    kinds = [e.kind for e in res.events]
    assert "start" in kinds and "end" in kinds
    for e in res.events:
        assert e.threshold == det.score_threshold and 0.0 <= e.score <= 1.0
        if e.kind == "start":
            assert res.anomalous[e.row] and e.score >= e.threshold
    assert det.store.novelty is not None


@pytest.mark.parametrize("seasonal", [False, True])
def test_novelty_rule_snapshot_restore_continues_like_an_uninterrupted_detector(seasonal):
    bundle = seasonal_bundle() if seasonal else stateful_bundle(**NOVELTY)
    batch = fleet(length=80)
    first, second = np.arange(len(batch)) < 120, np.arange(len(batch)) >= 120
    whole = StreamingDetector(bundle)
    whole.process(batch.take(np.flatnonzero(first)))
    expected = whole.process(batch.take(np.flatnonzero(second)))

    before = StreamingDetector(bundle)
    before.process(batch.take(np.flatnonzero(first)))
    devices = before.store.devices()
    blob = encode_states(before.store, devices)
    after = StreamingDetector(bundle)
    load_states(after.store, decode_states(blob))
    got = after.process(batch.take(np.flatnonzero(second)))
    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got.novelty, expected.novelty, atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(got.alerts, expected.alerts)
    np.testing.assert_array_equal(got.anomalous, expected.anomalous)
    assert [(e.kind, e.device_id, e.ts_ms) for e in got.events] == [(e.kind, e.device_id, e.ts_ms)
                                                                      for e in expected.events]
    assert expected.alerts.any()  # the continuation is not trivially quiet


def test_novelty_records_and_episode_survive_a_gap_reset_but_not_removal():
    det = StreamingDetector(stateful_bundle(**NOVELTY))
    ts = 1_000_000 + np.arange(30, dtype=np.int64) * 1000
    values = device_series(0, 30)
    values[20:] += 40.0  # a shift that opens a novelty episode and is still going on at the gap
    first = det.process(ReadingBatch.from_arrays(["a"] * 30, ts, values))
    slot = det.store.slot_of("a")
    seen = int(det.store.novelty.seen[slot, 0])
    assert seen == 30 - 3  # every scored reading after the warm-up
    assert first.anomalous[-1] and det.store.in_episode[slot]
    later = ts[-1] + 60_000 + np.arange(5, dtype=np.int64) * 1000  # a gap longer than gap_factor intervals
    res = det.process(ReadingBatch.from_arrays(["a"] * 5, later, device_series(1, 5) + 40.0))
    assert res.gap_resets == 1 and int(det.store.novelty.seen[slot, 0]) == seen + 2  # 3 warm-up readings again
    assert res.anomalous[:3].all() and not [e for e in res.events if e.ts_ms == later[0]]  # no end at the gap
    det.store.remove(["a"])
    assert int(det.store.novelty.seen[slot, 0]) == 0 and np.isnan(det.store.novelty.val_hi[slot]).all()


def test_threshold_rule_alerts_are_episode_starts_and_it_keeps_no_novelty_records():
    det = StreamingDetector(stateful_bundle())
    res = det.process(fleet())
    starts = sorted(e.row for e in res.events if e.kind == "start")
    assert starts and np.flatnonzero(res.alerts).tolist() == starts
    assert np.isnan(res.novelty).all() and det.store.novelty is None


def test_seasonal_profile_survives_a_gap_reset_but_not_removal():
    det = StreamingDetector(seasonal_bundle())
    ts = 1_000_000 + np.arange(20, dtype=np.int64) * 1000
    det.process(ReadingBatch.from_arrays(["a"] * 20, ts, device_series(0, 20)))
    slot = det.store.slot_of("a")
    profile = det.store.season[slot].copy()
    assert det.store.season.shape[1:] == (7, 3) and not np.isnan(profile).any()
    later = ts[-1] + 60_000 + np.arange(3, dtype=np.int64) * 1000  # a gap: the network restarts, warm-up again
    res = det.process(ReadingBatch.from_arrays(["a"] * 3, later, device_series(1, 3)))
    assert res.gap_resets == 1
    assert int(det.store.novelty.seen[slot, 1]) == 20 - 7  # no seasonal surprise in warm-up, the rest kept
    assert np.isfinite(det.store.season[slot]).all() and not np.array_equal(det.store.season[slot], profile)
    det.store.remove(["a"])
    assert np.isnan(det.store.season[slot]).all() and (det.store.novelty.seen[slot] == 0).all()


def test_seasonal_channel_changes_the_novelty_scores_and_only_the_novelty_rule_keeps_a_profile():
    batch = fleet()
    plain = StreamingDetector(stateful_bundle(**NOVELTY)).process(batch)
    det = StreamingDetector(seasonal_bundle())
    seasonal = det.process(batch)
    assert det.store.season is not None and det.store.novelty.n_channels == 2
    assert not np.allclose(np.nan_to_num(plain.novelty), np.nan_to_num(seasonal.novelty))
    np.testing.assert_array_equal(plain.raw_scores, seasonal.raw_scores)  # the forecaster's own scores unchanged
    threshold_rule = StreamingDetector(seasonal_bundle(episode_rule="threshold"))
    threshold_rule.process(batch)
    assert threshold_rule.store.season is None and threshold_rule.store.novelty is None


def test_seasonal_channel_sees_a_cycle_that_skips_its_jump_where_the_forecaster_does_not():
    """A square wave whose 10th cycle stays low: one step at a time every reading of it is predictable
    and inside the value range; against the previous cycle it is 3 units off for half a cycle."""
    period, rng = 24, np.random.default_rng(0)
    t = np.arange(period * 12)
    values = np.where(t % period >= period // 2, 3.0, 0.0) + rng.normal(0, 0.05, len(t))
    skipped = (t // period == 10) & (t % period >= period // 2)
    values[skipped] -= 3.0
    base = ModelBundle.untrained(["x"], hidden_size=4, scorer=NormalErrorModel.fit(rng.normal(0, 0.05, (2000, 1))))
    base = base.with_config(episode_rule="novelty", warmup_steps=2, novelty_learn_readings=period,
                            novelty_refractory=0)
    noise = rng.normal(0, 0.05, (2000, 1)) * np.sqrt(4 / 3)  # a reading minus a 0.5-weighted profile
    with_season = replace(base, seasonal_scorer=NormalErrorModel.fit(noise)).with_config(seasonal_period=period)
    batch = ReadingBatch.from_arrays(["d"] * len(t), t * 1000, values[:, None])
    without = StreamingDetector(base).process(batch)
    seen = StreamingDetector(with_season).process(batch)
    assert not without.alerts[skipped].any()
    assert seen.alerts[skipped].any() and seen.anomalous[skipped].any()
    assert np.flatnonzero(seen.alerts & skipped)[0] <= np.flatnonzero(skipped)[0] + 2  # at the jump that did not come


def switch_on_series(period: int, cycles: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A device that switches on for the second half of every cycle, to a height that varies a little from
    cycle to cycle (2.7-3.3), with noise 0.05; timestamps one second apart."""
    rng = np.random.default_rng(seed)
    t = np.arange(period * cycles)
    height = rng.uniform(2.7, 3.3, cycles)[t // period]
    values = np.where(t % period >= period // 2, height, 0.0) + rng.normal(0, 0.05, len(t))
    return t, values


def switch_on_bundle(period: int, **config) -> ModelBundle:
    """A persistence forecaster whose normal errors have sd 1 (a switch-on of 3 surprises it, uncapped) and
    a seasonal scorer for which the cycle-to-cycle variation of the height is normal (sd 0.5); the
    value-range channel is off, so only the error channels can alert."""
    rng = np.random.default_rng(1)
    base = ModelBundle.untrained(["x"], hidden_size=4, scorer=NormalErrorModel.fit(rng.normal(0, 1.0, (4000, 1))))
    bundle = replace(base, seasonal_scorer=NormalErrorModel.fit(rng.normal(0, 0.5, (4000, 1))))
    return bundle.with_config(**({"episode_rule": "novelty", "warmup_steps": 2, "novelty_learn_readings": 2 * period,
                                  "novelty_refractory": 0, "novelty_value_range": False,
                                  "seasonal_period": period} | config))


def test_a_daily_switch_on_is_explained_by_the_cycle_but_a_switch_on_at_another_time_is_not():
    """The one-step forecaster misses every switch-on by its whole height, a little more on some days than on
    any before: fed its own surprise, its records are beaten again and again. The cycle explains those
    readings, so with ``seasonal_explains`` nothing alerts after learning, until the device switches on in
    the first half of cycle 16, when it never has: that neither channel explains."""
    period, cycles = 24, 20
    t, values = switch_on_series(period, cycles)
    odd = (t // period == 16) & (t % period >= 4) & (t % period < 8)
    values[odd] += 3.0
    batch = ReadingBatch.from_arrays(["d"] * len(t), t * 1000, values[:, None])
    learned = t >= 3 * period
    own = StreamingDetector(switch_on_bundle(period, seasonal_explains=False)).process(batch)
    explained = StreamingDetector(switch_on_bundle(period)).process(batch)
    routine = learned & ~odd & (t < 16 * period)
    switch_rows = (t % period == period // 2) | (t % period == 0)
    assert own.alerts[routine].sum() >= 2 and (own.alerts[routine] <= switch_rows[routine]).all()
    assert not explained.alerts[routine].any()
    assert explained.alerts[odd].any() and np.flatnonzero(explained.alerts & odd)[0] <= np.flatnonzero(odd)[0] + 1


# ------------------------------------------------------------------------------------ context inputs


def context_bundle(head: bool = True, **config) -> ModelBundle:
    """Features a, b and context input "mode"; ``head``: forecasts depend on the state (and so on the context)."""
    torch.manual_seed(2)
    scorer = NormalErrorModel.fit(np.random.default_rng(0).normal(scale=0.3, size=(2000, 2)))
    bundle = ModelBundle.untrained(("a", "b"), hidden_size=8, scorer=scorer, version="9", context=("mode",))
    if head:
        with torch.no_grad():
            bundle.model.head.weight.normal_(0, 0.3)
    return bundle.with_config(**({"warmup_steps": 3, "threshold": 3.0, "cooldown": 2, "nominal_interval_ms": 1000}
                                 | config))


def context_series(length: int = 40) -> np.ndarray:
    """[length, 3]: a, b (small noise) and mode (0)."""
    values = np.zeros((length, 3), dtype=np.float32)
    values[:, :2] = np.random.default_rng(5).normal(scale=0.05, size=(length, 2))
    return values


def test_a_change_in_a_context_column_alone_raises_nothing_while_the_same_change_in_a_feature_does():
    ts = 1000 * np.arange(40)
    commanded = context_series()
    commanded[20:, 2] = 40.0  # the mode jumps and stays
    res = StreamingDetector(context_bundle(head=False)).process(ReadingBatch.from_arrays(["d"] * 40, ts, commanded))
    assert res.events == [] and not res.anomalous.any() and res.counts()["scored"] == 37
    assert res.expected.shape == (40, 2)  # no forecast of the context input
    sensed = context_series()
    sensed[20:, 1] = 40.0  # the same jump in feature b
    res = StreamingDetector(context_bundle(head=False)).process(ReadingBatch.from_arrays(["d"] * 40, ts, sensed))
    start = res.events[0]
    assert start.kind == "start" and start.ts_ms == 20_000
    assert set(start.contributions) == set(start.expected) == set(start.actual) == {"a", "b"}


def test_context_reaches_the_network_and_a_missing_value_is_the_last_known_one():
    ts = 1000 * np.arange(12)
    given = context_series(12)
    given[6:, 2] = 2.0
    sparse = given.copy()
    sparse[[1, 2, 3, 7, 8, 11], 2] = np.nan  # the mode only when it changes (and a few repeats)
    full_det, sparse_det = StreamingDetector(context_bundle()), StreamingDetector(context_bundle())
    full = full_det.process(ReadingBatch.from_arrays(["d"] * 12, ts, given))
    part = sparse_det.process(ReadingBatch.from_arrays(["d"] * 12, ts, sparse))
    np.testing.assert_array_equal(full.scores, part.scores)
    assert torch.equal(full_det.store.h, sparse_det.store.h)
    unchanged = StreamingDetector(context_bundle()).process(ReadingBatch.from_arrays(["d"] * 12, ts,
                                                                                    context_series(12)))
    assert not np.allclose(full.scores[7:], unchanged.scores[7:])  # the mode did change the forecasts


def test_a_context_only_reading_updates_the_context_and_nothing_else():
    bundle = context_bundle()
    values = context_series(8)
    values[5:, 2] = 3.0
    together = StreamingDetector(bundle)
    together.process(ReadingBatch.from_arrays(["d"] * 8, 1000 * np.arange(8), values))
    # the same readings without the mode, and the mode change as a command of its own at 4,500 ms
    apart = StreamingDetector(bundle)
    values_apart = values.copy()
    values_apart[:, 2] = np.nan
    values_apart[0, 2] = 0.0
    command = np.array([[np.nan, np.nan, 3.0]], dtype=np.float32)
    first = apart.process(ReadingBatch.from_arrays(["d"] * 5, 1000 * np.arange(5), values_apart[:5]))
    res = apart.process(ReadingBatch.from_arrays(["d"] * 4, [6000, 4500, 7000, 5000],
                                                 np.concatenate([values_apart[[6]], command, values_apart[[7, 5]]])))
    assert [ReadingStatus(s).label for s in res.status] == ["scored", "context", "scored", "scored"]
    assert np.isnan(res.scores[1]) and np.isnan(res.expected[1]).all() and first.counts()["context"] == 0
    assert apart.store.steps[0] == together.store.steps[0] == 8
    assert torch.equal(apart.store.h, together.store.h)
    # a command after the last reading is kept for the next call; an old one is out of order
    later = apart.process(ReadingBatch.from_arrays(["d", "d"], [7500, 3000],
                                                   np.array([[np.nan, np.nan, -1.0], [np.nan, np.nan, 9.0]],
                                                            dtype=np.float32)))
    assert [ReadingStatus(s).label for s in later.status] == ["context", "out_of_order"]
    assert apart.store.last_context[0, 0] == -1.0 and apart.store.steps[0] == 8 and apart.store.last_ts[0] == 7000
    empty = apart.process(ReadingBatch.from_arrays(["d"], [8000], np.full((1, 3), np.nan, dtype=np.float32)))
    assert ReadingStatus(empty.status[0]).label == "empty"


def test_context_state_survives_a_snapshot_and_a_gap_reset():
    bundle = context_bundle(gap_factor=3.0)
    values = context_series(20)
    values[:, 2] = np.nan
    values[0, 2] = 4.0
    det = StreamingDetector(bundle)
    det.process(ReadingBatch.from_arrays(["d"] * 10, 1000 * np.arange(10), values[:10]))
    restored = StreamingDetector(bundle)
    load_states(restored.store, decode_states(encode_states(det.store, ["d"])))
    after_gap = 1000 * np.arange(10) + 60_000  # a gap: the network restarts, the mode is still known
    a = det.process(ReadingBatch.from_arrays(["d"] * 10, after_gap, values[10:]))
    b = restored.process(ReadingBatch.from_arrays(["d"] * 10, after_gap, values[10:]))
    assert a.gap_resets == 1 and det.store.last_context[0, 0] == 4.0
    np.testing.assert_array_equal(a.scores, b.scores)


def test_a_batch_without_the_context_columns_is_refused():
    det = StreamingDetector(context_bundle())
    with pytest.raises(InvalidReadingError, match=r"expected 2 features \['a', 'b'\] and 1 context inputs"):
        det.process(ReadingBatch.from_arrays(["d"], [0], [[1.0, 2.0]]))
