"""Scoring prediction errors against the error distribution learned on normal data.

Why it exists: a raw prediction error means nothing until compared with the errors the model
makes on normal behaviour. :class:`NormalErrorModel` is fitted on held-out *normal* residuals
(per-feature centre and covariance → squared Mahalanobis distance d²) and turns a residual into
a calibrated tail probability: the body of the d² distribution is its empirical CDF, the far tail
an exponential fitted to the largest ``tail_fraction`` of distances (peaks over threshold), so
scores stay meaningful beyond anything seen in calibration.

Scores are worked with as *surprise* ``s = -log10(tail probability)`` (0 = typical, 3 = one in a
thousand). Smoothing is an exponential moving average of surprise, i.e. a geometric mean of tail
probabilities, which lets a run of moderately unusual readings add up. A single reading far beyond
anything normal must not be averaged away, so the decision statistic is
``max(smoothed, raw - point_margin)`` (:func:`decision_surprise`): either the smoothed surprise, or
one reading ``10**point_margin`` times rarer still. The score users see is ``1 - 10**-statistic`` in
[0, 1]. The threshold is the statistic exceeded by a target fraction of normal readings
(:func:`calibrate_threshold`).

Devices differ: one pump's sensors are four times noisier than another's. Residuals are therefore
first divided by each device's own running residual scale (:func:`normalize_residuals`, relative
to the fleet's), so that a quiet device's small fault and a noisy device's normal jitter are
judged on the same scale.

What it must not do: decide episodes (``anomaly.episodes``) or own device state (the caller keeps
the per-device ratios).

Shapes: ``[..., F]`` residuals in scaled units, ``[...]`` distances/surprises.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from anomaly.errors import TrainingError

__all__ = [
    "MAX_SURPRISE",
    "NormalErrorModel",
    "calibrate_threshold",
    "decision_surprise",
    "normalize_residuals",
    "repeat_runs",
    "score_from_surprise",
    "seasonal_phase",
    "seasonal_residuals",
    "smooth_surprise",
    "surprise_from_score",
]

MAX_SURPRISE = 12.0
"""Tail probabilities are floored at 1e-12: beyond that float32 maths and any calibration are noise."""

_BODY_POINTS = 201


@dataclass(frozen=True)
class NormalErrorModel:
    """Distribution of prediction residuals on normal data.

    Attributes
    ----------
    centre : ``[F]`` mean residual; precision : ``[F, F]`` inverse (shrunk) covariance.
    body_d2 : ``[K]`` quantiles of d² at probabilities ``body_cdf``.
    tail_start, tail_scale, tail_fraction : exponential tail ``P(D > x) = fraction·exp(-(x - start)/scale)``.
    n_fit : residuals the model was fitted on.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> m = NormalErrorModel.fit(rng.normal(size=(5000, 2)))
    >>> s = m.surprise(np.array([[0.0, 0.0], [6.0, 0.0]]))
    >>> bool(s[0] < 0.5), bool(s[1] > 6)
    (True, True)
    """

    centre: np.ndarray
    precision: np.ndarray
    body_d2: np.ndarray
    body_cdf: np.ndarray
    tail_start: float
    tail_scale: float
    tail_fraction: float
    n_fit: int
    reference_var: np.ndarray | None = None
    """[F] the fleet's residual variance per feature, the unit of :func:`normalize_residuals`."""

    def __post_init__(self) -> None:
        if self.reference_var is None:
            object.__setattr__(self, "reference_var", np.diag(np.linalg.inv(self.precision)).astype(np.float32))

    @classmethod
    def fit(cls, residuals: np.ndarray, tail_fraction: float = 0.05, shrinkage: float = 1e-3,
            min_samples: int = 50, reference_var: np.ndarray | None = None) -> NormalErrorModel:
        """Fit on normal residuals ``[N, F]`` (rows with NaN are ignored).

        ``shrinkage`` adds that fraction of the mean variance to the covariance's diagonal, so a
        constant or perfectly predicted feature does not make the covariance singular.
        ``reference_var`` is the per-feature variance the residuals were normalised against
        (default: their own variance).
        """
        r = np.asarray(residuals, dtype=np.float64)
        if r.ndim != 2:
            raise TrainingError(f"expected residuals [N, F], got shape {r.shape}")
        r = r[np.isfinite(r).all(axis=1)]
        if len(r) < min_samples:
            raise TrainingError(f"need at least {min_samples} normal residuals to calibrate, got {len(r)}")
        if not 0.0 < tail_fraction < 0.5:
            raise ValueError(f"tail_fraction must be in (0, 0.5), got {tail_fraction}")
        centre = r.mean(axis=0)
        cov = np.atleast_2d(np.cov(r - centre, rowvar=False))
        floor = max(float(np.trace(cov)) / len(cov), 1e-12) * shrinkage
        precision = np.linalg.inv(cov + np.eye(len(cov)) * floor)
        d2 = np.einsum("nf,fg,ng->n", r - centre, precision, r - centre)
        cdf = np.linspace(0.0, 1.0 - tail_fraction, _BODY_POINTS)
        body = np.quantile(d2, cdf)
        start = float(body[-1])
        excess = d2[d2 > start] - start
        scale = float(excess.mean()) if len(excess) else max(start, 1e-6)
        if reference_var is None:
            reference_var = np.maximum(r.var(axis=0), 1e-12)
        return cls(centre=centre.astype(np.float32), precision=precision.astype(np.float32),
                   body_d2=body.astype(np.float64), body_cdf=cdf, tail_start=start,
                   tail_scale=max(scale, 1e-9), tail_fraction=float(tail_fraction), n_fit=len(r),
                   reference_var=np.asarray(reference_var, dtype=np.float32))

    @property
    def n_features(self) -> int:
        return len(self.centre)

    def _centred(self, residuals: np.ndarray) -> np.ndarray:
        # float64 and a clip far beyond any calibration keep absurd residuals finite
        z = np.clip(np.asarray(residuals, dtype=np.float64) - self.centre, -1e6, 1e6)
        return np.where(np.isnan(z), 0.0, z)  # a missing feature contributes nothing

    def distance2(self, residuals: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance ``[...]`` of residuals ``[..., F]``; NaN entries count as typical."""
        z = self._centred(residuals)
        flat = z.reshape(-1, z.shape[-1])  # one 2-D product: a stack of [1, F] products is ~10x slower
        return np.einsum("nf,nf->n", flat @ self.precision.astype(np.float64), flat).reshape(z.shape[:-1])

    def contributions(self, residuals: np.ndarray) -> np.ndarray:
        """Each feature's share ``[..., F]`` of d²: ``z_i (P z)_i / d²`` (sums to 1)."""
        z = self._centred(residuals)
        parts = z * (z @ self.precision.astype(np.float64))
        total = parts.sum(axis=-1, keepdims=True)
        return np.divide(parts, total, out=np.zeros_like(parts), where=total > 0).astype(np.float32)

    def tail_probability(self, d2: np.ndarray) -> np.ndarray:
        """``P(D² > d2)`` under the normal-error distribution, floored at ``10**-MAX_SURPRISE``."""
        d2 = np.asarray(d2, dtype=np.float64)
        body = 1.0 - np.interp(d2, self.body_d2, self.body_cdf)
        tail = self.tail_fraction * np.exp(-(np.maximum(d2, self.tail_start) - self.tail_start) / self.tail_scale)
        return np.maximum(np.where(d2 >= self.tail_start, tail, body), 10.0 ** -MAX_SURPRISE)

    def surprise(self, residuals: np.ndarray) -> np.ndarray:
        """``-log10`` tail probability ``[...]`` of residuals ``[..., F]``, in [0, MAX_SURPRISE]."""
        return (-np.log10(self.tail_probability(self.distance2(residuals)))).astype(np.float32)

    def to_dict(self) -> dict[str, object]:
        return {"centre": self.centre.tolist(), "precision": self.precision.tolist(),
                "body_d2": self.body_d2.tolist(), "body_cdf": self.body_cdf.tolist(),
                "tail_start": self.tail_start, "tail_scale": self.tail_scale,
                "tail_fraction": self.tail_fraction, "n_fit": self.n_fit,
                "reference_var": np.asarray(self.reference_var).tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, object], n_features: int) -> NormalErrorModel:
        """Rebuild from :meth:`to_dict` output, checking shapes (``ValueError`` names the field)."""
        centre = np.asarray(data["centre"], dtype=np.float32)
        precision = np.asarray(data["precision"], dtype=np.float32)
        body_d2 = np.asarray(data["body_d2"], dtype=np.float64)
        body_cdf = np.asarray(data["body_cdf"], dtype=np.float64)
        if centre.shape != (n_features,):
            raise ValueError(f"scorer.centre: expected {n_features} values, got shape {centre.shape}")
        if precision.shape != (n_features, n_features):
            raise ValueError(f"scorer.precision: expected [{n_features}, {n_features}], got {precision.shape}")
        if body_d2.ndim != 1 or body_d2.shape != body_cdf.shape or len(body_d2) < 2:
            raise ValueError("scorer.body_d2/body_cdf: expected two equal-length lists of at least 2 values")
        if np.any(np.diff(body_d2) < 0) or np.any(np.diff(body_cdf) < 0):
            raise ValueError("scorer.body_d2/body_cdf must be non-decreasing")
        fields = {k: float(data[k]) for k in ("tail_start", "tail_scale", "tail_fraction")}  # type: ignore[arg-type]
        if not all(np.isfinite(v) for v in fields.values()) or fields["tail_scale"] <= 0:
            raise ValueError("scorer tail parameters must be finite with tail_scale > 0")
        for name, arr in (("centre", centre), ("precision", precision), ("body_d2", body_d2)):
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"scorer.{name} has non-finite values")
        reference = data.get("reference_var")
        reference_var = None
        if reference is not None:
            reference_var = np.asarray(reference, dtype=np.float32)
            if reference_var.shape != (n_features,) or not np.all(np.isfinite(reference_var)) \
                    or not np.all(reference_var > 0):
                raise ValueError(f"scorer.reference_var: expected {n_features} finite values > 0")
        return cls(centre=centre, precision=precision, body_d2=body_d2, body_cdf=body_cdf,
                   n_fit=int(data.get("n_fit", 0)), reference_var=reference_var, **fields)  # type: ignore[arg-type]


