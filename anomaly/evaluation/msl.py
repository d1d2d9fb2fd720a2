"""The ``sensor-anomaly evaluate msl`` run: spacecraft telemetry scored per channel, counted as Telemanom does.

Why it exists: NASA's Curiosity (MSL) telemetry, labelled by Telemanom (Hundman et al., KDD 2018), is the
reference benchmark for LSTM detectors of sensor telemetry, and its channels come with the commands that
explain them (context). This module runs any folder of Telemanom's layout (:func:`load_msl`) through
the code the service runs, under the benchmark's protocol, so that our figures compare with published ones.

Per channel: the model trains on ``train/`` only (the :class:`~anomaly.evaluation.runs.EvalSettings`
NAB and SKAB use, one set for every channel); ``test/`` is streamed once, in order, from a fresh
:class:`~anomaly.detector.StreamingDetector` (rows are time steps; row i gets timestamp i seconds);
``DIR/<chan>.csv`` gets one row per test row: ``anomaly_score`` (the novelty score in [0, 1)) and
``anomaly_pred`` (the novelty episode flag: what the service would raise). Column 0 (telemetry) is the
scored feature; with ``context=True`` the other columns are the bundle's context inputs (seen by the
LSTM, never scored). Predicted sequences are counted against the labelled ones with
:func:`~anomaly.evaluation.scorers.telemanom_event_counts`, per spacecraft and in total.

River's ``HalfSpaceTrees`` runs through the same loop as the peer: it learns the training rows, then
scores the test rows without learning; a row is flagged above the ``river_quantile`` of its training scores.

What it must not do: look at labels before counting, tune anything per channel, or know about Kafka.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from anomaly.errors import DataError
from anomaly.evaluation.datasets import MslChannel, load_msl
from anomaly.evaluation.runs import (
    DETECTORS,
    RIVER_SEED,
    Detector,
    EvalSettings,
    _river_model,
    _river_records,
    _save_plot,
    _stream,
    _torch_threads,
    _train,
)
from anomaly.evaluation.scorers import EventCounts, predicted_sequences, telemanom_event_counts

__all__ = ["TELEMANOM_PUBLISHED", "MslRun", "format_msl", "msl_columns", "run_msl"]

logger = logging.getLogger(__name__)

TELEMANOM_PUBLISHED = {"precision": 0.926, "recall": 0.694, "f1": 0.79}
"""Telemanom's published event-level figures on the 27 MSL channels (paper / README; see the data README)."""

_TIME = "ts"
_STEP_MS = 1000  # rows have no timestamps: row i is i seconds, so every interval is the nominal one


def msl_columns(n_columns: int) -> tuple[list[str], list[str]]:
    """Names of a channel's columns: ``(["telemetry"], ["cmd_1", ..., "cmd_{C-1}"])``.

    >>> msl_columns(3)
    (['telemetry'], ['cmd_1', 'cmd_2'])
    """
    return ["telemetry"], [f"cmd_{i}" for i in range(1, n_columns)]


def _frame(array: np.ndarray) -> pd.DataFrame:
    scored, context = msl_columns(array.shape[1])
    frame = pd.DataFrame(array, columns=scored + context)
    frame.insert(0, _TIME, np.arange(len(array), dtype=np.int64) * _STEP_MS)
    return frame


