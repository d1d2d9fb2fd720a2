"""Tests of anomaly/adaptation.py: novelty records, alerts, refractory periods and novelty episodes."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly.adaptation import NoveltyConfig, NoveltyRecords, NoveltySteps, novelty_from_excess, novelty_step


class NoveltyTracker:
    """Slot-addressed records and episode flags, the way the detector keeps them in its state store."""

    def __init__(self, config: NoveltyConfig, n_features: int, capacity: int = 8):
        self.config, self.n_features = config, n_features
        self.records = NoveltyRecords.empty(capacity, len(config.alphas), n_features)
        self.in_episode = np.zeros(capacity, dtype=bool)
        self.calm = np.zeros(capacity, dtype=np.int64)

    def step(self, slots: np.ndarray, surprise: np.ndarray, values: np.ndarray, valid: np.ndarray) -> NoveltySteps:
        rows = self.records.take(slots)
        out = novelty_step(self.config, rows, self.in_episode[slots], self.calm[slots], surprise, values, valid)
        self.records.put(slots, rows)
        self.in_episode[slots], self.calm[slots] = out.in_episode, out.calm_run
        return out

    @property
    def val_hi(self) -> np.ndarray:
        return self.records.val_hi

    @property
    def val_lo(self) -> np.ndarray:
        return self.records.val_lo


def _values_only(**overrides: object) -> NoveltyConfig:
    settings: dict[str, object] = {"learn_readings": 0, "refractory": 0}
    settings.update(overrides)
    return NoveltyConfig(**settings)  # type: ignore[arg-type]


def _calm(n: int, seed: int = 0) -> np.ndarray:
    """Readings that fill [0, 1] (with both ends seen first), so the range is settled."""
    return np.r_[0.0, 1.0, np.random.default_rng(seed).uniform(0, 1, n - 2)]


def _step(tracker: NoveltyTracker, surprise: np.ndarray, values: np.ndarray | None = None, slot: int = 0):
    t = len(surprise)
    vals = np.zeros((1, t, tracker.n_features)) if values is None else values.reshape(1, t, -1)
    return tracker.step(np.array([slot]), surprise[None], vals, np.ones((1, t), bool))


def test_threshold_means_a_record_beaten_by_the_tolerance() -> None:
    cfg = NoveltyConfig(tolerance=0.05)
    assert cfg.threshold == pytest.approx(0.05 / 1.05)
    assert novelty_from_excess(np.array([0.049]))[0] < cfg.threshold <= novelty_from_excess(np.array([0.05]))[0]


@pytest.mark.parametrize(("jump", "alerts"), [(1.04, False), (1.20, True)])
def test_value_outside_the_range_seen_alerts_only_beyond_the_tolerance(jump: float, alerts: bool) -> None:
    tracker = NoveltyTracker(_values_only(value_range=True, alphas=(0.3,), learn_readings=5), n_features=1)
    values = np.r_[_calm(50), jump]
    out = _step(tracker, np.zeros(51), values)
    assert bool(out.alerts[0, -1]) is alerts
    assert not out.alerts[0, :-1].any()


def test_error_burst_beyond_every_earlier_burst_alerts_and_opens_an_episode_that_closes() -> None:
    cfg = _values_only(value_range=False, alphas=(0.3, 0.1), cooldown=3)
    tracker = NoveltyTracker(cfg, n_features=1)
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
    tracker = NoveltyTracker(cfg, n_features=1)
    values = np.r_[_calm(30), 2.0, 3.0, np.zeros(20), 10.0]
    out = _step(tracker, np.zeros(len(values)), values)
    assert np.flatnonzero(out.alerts[0]).tolist() == [30, len(values) - 1]
    assert out.novelty[0, 31] >= cfg.threshold > out.alert_score[0, 31]


def test_ranges_shrink_towards_their_midpoint_not_towards_zero() -> None:
    cfg = _values_only(value_range=True, half_life=100.0)
    tracker = NoveltyTracker(cfg, n_features=1)
    values = np.r_[0.5, 0.9, np.full(400, 0.7)]
    _step(tracker, np.zeros(len(values)), values)
    lo, hi = float(tracker.val_lo[0, 0]), float(tracker.val_hi[0, 0])
    assert 0.5 < lo < 0.7 < hi < 0.9
    assert (lo + hi) / 2 == pytest.approx(0.7, abs=1e-6)


def test_learning_period_builds_records_without_alerting() -> None:
    tracker = NoveltyTracker(_values_only(value_range=True, learn_readings=20), n_features=1)
    out = _step(tracker, np.zeros(30), np.r_[np.arange(20.0), 40.0, np.zeros(9)])
    assert not out.alerts[0, :20].any() and out.alerts[0, 20]


def test_devices_stepped_together_or_apart_and_in_chunks_get_the_same_outputs() -> None:
    rng = np.random.default_rng(0)
    b, t, f = 3, 120, 2
    surprise = rng.exponential(0.43, (b, t)) * (1 + 5 * (rng.random((b, t)) > 0.97))
    values = rng.normal(size=(b, t, f))
    valid = rng.random((b, t)) > 0.1
    cfg = NoveltyConfig(learn_readings=10, refractory=5)
    together = NoveltyTracker(cfg, f).step(np.arange(b), surprise, values, valid)
    apart = NoveltyTracker(cfg, f)
    chunked = NoveltyTracker(cfg, f)
    for i in range(b):
        one = apart.step(np.array([i]), surprise[i:i + 1], values[i:i + 1], valid[i:i + 1])
        for name in ("novelty", "alert_score", "alerts", "anomalous"):
            np.testing.assert_array_equal(getattr(one, name)[0], getattr(together, name)[i])
    first = chunked.step(np.arange(b), surprise[:, :50], values[:, :50], valid[:, :50])
    second = chunked.step(np.arange(b), surprise[:, 50:], values[:, 50:], valid[:, 50:])
    np.testing.assert_array_equal(np.concatenate([first.alerts, second.alerts], axis=1), together.alerts)
    np.testing.assert_allclose(np.concatenate([first.novelty, second.novelty], axis=1), together.novelty)
    assert together.alerts.any() and together.anomalous.any()


def test_missing_features_neither_alert_nor_move_the_range() -> None:
    tracker = NoveltyTracker(_values_only(value_range=True, learn_readings=5), n_features=2)
    values = np.c_[_calm(40), _calm(40, seed=1)]
    values[-1] = [np.nan, 0.5]
    out = _step(tracker, np.zeros(40), values)
    assert not out.alerts.any()
    assert tracker.val_hi[0, 0] == pytest.approx(1.0, rel=1e-3)


def test_reset_forgets_a_device() -> None:
    tracker = NoveltyTracker(_values_only(value_range=True), n_features=1)
    _step(tracker, np.zeros(10), np.arange(10.0))
    tracker.records.reset(np.array([0]))
    assert np.isnan(tracker.val_hi[0, 0]) and tracker.records.seen[0] == 0


@pytest.mark.parametrize("bad", [{"alphas": ()}, {"alphas": (0.0,)}, {"tolerance": 0.0}, {"half_life": 0.0},
                                 {"refractory": -1}, {"cooldown": 0}, {"learn_readings": 1.5},
                                 {"value_range": "yes"}])
def test_config_rejects_bad_settings_naming_them(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        NoveltyConfig(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("channels", [1, 2])
def test_records_flatten_for_snapshots_and_back(channels: int):
    rec = NoveltyRecords.empty(3, n_alphas=2, n_features=2, n_channels=channels)
    rec.ema[:] = np.arange(6 * channels).reshape(3, -1) / 10
    rec.val_hi[1], rec.seen[2], rec.since_alert[0], rec.entry_level[1] = [1.0, 2.0], 5, 7, 0.25
    floats, ints = rec.to_arrays()
    back = NoveltyRecords.from_arrays(floats, ints, n_alphas=2, n_channels=channels)
    for name in ("ema", "err_record", "val_hi", "val_lo", "entry_level", "seen", "since_alert"):
        np.testing.assert_array_equal(getattr(back, name), getattr(rec, name))
    assert (back.n_alphas, back.n_channels) == (2, channels)
    assert rec.nbytes() == 3 * rec.nbytes_per_slot


def _two_channels(config: NoveltyConfig, first: np.ndarray, second: np.ndarray):
    rec = NoveltyRecords.empty(1, len(config.alphas), 1, n_channels=2)
    t = len(first)
    out = novelty_step(config, rec, np.zeros(1, bool), np.zeros(1), np.stack([first, second], axis=1)[None],
                       np.zeros((1, t, 1)), np.ones((1, t), bool))
    return rec, out


def test_a_second_error_channel_has_records_and_a_learning_period_of_its_own() -> None:
    cfg = NoveltyConfig(learn_readings=20, refractory=0, value_range=False)
    rng = np.random.default_rng(0)
    first = rng.exponential(0.43, 200)
    second = np.r_[np.full(60, np.nan), 2.0 + rng.exponential(0.1, 100), np.full(40, 2.0)]  # no reference at first
    second[180:] = 8.0  # its own level is ~2: 8 is novel for it, though the first channel never saw less
    rec, out = _two_channels(cfg, first, second)
    assert rec.seen[0].tolist() == [200, 140]  # NaN readings were ignored, not counted as 0
    assert not out.alerts[0, 60:80].any()  # the second channel's learning period, after its first reading
    assert out.alerts[0, 180] and out.anomalous[0, 180]  # a beaten record of either channel opens an episode
    # one shared record would have been set by the noisier channel: here channel 0's stays low
    assert rec.err_record[0, 0] < 4.0 and rec.err_record[0, 2] >= 8.0 * 0.3


def test_an_episode_lasts_until_every_channel_is_back_within_its_record() -> None:
    cfg = NoveltyConfig(learn_readings=10, refractory=0, value_range=False, cooldown=2)
    calm = np.full(200, 0.43)
    first, second = calm.copy(), calm.copy()
    first[30:35] = 6.0  # an error burst on channel 0 opens the episode ...
    second[30:50] = 6.0  # ... and channel 1 stays high longer
    _, out = _two_channels(cfg, first, second)
    both = out.anomalous[0]
    _, alone = _two_channels(cfg, first, calm)
    assert both[30] and alone.anomalous[0, 30]
    assert np.flatnonzero(both).max() > np.flatnonzero(alone.anomalous[0]).max() >= 34
    assert not both[-1]


def test_surprise_must_match_the_records_channels() -> None:
    rec = NoveltyRecords.empty(1, n_alphas=2, n_features=1, n_channels=2)
    with pytest.raises(ValueError, match="2 channel"):
        novelty_step(NoveltyConfig(), rec, np.zeros(1, bool), np.zeros(1), np.zeros((1, 3)), np.zeros((1, 3, 1)),
                     np.ones((1, 3), bool))
