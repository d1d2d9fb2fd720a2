"""Training a forecaster on normal history and calibrating its scorer: ``fit(DataFrame) -> ModelBundle``.

Why it exists: the notebook, the CLI (``sensor-anomaly train``) and the evaluation commands train
the same way. Steps: validate the table → per-device series sorted by time (duplicate timestamps
dropped, missing values forward-filled) → split each device by time into a training part and a
held-out normal part → fit the scaler on the training part → truncated backpropagation through
time over contiguous pieces, carrying (h, c) across chunks so the network learns to run from a
long-lived state, as it does in the service → early stopping on the held-out loss → fit the
:class:`~anomaly.scoring.NormalErrorModel` and the threshold on held-out residuals, computed by
streaming each device's whole series through the trained model → optionally (``seasonal=True``)
detect a dominant cycle (:func:`dominant_period`) and fit a second normal-error model on the
residuals of each reading against the same phase one period earlier.

What it must not do: read files or talk to Kafka (``anomaly.evaluation.datasets`` and ``streams`` do).
Deterministic for a given seed on one machine.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from anomaly.bundle import MAX_SEASONAL_PERIOD, DetectorConfig, ModelBundle, Scaler
from anomaly.errors import DataError, TrainingError
from anomaly.model import LSTMForecaster
from anomaly.readings import ReadingBatch
from anomaly.scoring import (
    NormalErrorModel,
    calibrate_threshold,
    decision_surprise,
    normalize_residuals,
    seasonal_phase,
    seasonal_residuals,
    smooth_surprise,
)

__all__ = ["Adam", "TrainingConfig", "dominant_period", "fit", "prepare_series"]

logger = logging.getLogger(__name__)

CALIBRATION_MIN = 50
"""Held-out normal readings (after warm-up) the scorer is calibrated on, at least."""

MIN_PERIOD = 8
"""Shortest cycle :func:`dominant_period` reports: below it the one-step forecaster sees the cycle itself."""
MIN_CYCLES = 1.5
"""A cycle counts only with this many of its periods in the data: one and a half periods make the
autocorrelation at its lag rest on half a period of pairs at least."""
MIN_AUTOCORRELATION = 0.5
"""The autocorrelation at a cycle's lag must reach this ("clearly periodic": half the variance shared
with the previous cycle); below it the seasonal residual is mostly noise of two readings."""
MIN_DIP = 0.2
"""...and exceed the lowest autocorrelation at shorter lags by this much: a slow trend's autocorrelation
is high at every lag and falls steadily, so its "peaks" are not cycles."""
SAME_CYCLE = 0.05
"""Peaks within this much of the highest are one cycle and its multiples (a sine of period 48 peaks
at 48, 96, 144, ... almost equally, and noise decides which is highest): the shortest is the cycle.
A weekly cycle on top of a daily one peaks clearly higher at the week, and is taken."""


@dataclass(frozen=True)
class TrainingConfig:
    """Hyperparameters of :func:`fit` (defaults suit sensor data at a regular interval).

    ``window`` is the truncated-BPTT chunk length; ``piece_length`` the length of the contiguous
    pieces trained in parallel (state is carried across the chunks of a piece).
    """

    hidden_size: int = 64
    num_layers: int = 1
    dropout: float = 0.0
    window: int = 32
    piece_length: int = 256
    batch_size: int = 32
    epochs: int = 30
    learning_rate: float = 3e-3
    val_fraction: float = 0.25
    patience: int = 4
    seed: int = 0
    max_seconds: float | None = None
    burn_in: int = 8
    threads: int = 1
    """torch intra-op threads while training: the batches are small, and on a shared 2-core machine one
    thread was 8x faster than two (spinning OpenMP workers contend with everything else)."""
    seasonal: bool = False
    """Detect a dominant cycle in the training rows (:func:`dominant_period`) and, if there is one, set the
    detector's ``seasonal_period`` and calibrate the bundle's ``seasonal_scorer`` (off: no seasonal channel)."""

    def __post_init__(self) -> None:
        ints = ("hidden_size", "num_layers", "window", "piece_length", "batch_size", "epochs", "patience", "threads")
        for name in ints:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"training setting {name}={getattr(self, name)!r} must be an integer >= 1")
        if not 0.0 < self.val_fraction < 0.9:
            raise ValueError(f"training setting val_fraction={self.val_fraction} must be in (0, 0.9)")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"training setting learning_rate={self.learning_rate} must be > 0")
        if self.piece_length < self.window:
            raise ValueError(f"piece_length ({self.piece_length}) must be >= window ({self.window})")
        if not isinstance(self.seasonal, bool):
            raise ValueError(f"training setting seasonal={self.seasonal!r} must be true or false")


def prepare_series(frame: pd.DataFrame, features: Sequence[str], time_col: str,
                   device_col: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-device ``(timestamps_ms [T], values [T, F])`` sorted by time, ready for training.

    Duplicate timestamps keep their first row; missing values are forward- then back-filled within
    a device; rows with every feature missing are dropped. Raises :class:`DataError` naming the
    column for missing or non-numeric columns and for an empty table.
    """
    if isinstance(features, str):
        raise DataError(f"features must be a list of column names, got the string {features!r}")
    if len(features) == 0:
        raise DataError("no features given")
    repeated = sorted({f for f in features if list(features).count(f) > 1})
    if repeated:
        raise DataError(f"feature(s) {repeated} listed more than once")
    if len(frame) == 0:
        raise DataError("the table has no rows")
    batch = ReadingBatch.from_frame(frame, features, time_col=time_col, device_col=device_col)
    table = pd.DataFrame(batch.values, columns=list(features))
    table["_device"], table["_ts"] = batch.device_ids, batch.timestamps_ms
    table = table.dropna(subset=list(features), how="all")
    if table.empty:
        raise DataError(f"every row has all features {list(features)} missing")
    table = table.sort_values(["_device", "_ts"], kind="stable").drop_duplicates(["_device", "_ts"])
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for device, part in table.groupby("_device", sort=True):
        vals = part[list(features)].ffill().bfill()
        if vals.isna().any().any():
            column = vals.columns[vals.isna().any()][0]
            raise DataError(f"column {column!r} has no value at all for device {device!r}")
        out[str(device)] = (part["_ts"].to_numpy(np.int64), vals.to_numpy(np.float32))
    return out


