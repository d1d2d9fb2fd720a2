"""The ``sensor-anomaly evaluate nab|skab`` runs: train, stream, write results and plots, score.

Why it exists: detection-quality numbers must come from the code the service runs, under each
benchmark's rules, with one set of hyperparameters for every file, so that they can be compared with
published ones and reproduced by one command. For every file this module trains a model on the
normal data the benchmark allows, streams the file in order through
:meth:`anomaly.detector.StreamingDetector.process` with the bundle's ``episode_rule="novelty"`` (the
novelty alerts of :mod:`anomaly.adaptation`, inside the detector: the path ``serve`` runs for such a
bundle), writes the per-row results and a plot, and finally scores them
with :mod:`anomaly.evaluation.scorers`. River's ``HalfSpaceTrees`` runs through the same loop as a peer baseline.

Benchmark rules as applied here:

- **NAB**: each file is seen online, in order, once; the detector never sees a later row or a label.
  It trains on the probationary period (the first ``min(floor(0.15 N), 750)`` rows) and keeps
  adapting online after it (its novelty records). Training also looks for a cycle in those rows
  (``seasonal``); a file that has one gets the seasonal error channel. Results: ``<category>/<file>.csv`` with
  ``timestamp,value,anomaly_score``. ``anomaly_score`` is the novelty alert score, so a row scores at
  or above the shipped threshold exactly where the detector raises an alert.
- **SKAB**: per file, the model trains on the first ``skab_train_rows`` (400) rows only (the
  anomaly-free run is not used); those rows are streamed (they warm the network's state and seed the
  novelty records) but neither written nor scored. Results: ``<group>/<file>.csv`` with
  ``datetime,anomaly_score,anomaly_pred``: the novelty score and the novelty-episode flag (an alert
  opens an episode, which lasts until the device's slow error average is back within its record).
  There is no threshold to calibrate: alerts are relative to each device's own records.

What it must not do: look at labels before the scoring step, tune anything per file, or know about
Kafka. Plot drawing is :mod:`anomaly.evaluation.plots`; metrics are :mod:`anomaly.evaluation.scorers`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from anomaly.adaptation import NoveltyConfig
from anomaly.bundle import DetectorConfig, ModelBundle
from anomaly.detector import StreamingDetector
from anomaly.errors import DataError, TrainingError
from anomaly.evaluation.datasets import (
    SKAB_FEATURES,
    SKAB_TIME_COLUMN,
    NabFile,
    SkabFile,
    load_nab,
    load_skab,
    nab_windows,
)
from anomaly.evaluation.scorers import (
    BinaryMetrics,
    NabProfileResult,
    NabReport,
    nab_score_corpus,
    probation_length,
    skab_binary_metrics,
)
from anomaly.readings import ReadingBatch
from anomaly.scoring import score_from_surprise
from anomaly.training import fit

__all__ = [
    "DETECTORS",
    "EvalSettings",
    "NabRun",
    "SkabRun",
    "add_evaluate_arguments",
    "label_windows",
    "run_nab",
    "run_skab",
]

logger = logging.getLogger(__name__)

Detector = Literal["ours", "river-hst"]
DETECTORS: tuple[str, ...] = ("ours", "river-hst")

RIVER_SEED = 42
"""Seed of River's HalfSpaceTrees (its other parameters stay at their defaults)."""

_DEVICE = "file"  # every benchmark file is one device of its own


