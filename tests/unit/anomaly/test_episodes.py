"""EpisodePolicy: hysteresis, minimum duration, cooldown, unscored steps."""

import numpy as np
import pytest

from anomaly.episodes import EpisodePolicy


def run(policy, values, scored=None, in_ep=False, run_len=0):
    m = np.array([values], dtype=np.float32)
    ok = np.ones_like(m, dtype=bool) if scored is None else np.array([scored])
    return policy.run(m, ok, np.array([in_ep]), np.array([run_len]))


def test_one_start_and_one_end_per_episode_not_one_per_reading():
    tr = run(EpisodePolicy(enter=3, exit=1, min_duration=1, cooldown=2), [0, 5, 5, 5, 2, 0.5, 0.5, 0, 5])
    assert np.flatnonzero(tr.started[0]).tolist() == [1, 8]
    assert np.flatnonzero(tr.ended[0]).tolist() == [6]
    assert tr.in_episode[0].tolist() == [False, True, True, True, True, True, False, False, True]


def test_min_duration_ignores_short_blips():
    tr = run(EpisodePolicy(enter=3, exit=1, min_duration=3, cooldown=1), [5, 5, 0, 5, 5, 5])
    assert np.flatnonzero(tr.started[0]).tolist() == [5]


def test_hysteresis_keeps_episode_open_between_exit_and_enter():
    tr = run(EpisodePolicy(enter=3, exit=1, cooldown=1), [5, 2, 2, 2, 0.5])
    assert np.flatnonzero(tr.ended[0]).tolist() == [4]


def test_unscored_steps_change_nothing_and_state_carries_over():
    policy = EpisodePolicy(enter=3, exit=1, min_duration=2, cooldown=1)
    first = run(policy, [5, 9], scored=[True, False])
    assert not first.started.any() and first.final_run_length[0] == 1
    second = run(policy, [5], in_ep=first.final_in_episode[0], run_len=first.final_run_length[0])
    assert second.started[0, 0]


def test_rejects_inconsistent_thresholds():
    with pytest.raises(ValueError, match="must not exceed"):
        EpisodePolicy(enter=1, exit=2)
    with pytest.raises(ValueError, match=">= 1"):
        EpisodePolicy(enter=2, exit=1, cooldown=0)
