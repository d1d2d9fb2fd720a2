"""Tests of anomaly/adaptation.py: novelty records, alerts, refractory periods and novelty episodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly.adaptation import AdaptiveDetector, NoveltyConfig, NoveltyTracker, novelty_from_excess
from anomaly.bundle import ModelBundle
from anomaly.detector import StreamingDetector
from anomaly.events import ReadingStatus
from anomaly.readings import ReadingBatch


def _values_only(**overrides: object) -> NoveltyConfig:
    settings: dict[str, object] = {"learn_readings": 0, "state_range": False, "refractory": 0}
    settings.update(overrides)
    return NoveltyConfig(**settings)  # type: ignore[arg-type]


def _calm(n: int, seed: int = 0) -> np.ndarray:
    """Readings that fill [0, 1] (with both ends seen first), so the range is settled."""
    return np.r_[0.0, 1.0, np.random.default_rng(seed).uniform(0, 1, n - 2)]


def _step(tracker: NoveltyTracker, surprise: np.ndarray, values: np.ndarray | None = None, slot: int = 0):
    t = len(surprise)
    vals = np.zeros((1, t, tracker.n_features)) if values is None else values.reshape(1, t, -1)
    return tracker.step(np.array([slot]), surprise[None], vals, None, np.ones((1, t), bool))


def test_threshold_means_a_record_beaten_by_the_tolerance() -> None:
    cfg = NoveltyConfig(tolerance=0.05)
    assert cfg.threshold == pytest.approx(0.05 / 1.05)
    assert novelty_from_excess(np.array([0.049]))[0] < cfg.threshold <= novelty_from_excess(np.array([0.05]))[0]


@pytest.mark.parametrize(("jump", "alerts"), [(1.04, False), (1.20, True)])
def test_value_outside_the_range_seen_alerts_only_beyond_the_tolerance(jump: float, alerts: bool) -> None:
    tracker = NoveltyTracker(_values_only(value_range=True, alphas=(0.3,), learn_readings=5), n_features=1,
                             hidden_size=0)
    values = np.r_[_calm(50), jump]
    out = _step(tracker, np.zeros(51), values)
    assert bool(out.alerts[0, -1]) is alerts
    assert not out.alerts[0, :-1].any()


def test_error_burst_beyond_every_earlier_burst_alerts_and_opens_an_episode_that_closes() -> None:
    cfg = _values_only(value_range=False, alphas=(0.3, 0.1), cooldown=3)
    tracker = NoveltyTracker(cfg, n_features=1, hidden_size=0)
    surprise = np.r_[np.full(200, 0.4), np.full(5, 3.0), np.full(20, 0.4), np.full(30, 8.0), np.full(200, 0.4)]
    out = _step(tracker, surprise)
    alerts = np.flatnonzero(out.alerts[0])
    assert alerts[0] == 200  # the first burst beats the records of a quiet device
    assert any(225 <= a < 230 for a in alerts)  # a larger burst beats the record that the first one set
    assert not any(205 <= a < 225 for a in alerts)
    inside = out.anomalous[0]
    assert inside[200] and inside[230] and not inside[-1]
    # the episode ends once the slow average is back within the record it had beaten
    assert not inside[199]


def test_refractory_period_suppresses_alerts_and_caps_the_alert_score() -> None:
    cfg = _values_only(value_range=True, refractory=10, alphas=(0.3,), learn_readings=5)
    tracker = NoveltyTracker(cfg, n_features=1, hidden_size=0)
    values = np.r_[_calm(30), 2.0, 3.0, np.zeros(20), 10.0]
    out = _step(tracker, np.zeros(len(values)), values)
    assert np.flatnonzero(out.alerts[0]).tolist() == [30, len(values) - 1]
    assert out.novelty[0, 31] >= cfg.threshold > out.alert_score[0, 31]


def test_ranges_shrink_towards_their_midpoint_not_towards_zero() -> None:
    cfg = _values_only(value_range=True, half_life=100.0)
    tracker = NoveltyTracker(cfg, n_features=1, hidden_size=0)
    values = np.r_[0.5, 0.9, np.full(400, 0.7)]
    _step(tracker, np.zeros(len(values)), values)
    lo, hi = float(tracker.val_lo[0, 0]), float(tracker.val_hi[0, 0])
    assert 0.5 < lo < 0.7 < hi < 0.9
    assert (lo + hi) / 2 == pytest.approx(0.7, abs=1e-6)


def test_learning_period_builds_records_without_alerting() -> None:
    tracker = NoveltyTracker(_values_only(value_range=True, learn_readings=20), n_features=1, hidden_size=0)
    out = _step(tracker, np.zeros(30), np.r_[np.arange(20.0), 40.0, np.zeros(9)])
    assert not out.alerts[0, :20].any() and out.alerts[0, 20]


def test_devices_stepped_together_or_apart_and_in_chunks_get_the_same_outputs() -> None:
    rng = np.random.default_rng(0)
    b, t, f, h = 3, 120, 2, 4
    surprise = rng.exponential(0.43, (b, t)) * (1 + 5 * (rng.random((b, t)) > 0.97))
    values, hidden = rng.normal(size=(b, t, f)), np.tanh(rng.normal(size=(b, t, h)))
    valid = rng.random((b, t)) > 0.1
    cfg = NoveltyConfig(learn_readings=10, refractory=5)
    together = NoveltyTracker(cfg, f, h).step(np.arange(b), surprise, values, hidden, valid)
    apart = NoveltyTracker(cfg, f, h, capacity=1)
    chunked = NoveltyTracker(cfg, f, h)
    for i in range(b):
        one = apart.step(np.array([i]), surprise[i:i + 1], values[i:i + 1], hidden[i:i + 1], valid[i:i + 1])
        for name in ("novelty", "alert_score", "alerts", "anomalous"):
            np.testing.assert_array_equal(getattr(one, name)[0], getattr(together, name)[i])
    first = chunked.step(np.arange(b), surprise[:, :50], values[:, :50], hidden[:, :50], valid[:, :50])
    second = chunked.step(np.arange(b), surprise[:, 50:], values[:, 50:], hidden[:, 50:], valid[:, 50:])
    np.testing.assert_array_equal(np.concatenate([first.alerts, second.alerts], axis=1), together.alerts)
    np.testing.assert_allclose(np.concatenate([first.novelty, second.novelty], axis=1), together.novelty)
    assert together.alerts.any() and together.anomalous.any()


def test_missing_features_neither_alert_nor_move_the_range() -> None:
    tracker = NoveltyTracker(_values_only(value_range=True, learn_readings=5), n_features=2, hidden_size=0)
    values = np.c_[_calm(40), _calm(40, seed=1)]
    values[-1] = [np.nan, 0.5]
    out = _step(tracker, np.zeros(40), values)
    assert not out.alerts.any()
    assert tracker.val_hi[0, 0] == pytest.approx(1.0, rel=1e-3)


def test_reset_forgets_a_device() -> None:
    tracker = NoveltyTracker(_values_only(value_range=True), n_features=1, hidden_size=0)
    _step(tracker, np.zeros(10), np.arange(10.0))
    tracker.reset(np.array([0]))
    assert np.isnan(tracker.val_hi[0, 0]) and tracker.seen[0] == 0


@pytest.mark.parametrize("bad", [{"alphas": ()}, {"alphas": (0.0,)}, {"tolerance": 0.0}, {"half_life": 0.0},
                                 {"refractory": -1}, {"cooldown": 0}, {"learn_readings": 1.5}])
def test_config_rejects_bad_settings_naming_them(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        NoveltyConfig(**bad)  # type: ignore[arg-type]


def _detector(hidden: int = 4) -> StreamingDetector:
    torch.manual_seed(0)
    return StreamingDetector(ModelBundle.untrained(["x", "y"], hidden_size=hidden).with_config(warmup_steps=3))


def test_adaptive_detector_keeps_the_detectors_results_and_scores_a_fleet_like_one_device_at_a_time() -> None:
    rng = np.random.default_rng(1)
    n = 300
    t = np.arange(n)
    a = np.c_[np.sin(t / 5), np.cos(t / 7)] + rng.normal(0, 0.05, (n, 2))
    b = np.c_[np.cos(t / 4), np.sin(t / 9)] + rng.normal(0, 0.05, (n, 2))
    a[250], b[200] = [6.0, 0.0], [0.0, -6.0]
    ids = np.r_[np.full(n, "a"), np.full(n, "b")].astype(object)
    ts = np.r_[t, t] * 1000
    order = np.lexsort((ids, ts))  # interleaved, as a fleet arrives
    batch = ReadingBatch.from_arrays(ids[order], ts[order], np.r_[a, b][order])
    cfg = NoveltyConfig(learn_readings=50)
    fleet = AdaptiveDetector(_detector(), cfg).process(batch)
    alone_a = AdaptiveDetector(_detector(), cfg).process(ReadingBatch.from_arrays(["a"] * n, t * 1000, a))
    where_a = np.flatnonzero(batch.device_ids == "a")
    np.testing.assert_allclose(fleet.novelty[where_a], alone_a.novelty)
    np.testing.assert_array_equal(fleet.result.status[where_a], alone_a.result.status)
    assert fleet.alerts[where_a].sum() >= 1 and np.flatnonzero(alone_a.alerts).max() == 250
    for event in fleet.result.events:  # events point at rows of the whole batch
        assert batch.device_ids[event.row] == event.device_id


def test_adaptive_detector_surprise_is_nan_where_the_detector_did_not_score() -> None:
    det = AdaptiveDetector(_detector(), NoveltyConfig(learn_readings=0))
    batch = ReadingBatch.from_arrays(["a"] * 6, [0, 1000, 2000, 2000, 3000, 4000], np.ones((6, 2)))
    out = det.process(batch)
    scored = out.result.status == ReadingStatus.SCORED
    assert np.isnan(out.surprise[~scored]).all() and np.isfinite(out.surprise[scored]).all()
    assert (out.novelty[~scored] == 0).all()
    det.close()
    assert det._hook is None


def test_surprise_can_come_from_the_detectors_own_scores() -> None:
    batch = ReadingBatch.from_arrays(["a"] * 40, np.arange(40) * 1000, np.c_[np.sin(np.arange(40.0)), np.ones(40)])
    out = AdaptiveDetector(_detector(), NoveltyConfig(), surprise="detector").process(batch)
    scored = out.result.status == ReadingStatus.SCORED
    expected = -np.log10(1.0 - out.result.raw_scores[scored].astype(np.float64))
    np.testing.assert_allclose(out.surprise[scored], expected)
    with pytest.raises(ValueError, match="surprise"):
        AdaptiveDetector(_detector(), surprise="magic")  # type: ignore[arg-type]
