"""Deciding anomaly episodes from smoothed scores: threshold with hysteresis and minimum duration.

Why it exists: scoring (``anomaly.scoring``) says how unusual a reading is; this module decides
when a device *enters* and *leaves* an anomaly, so operators get one ``start`` and one ``end``
event per episode, never one event per reading. Thresholds live here, so they can be
recalibrated without retraining the model.

Rule: outside an episode, a device enters one after ``min_duration`` consecutive scored readings
with smoothed surprise ≥ ``enter``; inside, it leaves after ``cooldown`` consecutive scored
readings with smoothed surprise < ``exit`` (``exit ≤ enter``: hysteresis). Readings that are not
scored (warm-up, dropped) change nothing. Flagged readings still advance the device's LSTM state:
the model must keep tracking the device to notice when it is back to normal.

Shapes: B devices in the batch, T steps; state vectors ``[B]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["EpisodePolicy", "EpisodeTransitions"]


@dataclass(frozen=True)
class EpisodeTransitions:
    """Where episodes started and ended: ``[B, T]`` bool masks, plus the state after the last step."""

    started: np.ndarray
    ended: np.ndarray
    in_episode: np.ndarray  # [B, T] after each step
    final_in_episode: np.ndarray  # [B]
    final_run_length: np.ndarray  # [B]


@dataclass(frozen=True)
class EpisodePolicy:
    """Hysteresis thresholds in surprise units (see :mod:`anomaly.scoring`).

    Examples
    --------
    >>> p = EpisodePolicy(enter=3.0, exit=1.5, min_duration=2, cooldown=2)
    >>> m = np.array([[4.0, 4.0, 2.0, 1.0, 1.0, 1.0]])
    >>> tr = p.run(m, np.ones_like(m, dtype=bool), np.array([False]), np.array([0]))
    >>> np.flatnonzero(tr.started[0]).tolist(), np.flatnonzero(tr.ended[0]).tolist()
    ([1], [4])
    """

    enter: float
    exit: float
    min_duration: int = 1
    cooldown: int = 3

    def __post_init__(self) -> None:
        if not self.exit <= self.enter:
            raise ValueError(f"exit threshold ({self.exit}) must not exceed enter threshold ({self.enter})")
        if self.min_duration < 1 or self.cooldown < 1:
            raise ValueError("min_duration and cooldown must be >= 1 reading")

    def run(self, smoothed: np.ndarray, scored: np.ndarray, in_episode: np.ndarray,
            run_length: np.ndarray) -> EpisodeTransitions:
        """Advance the episode state of B devices through T steps.

        Parameters
        ----------
        smoothed : ``[B, T]`` smoothed surprise; scored : ``[B, T]`` bool, steps that count;
        in_episode : ``[B]`` bool and run_length : ``[B]`` int, the state before the first step.
        """
        b, t_steps = smoothed.shape
        started = np.zeros((b, t_steps), dtype=bool)
        ended = np.zeros((b, t_steps), dtype=bool)
        inside = np.zeros((b, t_steps), dtype=bool)
        ep = in_episode.astype(bool).copy()
        run = run_length.astype(np.int32).copy()
        for t in range(t_steps):
            ok = scored[:, t]
            m = smoothed[:, t]
            counting = np.where(ep, m < self.exit, m >= self.enter) & ok
            run = np.where(ok, np.where(counting, run + 1, 0), run)
            start = ok & ~ep & (run >= self.min_duration)
            end = ok & ep & (run >= self.cooldown)
            flip = start | end
            ep = ep ^ flip
            run = np.where(flip, 0, run)
            started[:, t] = start
            ended[:, t] = end
            inside[:, t] = ep
        return EpisodeTransitions(started, ended, inside, ep, run)