@dataclass(frozen=True)
class EvalSettings:
    """The one set of hyperparameters used for every file of both benchmarks.

    Attributes
    ----------
    hidden_size, epochs, window, piece_length : the LSTM and its training (small: a NAB probationary
        period is at most 750 rows, so a larger network only memorises it).
    min_val_rows : held-out rows for early stopping and calibration; the held-out share of a training
        part is ``max(0.25, min_val_rows / rows)`` (NAB's shortest probationary period is 186 rows).
    seed : training seed.
    chunk_rows : readings per :meth:`StreamingDetector.process` call when streaming a file.
    novelty : the novelty rule's settings (see :mod:`anomaly.adaptation`), written into every trained
        bundle's :class:`~anomaly.bundle.DetectorConfig` (``novelty_*``, and ``cooldown``).
    score_source : ``"novelty"`` (what ``ours`` ships: the bundle's ``episode_rule="novelty"``) or
        ``"detector"``: ``episode_rule="threshold"``, the detector's own statistic and episode flag, for
        comparison (on NAB written as ``statistic / (2 * calibrated threshold)``, so that the fixed
        threshold 0.5 is each file's calibrated one).
    seasonal : train with ``seasonal=True``: a file whose training rows have a clear cycle gets a seasonal
        error channel (:func:`anomaly.training.dominant_period`, ``DetectorConfig.seasonal_period``).
    seasonal_alpha : the detector's ``seasonal_alpha`` (weight of the newest reading in the profile).
    seasonal_explains : the detector's ``seasonal_explains`` (the forecaster channel is fed the smaller of
        its surprise and the seasonal one).
    skab_train_rows : rows at the start of each SKAB file used for training and never scored.
    river_quantile : River's SKAB threshold, the quantile of its scores on the training rows (it ships
        none; ours needs none: its alerts are relative to each device's own records).
    """

    hidden_size: int = 32
    epochs: int = 30
    window: int = 32
    piece_length: int = 128
    min_val_rows: int = 70
    seed: int = 0
    chunk_rows: int = 256
    novelty: NoveltyConfig = field(default_factory=NoveltyConfig)
    score_source: Literal["novelty", "detector"] = "novelty"
    seasonal: bool = True
    seasonal_alpha: float = 0.5
    seasonal_explains: bool = True
    skab_train_rows: int = 400
    river_quantile: float = 0.99

    def __post_init__(self) -> None:
        for name in ("hidden_size", "epochs", "window", "piece_length", "min_val_rows", "chunk_rows",
                     "skab_train_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"evaluation setting {name}={value!r} must be an integer >= 1")
        if self.score_source not in ("novelty", "detector"):
            raise ValueError(f"evaluation setting score_source={self.score_source!r} must be 'novelty' or 'detector'")
        if not isinstance(self.seasonal, bool) or not 0.0 < self.seasonal_alpha <= 1.0:
            raise ValueError(f"evaluation settings seasonal={self.seasonal!r}, seasonal_alpha={self.seasonal_alpha!r} "
                             "must be true or false, and in (0, 1]")
        if not isinstance(self.seasonal_explains, bool):
            raise ValueError(f"evaluation setting seasonal_explains={self.seasonal_explains!r} must be true or false")
        if not 0.5 <= self.river_quantile < 1.0:
            raise ValueError(f"evaluation setting river_quantile={self.river_quantile} must be in [0.5, 1)")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["novelty"]["alphas"] = list(self.novelty.alphas)
        return out

    def detector_config(self) -> DetectorConfig:
        """The detector settings every trained bundle starts from (``fit`` calibrates the rest)."""
        n = self.novelty
        return DetectorConfig(episode_rule="novelty" if self.score_source == "novelty" else "threshold",
                              cooldown=n.cooldown, novelty_alphas=n.alphas, novelty_tolerance=n.tolerance,
                              novelty_half_life=n.half_life, novelty_refractory=n.refractory,
                              novelty_learn_readings=n.learn_readings, novelty_value_range=n.value_range,
                              seasonal_alpha=self.seasonal_alpha, seasonal_explains=self.seasonal_explains)


# ----------------------------------------------------------------------------------------- helpers


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Tiny networks run fastest on one thread; restore the caller's setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train(frame: pd.DataFrame, features: Sequence[str], time_col: str, settings: EvalSettings,
           name: str, context: Sequence[str] = ()) -> ModelBundle:
    rows = len(frame)
    detector = settings.detector_config()
    val_fraction = min(0.5, max(0.25, settings.min_val_rows / max(rows, 1)))
    try:
        return fit(frame, list(features), time_col=time_col, hidden_size=settings.hidden_size,
                   epochs=settings.epochs, window=settings.window, piece_length=settings.piece_length,
                   val_fraction=val_fraction, seed=settings.seed, detector=detector, name=name, progress=False,
                   seasonal=settings.seasonal, context=context)
    except TrainingError as exc:
        raise TrainingError(f"{name}: cannot train on its {rows} training rows: {exc}") from exc