def score_from_surprise(surprise: np.ndarray | float) -> np.ndarray:
    """Map surprise to the [0, 1] score users see: ``1 - 10**-surprise``.

    >>> score_from_surprise(np.array([0.0, 2.0])).round(3).tolist()
    [0.0, 0.99]
    """
    return (1.0 - np.power(10.0, -np.asarray(surprise, dtype=np.float64))).astype(np.float32)


def surprise_from_score(score: float) -> float:
    """Inverse of :func:`score_from_surprise` (a score threshold → surprise threshold).

    >>> round(surprise_from_score(0.999), 6)
    3.0
    """
    if not 0.0 <= score < 1.0:
        raise ValueError(f"score must be in [0, 1), got {score}")
    return float(-np.log10(1.0 - score))


def smooth_surprise(surprise: np.ndarray, valid: np.ndarray, initial: np.ndarray, alpha: float) -> np.ndarray:
    """Exponential moving average of surprise along the step axis, per row.

    Parameters
    ----------
    surprise : ``[B, T]`` raw surprise per step.
    valid : ``[B, T]`` bool, steps that update the average (others keep the previous value).
    initial : ``[B]`` the average before the first step.
    alpha : weight of the newest step, in (0, 1].

    Returns
    -------
    ``[B, T]`` the average after each step. Cost: one vectorised update per step (T Python iterations).

    >>> smooth_surprise(np.array([[4.0, 0.0]]), np.array([[True, True]]), np.array([0.0]), 0.5).tolist()
    [[2.0, 1.0]]
    """
    out = np.empty(surprise.shape, dtype=np.float32)
    m = np.asarray(initial, dtype=np.float32).copy()
    a = np.float32(alpha)
    for t in range(surprise.shape[1]):
        m = np.where(valid[:, t], a * surprise[:, t] + (1 - a) * m, m)
        out[:, t] = m
    return out


