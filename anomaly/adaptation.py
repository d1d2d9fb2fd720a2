"""Novelty alerts: per-device records of what a device has done, and an alert when it does something new.

Why it exists: a forecaster's surprise says how unlikely one reading is under the error model fitted
at training time. On real devices that model drifts out of date (the noise level changes, a load
pattern appears that training never saw), so a fixed threshold on surprise either floods operators
or misses things. What an operator wants paged for is *novelty*: the device doing something it has
not done before. This module keeps, per device, decaying *records* of three things and raises an
alert when a reading beats one of them by a relative margin (``tolerance``):

- **error records**: the largest exponential moving average of surprise seen so far, at a fast and a
  slow time scale (``alphas``). A burst of errors larger than any before is novel; a device whose
  errors are always large stops alerting once its records have grown to that level.
- **value range**: per feature, the highest and lowest (scaled) value seen so far; a reading outside
  that range by more than ``tolerance`` of its width is novel (HTM's "spatial anomaly" in NAB).
- **state range**: the same per unit of the LSTM's hidden state, so a *pattern* the network never
  had to represent is novel even when each value lies inside its range.

Records decay with ``half_life`` readings (error records towards zero, ranges towards their own
midpoint), so a device becomes sensitive again long after one large incident.

Two outputs come from the novelty score. An *alert* (a page) is raised when a record is beaten,
except for ``refractory`` readings after the previous alert: further novelty then is the same
incident. A novelty *episode* (the device's state) opens when an error record is beaten and lasts
until the slowest error average is back at or below the record it beat, for ``cooldown`` readings:
the state is about errors, so it opens and closes on them, while a value or state leaving its range
is an alert (an event) that need not mean the device's behaviour has changed.

The novelty score of a reading is ``1 - 1/(1 + e)`` where ``e`` is the largest relative excess over a
record (0 when no record is beaten), so the alert threshold ``1 - 1/(1 + tolerance)`` means "a record
beaten by ``tolerance``". :class:`NoveltyTracker` does the per-step arithmetic for B devices at once
(the same T-step loop shape as :func:`anomaly.scoring.smooth_surprise`), so it can move into
``StreamingDetector._run_pass`` unchanged; :class:`AdaptiveDetector` runs it today around an unmodified
:class:`~anomaly.detector.StreamingDetector`, recovering each reading's residual from
``ProcessResult.expected`` and the network's hidden states with a forward hook.

What it must not do: train or change the model, decide the detector's own episodes, or know about
Kafka. :class:`AdaptiveDetector` calls the detector once per device in a batch (a per-device Python
loop); that is fine for evaluation and notebooks, not for the service hot path (see above).

Shapes: B devices in a call, T steps, F features, H hidden units, A error time scales, C capacity.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from anomaly.detector import StreamingDetector
from anomaly.events import ProcessResult, ReadingStatus
from anomaly.readings import ReadingBatch

__all__ = ["AdaptiveDetector", "AdaptiveResult", "NoveltyConfig", "NoveltyTracker", "novelty_from_excess"]

logger = logging.getLogger(__name__)

MIN_ERROR_RECORD = 0.5
"""Error records never fall below this smoothed surprise: under a calibrated error model surprise
averages ``1/ln 10 ≈ 0.43``, so beating a record below that would be beating noise (a perfectly
predicted flat series has records of 0 otherwise)."""

MIN_RANGE_WIDTH = 1e-6
"""Smallest value/state range width (scaled units) used as the denominator of an excess; a device that
has been constant so far alerts on any change, which is what a constant sensor leaving its value means."""


def novelty_from_excess(excess: np.ndarray) -> np.ndarray:
    """Map a relative excess over a record (``e >= 0``) to a novelty score ``1 - 1/(1 + e)`` in [0, 1).

    >>> novelty_from_excess(np.array([0.0, 0.05, 1.0, np.inf])).round(4).tolist()
    [0.0, 0.0476, 0.5, 1.0]
    """
    e = np.maximum(np.asarray(excess, dtype=np.float64), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.isinf(e), 1.0, e / (1.0 + e))


@dataclass(frozen=True)
class NoveltyConfig:
    """Settings of the novelty channels (one set for every device and data set).

    Attributes
    ----------
    alphas : weights of the newest reading in the moving averages of surprise whose records are kept
        (0.3: a burst of a few readings; 0.1: a shift lasting tens of readings).
    tolerance : a record must be beaten by this fraction to count (0.05, HTM's spatial tolerance).
    half_life : readings after which an error record (a range's width) has decayed to half.
    refractory : readings after an alert during which the device raises no new alert.
    cooldown : readings with the slowest error average back within its record that end an episode.
    learn_readings : scored readings of a device that only build its records before it may alert.
    value_range, state_range : whether the value-range and hidden-state-range channels are on.
    """

    alphas: tuple[float, ...] = (0.3, 0.1)
    tolerance: float = 0.05
    half_life: float = 20_000.0
    refractory: int = 100
    cooldown: int = 3
    learn_readings: int = 100
    value_range: bool = True
    state_range: bool = True

    def __post_init__(self) -> None:
        if not self.alphas or not all(0.0 < a <= 1.0 for a in self.alphas):
            raise ValueError(f"novelty setting alphas={self.alphas!r} must be a non-empty tuple of values in (0, 1]")
        checks = [
            ("tolerance", math.isfinite(self.tolerance) and self.tolerance > 0, "a finite number > 0"),
            ("half_life", self.half_life > 0, "> 0 readings (math.inf: records never decay)"),
            ("refractory", isinstance(self.refractory, int) and self.refractory >= 0, "an integer >= 0"),
            ("cooldown", isinstance(self.cooldown, int) and self.cooldown >= 1, "an integer >= 1"),
            ("learn_readings", isinstance(self.learn_readings, int) and self.learn_readings >= 0,
             "an integer >= 0"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"novelty setting {name}={getattr(self, name)!r} must be {rule}")

    @property
    def threshold(self) -> float:
        """The novelty score at which a reading alerts: ``1 - 1/(1 + tolerance)``."""
        return float(novelty_from_excess(np.array(self.tolerance)))

    @property
    def decay(self) -> float:
        """Per-reading decay factor of the records, ``0.5 ** (1 / half_life)``."""
        return float(0.5 ** (1.0 / self.half_life))


class NoveltyTracker:
    """Per-slot records of B devices, advanced T steps at a time.

    Parameters
    ----------
    config : NoveltyConfig
    n_features, hidden_size : int
        F and H (``hidden_size`` is ignored when the state channel is off).
    capacity : int
        Initial slots C; grows by doubling when :meth:`step` sees a larger slot.

    Memory per slot: ``8 * (2A + 2F + 2H) + 16`` bytes.

    Examples
    --------
    >>> tr = NoveltyTracker(NoveltyConfig(learn_readings=3, state_range=False), n_features=1, hidden_size=0)
    >>> values = np.array([[[0.0], [1.0], [0.5], [0.2], [3.0]]])
    >>> out = tr.step(np.array([0]), np.zeros((1, 5)), values, None, np.ones((1, 5), bool))
    >>> out.alerts.tolist(), round(float(out.novelty[0, 4]), 3)
    ([[False, False, False, False, True]], 0.667)
    """

    def __init__(self, config: NoveltyConfig, n_features: int, hidden_size: int, capacity: int = 16):
        self.config = config
        self.n_features = n_features
        self.hidden_size = hidden_size if config.state_range else 0
        self.n_alphas = len(config.alphas)
        self._alloc(max(1, capacity))

    def _alloc(self, capacity: int) -> None:
        a, f, h = self.n_alphas, self.n_features, self.hidden_size
        self.capacity = capacity
        self.ema = np.zeros((capacity, a))
        self.err_record = np.full((capacity, a), np.nan)
        self.val_hi = np.full((capacity, f), np.nan)
        self.val_lo = np.full((capacity, f), np.nan)
        self.state_hi = np.full((capacity, h), np.nan)
        self.state_lo = np.full((capacity, h), np.nan)
        self.seen = np.zeros(capacity, dtype=np.int64)
        self.since_alert = np.full(capacity, np.iinfo(np.int64).max // 2, dtype=np.int64)
        self.in_episode = np.zeros(capacity, dtype=bool)
        self.entry_level = np.zeros(capacity)
        self.calm_run = np.zeros(capacity, dtype=np.int64)

    def _grow(self, needed: int) -> None:
        capacity = self.capacity
        while capacity <= needed:
            capacity *= 2
        old = {k: getattr(self, k) for k in ("ema", "err_record", "val_hi", "val_lo", "state_hi", "state_lo",
                                             "seen", "since_alert", "in_episode", "entry_level", "calm_run")}
        self._alloc(capacity)
        for k, arr in old.items():
            getattr(self, k)[:len(arr)] = arr

    def reset(self, slots: np.ndarray) -> None:
        """Forget the records of ``slots`` (a device that was removed or retrained from scratch)."""
        self.ema[slots] = 0.0
        for k in ("err_record", "val_hi", "val_lo", "state_hi", "state_lo"):
            getattr(self, k)[slots] = np.nan
        self.seen[slots] = 0
        self.since_alert[slots] = np.iinfo(np.int64).max // 2
        self.in_episode[slots], self.entry_level[slots], self.calm_run[slots] = False, 0.0, 0

    def step(self, slots: np.ndarray, surprise: np.ndarray, values: np.ndarray, hidden: np.ndarray | None,
             valid: np.ndarray) -> NoveltySteps:
        """Score and learn T steps of B devices.

        Parameters
        ----------
        slots : ``[B]`` int slot of each device.
        surprise : ``[B, T]`` surprise of each reading (``-log10`` tail probability).
        values : ``[B, T, F]`` scaled readings (NaN: missing feature, ignored).
        hidden : ``[B, T, H]`` the network's top-layer hidden state after each reading, or ``None``.
        valid : ``[B, T]`` bool, steps that are scored; others neither score nor learn.

        Returns
        -------
        NoveltySteps with ``[B, T]`` novelty, alert_score and alerts.
        """
        slots = np.asarray(slots, dtype=np.int64)
        if len(slots) and int(slots.max()) >= self.capacity:
            self._grow(int(slots.max()))
        cfg = self.config
        b, t_steps = valid.shape
        alphas = np.asarray(cfg.alphas)[None, :]
        lam = cfg.decay
        theta = cfg.threshold
        ema, err = self.ema[slots], self.err_record[slots]
        vhi, vlo = self.val_hi[slots], self.val_lo[slots]
        use_state = self.hidden_size > 0 and hidden is not None
        shi, slo = self.state_hi[slots], self.state_lo[slots]
        seen, since = self.seen[slots], self.since_alert[slots]
        inside, entry, calm = self.in_episode[slots], self.entry_level[slots], self.calm_run[slots]
        slow = int(np.argmin(cfg.alphas))
        novelty = np.zeros((b, t_steps))
        score = np.zeros((b, t_steps))
        alerts = np.zeros((b, t_steps), dtype=bool)
        anomalous = np.zeros((b, t_steps), dtype=bool)
        sur = np.nan_to_num(np.asarray(surprise, dtype=np.float64), nan=0.0)
        for t in range(t_steps):
            ok = valid[:, t]
            ema = np.where(ok[:, None], alphas * sur[:, t, None] + (1 - alphas) * ema, ema)
            record = np.maximum(err, MIN_ERROR_RECORD)
            excess = np.max(np.where(np.isnan(err), 0.0, ema / record - 1.0), axis=1)
            error_novel = ok & (seen >= cfg.learn_readings) & (excess >= cfg.tolerance)
            if cfg.value_range:
                ex, vhi, vlo = _range_step(values[:, t].astype(np.float64), vhi, vlo, ok, lam)
                excess = np.maximum(excess, ex)
            if use_state:
                ex, shi, slo = _range_step(hidden[:, t].astype(np.float64), shi, slo, ok, lam)  # type: ignore[index]
                excess = np.maximum(excess, ex)
            nov = np.where(ok & (seen >= cfg.learn_readings), novelty_from_excess(excess), 0.0)
            novel = ok & (nov >= theta)
            eligible = since >= cfg.refractory
            fire = novel & eligible
            # an open episode ends once the slow error average is back within the record it had
            calm = np.where(ok & inside, np.where(ema[:, slow] <= entry, calm + 1, 0), calm)
            inside = np.where(inside & (calm >= cfg.cooldown), False, inside)
            opens = error_novel & ~inside  # the state is about errors: it opens and closes on them
            entry = np.where(opens, np.nan_to_num(record[:, slow], nan=MIN_ERROR_RECORD), entry)
            inside = inside | opens
            calm = np.where(opens, 0, calm)
            err = np.where(ok[:, None], np.fmax(err * lam, np.maximum(ema, MIN_ERROR_RECORD)), err)
            novelty[:, t] = nov
            score[:, t] = np.where(eligible, nov, np.minimum(nov, theta / 2))
            alerts[:, t] = fire
            anomalous[:, t] = inside
            since = np.where(fire, 0, since + ok)
            seen = seen + ok
        self.ema[slots], self.err_record[slots] = ema, err
        self.val_hi[slots], self.val_lo[slots] = vhi, vlo
        if use_state:
            self.state_hi[slots], self.state_lo[slots] = shi, slo
        self.seen[slots], self.since_alert[slots] = seen, since
        self.in_episode[slots], self.entry_level[slots], self.calm_run[slots] = inside, entry, calm
        return NoveltySteps(novelty=novelty, alert_score=score, alerts=alerts, anomalous=anomalous)


def _range_step(x: np.ndarray, hi: np.ndarray, lo: np.ndarray, ok: np.ndarray,
                lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step of a decaying range channel.

    Returns the relative excess ``[B]`` of ``x`` ``[B, K]`` beyond ``[lo, hi]`` (a fraction of the width
    ``hi - lo``, largest over K), then ``hi`` and ``lo`` after learning ``x``. The range shrinks towards
    its own midpoint by ``lam`` per learned step (not towards 0: a hidden unit living in [0.5, 0.9]
    must not see its range drift away from where it lives). NaN entries of ``x`` (missing features)
    neither count nor update; a NaN ``hi``/``lo`` (nothing seen yet) takes the first value.
    """
    width = np.maximum(hi - lo, MIN_RANGE_WIDTH)
    with np.errstate(invalid="ignore"):
        ex = np.fmax((x - hi) / width, (lo - x) / width)
    ex = np.where(np.isnan(ex), 0.0, ex)
    excess = ex.max(axis=1) if ex.shape[1] else np.zeros(len(x))
    upd = ok[:, None] & ~np.isnan(x)
    mid = (hi + lo) / 2
    hi = np.where(upd, np.fmax(mid + lam * (hi - mid), x), hi)
    lo = np.where(upd, np.fmin(mid - lam * (mid - lo), x), lo)
    return excess, hi, lo


@dataclass(frozen=True)
class NoveltySteps:
    """:meth:`NoveltyTracker.step` output, all ``[B, T]``.

    ``novelty`` in [0, 1); ``alert_score`` equals it except inside a refractory period, where it is capped
    at half the alert threshold: the score that a benchmark counting every flagged reading (NAB) should
    see. ``alerts`` marks alerts and ``anomalous`` the readings inside a novelty episode (after the step).
    """

    novelty: np.ndarray
    alert_score: np.ndarray
    alerts: np.ndarray
    anomalous: np.ndarray


@dataclass
class AdaptiveResult:
    """A :class:`ProcessResult` plus the novelty outputs, aligned with the batch (N readings).

    Attributes
    ----------
    result : the detector's own result (scores, status, episodes, events), unchanged.
    surprise : ``[N]`` float64 surprise of each scored reading (NaN otherwise).
    novelty, alert_score : ``[N]`` float64 in [0, 1), 0 where not scored.
    alerts : ``[N]`` bool, readings that raised a novelty alert.
    anomalous : ``[N]`` bool, readings inside a novelty episode.
    """

    result: ProcessResult
    surprise: np.ndarray
    novelty: np.ndarray
    alert_score: np.ndarray
    alerts: np.ndarray
    anomalous: np.ndarray


class AdaptiveDetector:
    """A :class:`StreamingDetector` with novelty alerts, for evaluation and notebooks.

    Parameters
    ----------
    detector : StreamingDetector
        Scores the readings exactly as the service does; its model and state are used, not copied.
    config : NoveltyConfig
    surprise : where each reading's surprise comes from. ``"residual"`` (default): the bundle's
        normal-error model applied to the reading's raw residual (``actual - expected``).
        ``"detector"``: the detector's own per-reading surprise, recovered from
        ``ProcessResult.raw_scores`` (float32, so it saturates near 7.2), including any per-device
        residual scaling the detector applies. Inside ``_run_pass`` both are at hand.

    Examples
    --------
    >>> from anomaly.bundle import ModelBundle
    >>> _ = torch.manual_seed(0)
    >>> det = AdaptiveDetector(StreamingDetector(ModelBundle.untrained(["x"], hidden_size=4).with_config(
    ...     warmup_steps=2)), NoveltyConfig(learn_readings=25))
    >>> x = np.r_[np.sin(np.arange(40) / 3), 9.0]
    >>> out = det.process(ReadingBatch.from_arrays(["a"] * 41, np.arange(41) * 1000, x[:, None]))
    >>> bool(out.alerts[-1]), int(out.alerts.sum())
    (True, 1)
    """

    def __init__(self, detector: StreamingDetector, config: NoveltyConfig | None = None,
                 surprise: Literal["residual", "detector"] = "residual"):
        if surprise not in ("residual", "detector"):
            raise ValueError(f"surprise={surprise!r} must be 'residual' or 'detector'")
        self.detector = detector
        self.config = config or NoveltyConfig()
        self.surprise_source = surprise
        model = detector.model
        self.tracker = NoveltyTracker(self.config, len(detector.features), model.hidden_size)
        self._slots: dict[str, int] = {}
        self._captured: list[torch.Tensor] = []
        self._hook = model.lstm.register_forward_hook(self._capture) if self.config.state_range else None

    def close(self) -> None:
        """Remove the forward hook from the detector's network."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _capture(self, module: nn.Module, inputs: object, output: object) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, PackedSequence):
            out = pad_packed_sequence(out, batch_first=True)[0]
        self._captured.append(out.detach())

    def _slot(self, device: str) -> int:
        slot = self._slots.get(device)
        if slot is None:
            slot = self._slots[device] = len(self._slots)
        return slot

    def process(self, batch: ReadingBatch) -> AdaptiveResult:
        """Score a batch through the detector (one call per device in it), then the novelty channels."""
        n = len(batch)
        det = self.detector
        results: list[tuple[np.ndarray, ProcessResult]] = []
        surprise = np.full(n, np.nan)
        novelty = np.zeros(n)
        score = np.zeros(n)
        alerts = np.zeros(n, dtype=bool)
        anomalous = np.zeros(n, dtype=bool)
        codes, uniques = pd.factorize(batch.device_ids)
        for code, device in enumerate(uniques):
            rows = np.flatnonzero(codes == code) if len(uniques) > 1 else np.arange(n)
            sub = batch.take(rows) if len(uniques) > 1 else batch
            self._captured.clear()
            res = det.process(sub)
            results.append((rows, res))
            accepted = np.flatnonzero((res.status == ReadingStatus.SCORED) | (res.status == ReadingStatus.WARMUP))
            if len(accepted) == 0:
                continue
            accepted = accepted[np.argsort(sub.timestamps_ms[accepted], kind="stable")]
            scaled = det.bundle.scaler.transform(sub.values[accepted].astype(np.float64))
            residual = scaled - det.bundle.scaler.transform(res.expected[accepted].astype(np.float64))
            valid = res.status[accepted] == ReadingStatus.SCORED
            if self.surprise_source == "detector":
                raw = np.minimum(res.raw_scores[accepted].astype(np.float64), np.nextafter(1.0, 0.0))
                sur = np.where(valid, -np.log10(1.0 - raw), np.nan)
            else:
                sur = np.where(valid, det.bundle.scorer.surprise(residual), np.nan)
            hidden = None
            if self._hook is not None:
                hidden = torch.cat([h[0] for h in self._captured], dim=0).numpy()[None]
                if hidden.shape[1] != len(accepted):  # cannot happen for one device; guard the alignment
                    raise RuntimeError(f"captured {hidden.shape[1]} hidden states for {len(accepted)} readings")
            steps = self.tracker.step(np.array([self._slot(str(device))]), sur[None], scaled[None], hidden,
                                      valid[None])
            target = rows[accepted]
            surprise[target] = sur
            novelty[target] = steps.novelty[0]
            score[target] = steps.alert_score[0]
            alerts[target] = steps.alerts[0]
            anomalous[target] = steps.anomalous[0]
        return AdaptiveResult(result=_merge(results, n, len(det.features)), surprise=surprise, novelty=novelty,
                              alert_score=score, alerts=alerts, anomalous=anomalous)


def _merge(parts: Sequence[tuple[np.ndarray, ProcessResult]], n: int, n_features: int) -> ProcessResult:
    """One :class:`ProcessResult` aligned with the whole batch from per-device results."""
    if len(parts) == 1 and len(parts[0][0]) == n:
        return parts[0][1]
    out = ProcessResult(scores=np.full(n, np.nan, np.float32), raw_scores=np.full(n, np.nan, np.float32),
                        status=np.zeros(n, np.int8), anomalous=np.zeros(n, bool),
                        expected=np.full((n, n_features), np.nan, np.float32))
    for rows, res in parts:
        out.scores[rows], out.raw_scores[rows], out.status[rows] = res.scores, res.raw_scores, res.status
        out.anomalous[rows], out.expected[rows] = res.anomalous, res.expected
        for event in res.events:
            out.events.append(replace(event, row=int(rows[event.row])))
        out.gap_resets += res.gap_resets
    return out