@dataclass
class MslRun:
    """The outcome of :func:`run_msl`.

    Attributes
    ----------
    detector : ``"ours"`` or ``"river-hst"``; context : whether the context columns were model inputs.
    per_channel : one row per channel (``chan_id``, ``spacecraft``, ``rows``, ``tp``, ``fp``, ``fn``,
        ``seconds``), in the label file's order.
    results : channel id -> its results frame (``anomaly_score``, ``anomaly_pred``), as written.
    seconds : wall time of the run; out : the results folder.
    """

    detector: str
    context: bool
    per_channel: pd.DataFrame
    results: dict[str, pd.DataFrame]
    seconds: float
    out: Path
    settings: EvalSettings

    def counts(self, channels: Sequence[str] | None = None) -> EventCounts:
        """Counts summed over ``channels`` (default: all)."""
        rows = self.per_channel if channels is None else self.per_channel[self.per_channel.chan_id.isin(channels)]
        return EventCounts(int(rows.tp.sum()), int(rows.fp.sum()), int(rows.fn.sum()))

    def by_spacecraft(self) -> dict[str, EventCounts]:
        return {craft: self.counts(group.chan_id.tolist())
                for craft, group in self.per_channel.groupby("spacecraft", sort=True)}

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary (written as ``summary.json`` beside the results)."""

        def figures(c: EventCounts) -> dict[str, Any]:
            return {"tp": c.tp, "fp": c.fp, "fn": c.fn, "precision": c.precision, "recall": c.recall, "f1": c.f1}

        return {"benchmark": "msl", "detector": self.detector, "context": self.context,
                "channels": len(self.per_channel), "rows": int(self.per_channel.rows.sum()),
                "seconds": round(self.seconds, 1), "total": figures(self.counts()),
                "spacecraft": {k: figures(v) for k, v in self.by_spacecraft().items()},
                "per_channel": self.per_channel.to_dict(orient="records"),
                "settings": self.settings.to_dict() if self.detector == "ours" else
                {"river": f"MinMaxScaler | HalfSpaceTrees(seed={RIVER_SEED})",
                 "river_quantile": self.settings.river_quantile}}


def _msl_ours(channel: MslChannel, settings: EvalSettings, context: bool) -> tuple[np.ndarray, np.ndarray, float]:
    features, commands = msl_columns(channel.train.shape[1])
    context = commands if context else []
    bundle = _train(_frame(channel.train), features, _TIME, settings, channel.chan_id, context=context)
    streamed = _stream(bundle, _frame(channel.test), list(bundle.inputs), _TIME, settings)
    if settings.score_source == "detector":
        return streamed.score, streamed.anomalous, float(bundle.config.threshold)
    return streamed.novelty, streamed.anomalous, bundle.config.novelty.threshold


def _msl_river(channel: MslChannel, settings: EvalSettings, context: bool) -> tuple[np.ndarray, np.ndarray, float]:
    scored, commands = msl_columns(channel.train.shape[1])
    features = scored + commands if context else scored
    model = _river_model()
    train = _river_records(_frame(channel.train), features)
    for x in train:
        model.learn_one(x)
    threshold = float(np.quantile([model.score_one(x) for x in train], settings.river_quantile))
    scores = np.array([model.score_one(x) for x in _river_records(_frame(channel.test), features)])
    return scores, scores > threshold, threshold


def run_msl(root: str | Path, out: str | Path, detector: Detector = "ours", *, context: bool = False,
            settings: EvalSettings | None = None, progress: bool = True, plots: bool = True,
            channels: tuple[str, ...] | None = None) -> MslRun:
    """Train on each channel's ``train/``, stream its ``test/``, write results (and plots), count events.

    Parameters
    ----------
    root : a folder of Telemanom's layout (``train/``, ``test/``, ``labeled_anomalies.csv``).
    out : results folder; ``<chan>.csv`` (and ``.png``) and ``summary.json`` are written.
    detector : ``"ours"`` or ``"river-hst"``.
    context : feed columns 1.. to the model as context inputs (default: telemetry only).
    settings, progress, plots : as in :func:`anomaly.evaluation.runs.run_nab`.
    channels : only these channel ids (default: every channel of the label file).

    Returns
    -------
    MslRun
    """
    if detector not in DETECTORS:
        raise DataError(f"unknown detector {detector!r}; expected one of {DETECTORS}")
    settings = settings or EvalSettings()
    started = time.perf_counter()
    loaded = load_msl(root, channels)
    if not loaded:
        raise DataError(f"no channels in {Path(root)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, results = [], {}
    label = "context" if context else "telemetry only"
    bar = tqdm(loaded, desc=f"MSL {detector} ({label})", unit="channel", disable=not progress)
    with _torch_threads(1):
        for channel in bar:
            bar.set_postfix_str(channel.chan_id)
            began = time.perf_counter()
            if detector == "ours":
                scores, pred, threshold = _msl_ours(channel, settings, context)
            else:
                scores, pred, threshold = _msl_river(channel, settings, context)
            frame = pd.DataFrame({"anomaly_score": scores, "anomaly_pred": pred.astype(np.int8)})
            target = out / f"{channel.chan_id}.csv"
            frame.to_csv(target, index=False)
            results[channel.chan_id] = frame
            runs = predicted_sequences(pred)
            counts = telemanom_event_counts(channel.sequences, runs)
            rows.append({"chan_id": channel.chan_id, "spacecraft": channel.spacecraft, "rows": len(frame),
                         "tp": counts.tp, "fp": counts.fp, "fn": counts.fn, "predicted": len(runs),
                         "seconds": round(time.perf_counter() - began, 2)})
            if plots:
                _save_plot(target.with_suffix(".png"), timestamps=np.arange(len(frame)),
                           values={"telemetry": channel.test[:, 0]}, scores=scores, threshold=threshold,
                           windows=list(channel.sequences), detections=pred.astype(bool),
                           title=f"{channel.spacecraft} {channel.chan_id} ({detector}, {label}): "
                                 f"TP {counts.tp} FP {counts.fp} FN {counts.fn}",
                           figsize=(12.0, 4.5))
    run = MslRun(detector, context, pd.DataFrame(rows), results, time.perf_counter() - started, out, settings)
    (out / "summary.json").write_text(json.dumps(run.summary(), indent=2))
    return run


def format_msl(run: MslRun) -> str:
    """The MSL result as a small text table (what ``evaluate msl`` prints)."""
    label = "with context" if run.context else "telemetry only"
    lines = [f"MSL, detector {run.detector} ({label}): {len(run.per_channel)} channels, "
             f"{int(run.per_channel.rows.sum())} test rows, {run.seconds:.0f} s; results in {run.out}",
             f"{'':<10} {'TP':>4} {'FP':>4} {'FN':>4} {'precision':>10} {'recall':>7} {'F1':>5}"]
    for name, c in [*run.by_spacecraft().items(), ("total", run.counts())]:
        lines.append(f"{name:<10} {c.tp:>4} {c.fp:>4} {c.fn:>4} {c.precision:>10.3f} {c.recall:>7.3f} {c.f1:>5.2f}")
    lines.append("(event level, Telemanom's counting: a predicted run overlapping a labelled sequence is a hit, "
                 "one overlapping none a false positive; Telemanom published precision 0.926, recall 0.694)")
    return "\n".join(lines)