class Adam:
    """Adam, step for step what ``torch.optim.Adam`` does on CPU (its single-tensor path; no weight
    decay, no amsgrad), so trained weights are bitwise the same (tests compare the two).

    Why not ``torch.optim.Adam`` itself: constructing any torch optimizer imports ``torch._dynamo``,
    3-4 s on a shared 2-core machine, paid by every ``sensor-anomaly train`` and every process that
    trains; these twenty lines cost nothing to import.

    >>> w = torch.ones(2, requires_grad=True)
    >>> opt = Adam([w], lr=0.1)
    >>> (w ** 2).sum().backward(); opt.step()
    >>> w.detach().tolist()
    [0.9..., 0.9...]
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params = [p for p in params if p.requires_grad]
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = [0] * len(self.params)  # per parameter: one without a gradient is skipped, as in torch

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, (p, exp_avg, exp_avg_sq) in enumerate(zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True)):
            if p.grad is None:
                continue
            grad = p.grad
            self.steps[i] += 1
            step = float(self.steps[i])
            exp_avg.lerp_(grad, 1 - self.beta1)
            exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            bias_correction1 = 1 - self.beta1 ** step
            bias_correction2_sqrt = (1 - self.beta2 ** step) ** 0.5
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-(self.lr / bias_correction1))


def _pieces(series: list[np.ndarray], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut scaled series into contiguous pieces ``[S, length, F + Fc]`` with a validity mask ``[S, length]``."""
    pieces, masks = [], []
    for values in series:
        for start in range(0, len(values) - 1, length):
            chunk = values[start:start + length]
            if len(chunk) < 2:
                continue
            pad = length - len(chunk)
            pieces.append(np.pad(chunk, ((0, pad), (0, 0))))
            masks.append(np.r_[np.ones(len(chunk), bool), np.zeros(pad, bool)])
    return torch.from_numpy(np.stack(pieces)), torch.from_numpy(np.stack(masks))


