"""Novelty alerts: per-device records of what a device has done, and an alert when it does something new.

Why it exists: a forecaster's surprise says how unlikely one reading is under the error model fitted
at training time. On real devices that model drifts out of date (the noise level changes, a load
pattern appears that training never saw), so a fixed threshold on surprise either floods operators
or misses things. What an operator wants paged for is *novelty*: the device doing something it has
not done before. This module keeps, per device, decaying *records* of two things and raises an
alert when a reading beats one of them by a relative margin (``tolerance``):

- **error records**: the largest exponential moving average of surprise seen so far, at a fast and a
  slow time scale (``alphas``). A burst of errors larger than any before is novel; a device whose
  errors are always large stops alerting once its records have grown to that level.
- **value range**: per feature, the highest and lowest (scaled) value seen so far; a reading outside
  that range by more than ``tolerance`` of its width is novel (HTM's "spatial anomaly" in NAB).

Error records are kept per *error channel* (K of them): channel 0 is the forecaster's surprise; a
bundle with a seasonal period adds channel 1, the surprise of the reading against the same phase one
period earlier (:func:`anomaly.scoring.seasonal_residuals`); the detector then feeds channel 0 the
smaller of the two surprises (``DetectorConfig.seasonal_explains``). Each channel has its own records and its
own learning period, because the channels' noise levels differ: one shared record would be set by
the noisier channel and blind the other (a max of the two surprises has that flaw). A channel's NaN
surprise (no reference yet) is ignored: its averages and records stay as they were.

Records decay with ``half_life`` readings (error records towards zero, ranges towards their own
midpoint), so a device becomes sensitive again long after one large incident.

Two outputs come from the novelty score. An *alert* (a page) is raised when a record is beaten,
except for ``refractory`` readings after the previous alert: further novelty then is the same
incident. A novelty *episode* (the device's state) opens when an error record is beaten (any channel)
and lasts until every channel's slowest error average is back at or below its record at the opening,
for ``cooldown`` readings:
the state is about errors, so it opens and closes on them, while a value leaving its range is an
alert (an event) that need not mean the device's behaviour has changed.

The novelty score of a reading is ``1 - 1/(1 + e)`` where ``e`` is the largest relative excess over a
record (0 when no record is beaten), so the alert threshold ``1 - 1/(1 + tolerance)`` means "a record
beaten by ``tolerance``".

Where it runs: :class:`~anomaly.detector.StreamingDetector` with ``episode_rule="novelty"`` calls
:func:`novelty_step` inside its batched pass, on records that live in the
:class:`~anomaly.state.DeviceStateStore` slabs (:class:`NoveltyRecords`), so the service, the CLI and
the benchmark runs share this code. :func:`novelty_step` loops over the T steps of a call (like
:func:`anomaly.scoring.smooth_surprise`), vectorised over the B devices; never per device.

What it must not do: train or change the model, score residuals (the detector hands it surprise), or
know about Kafka.

Shapes: B devices in a call, T steps, F features, A error time scales, K error channels, C slab capacity.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["NoveltyConfig", "NoveltyRecords", "NoveltySteps", "novelty_from_excess", "novelty_step"]

logger = logging.getLogger(__name__)

MIN_ERROR_RECORD = 0.5
"""Error records never fall below this smoothed surprise: under a calibrated error model surprise
averages ``1/ln 10 ≈ 0.43``, so beating a record below that would be beating noise (a perfectly
predicted flat series has records of 0 otherwise)."""

MIN_RANGE_WIDTH = 1e-6
"""Smallest value range width (scaled units) used as the denominator of an excess; a device that has
been constant so far alerts on any change, which is what a constant sensor leaving its value means."""

NEVER_ALERTED = np.iinfo(np.int64).max // 2
"""``since_alert`` of a device that has not alerted yet (large, and safe to increment)."""


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
    """Settings of the novelty channels (built from :class:`~anomaly.bundle.DetectorConfig`'s ``novelty_*``).

    Attributes
    ----------
    alphas : weights of the newest reading in the moving averages of surprise whose records are kept
        (0.3: a burst of a few readings; 0.1: a shift lasting tens of readings).
    tolerance : a record must be beaten by this fraction to count (0.05, HTM's spatial tolerance).
    half_life : readings after which an error record (a range's width) has decayed to half.
    refractory : readings after an alert during which the device raises no new alert.
    cooldown : readings with the slowest error average back within its record that end an episode.
    learn_readings : scored readings of a device that only build its records before it may alert.
    value_range : whether the value-range channel is on.
    """

    alphas: tuple[float, ...] = (0.3, 0.1)
    tolerance: float = 0.05
    half_life: float = 20_000.0
    refractory: int = 100
    cooldown: int = 3
    learn_readings: int = 100
    value_range: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", tuple(self.alphas))
        if not self.alphas or not all(isinstance(a, (int, float)) and 0.0 < a <= 1.0 for a in self.alphas):
            raise ValueError(f"novelty setting alphas={self.alphas!r} must be a non-empty tuple of values in (0, 1]")
        checks = [
            ("tolerance", math.isfinite(self.tolerance) and self.tolerance > 0, "a finite number > 0"),
            ("half_life", self.half_life > 0, "> 0 readings (math.inf: records never decay)"),
            ("refractory", isinstance(self.refractory, int) and self.refractory >= 0, "an integer >= 0"),
            ("cooldown", isinstance(self.cooldown, int) and self.cooldown >= 1, "an integer >= 1"),
            ("learn_readings", isinstance(self.learn_readings, int) and self.learn_readings >= 0,
             "an integer >= 0"),
            ("value_range", isinstance(self.value_range, bool), "true or false"),
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


_FIELDS = ("ema", "err_record", "val_hi", "val_lo", "entry_level", "seen", "since_alert")


@dataclass
class NoveltyRecords:
    """Per-slot novelty records (the rows of C slots, or of the B devices gathered for one call).

    Attributes
    ----------
    ema : ``[C, K·A]`` float64 moving averages of surprise, column ``k·A + a``: channel k, time scale a.
    err_record : ``[C, K·A]`` float64 records of ``ema`` (NaN: nothing learned yet).
    val_hi, val_lo : ``[C, F]`` float64 value range in scaled units (NaN: nothing seen yet).
    entry_level : ``[C, K]`` float64 each channel's slow record when the open episode began (what closes it).
    seen : ``[C, K]`` int64 readings learned per channel (channel 0: every scored reading).
    since_alert : ``[C]`` int64 scored readings since the last alert.

    Memory per slot: ``16·K·A + 16·F + 16·K + 8`` bytes (120 B for one channel, two time scales and
    four features). Episode flag and calm-run count are the store's ``in_episode`` and ``run_length``.

    >>> rec = NoveltyRecords.empty(4, n_alphas=2, n_features=1)
    >>> rec.nbytes_per_slot, rec.take(np.array([1, 2])).ema.shape
    (72, (2, 2))
    >>> NoveltyRecords.empty(4, n_alphas=2, n_features=1, n_channels=2).ema.shape
    (4, 4)
    """

    ema: np.ndarray
    err_record: np.ndarray
    val_hi: np.ndarray
    val_lo: np.ndarray
    entry_level: np.ndarray
    seen: np.ndarray
    since_alert: np.ndarray

    @classmethod
    def empty(cls, capacity: int, n_alphas: int, n_features: int, n_channels: int = 1) -> NoveltyRecords:
        k = n_channels * n_alphas
        return cls(ema=np.zeros((capacity, k)), err_record=np.full((capacity, k), np.nan),
                   val_hi=np.full((capacity, n_features), np.nan), val_lo=np.full((capacity, n_features), np.nan),
                   entry_level=np.zeros((capacity, n_channels)), seen=np.zeros((capacity, n_channels), dtype=np.int64),
                   since_alert=np.full(capacity, NEVER_ALERTED, dtype=np.int64))

    @property
    def n_channels(self) -> int:
        return int(self.seen.shape[1])

    @property
    def n_alphas(self) -> int:
        return int(self.ema.shape[1]) // self.n_channels

    @property
    def n_features(self) -> int:
        return int(self.val_hi.shape[1])

    @property
    def nbytes_per_slot(self) -> int:
        return 16 * self.n_channels * self.n_alphas + 16 * self.n_features + 16 * self.n_channels + 8

    def nbytes(self) -> int:
        return sum(getattr(self, k).nbytes for k in _FIELDS)

    def grown(self, capacity: int) -> NoveltyRecords:
        """A copy with ``capacity`` slots, the new ones empty."""
        out = NoveltyRecords.empty(capacity, self.n_alphas, self.n_features, self.n_channels)
        out.put(np.arange(len(self.seen)), self)
        return out

    def reset(self, slots: np.ndarray) -> None:
        """Forget the records of ``slots`` (a new device, or one removed)."""
        self.put(slots, NoveltyRecords.empty(len(slots), self.n_alphas, self.n_features, self.n_channels))

    def take(self, slots: np.ndarray) -> NoveltyRecords:
        """The records of ``slots`` (copies)."""
        return NoveltyRecords(*(getattr(self, k)[slots] for k in _FIELDS))

    def put(self, slots: np.ndarray, rows: NoveltyRecords) -> None:
        """Write ``rows`` (one per slot) into ``slots``."""
        for k in _FIELDS:
            getattr(self, k)[slots] = getattr(rows, k)

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``([n, 2KA + 2F + K] float64, [n, K + 1] int64)``: the records flattened for snapshots."""
        floats = np.concatenate([self.ema, self.err_record, self.val_hi, self.val_lo, self.entry_level], axis=1)
        return floats, np.concatenate([self.seen, self.since_alert[:, None]], axis=1)

    @classmethod
    def from_arrays(cls, floats: np.ndarray, ints: np.ndarray, n_alphas: int, n_channels: int = 1) -> NoveltyRecords:
        """Inverse of :meth:`to_arrays`."""
        a, k = n_channels * n_alphas, n_channels
        f = (floats.shape[1] - 2 * a - k) // 2
        return cls(ema=floats[:, :a].copy(), err_record=floats[:, a:2 * a].copy(),
                   val_hi=floats[:, 2 * a:2 * a + f].copy(), val_lo=floats[:, 2 * a + f:2 * a + 2 * f].copy(),
                   entry_level=floats[:, 2 * a + 2 * f:].copy(), seen=ints[:, :k].copy(),
                   since_alert=ints[:, k].copy())


@dataclass(frozen=True)
class NoveltySteps:
    """:func:`novelty_step` output.

    ``novelty`` ``[B, T]`` in [0, 1); ``alert_score`` equals it except inside a refractory period,
    where it is capped at half the alert threshold: the score that a benchmark counting every flagged
    reading (NAB) should see. ``alerts`` ``[B, T]`` marks alerts and ``anomalous`` ``[B, T]`` the
    readings inside a novelty episode (after the step). ``in_episode`` and ``calm_run`` ``[B]`` are the
    episode flag and calm-run count after the last step.
    """

    novelty: np.ndarray
    alert_score: np.ndarray
    alerts: np.ndarray
    anomalous: np.ndarray
    in_episode: np.ndarray
    calm_run: np.ndarray


def novelty_step(config: NoveltyConfig, records: NoveltyRecords, in_episode: np.ndarray, calm_run: np.ndarray,
                 surprise: np.ndarray, values: np.ndarray, valid: np.ndarray) -> NoveltySteps:
    """Score and learn T steps of B devices; updates ``records`` (B rows, e.g. from :meth:`NoveltyRecords.take`).

    Parameters
    ----------
    config : NoveltyConfig
    records : the B devices' records (K error channels); advanced in place.
    in_episode, calm_run : ``[B]`` the devices' novelty-episode flag and calm-run count before the call.
    surprise : ``[B, T]`` (one channel) or ``[B, T, K]`` surprise of each reading per error channel
        (``-log10`` tail probability); NaN: the channel has none for that reading (ignored).
    values : ``[B, T, F]`` scaled readings (NaN: missing feature, ignored).
    valid : ``[B, T]`` bool, steps that are scored; others neither score nor learn.

    Returns
    -------
    NoveltySteps

    Cost: T iterations of O(B·(K·A + F)) numpy.

    Examples
    --------
    >>> cfg = NoveltyConfig(learn_readings=3)
    >>> rec = NoveltyRecords.empty(1, n_alphas=2, n_features=1)
    >>> values = np.array([[[0.0], [1.0], [0.5], [0.2], [3.0]]])
    >>> out = novelty_step(cfg, rec, np.zeros(1, bool), np.zeros(1), np.zeros((1, 5)), values, np.ones((1, 5), bool))
    >>> out.alerts.tolist(), round(float(out.novelty[0, 4]), 3)
    ([[False, False, False, False, True]], 0.667)
    """
    cfg = config
    b, t_steps = valid.shape
    sur = np.asarray(surprise, dtype=np.float64)
    if sur.ndim == 2:
        sur = sur[:, :, None]
    k_channels, n_alphas = records.n_channels, len(cfg.alphas)
    if sur.shape[2] != k_channels or records.n_alphas != n_alphas:
        raise ValueError(f"expected surprise of {records.n_channels} channel(s) and records of {n_alphas} time "
                         f"scales, got {sur.shape[2]} channel(s) and {records.n_alphas} time scales")
    channel = np.repeat(np.arange(k_channels), n_alphas)  # the channel of each error column
    alphas = np.tile(np.asarray(cfg.alphas, dtype=np.float64), k_channels)[None, :]
    slow = np.arange(k_channels) * n_alphas + int(np.argmin(cfg.alphas))  # each channel's slow column
    lam, theta = cfg.decay, cfg.threshold
    ema, err, vhi, vlo = records.ema, records.err_record, records.val_hi, records.val_lo
    seen, since, entry = records.seen, records.since_alert, records.entry_level
    inside = np.asarray(in_episode, dtype=bool).copy()
    calm = np.asarray(calm_run, dtype=np.int64).copy()
    novelty = np.zeros((b, t_steps))
    score = np.zeros((b, t_steps))
    alerts = np.zeros((b, t_steps), dtype=bool)
    anomalous = np.zeros((b, t_steps), dtype=bool)
    vals = np.asarray(values, dtype=np.float64)
    for t in range(t_steps):
        ok = valid[:, t]
        s_t = sur[:, t]
        has = ok[:, None] & ~np.isnan(s_t)  # [B, K] channels with a surprise this step
        learns = has[:, channel]
        ema = np.where(learns, alphas * s_t[:, channel] + (1 - alphas) * ema, ema)
        record = np.maximum(err, MIN_ERROR_RECORD)
        learned = (has & (seen >= cfg.learn_readings))[:, channel]
        excess = np.max(np.where(learned & ~np.isnan(err), ema / record - 1.0, 0.0), axis=1)
        error_novel = excess >= cfg.tolerance
        if cfg.value_range:
            ex, vhi, vlo = _range_step(vals[:, t], vhi, vlo, ok, lam)
            excess = np.maximum(excess, np.where(ok & (seen[:, 0] >= cfg.learn_readings), ex, 0.0))
        nov = np.where(ok, novelty_from_excess(excess), 0.0)
        novel = ok & (nov >= theta)
        eligible = since >= cfg.refractory
        fire = novel & eligible
        # an open episode ends once every channel's slow error average is back within its record at the opening
        back = np.all(ema[:, slow] <= entry, axis=1)
        calm = np.where(ok & inside, np.where(back, calm + 1, 0), calm)
        inside = np.where(inside & (calm >= cfg.cooldown), False, inside)
        opens = error_novel & ~inside  # the state is about errors: it opens and closes on them
        entry = np.where(opens[:, None], np.nan_to_num(record[:, slow], nan=MIN_ERROR_RECORD), entry)
        inside = inside | opens
        calm = np.where(opens, 0, calm)
        err = np.where(learns, np.fmax(err * lam, np.maximum(ema, MIN_ERROR_RECORD)), err)
        novelty[:, t] = nov
        score[:, t] = np.where(eligible, nov, np.minimum(nov, theta / 2))
        alerts[:, t] = fire
        anomalous[:, t] = inside
        since = np.where(fire, 0, since + ok)
        seen = seen + has
    records.ema, records.err_record, records.val_hi, records.val_lo = ema, err, vhi, vlo
    records.seen, records.since_alert, records.entry_level = seen, since, entry
    return NoveltySteps(novelty=novelty, alert_score=score, alerts=alerts, anomalous=anomalous,
                        in_episode=inside, calm_run=calm)


def _range_step(x: np.ndarray, hi: np.ndarray, lo: np.ndarray, ok: np.ndarray,
                lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step of a decaying range channel.

    Returns the relative excess ``[B]`` of ``x`` ``[B, K]`` beyond ``[lo, hi]`` (a fraction of the width
    ``hi - lo``, largest over K), then ``hi`` and ``lo`` after learning ``x``. The range shrinks towards
    its own midpoint by ``lam`` per learned step (not towards 0: a feature living in [0.5, 0.9] must not
    see its range drift away from where it lives). NaN entries of ``x`` (missing features) neither
    count nor update; a NaN ``hi``/``lo`` (nothing seen yet) takes the first value.
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