def _batch(frame: pd.DataFrame, features: Sequence[str], time_col: str) -> ReadingBatch:
    return ReadingBatch.from_arrays(np.full(len(frame), _DEVICE, dtype=object),
                                    frame[time_col].to_numpy("datetime64[ms]").astype(np.int64),
                                    frame[list(features)].to_numpy(np.float32))


@dataclass(frozen=True)
class _Streamed:
    """Per-row outputs of streaming one file (N rows), 0/False where a reading was not scored."""

    score: np.ndarray  # [N] float64 ProcessResult.scores in [0, 1] (novelty rule: the alert score)
    novelty: np.ndarray  # [N] float64 novelty score in [0, 1) (0 under the threshold rule)
    alerts: np.ndarray  # [N] bool alerts
    anomalous: np.ndarray  # [N] bool inside an episode
    status: np.ndarray  # [N] int8 ReadingStatus


def _stream(bundle: ModelBundle, frame: pd.DataFrame, features: Sequence[str], time_col: str,
            settings: EvalSettings) -> _Streamed:
    """Feed ``frame`` in order, ``chunk_rows`` at a time, through the service's detector path (``features``:
    the bundle's inputs, context included)."""
    det = StreamingDetector(bundle, capacity=4)
    batch = _batch(frame, features, time_col)
    n = len(batch)
    score, novelty = np.zeros(n), np.zeros(n)
    anomalous, alerts = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    status = np.zeros(n, dtype=np.int8)
    for start in range(0, n, settings.chunk_rows):
        rows = np.arange(start, min(n, start + settings.chunk_rows))
        out = det.process(batch.take(rows))
        score[rows] = np.nan_to_num(out.scores.astype(np.float64), nan=0.0)
        novelty[rows] = np.nan_to_num(out.novelty.astype(np.float64), nan=0.0)
        status[rows], anomalous[rows], alerts[rows] = out.status, out.anomalous, out.alerts
    return _Streamed(score, novelty, alerts, anomalous, status)


def _save_plot(path: Path, **fields: Any) -> None:
    from anomaly.evaluation.plots import SeriesPlot, save_plot  # matplotlib only when plotting, not for `serve`

    figsize = fields.pop("figsize")
    save_plot(path, SeriesPlot(**fields), figsize=figsize, dpi=80)


def _river_model() -> Any:
    try:
        from river import anomaly, preprocessing
    except ImportError as exc:  # river is a dev extra
        raise DataError("--detector river-hst needs the 'river' package (pip install river)") from exc
    return preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(seed=RIVER_SEED)


def _river_records(frame: pd.DataFrame, features: Sequence[str]) -> list[dict[str, float]]:
    values = frame[list(features)].to_numpy(np.float64)
    return [dict(zip(features, row, strict=True)) for row in values.tolist()]


# --------------------------------------------------------------------------------------------- NAB