def _stream_predictions(model: LSTMForecaster, series: list[np.ndarray]) -> list[np.ndarray]:
    """One-step forecasts ``[T, F]`` of each whole series (``[T, F + Fc]`` inputs) from a zero state (what the
    detector computes)."""
    lengths = torch.as_tensor([len(s) for s in series])
    x = torch.zeros(len(series), int(lengths.max()), series[0].shape[1])
    for i, s in enumerate(series):
        x[i, :len(s)] = torch.from_numpy(s)
    with torch.inference_mode():
        pred, _ = model(x, None, lengths)
    return [pred[i, :len(s)].numpy() for i, s in enumerate(series)]


def fit(frame: pd.DataFrame, features: Sequence[str], time_col: str, device_col: str | None = None, *,
        config: TrainingConfig | None = None, detector: DetectorConfig | None = None,
        name: str = "sensor-anomaly", version: str = "1", progress: bool = True,
        context: Sequence[str] = (), **overrides: Any) -> ModelBundle:
    """Train a forecaster on normal history and calibrate its scorer.

    Parameters
    ----------
    frame : one row per reading of normal operation (one or many devices).
    features : the numeric columns to model, in the order the model will use.
    time_col : timestamps (ISO-8601, datetimes or epoch ms); device_col : device ids, or ``None``
        for a single device.
    context : numeric columns the model sees as inputs at every step but never forecasts or scores
        (commands, setpoints, operating modes); scaled like the features, by a scaler of their own.
    config : hyperparameters; keyword ``overrides`` replace single fields (``epochs=5``).
    detector : detector settings; its ``threshold`` is replaced by the calibrated one and its
        ``nominal_interval_ms`` by the median interval of the data.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> t = np.arange(600)
    >>> df = pd.DataFrame({"ts": t * 1000, "x": np.sin(t / 10) + rng.normal(0, 0.05, 600)})
    >>> bundle = fit(df, ["x"], time_col="ts", epochs=2, hidden_size=8, progress=False)
    >>> bundle.features, bundle.config.nominal_interval_ms
    (('x',), 1000)
    """
    unknown = sorted(set(overrides) - {f.name for f in fields(TrainingConfig)})
    if unknown:
        raise ValueError(f"unknown training setting(s) {unknown}; known: {[f.name for f in fields(TrainingConfig)]}")
    cfg = replace(config or TrainingConfig(), **overrides)
    det = detector or DetectorConfig()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _fit(frame, features, context, time_col, device_col, cfg, det, name, version, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _fit(frame: pd.DataFrame, features: Sequence[str], context: Sequence[str], time_col: str,
         device_col: str | None, cfg: TrainingConfig, det: DetectorConfig, name: str, version: str,
         progress: bool) -> ModelBundle:
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    for what, names in (("features", features), ("context", context)):
        if isinstance(names, str):
            raise DataError(f"{what} must be a list of column names, got the string {names!r}")
    context = tuple(context)
    both = sorted(set(features) & set(context))
    if both:
        raise DataError(f"column(s) {both} cannot be both a feature and a context input")
    n_f = len(features)
    series = prepare_series(frame, [*features, *context], time_col, device_col)  # values [T, F + Fc]
    devices = list(series)
    n_rows = sum(len(v) for _, v in series.values())
    min_rows = max(2 * det.warmup_steps + 20, 4 * cfg.window)
    # calibration needs CALIBRATION_MIN held-out readings after warm-up: on a small table the held-out
    # share grows as needed, up to half of the data
    val_fraction = min(max(cfg.val_fraction, (CALIBRATION_MIN + 20 + det.warmup_steps) / max(n_rows, 1)), 0.5)
    if val_fraction > cfg.val_fraction:
        logger.info("held-out share raised from %.2f to %.2f to have %d calibration readings", cfg.val_fraction,
                    val_fraction, CALIBRATION_MIN)
    splits = {d: round(len(v) * (1 - val_fraction)) for d, (_, v) in series.items()}
    usable = [d for d in devices if splits[d] >= 2 and len(series[d][1]) - splits[d] >= 2]
    n_usable = sum(len(series[d][1]) for d in usable)
    if n_usable < min_rows:
        short = len(devices) - len(usable)
        raise TrainingError(
            f"too little data: {n_usable} rows in devices long enough to split by time, need at least {min_rows} "
            f"(window={cfg.window}, warmup_steps={det.warmup_steps}); {len(devices)} device(s), {n_rows} rows"
            + (f", {short} device(s) too short for val_fraction={cfg.val_fraction}" if short else ""))
    train_raw = np.concatenate([series[d][1][:splits[d]] for d in usable])
    scaler = Scaler.fit(train_raw[:, :n_f])
    context_scaler = Scaler.fit(train_raw[:, n_f:]) if context else None
    scaled = {d: scaler.transform(series[d][1][:, :n_f]) for d in usable}  # the model's inputs: features, context
    if context_scaler is not None:
        scaled = {d: np.concatenate([x, context_scaler.transform(series[d][1][:, n_f:])], axis=1)
                  for d, x in scaled.items()}
    diffs = np.concatenate([np.diff(series[d][0]) for d in usable])
    interval = int(np.median(diffs[diffs > 0])) if (diffs > 0).any() else det.nominal_interval_ms

    model = LSTMForecaster(n_f, cfg.hidden_size, cfg.num_layers, cfg.dropout, n_context=len(context))
    x_all, mask_all = _pieces([scaled[d][:splits[d]] for d in usable], cfg.piece_length)
    optimiser = Adam(model.parameters(), lr=cfg.learning_rate)
    loss_fn = nn.MSELoss(reduction="none")
    best_loss, best_state, stale, epochs_run = math.inf, None, 0, 0
    history: list[dict[str, float]] = []
    bar = tqdm(range(cfg.epochs), desc="training", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        perm = torch.from_numpy(rng.permutation(len(x_all)))
        total, count = 0.0, 0
        for first in range(0, len(perm), cfg.batch_size):
            idx = perm[first:first + cfg.batch_size]
            xb, mb = x_all[idx], mask_all[idx]
            state = None
            for c0 in range(0, cfg.piece_length - 1, cfg.window):
                c1 = min(c0 + cfg.window, cfg.piece_length - 1)
                pred, state = model(xb[:, c0:c1], state)
                state = (state[0].detach(), state[1].detach())
                weight = (mb[:, c0 + 1:c1 + 1] & mb[:, c0:c1]).float()
                if c0 == 0:
                    weight[:, :cfg.burn_in] = 0.0
                denom = weight.sum() * n_f
                if denom == 0:
                    continue
                loss = (loss_fn(pred, xb[:, c0 + 1:c1 + 1, :n_f]).sum(-1) * weight).sum() / denom
                optimiser.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimiser.step()
                total += float(loss.detach()) * float(denom)
                count += int(denom)
        model.eval()
        val_loss = _validation_loss(model, [scaled[d] for d in usable], [splits[d] for d in usable])
        epochs_run = epoch + 1
        history.append({"epoch": epochs_run, "train_loss": total / max(count, 1), "val_loss": val_loss})
        bar.set_postfix(train=f"{total / max(count, 1):.4f}", val=f"{val_loss:.4f}")
        logger.info("epoch %d: train loss %.5f, held-out loss %.5f", epochs_run, total / max(count, 1), val_loss)
        if val_loss < best_loss - 1e-6:
            best_loss, stale = val_loss, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.patience:
                break
        if cfg.max_seconds is not None and time.perf_counter() - started > cfg.max_seconds:
            logger.info("stopping after %.0f s (max_seconds)", time.perf_counter() - started)
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()

    scorer, threshold = _calibrate(model, [scaled[d] for d in usable], [splits[d] for d in usable], det)
    stuck_after = det.stuck_after or _stuck_limits([series[d][1][:, :n_f] for d in usable])
    period, seasonal_scorer, seasonal_info = None, None, None
    if cfg.seasonal:
        period, seasonal_scorer, seasonal_info = _calibrate_seasonal(
            [series[d][0] for d in usable], [scaled[d][:, :n_f] for d in usable], interval, det.seasonal_alpha)
    summary = {
        "rows": n_rows, "devices": len(devices), "devices_used": len(usable),
        "time_range": [int(min(series[d][0][0] for d in usable)), int(max(series[d][0][-1] for d in usable))],
        "epochs": epochs_run, "best_val_loss": best_loss, "history": history,
        "seconds": round(time.perf_counter() - started, 2), "seed": cfg.seed,
        "calibration_residuals": scorer.n_fit, "config": {k: v for k, v in cfg.__dict__.items()},
        "seasonal": seasonal_info, "context": list(context),
    }
    logger.info("trained %s v%s on %d rows in %.1f s (best held-out loss %.5f)", name, version, n_rows,
                summary["seconds"], best_loss)
    return ModelBundle(name=name, version=version, features=tuple(features), scaler=scaler, model=model,
                       scorer=scorer,
                       config=replace(det, threshold=threshold, nominal_interval_ms=interval, stuck_after=stuck_after,
                                      seasonal_period=period),
                       training=summary, seasonal_scorer=seasonal_scorer, context=context,
                       context_scaler=context_scaler)


def _stuck_limits(series: list[np.ndarray]) -> tuple[int, ...]:
    """Per feature, more exact repeats in a row than normal data ever showed: ``max(5, 2 * longest + 1)``.

    A feature that is constant in normal data gets a limit it never reaches in practice.
    """
    longest = np.zeros(series[0].shape[1], dtype=np.int64)
    for values in series:
        same = values[1:] == values[:-1]  # [T-1, F]
        for f in range(same.shape[1]):
            flags = np.r_[False, same[:, f], False].astype(np.int8)
            edges = np.flatnonzero(np.diff(flags))
            if len(edges):
                longest[f] = max(longest[f], int((edges[1::2] - edges[::2]).max()))
    return tuple(int(min(max(5, 2 * n + 1), np.iinfo(np.int16).max)) for n in longest)


def _validation_loss(model: LSTMForecaster, series: list[np.ndarray], splits: list[int]) -> float:
    preds = _stream_predictions(model, series)
    n_f = model.n_features
    errs = [((p[split - 1:-1] - s[split:, :n_f]) ** 2).mean()
            for p, s, split in zip(preds, series, splits, strict=True)]
    return float(np.mean(errs))


def _calibrate(model: LSTMForecaster, series: list[np.ndarray], splits: list[int],
               det: DetectorConfig) -> tuple[NormalErrorModel, float]:
    """Fit the normal-error model and the threshold on held-out residuals (after warm-up).

    Residuals go through the same per-device normalisation as in the detector, over each device's
    whole series (so a device's scale has adapted by the time its held-out part starts).
    """
    preds = _stream_predictions(model, series)
    full = [s[1:, :model.n_features] - p[:-1] for p, s in zip(preds, series, strict=True)]  # reading i + 1's
    firsts = [max(split, det.warmup_steps) - 1 for split in splits]  # index of the first held-out residual
    held_out = [r[first:] for r, first in zip(full, firsts, strict=True)]
    if sum(len(r) for r in held_out) < CALIBRATION_MIN:
        raise TrainingError(f"too little held-out data to calibrate the scorer (need {CALIBRATION_MIN} readings "
                            "after warm-up); "
                            "give more rows or raise val_fraction")
    reference_var = np.maximum(np.concatenate(held_out).astype(np.float64).var(axis=0), 1e-12).astype(np.float32)
    longest = max(len(r) for r in full)
    padded = np.zeros((len(full), longest, full[0].shape[1]), dtype=np.float32)
    update = np.zeros((len(full), longest), dtype=bool)
    for i, r in enumerate(full):
        padded[i, :len(r)] = r
        update[i, :len(r)] = np.arange(1, len(r) + 1) >= det.warmup_steps
    normalised, _ = normalize_residuals(padded, update, np.ones((len(full), padded.shape[2]), np.float32),
                                        reference_var, det.scale_alpha)
    residuals = [normalised[i, first:len(r)] for i, (r, first) in enumerate(zip(full, firsts, strict=True))]
    scorer = NormalErrorModel.fit(np.concatenate(residuals), reference_var=reference_var)
    longest = max(len(r) for r in residuals)
    surprise = np.zeros((len(residuals), longest), dtype=np.float32)
    valid = np.zeros((len(residuals), longest), dtype=bool)
    for i, r in enumerate(residuals):
        surprise[i, :len(r)] = scorer.surprise(r)
        valid[i, :len(r)] = True
    smoothed = smooth_surprise(surprise, valid, np.zeros(len(residuals), np.float32), det.smoothing_alpha)
    decision = decision_surprise(smoothed, surprise, det.point_margin)
    return scorer, calibrate_threshold(decision[valid], det.false_alarm_rate)


def dominant_period(series: Sequence[np.ndarray], min_period: int = MIN_PERIOD,
                    max_period: int = MAX_SEASONAL_PERIOD) -> tuple[int | None, float]:
    """The lag (in readings) of the strongest cycle in scaled series, or ``None``; and its autocorrelation.

    The autocorrelation at lag L is the Pearson correlation of ``x[t]`` with ``x[t + L]``, pairs pooled
    over the series, averaged over features. A cycle is a local maximum at a lag in
    ``[min_period, min(max_period, n / MIN_CYCLES)]`` (n: the longest series) that reaches
    ``MIN_AUTOCORRELATION`` and rises ``MIN_DIP`` above the lowest autocorrelation at shorter lags; of
    those within ``SAME_CYCLE`` of the highest, the shortest wins. Cost: one FFT per series and
    feature, O(n log n).

    Parameters
    ----------
    series : per device ``[T, F]`` readings at a regular interval (gaps are not filled: lags count readings).

    Examples
    --------
    >>> t = np.arange(600)
    >>> noise = np.random.default_rng(0).normal(0, 0.2, 600)
    >>> period, acf = dominant_period([(np.sin(2 * np.pi * t / 48) + noise)[:, None]])
    >>> period, round(acf, 1)
    (48, 0.9)
    >>> dominant_period([np.cumsum(noise)[:, None]])[0] is None  # a random walk has no cycle
    True
    """
    longest = max((len(s) for s in series), default=0)
    top = min(max_period, int(longest / MIN_CYCLES))
    if top < min_period + 1:
        return None, float("nan")
    acf = _autocorrelation(series, top + 1)
    lags = np.arange(min_period, top + 1)
    peak = (acf[lags] >= acf[lags - 1]) & (acf[lags] >= acf[lags + 1])
    lowest = np.minimum.accumulate(np.nan_to_num(acf, nan=1.0))
    ok = peak & (acf[lags] >= MIN_AUTOCORRELATION) & (acf[lags] - lowest[lags - 1] >= MIN_DIP)
    if not ok.any():
        return None, float(np.nanmax(acf[lags])) if np.isfinite(acf[lags]).any() else float("nan")
    peaks = lags[ok]
    best = peaks[np.flatnonzero(acf[peaks] >= acf[peaks].max() - SAME_CYCLE)[0]]
    return int(best), float(acf[best])


def _autocorrelation(series: Sequence[np.ndarray], max_lag: int) -> np.ndarray:
    """Pearson autocorrelation ``[max_lag + 1]`` at lags 0..max_lag, pairs pooled over series, mean over features."""
    n_f = series[0].shape[1]
    sums = np.zeros((6, max_lag + 1, n_f))  # pairs, Σa, Σb, Σa², Σb², Σab with a = x[t], b = x[t + L]
    for values in series:
        x = np.asarray(values, dtype=np.float64)
        n = len(x)
        lags = np.arange(min(max_lag, n - 1) + 1)
        size = 1 << int(2 * n - 1).bit_length()
        spectrum = np.fft.rfft(x, size, axis=0)
        cross = np.fft.irfft(spectrum * np.conj(spectrum), size, axis=0)[lags]  # Σ x[t] x[t + L]
        c1, c2 = np.cumsum(np.r_[np.zeros((1, n_f)), x], axis=0), np.cumsum(np.r_[np.zeros((1, n_f)), x * x], axis=0)
        k = n - lags
        sums[:, lags] += np.stack([np.broadcast_to(k[:, None], (len(lags), n_f)), c1[k], c1[n] - c1[lags],
                                   c2[k], c2[n] - c2[lags], cross])
    pairs, sa, sb, saa, sbb, sab = sums
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sab / pairs - sa * sb / pairs ** 2
        var = (saa / pairs - (sa / pairs) ** 2) * (sbb / pairs - (sb / pairs) ** 2)
        r = np.where(var > 1e-12, cov / np.sqrt(np.maximum(var, 1e-300)), np.nan)
    out = np.full(max_lag + 1, np.nan)
    has = np.isfinite(r).any(axis=1)
    out[has] = np.nanmean(r[has], axis=1)
    return out


def _calibrate_seasonal(times: list[np.ndarray], scaled: list[np.ndarray], interval_ms: int,
                        alpha: float) -> tuple[int | None, NormalErrorModel | None, dict[str, Any]]:
    """Detect the cycle of the training rows and fit the normal-error model of their seasonal residuals.

    The residuals are what the detector computes (:func:`anomaly.scoring.seasonal_residuals` over each
    device's whole series from an empty profile): every reading after the first period. Returns
    ``(period, scorer, summary)``, ``(None, None, summary)`` without a clear cycle or with too few residuals.
    """
    period, acf = dominant_period(scaled)
    info: dict[str, Any] = {"period": None, "autocorrelation": round(acf, 4) if math.isfinite(acf) else None}
    if period is None:
        logger.info("no seasonal cycle in the training rows (best autocorrelation %.2f)", acf)
        return None, None, info
    longest, n_f = max(len(s) for s in scaled), scaled[0].shape[1]
    values = np.full((len(scaled), longest, n_f), np.nan, dtype=np.float32)
    phase = np.zeros((len(scaled), longest), dtype=np.int64)
    valid = np.zeros((len(scaled), longest), dtype=bool)
    for i, (ts, x) in enumerate(zip(times, scaled, strict=True)):
        values[i, :len(x)], valid[i, :len(x)] = x, True
        phase[i, :len(x)] = seasonal_phase(ts, interval_ms, period)
    profile = np.full((len(scaled), period, n_f), np.nan, dtype=np.float32)
    residual = seasonal_residuals(profile, np.arange(len(scaled)), phase, values, valid, alpha)
    known = residual[valid & ~np.isnan(residual).all(axis=2)]
    try:
        scorer = NormalErrorModel.fit(known)
    except TrainingError as exc:
        logger.info("seasonal cycle of %d readings not used: %s", period, exc)
        return None, None, info
    logger.info("seasonal cycle of %d readings (autocorrelation %.2f), %d residuals", period, acf, scorer.n_fit)
    return period, scorer, info | {"period": period, "residuals": scorer.n_fit}