RATIO_BOUNDS = (1.0 / 16.0, 16.0)
"""A device's residual variance is taken as at most 16x (4x in standard deviation) below or above the
fleet's: beyond that a device is broken or mis-assigned, not merely quieter or noisier."""
PROTECT_Z = 4.0
"""Residuals beyond this many (normalised) standard deviations do not update the device's scale, so a
fault cannot teach the detector that the faulty behaviour is the device's normal noise."""


def normalize_residuals(residual: np.ndarray, update: np.ndarray, ratio: np.ndarray, reference_var: np.ndarray,
                        alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Divide residuals by each device's running residual scale, updating it step by step.

    Parameters
    ----------
    residual : ``[B, T, F]`` residuals (NaN = missing feature).
    update : ``[B, T]`` bool, steps allowed to update the scale (scored readings).
    ratio : ``[B, F]`` each device's residual variance relative to ``reference_var`` before the first step.
    reference_var : ``[F]`` the fleet's residual variance.
    alpha : weight of the newest squared residual in the moving average (0 disables normalisation).

    Returns
    -------
    ``(normalised [B, T, F], ratio after the last step [B, F])``. Cost: T vectorised steps.

    >>> z, r = normalize_residuals(np.full((1, 3, 1), 2.0), np.ones((1, 3), bool), np.ones((1, 1)),
    ...                            np.array([1.0]), alpha=0.5)
    >>> [round(float(v), 3) for v in z[0, :, 0]], float(r[0, 0])
    ([2.0, 1.265, 1.109], 3.625)
    """
    if alpha <= 0:
        return residual.astype(np.float32, copy=False), ratio
    out = np.empty(residual.shape, dtype=np.float32)
    ratio = np.asarray(ratio, dtype=np.float32).copy()
    ref = np.asarray(reference_var, dtype=np.float32)
    sd_ref = np.sqrt(ref)
    lo, hi = RATIO_BOUNDS
    a = np.float32(alpha)
    for t in range(residual.shape[1]):
        r = residual[:, t]
        z = r / np.sqrt(ratio)
        out[:, t] = z
        ok = update[:, t, None] & np.isfinite(r) & (np.abs(z) < PROTECT_Z * sd_ref)
        ratio = np.where(ok, np.clip((1 - a) * ratio + a * (r * r) / ref, lo, hi), ratio).astype(np.float32)
    return out, ratio


def repeat_runs(values: np.ndarray, valid: np.ndarray, previous: np.ndarray,
                run: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive readings in which each feature repeated its previous value exactly (a stuck sensor).

    A forecaster follows a stuck value (its residuals stay small), so stuckness is counted directly.
    A missing value (NaN) neither extends nor breaks a run.

    Parameters
    ----------
    values : ``[B, T, F]`` readings (NaN = missing); valid : ``[B, T]`` steps that exist.
    previous : ``[B, F]`` each device's last value before the first step; run : ``[B, F]`` runs so far.

    Returns
    -------
    ``(runs after each step [B, T, F], runs after the last step [B, F])``.

    >>> runs, last = repeat_runs(np.array([[[1.0], [1.0], [np.nan], [1.0], [2.0]]]), np.ones((1, 5), bool),
    ...                          np.array([[1.0]]), np.zeros((1, 1), np.int16))
    >>> runs[0, :, 0].tolist(), int(last[0, 0])
    ([1, 2, 2, 3, 0], 0)
    """
    out = np.empty(values.shape, dtype=np.int16)
    prev = np.asarray(previous, dtype=values.dtype).copy()
    r = np.asarray(run, dtype=np.int16).copy()
    for t in range(values.shape[1]):
        v = values[:, t]
        seen = valid[:, t, None] & ~np.isnan(v)
        r = np.where(seen, np.where(v == prev, np.minimum(r + 1, np.iinfo(np.int16).max), 0), r).astype(np.int16)
        prev = np.where(seen, v, prev)
        out[:, t] = r
    return out, r


def seasonal_phase(ts_ms: np.ndarray, interval_ms: int, period: int) -> np.ndarray:
    """Phase ``[...]`` int64 in ``[0, period)`` of readings at ``ts_ms``: their slot on the nominal time grid.

    Time rather than a count of readings, so a dropped reading or a gap does not shift the phase of
    every later reading (the grid is epoch-aligned: the same timestamp always has the same phase).

    >>> seasonal_phase(np.array([0, 1000, 2400, 3000, 5100]), 1000, 3).tolist()
    [0, 1, 2, 0, 2]
    """
    return ((np.asarray(ts_ms, dtype=np.int64) + interval_ms // 2) // interval_ms) % period


def seasonal_residuals(profile: np.ndarray, slots: np.ndarray, phase: np.ndarray, values: np.ndarray,
                       valid: np.ndarray, alpha: float) -> np.ndarray:
    """Residuals of readings against the same phase one period earlier; updates ``profile`` step by step.

    The seasonal-naive forecast: a reading is compared with what the device did at the same phase of
    the previous period(s). It sees what a one-step forecaster cannot: a daily peak that stays low, or
    a daily jump that does not come, is perfectly predictable one step at a time.

    Parameters
    ----------
    profile : ``[C, P, F]`` float32 slab, per slot the reference at each phase (NaN: not seen yet);
        updated in place at ``(slot, phase)`` of every valid reading.
    slots : ``[B]`` the rows' slots (distinct); phase : ``[B, T]`` int phases (:func:`seasonal_phase`).
    values : ``[B, T, F]`` scaled readings (NaN: missing feature: no residual, no update).
    valid : ``[B, T]`` bool, readings that exist (others neither score nor update).
    alpha : weight of the newest reading in the reference (1: exactly the reading one period earlier).

    Returns
    -------
    ``[B, T, F]`` float32 ``values - reference`` before each step (NaN without a reading or a reference).
    Cost: T vectorised gathers and scatters of ``[B, F]``.

    >>> profile = np.full((1, 2, 1), np.nan, np.float32)
    >>> x = np.array([[[1.0], [5.0], [2.0], [5.0]]], np.float32)
    >>> r = seasonal_residuals(profile, np.array([0]), np.array([[0, 1, 0, 1]]), x, np.ones((1, 4), bool), 1.0)
    >>> r[0, :, 0].tolist(), profile[0, :, 0].tolist()
    ([nan, nan, 1.0, 0.0], [2.0, 5.0])
    """
    out = np.full(values.shape, np.nan, dtype=np.float32)
    a = np.float32(alpha)
    for t in range(values.shape[1]):
        ok = valid[:, t]
        s, p = slots[ok], phase[ok, t]
        ref, v = profile[s, p], values[ok, t]
        out[ok, t] = v - ref
        new = v if alpha == 1.0 else ref + a * (v - ref)
        profile[s, p] = np.where(np.isnan(v), ref, np.where(np.isnan(ref), v, new))
    return out


def decision_surprise(smoothed: np.ndarray, raw: np.ndarray, point_margin: float) -> np.ndarray:
    """The statistic episodes are decided on: ``max(smoothed, raw - point_margin)``.

    >>> decision_surprise(np.array([1.0, 1.0]), np.array([2.0, 9.0]), 2.0).tolist()
    [1.0, 7.0]
    """
    return np.maximum(smoothed, np.asarray(raw, dtype=np.float32) - np.float32(point_margin))


def calibrate_threshold(smoothed_normal: np.ndarray, false_alarm_rate: float) -> float:
    """The smoothed-surprise threshold exceeded by ``false_alarm_rate`` of normal readings.

    With fewer than ``10 / false_alarm_rate`` normal readings the empirical quantile is noise;
    then the threshold is ``-log10(false_alarm_rate)``, which the raw (unsmoothed) surprise
    exceeds at exactly that rate by construction, and smoothing only lowers the rate.

    >>> calibrate_threshold(np.zeros(10), 1e-3)
    3.0
    """
    if not 0.0 < false_alarm_rate < 1.0:
        raise ValueError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate}")
    values = np.asarray(smoothed_normal, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) * false_alarm_rate < 10:
        return float(-np.log10(false_alarm_rate))
    return float(np.quantile(values, 1.0 - false_alarm_rate))