@dataclass
class NabRun:
    """The outcome of :func:`run_nab`.

    Attributes
    ----------
    detector : ``"ours"`` or ``"river-hst"``.
    results : file key -> results frame (``timestamp, value, anomaly_score``), as written.
    report : NAB scores optimised over the corpus (``None`` without labels).
    fixed_threshold : the threshold the detector ships with (``None`` for River, which has none).
    fixed : profile -> NAB result at ``fixed_threshold``.
    seconds : wall time of the run; out : the results folder.
    """

    detector: str
    results: dict[str, pd.DataFrame]
    report: NabReport | None
    fixed_threshold: float | None
    fixed: dict[str, NabProfileResult]
    seconds: float
    out: Path
    settings: EvalSettings

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary (written as ``summary.json`` beside the results)."""
        out: dict[str, Any] = {"benchmark": "nab", "detector": self.detector, "files": len(self.results),
                               "rows": int(sum(len(f) for f in self.results.values())),
                               "seconds": round(self.seconds, 1), "fixed_threshold": self.fixed_threshold,
                               "settings": self.settings.to_dict() if self.detector == "ours" else
                               {"river": f"MinMaxScaler | HalfSpaceTrees(seed={RIVER_SEED})"}}
        if self.report is not None:
            out["profiles"] = {
                name: {"best_threshold": r.threshold, "best": r.normalized, "raw": r.score,
                       "fixed": self.fixed[name].normalized if name in self.fixed else None,
                       "tp_rows": r.tp, "fp_rows": r.fp}
                for name, r in self.report.profiles.items()}
        return out


def _nab_ours(file: NabFile, settings: EvalSettings) -> tuple[np.ndarray, np.ndarray, float]:
    n = len(file.frame)
    probation = int(probation_length(n))
    bundle = _train(file.frame.iloc[:probation], ["value"], "timestamp", settings, file.key)
    streamed = _stream(bundle, file.frame, ["value"], "timestamp", settings)
    if settings.score_source == "detector":
        # each file has its own calibrated threshold; NAB takes one for the corpus, so the statistic is
        # written relative to it: 0.5 is the file's threshold (float32 scores resolve surprise to ~7)
        score = np.minimum(streamed.score, np.nextafter(np.float32(1), np.float32(0)))
        relative = np.minimum(1.0, -np.log10(1.0 - score) / (2.0 * bundle.config.threshold))
        return relative, streamed.alerts, 0.5
    # the float32 scores of a reading at the threshold are >= the float32 threshold (rounding is monotone)
    return streamed.score, streamed.alerts, float(np.float32(bundle.config.novelty.threshold))


def _nab_river(file: NabFile) -> tuple[np.ndarray, np.ndarray, None]:
    model = _river_model()
    scores = np.empty(len(file.frame))
    for i, x in enumerate(_river_records(file.frame, ["value"])):
        scores[i] = model.score_one(x)
        model.learn_one(x)
    return scores, np.zeros(len(scores), dtype=bool), None


def run_nab(root: str | Path, out: str | Path, detector: Detector = "ours", *,
            settings: EvalSettings | None = None, progress: bool = True, plots: bool = True,
            categories: tuple[str, ...] | None = None) -> NabRun:
    """Stream every NAB file through a detector, write results (and plots), score them if labelled.

    Parameters
    ----------
    root : NAB folder with ``data/<category>/*.csv`` and optionally ``labels/combined_windows.json``.
    out : results folder; ``<category>/<file>.csv`` (and ``.png``) and ``summary.json`` are written.
    detector : ``"ours"`` (this package) or ``"river-hst"``.
    settings : hyperparameters (default :class:`EvalSettings`).
    progress : show a progress bar; plots : draw one PNG per file.

    Returns
    -------
    NabRun
    """
    if detector not in DETECTORS:
        raise DataError(f"unknown detector {detector!r}; expected one of {DETECTORS}")
    settings = settings or EvalSettings()
    started = time.perf_counter()
    files = load_nab(root, categories)
    out = Path(out)
    results: dict[str, pd.DataFrame] = {}
    fixed_threshold: float | None = None
    bar = tqdm(files, desc=f"NAB {detector}", unit="file", disable=not progress)
    with _torch_threads(1):
        for file in bar:
            bar.set_postfix_str(file.name[:40])
            if detector == "ours":
                scores, alerts, fixed_threshold = _nab_ours(file, settings)
            else:
                scores, alerts, _ = _nab_river(file)
            frame = pd.DataFrame({"timestamp": file.frame["timestamp"], "value": file.frame["value"],
                                  "anomaly_score": scores})
            target = out / file.category / f"{file.name}.csv"
            target.parent.mkdir(parents=True, exist_ok=True)
            frame.to_csv(target, index=False)
            results[file.key] = frame
            if plots:
                _save_plot(target.with_suffix(".png"), timestamps=frame["timestamp"].to_numpy(),
                           values=frame[["value"]], scores=scores, threshold=fixed_threshold, windows=file.windows,
                           detections=alerts if detector == "ours" else None, title=f"{file.key} ({detector})",
                           figsize=(12.0, 4.5))
    report, fixed = None, {}
    if all(f.labelled for f in files):
        report = nab_score_corpus(results, nab_windows(files))
        if fixed_threshold is not None:
            fixed = report.score_at_threshold(fixed_threshold)
    else:
        logger.warning("NAB root %s has no labels for some files: results written, not scored", root)
    run = NabRun(detector, results, report, fixed_threshold, fixed, time.perf_counter() - started, out, settings)
    (out / "summary.json").write_text(json.dumps(run.summary(), indent=2))
    return run


def format_nab(run: NabRun) -> str:
    """The NAB result as a small text table (what ``evaluate nab`` prints)."""
    lines = [f"NAB, detector {run.detector}: {len(run.results)} files, "
             f"{sum(len(f) for f in run.results.values())} rows, {run.seconds:.0f} s; results in {run.out}"]
    if run.report is None:
        lines.append("no labels/combined_windows.json: not scored")
        return "\n".join(lines)
    head = f"{'profile':<20} {'best thr':>10} {'score':>7}"
    if run.fixed_threshold is not None:
        head += f" {'fixed thr':>10} {'score':>7}"
    lines.append(head)
    for name, r in run.report.profiles.items():
        line = f"{name:<20} {r.threshold:>10.4g} {r.normalized:>7.1f}"
        if run.fixed_threshold is not None:
            line += f" {run.fixed_threshold:>10.4g} {run.fixed[name].normalized:>7.1f}"
        lines.append(line)
    lines.append("(NAB normalised scores: 0 = null detector, 100 = perfect; 'best' uses the threshold NAB's "
                 "optimiser picks with the labels, 'fixed' the one the detector ships with)")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- SKAB


def label_windows(timestamps: np.ndarray, labels: np.ndarray) -> list[tuple[Any, Any]]:
    """Contiguous runs of ``labels == 1`` as ``(first timestamp, last timestamp)`` pairs.

    >>> label_windows(np.arange(8), np.array([0, 1, 1, 0, 0, 1, 0, 1]))
    [(1, 2), (5, 5), (7, 7)]
    """
    lab = np.asarray(labels) == 1
    edges = np.diff(np.r_[0, lab.astype(np.int8), 0])
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    ts = np.asarray(timestamps)
    return [(ts[s].item() if hasattr(ts[s], "item") else ts[s], ts[e].item() if hasattr(ts[e], "item") else ts[e])
            for s, e in zip(starts, ends, strict=True)]


@dataclass
class SkabRun:
    """The outcome of :func:`run_skab`: pooled metrics over the scored rows of every file."""

    detector: str
    metrics: BinaryMetrics
    per_file: pd.DataFrame
    results: dict[str, pd.DataFrame]
    threshold: dict[str, Any]
    seconds: float
    out: Path
    settings: EvalSettings

    def summary(self) -> dict[str, Any]:
        m = self.metrics
        return {"benchmark": "skab", "detector": self.detector, "files": len(self.results),
                "scored_rows": m.tp + m.tn + m.fp + m.fn, "f1": m.f1, "far": m.far, "mar": m.mar,
                "tp": m.tp, "tn": m.tn, "fp": m.fp, "fn": m.fn, "threshold": self.threshold,
                "seconds": round(self.seconds, 1),
                "settings": self.settings.to_dict() if self.detector == "ours" else
                {"river": f"MinMaxScaler | HalfSpaceTrees(seed={RIVER_SEED})"}}


def _skab_ours(file: SkabFile, settings: EvalSettings) -> tuple[np.ndarray, np.ndarray, float]:
    features = list(SKAB_FEATURES)
    train = settings.skab_train_rows
    bundle = _train(file.frame.iloc[:train], features, SKAB_TIME_COLUMN, settings, f"{file.group}/{file.name}")
    streamed = _stream(bundle, file.frame, features, SKAB_TIME_COLUMN, settings)
    if settings.score_source == "detector":
        return (streamed.score[train:], streamed.anomalous[train:].astype(np.int8),
                float(score_from_surprise(bundle.config.threshold)))
    return streamed.novelty[train:], streamed.anomalous[train:].astype(np.int8), bundle.config.novelty.threshold


def _skab_river(file: SkabFile, settings: EvalSettings) -> tuple[np.ndarray, np.ndarray, float]:
    model = _river_model()
    records = _river_records(file.frame, SKAB_FEATURES)
    train = settings.skab_train_rows
    for x in records[:train]:
        model.learn_one(x)
    # normal data only: the trained model scores without learning; its threshold is a high quantile of
    # its scores on the training rows (HalfSpaceTrees ships no threshold)
    threshold = float(np.quantile([model.score_one(x) for x in records[:train]], settings.river_quantile))
    scores = np.array([model.score_one(x) for x in records[train:]])
    return scores, (scores > threshold).astype(np.int8), threshold


def run_skab(root: str | Path, out: str | Path, detector: Detector = "ours", *,
             settings: EvalSettings | None = None, progress: bool = True, plots: bool = True,
             groups: Sequence[str] | None = None) -> SkabRun:
    """Train on each SKAB file's first rows, score the rest, write results (and plots), compute metrics.

    Parameters
    ----------
    root : SKAB folder with ``data/<group>/<n>.csv``.
    out : results folder; ``<group>/<file>.csv`` (and ``.png``) and ``summary.json`` are written.
    detector, settings, progress, plots : as in :func:`run_nab`.
    groups : labelled groups to run (default: every folder under ``data/`` except ``anomaly-free``).

    Returns
    -------
    SkabRun with F1/FAR/MAR pooled over the scored rows (training rows never count).
    """
    if detector not in DETECTORS:
        raise DataError(f"unknown detector {detector!r}; expected one of {DETECTORS}")
    settings = settings or EvalSettings()
    started = time.perf_counter()
    root, out = Path(root), Path(out)
    if groups is None:
        data = root / "data"
        if not data.is_dir():
            raise DataError(f"SKAB data folder not found: {data}")
        groups = sorted(p.name for p in data.iterdir() if p.is_dir() and p.name != "anomaly-free")
    files = [f for g in groups for f in load_skab(root, g)]
    if not files:
        raise DataError(f"no labelled SKAB files under {root / 'data'}")
    if detector == "ours":
        threshold_info: dict[str, Any] = {"rule": "novelty alert: a device record beaten by the tolerance",
                                          "threshold": settings.novelty.threshold}
    else:
        threshold_info = {"rule": f"{settings.river_quantile} quantile of the model's scores on its training rows"}
    train = settings.skab_train_rows
    truth, preds, rows, results = [], [], [], {}
    bar = tqdm(files, desc=f"SKAB {detector}", unit="file", disable=not progress)
    with _torch_threads(1):
        for file in bar:
            bar.set_postfix_str(f"{file.group}/{file.name}")
            if len(file.frame) <= train:
                raise DataError(f"SKAB file {file.path} has {len(file.frame)} rows; needs more than the "
                                f"{train} training rows")
            if detector == "ours":
                scores, pred, score_threshold = _skab_ours(file, settings)
            else:
                scores, pred, score_threshold = _skab_river(file, settings)
            scored = file.frame.iloc[train:]
            frame = pd.DataFrame({SKAB_TIME_COLUMN: scored[SKAB_TIME_COLUMN].to_numpy(), "anomaly_score": scores,
                                  "anomaly_pred": pred})
            target = out / file.group / f"{file.name}.csv"
            target.parent.mkdir(parents=True, exist_ok=True)
            frame.to_csv(target, index=False)
            key = f"{file.group}/{file.name}"
            results[key] = frame
            y = file.anomaly[train:]
            truth.append(y)
            preds.append(pred)
            m = BinaryMetrics(tp=int(np.sum((y == 1) & (pred == 1))), tn=int(np.sum((y != 1) & (pred != 1))),
                              fp=int(np.sum((y != 1) & (pred == 1))), fn=int(np.sum((y == 1) & (pred != 1))))
            rows.append({"file": key, "f1": m.f1, "far": m.far, "mar": m.mar, "threshold": score_threshold})
            if plots:
                feats = file.frame[list(SKAB_FEATURES)]
                mean, std = feats.iloc[:train].mean(), feats.iloc[:train].std().replace(0.0, 1.0)
                _save_plot(target.with_suffix(".png"), timestamps=scored[SKAB_TIME_COLUMN].to_numpy(),
                           values=(feats.iloc[train:] - mean) / std, scores=scores, threshold=score_threshold,
                           windows=label_windows(scored[SKAB_TIME_COLUMN].to_numpy(), y),
                           detections=pred.astype(bool),
                           title=f"SKAB {key} ({detector}); values as z-scores of the training rows",
                           figsize=(12.0, 5.0))
    metrics = skab_binary_metrics(truth, preds)
    run = SkabRun(detector, metrics, pd.DataFrame(rows).set_index("file"), results, threshold_info,
                  time.perf_counter() - started, out, settings)
    (out / "summary.json").write_text(json.dumps(run.summary(), indent=2))
    return run


def format_skab(run: SkabRun) -> str:
    """The SKAB result as text (what ``evaluate skab`` prints)."""
    f1, far, mar = run.metrics.skab_rounded()
    m = run.metrics
    lines = [f"SKAB, detector {run.detector}: {len(run.results)} files, {m.tp + m.tn + m.fp + m.fn} scored rows "
             f"(first {run.settings.skab_train_rows} rows of each file train, never scored), {run.seconds:.0f} s; "
             f"results in {run.out}",
             f"F1 {f1:.2f}   FAR {far:.2f} %   MAR {mar:.2f} %   (TP {m.tp}, FP {m.fp}, FN {m.fn}, TN {m.tn})"]
    if run.threshold:
        lines.append("threshold: " + "; ".join(f"{k} {v}" for k, v in run.threshold.items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI


def _cmd_evaluate(args: argparse.Namespace) -> int:
    settings = EvalSettings(seed=args.seed)
    if args.benchmark == "msl":
        from anomaly.evaluation.msl import format_msl, run_msl  # it imports this module

        msl = run_msl(args.data, args.out, args.detector, context=args.context, settings=settings,
                      progress=not args.quiet, plots=not args.no_plots)
        print(format_msl(msl))
    elif args.benchmark == "nab":
        nab = run_nab(args.data, args.out, args.detector, settings=settings, progress=not args.quiet,
                      plots=not args.no_plots)
        print(format_nab(nab))
    else:
        skab = run_skab(args.data, args.out, args.detector, settings=settings, progress=not args.quiet,
                        plots=not args.no_plots)
        print(format_skab(skab))
    return 0


def add_evaluate_arguments(evaluate: argparse.ArgumentParser) -> None:
    """Add ``nab``, ``skab`` and ``msl`` under the ``evaluate`` command (``anomaly.cli`` registers it lazily).

    >>> evaluate = argparse.ArgumentParser(prog="sensor-anomaly evaluate")
    >>> add_evaluate_arguments(evaluate)
    >>> args = evaluate.parse_args(["skab", "--data", "skab", "--out", "res", "--detector", "river-hst"])
    >>> args.benchmark, args.detector, str(args.out)
    ('skab', 'river-hst', 'res')
    """
    benchmarks = evaluate.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    helps = {
        "nab": ("the Numenta Anomaly Benchmark: data/<category>/*.csv, labels/combined_windows.json",
                "NAB root folder (holds data/ and optionally labels/)"),
        "skab": ("the Skoltech Anomaly Benchmark: data/<group>/<n>.csv (labelled experiments)",
                 "SKAB root folder (holds data/)"),
        "msl": ("NASA's Curiosity rover telemetry as labelled by Telemanom: train/<chan>.npy, test/<chan>.npy, "
                "labeled_anomalies.csv", "MSL root folder (Telemanom's layout)"),
    }
    for name, (text, data_help) in helps.items():
        cmd = benchmarks.add_parser(name, help=text, description=f"Evaluate on {text}.")
        cmd.add_argument("--data", required=True, type=Path, help=data_help)
        cmd.add_argument("--out", required=True, type=Path, help="results folder (created if needed)")
        cmd.add_argument("--detector", choices=DETECTORS, default="ours",
                         help="ours (default) or river-hst (River HalfSpaceTrees, the peer baseline)")
        cmd.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
        cmd.add_argument("--no-plots", action="store_true", help="write no PNG per file")
        cmd.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "msl":
            cmd.add_argument("--context", action="store_true",
                             help="feed columns 1.. (the commands) to the model as context inputs (default: "
                                  "the telemetry column alone)")
        cmd.set_defaults(func=_cmd_evaluate)
