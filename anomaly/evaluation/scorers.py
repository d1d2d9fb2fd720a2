"""Benchmark scoring: the NAB score exactly as NAB computes it, F1/FAR/MAR as SKAB reports them, and
event-level precision/recall as Telemanom counts them (MSL).

Why this module exists: detection quality claims ("NAB standard 65") are only comparable with
published numbers if the scorer is NAB's own, rule for rule. This is a vectorised re-implementation
of NAB v1.1 (github.com/numenta/NAB at ea702d75, ``nab/sweeper.py``, ``nab/optimizer.py``,
``nab/scorer.py``, ``nab/runner.py``) and of SKAB's ``core/metrics.py`` (``chp_score(...,
metric="binary")``). Where NAB's code would crash, this module takes the obvious limit and says so.

What it must not do: no detection, no thresholds of its own and no smoothing; it scores the
per-row ``anomaly_score`` it is given. It never reorders rows: NAB is positional. No Kafka, no HTTP.

NAB's rules, as its ``Sweeper`` applies them (row i of a file with N rows):

1. Probationary period: rows with ``i < min(floor(0.15 * N), 0.15 * 5000)`` are dropped from
   scoring entirely (no FP, no TP; a window lying wholly inside it is not a missed window).
2. Windows are entered at the first row whose timestamp equals the next window's start and left
   after the row whose timestamp equals its end. A window's width is ``index(end) - index(start) + 1``
   (first occurrences). Inside, a row's relative position is ``-(right - i + 1) / width`` in [-1, 0).
3. ``scaled_sigmoid(x) = 2 / (1 + exp(5 x)) - 1``, and -1 for x > 3. An in-window detection is worth
   ``tpWeight * scaled_sigmoid(pos) / scaled_sigmoid(-1)`` (so the first row earns exactly tpWeight);
   only the earliest detection of a window counts, and a window without one costs ``-fnWeight``.
4. A detection outside every window costs ``fpWeight * scaled_sigmoid(|i - prevRight| / (prevWidth - 1))``
   after a window (mildly negative right after it, -fpWeight from 3 widths on) and ``-fpWeight``
   before the first window.
5. One threshold per profile is chosen over the whole corpus: all scorable rows of all files are
   sorted by score once and swept (a row is a detection when ``score >= threshold``); the first
   (highest) threshold with the maximal total wins. The 1.1 start threshold means "no detections".
6. ``normalized = 100 * (score - null) / (perfect - null)``: ``perfect`` is the number of windows in
   the label file times tpWeight; ``null`` is NAB's null detector (a constant 0.5 score, run through
   the same optimiser, which in practice means "no detections": ``-fnWeight`` per scorable window).

Where NAB's code fails, this module does the following instead (none of these cases occurs on the
NAB corpus): a false positive after a one-row window (NAB: ZeroDivisionError) costs -fpWeight, the
limit; a window whose end first occurs before its start (NAB: zero or negative width) is a
:class:`~anomaly.errors.DataError`; with scores above 1.1 the "nothing detected" entry sits just above
the top score instead of being labelled 1.1; a fixed threshold below all of a file's scores (NAB's
``scoreDataSet`` returns None) scores every row as a detection.

Cross-checked against a transcription of NAB's ``Sweeper`` and optimiser: identical thresholds,
counts and best threshold, scores within 1e-11, on the real corpus and ~3000 random small corpora
(repeated and backward timestamps, ties, probation-heavy files).

Cost: building a :class:`NabCorpus` is O(N) numpy plus a Python step per row whose timestamp is a
window boundary; one sweep is one ``argsort`` of the N scorable scores, shared by all profiles
(NAB's 180k-row corpus: well under a second).

Telemanom's event counting (``evaluate_sequences`` in ``telemanom/detector.py``), per channel: a predicted
sequence is a maximal run of flagged rows; one that overlaps any labelled sequence matches the *first*
labelled sequence (in label-file order) it overlaps, which counts as a true positive the first time it is
matched (a labelled sequence touched by several predicted ones counts once; the others are neither TP nor
FP); one that overlaps none is a false positive; a labelled sequence never matched is a false negative.
No point adjustment.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from anomaly.errors import DataError

__all__ = [
    "MAX_TP",
    "NAB_PROFILES",
    "NAB_START_THRESHOLD",
    "BinaryMetrics",
    "CostMatrix",
    "EventCounts",
    "NabCorpus",
    "NabProfileResult",
    "NabReport",
    "nab_score_corpus",
    "predicted_sequences",
    "probation_length",
    "read_nab_profiles",
    "scaled_sigmoid",
    "skab_binary_metrics",
    "telemanom_event_counts",
]

logger = logging.getLogger(__name__)

#: NAB's sweep starts above every score so that its first entry is "nothing detected"
#: (``curThreshold = 1.1`` in ``Sweeper.calcScoreByThreshold``; NAB scores lie in [0, 1]).
NAB_START_THRESHOLD = 1.1

#: Default probationary fraction of each file (``Runner.probationaryPercent``).
NAB_PROBATION_PERCENT = 0.15


def scaled_sigmoid(position: float | np.ndarray) -> np.ndarray:
    """NAB's ``scaledSigmoid``: ``2 * sigmoid(-5 x) - 1``, and exactly -1 beyond ``x > 3``.

    Parameters
    ----------
    position : float or numpy.ndarray
        Relative position: -1 is a window's left edge, 0 its right edge, > 0 past it.

    Returns
    -------
    numpy.ndarray
        Values in [-1, 1), same shape as ``position``.

    Examples
    --------
    >>> scaled_sigmoid(np.array([-1.0, -0.5, 0.0, 1.0, 3.5])).round(5).tolist()
    [0.98661, 0.84828, 0.0, -0.98661, -1.0]
    """
    pos = np.asarray(position, dtype=np.float64)
    with np.errstate(over="ignore"):
        # Same operation order as NAB: 2 * (1 / (1 + exp(-(-5 x)))) - 1.0.
        value = 2.0 * (1.0 / (1.0 + np.exp(5.0 * pos))) - 1.0
    return np.where(pos > 3.0, -1.0, value)


#: ``scaledSigmoid(-1.0)``: the value of a detection on a window's first row, used to scale TPs.
MAX_TP = float(scaled_sigmoid(-1.0))


def probation_length(n_rows: int, probation_percent: float = NAB_PROBATION_PERCENT) -> float:
    """NAB's ``getProbationPeriod``: rows with index below this are not scored.

    ``min(floor(p * n), p * 5000)``, i.e. at most 750 rows with the default 15 %.

    Examples
    --------
    >>> probation_length(4032), probation_length(22695), probation_length(10)
    (604, 750.0, 1)
    """
    return min(math.floor(probation_percent * n_rows), probation_percent * 5000)


@dataclass(frozen=True)
class CostMatrix:
    """One NAB application profile (``profiles.json``'s ``CostMatrix``).

    ``tn_weight`` is carried for completeness; NAB's score does not use it.
    """

    tp_weight: float
    fp_weight: float
    fn_weight: float
    tn_weight: float = 1.0

    @classmethod
    def coerce(cls, value: CostMatrix | Mapping[str, Any], name: str = "profile") -> CostMatrix:
        """Accept a CostMatrix, a ``{"tpWeight": ...}`` dict or a ``{"CostMatrix": {...}}`` dict.

        >>> CostMatrix.coerce({"CostMatrix": {"tpWeight": 1, "fnWeight": 2, "fpWeight": 0.11}})
        CostMatrix(tp_weight=1.0, fp_weight=0.11, fn_weight=2.0, tn_weight=1.0)
        """
        if isinstance(value, CostMatrix):
            return value
        if not isinstance(value, Mapping):
            raise DataError(f"NAB profile {name!r}: expected a mapping of weights, "
                            f"got {type(value).__name__}")
        inner = value.get("CostMatrix", value)
        try:
            return cls(
                tp_weight=float(inner["tpWeight"]),
                fp_weight=float(inner["fpWeight"]),
                fn_weight=float(inner["fnWeight"]),
                tn_weight=float(inner.get("tnWeight", 1.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"NAB profile {name!r} needs numeric tpWeight, fpWeight, fnWeight: {exc}") from exc


#: NAB's three profiles, as in ``config/profiles.json``.
NAB_PROFILES: dict[str, CostMatrix] = {
    "standard": CostMatrix(tp_weight=1.0, fp_weight=0.11, fn_weight=1.0),
    "reward_low_FP_rate": CostMatrix(tp_weight=1.0, fp_weight=0.22, fn_weight=1.0),
    "reward_low_FN_rate": CostMatrix(tp_weight=1.0, fp_weight=0.11, fn_weight=2.0),
}


def read_nab_profiles(path: str | Path) -> dict[str, CostMatrix]:
    """Read NAB's ``config/profiles.json``.

    Raises
    ------
    DataError
        The file is missing, not JSON, or a profile lacks a weight.
    """
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read NAB profiles {p}: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{p}: expected a JSON object of profile -> CostMatrix")
    return {name: CostMatrix.coerce(value, name) for name, value in raw.items()}


def _coerce_profiles(profiles: Mapping[str, CostMatrix | Mapping[str, Any]] | None) -> dict[str, CostMatrix]:
    if profiles is None:
        return dict(NAB_PROFILES)
    out = {name: CostMatrix.coerce(value, name) for name, value in profiles.items()}
    if not out:
        raise DataError("profiles: at least one NAB profile is needed")
    return out


# --------------------------------------------------------------------------------- time handling


def _time_keys(values: Any, name: str) -> np.ndarray:
    """Timestamps as int64 keys: integers as they are, datetimes/strings as naive nanoseconds."""
    series = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values))
    if pd.api.types.is_integer_dtype(series.dtype):
        return series.to_numpy(dtype=np.int64)
    try:
        parsed = pd.to_datetime(series)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{name}: cannot parse timestamps: {exc}") from exc
    if parsed.isna().any():
        raise DataError(f"{name}: {int(parsed.isna().sum())} missing timestamps")
    if isinstance(parsed.dtype, pd.DatetimeTZDtype):
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    return parsed.astype("datetime64[ns]").to_numpy().view(np.int64)


def _bound_key(value: Any, name: str) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{name}: bad window boundary {value!r}: {exc}") from exc
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return int(stamp.as_unit("ns").value)


def _file_layout(keys: np.ndarray, bounds: list[tuple[int, int]], name: str) -> tuple[np.ndarray, np.ndarray]:
    """Replay ``Sweeper.calcSweepScore``'s window walk for one file.

    Returns ``local`` ([N] int64, window number within the file or -1) and ``unweighted`` ([N]
    float64): ``scaled_sigmoid(position)`` for rows inside a window and for rows after one, -1.0
    for rows before the first window. Weights are applied later, per profile.

    The walk is NAB's state machine (enter on ``ts == next start``, leave after ``ts == current
    end``), stepped only at rows whose timestamp is some window boundary; between those rows the
    state is constant and the values are filled with numpy.
    """
    n = keys.size
    local = np.full(n, -1, dtype=np.int64)
    unweighted = np.full(n, -1.0, dtype=np.float64)
    if not bounds:
        return local, unweighted
    first_index: dict[int, int] = {}
    for bound in {b for window in bounds for b in window}:
        hits = np.flatnonzero(keys == bound)
        if hits.size == 0:
            shown = pd.Timestamp(bound) if abs(bound) > 10**15 else bound  # ns keys read as dates
            raise DataError(f"{name}: window boundary {shown} does not occur in the file's timestamps "
                            "(NAB needs boundaries that match a row exactly)")
        first_index[bound] = int(hits[0])
    events = np.flatnonzero(np.isin(keys, np.fromiter(first_index, dtype=np.int64)))

    state: dict[str, Any] = {"cur": None, "prev": None}

    def fill(lo: int, hi: int) -> None:
        if hi <= lo:
            return
        idx = np.arange(lo, hi)
        cur, prev = state["cur"], state["prev"]
        if cur is not None:
            number, right, width, _ = cur
            local[lo:hi] = number
            unweighted[lo:hi] = scaled_sigmoid(-(right - idx + 1) / width)
        elif prev is not None:
            right, width = prev
            # NAB divides by (prevWidth - 1) and would raise ZeroDivisionError for a one-row window;
            # we take the limit (position +inf -> -1.0, a full false positive).
            with np.errstate(divide="ignore"):
                unweighted[lo:hi] = scaled_sigmoid(np.abs(right - idx) / float(width - 1.0))

    nxt = 0
    lo = 0
    for e in events.tolist():
        fill(lo, e)
        if nxt < len(bounds) and keys[e] == bounds[nxt][0]:
            start, end = bounds[nxt]
            right = first_index[end]
            width = right - first_index[start] + 1
            if width < 1:
                # NAB would divide by zero (width 0) or score with a negative width: the label is
                # broken (its end first occurs before its start, e.g. around repeated timestamps).
                raise DataError(f"{name}: window {bounds[nxt]} ends (first occurrence, row {right}) "
                                f"before it starts (row {first_index[start]})")
            state["cur"] = (nxt, right, float(width), end)
            nxt += 1
        fill(e, e + 1)
        cur = state["cur"]
        if cur is not None and keys[e] == cur[3]:
            state["prev"] = (e, cur[2])
            state["cur"] = None
        lo = e + 1
    fill(lo, n)
    if nxt < len(bounds):
        logger.warning("%s: %d window(s) never entered (label windows out of time order?); "
                       "NAB ignores them when sweeping", name, len(bounds) - nxt)
    return local, unweighted


# ---------------------------------------------------------------------------------- NAB results


@dataclass(frozen=True)
class NabProfileResult:
    """NAB's result for one profile at one threshold.

    Attributes
    ----------
    profile : str
    threshold : float
        A row is a detection when its score is ``>= threshold``.
    score : float
        Raw NAB score summed over files (NAB's ``Totals`` row).
    normalized : float
        ``100 * (score - null_score) / (perfect_score - null_score)``; NaN if perfect == null.
    null_score, perfect_score : float
    tp, tn, fp, fn : int
        Row counts over scorable rows (NAB's ``ThresholdScore`` counts: rows, not windows).
    """

    profile: str
    threshold: float
    score: float
    normalized: float
    null_score: float
    perfect_score: float
    tp: int
    tn: int
    fp: int
    fn: int

    @property
    def total(self) -> int:
        """Scorable rows (NAB's ``Total_Count``)."""
        return self.tp + self.tn + self.fp + self.fn


def _normalize(score: float, null: float, perfect: float) -> float:
    if perfect == null:
        return float("nan")
    return 100.0 * (score - null) / (perfect - null)


@dataclass(frozen=True)
class NabCorpus:
    """The scoring layout of a labelled corpus: which rows are scorable, in which window, at what weight.

    It depends only on timestamps and windows, so one corpus scores any number of detectors.

    Attributes
    ----------
    names : tuple of str
        File keys in the order given.
    lengths : numpy.ndarray
        [n_files] int64 rows per file.
    file_id : numpy.ndarray
        [N] int64 file number of each row (rows of all files concatenated in order).
    window_id : numpy.ndarray
        [N] int64 corpus-wide window number, -1 outside windows. As in NAB, which names a window
        ``"<file>|<start>"``, windows of one file that share a start timestamp share a number
        (possible only with repeated timestamps).
    unweighted : numpy.ndarray
        [N] float64 NAB sweep value before profile weights (see :func:`_file_layout`).
    scorable : numpy.ndarray
        [N] bool, False inside each file's probationary period.
    n_windows : int
        Windows in the labels of these files (NAB's ``tpCount``), probationary ones included.
    window_file : numpy.ndarray
        [W] int64 file number of each window number.
    """

    names: tuple[str, ...]
    lengths: np.ndarray = field(repr=False)
    file_id: np.ndarray = field(repr=False)
    window_id: np.ndarray = field(repr=False)
    unweighted: np.ndarray = field(repr=False)
    scorable: np.ndarray = field(repr=False)
    n_windows: int = 0
    window_file: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)

    @classmethod
    def build(
        cls,
        timestamps: Mapping[str, Any],
        windows: Mapping[str, Sequence[tuple[Any, Any]]],
        probation_percent: float = NAB_PROBATION_PERCENT,
    ) -> NabCorpus:
        """Lay out files for scoring.

        Parameters
        ----------
        timestamps : mapping of str to array-like
            File key -> timestamps in row order (datetimes, strings, or integers).
        windows : mapping of str to sequence of (start, end)
            File key -> inclusive windows in time order (NAB's ``combined_windows.json``); every
            key of ``timestamps`` must be present (``[]`` for a file without anomalies).
        probation_percent : float
            NAB's probationary fraction (0.15).

        Raises
        ------
        DataError
            A file has no windows entry, or a boundary does not occur in its timestamps.
        """
        if not timestamps:
            raise DataError("NAB corpus: no files to score")
        if not 0.0 <= probation_percent < 1.0:
            raise DataError(f"probation_percent must be in [0, 1), got {probation_percent}")
        missing = [name for name in timestamps if name not in windows]
        if missing:
            raise DataError(
                f"NAB corpus: no windows entry for {missing} (use [] for files without anomalies)")
        names = tuple(timestamps)
        lengths, file_ids, window_ids, values, scorable, window_file = [], [], [], [], [], []
        offset = 0
        n_windows = 0
        for number, name in enumerate(names):
            keys = _time_keys(timestamps[name], name)
            bounds = [(_bound_key(s, name), _bound_key(e, name)) for s, e in windows[name]]
            local, unweighted = _file_layout(keys, bounds, name)
            n = keys.size
            lengths.append(n)
            file_ids.append(np.full(n, number, dtype=np.int64))
            numbers: dict[int, int] = {}
            for start, _ in bounds:
                numbers.setdefault(start, offset + len(numbers))
            ids = np.asarray([numbers[start] for start, _ in bounds] + [-1], dtype=np.int64)
            window_ids.append(ids[local])  # local == -1 picks the trailing -1
            values.append(unweighted)
            scorable.append(np.arange(n) >= probation_length(n, probation_percent))
            window_file.append(np.full(len(numbers), number, dtype=np.int64))
            offset += len(numbers)
            n_windows += len(bounds)
        return cls(
            names=names,
            lengths=np.asarray(lengths, dtype=np.int64),
            file_id=np.concatenate(file_ids),
            window_id=np.concatenate(window_ids),
            unweighted=np.concatenate(values),
            scorable=np.concatenate(scorable),
            n_windows=n_windows,
            window_file=np.concatenate(window_file),
        )

    @property
    def n_rows(self) -> int:
        """Rows of all files together."""
        return int(self.file_id.size)

    def concat_scores(self, scores: Mapping[str, Any] | np.ndarray) -> np.ndarray:
        """Per-file scores (or one array already in corpus order) as one [N] float64 array.

        Raises
        ------
        DataError
            A file is missing, has the wrong number of rows, or a score is NaN/infinite.
        """
        if isinstance(scores, Mapping):
            parts = []
            for name, n in zip(self.names, self.lengths.tolist(), strict=True):
                if name not in scores:
                    raise DataError(f"no anomaly scores for {name}")
                part = np.asarray(scores[name], dtype=np.float64).reshape(-1)
                if part.size != n:
                    raise DataError(f"{name}: expected {n} anomaly scores (one per row), got {part.size}")
                parts.append(part)
            flat = np.concatenate(parts)
        else:
            flat = np.asarray(scores, dtype=np.float64).reshape(-1)
            if flat.size != self.n_rows:
                raise DataError(f"expected {self.n_rows} anomaly scores, got {flat.size}")
        bad = ~np.isfinite(flat)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise DataError(f"anomaly scores must be finite: {int(bad.sum())} are not "
                            f"(first in {self.names[int(self.file_id[first])]})")
        return flat

    # -- direct scoring of a fixed set of detections (NAB's per-file scoring step) -----------------

    def score_detections(self, detected: np.ndarray, profile: CostMatrix) -> pd.DataFrame:
        """Per-file NAB score of a boolean detection vector (probationary rows are ignored).

        Returns
        -------
        pandas.DataFrame
            Index: file keys; columns ``score, tp, tn, fp, fn, total`` (NAB's ``*_scores.csv``).
        """
        n_files = len(self.names)
        d = np.asarray(detected, dtype=bool) & self.scorable
        in_win = self.window_id >= 0
        fp_rows = d & ~in_win
        fp_part = np.bincount(self.file_id[fp_rows], weights=self.unweighted[fp_rows] * profile.fp_weight,
                              minlength=n_files)
        # Windows with a scorable row start at -fnWeight; a detected one takes its earliest detection.
        window_values = np.zeros(self.window_file.size)
        scorable_windows = np.unique(self.window_id[self.scorable & in_win])
        window_values[scorable_windows] = -profile.fn_weight
        hit_rows = np.flatnonzero(d & in_win)
        # max(), like NAB's scoreParts: normally the earliest detection, but a window whose end
        # timestamp first occurs before its start (repeated timestamps) is not monotone.
        np.maximum.at(window_values, self.window_id[hit_rows],
                      self.unweighted[hit_rows] * profile.tp_weight / MAX_TP)
        win_part = np.bincount(self.window_file, weights=window_values, minlength=n_files)
        tp = np.bincount(self.file_id[d & in_win], minlength=n_files)
        fp = np.bincount(self.file_id[fp_rows], minlength=n_files)
        pos = np.bincount(self.file_id[self.scorable & in_win], minlength=n_files)
        neg = np.bincount(self.file_id[self.scorable & ~in_win], minlength=n_files)
        return pd.DataFrame(
            {"score": fp_part + win_part, "tp": tp, "tn": neg - fp, "fp": fp, "fn": pos - tp,
             "total": pos + neg},
            index=pd.Index(self.names, name="file"),
        )

    def null_score(self, profile: CostMatrix) -> float:
        """NAB's null detector: constant 0.5 scores through the optimiser (none vs all detected)."""
        none = float(self.score_detections(np.zeros(self.n_rows, dtype=bool), profile)["score"].sum())
        every = float(self.score_detections(np.ones(self.n_rows, dtype=bool), profile)["score"].sum())
        return every if every > none else none

    def perfect_score(self, profile: CostMatrix) -> float:
        """``tpCount * tpWeight`` with tpCount the number of labelled windows."""
        return self.n_windows * profile.tp_weight

    def score(
        self,
        scores: Mapping[str, Any] | np.ndarray,
        profiles: Mapping[str, CostMatrix | Mapping[str, Any]] | None = None,
    ) -> NabReport:
        """Optimise one threshold per profile over the corpus and score at it (NAB's optimize+score).

        Parameters
        ----------
        scores : mapping of str to array-like, or numpy.ndarray
            Per-file anomaly scores in row order, or one array in corpus order.
        profiles : mapping, optional
            Profile name -> :class:`CostMatrix` (or profiles.json entries); default NAB's three.

        Returns
        -------
        NabReport
        """
        return NabReport(self, self.concat_scores(scores), _coerce_profiles(profiles))


@dataclass(frozen=True)
class _Sweep:
    """All scorable rows sorted by descending score, shared by every profile."""

    sorted_scores: np.ndarray
    rows: np.ndarray  # corpus row index of each sorted entry
    in_window: np.ndarray
    run_ends: np.ndarray  # last sorted position of each distinct score
    win_dest: np.ndarray  # sorted positions of in-window rows, grouped by window then by sort order
    win_groups: np.ndarray  # the window of each of those positions
    win_first: np.ndarray  # True where a window's group starts
    n_scorable_windows: int


def _prepare_sweep(corpus: NabCorpus, scores: np.ndarray) -> _Sweep:
    rows_all = np.flatnonzero(corpus.scorable)
    order = np.argsort(-scores[rows_all], kind="stable")  # stable, like Python's sorted(reverse=True)
    rows = rows_all[order]
    sorted_scores = scores[rows]
    in_window = corpus.window_id[rows] >= 0
    if sorted_scores.size:
        run_ends = np.append(np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), sorted_scores.size - 1)
    else:
        run_ends = np.zeros(0, dtype=np.int64)
    positions = np.flatnonzero(in_window)
    groups = corpus.window_id[rows[positions]]
    by_group = np.argsort(groups, kind="stable")
    groups = groups[by_group]
    win_dest = positions[by_group]
    win_first = np.ones(groups.size, dtype=bool)
    win_first[1:] = groups[1:] != groups[:-1]
    return _Sweep(sorted_scores, rows, in_window, run_ends, win_dest, groups, win_first,
                  int(win_first.sum()))


def _sweep_table(corpus: NabCorpus, sweep: _Sweep, profile: CostMatrix) -> pd.DataFrame:
    """NAB's ``calcScoreByThreshold`` over the corpus: one row per distinct threshold, highest first."""
    m = sweep.sorted_scores.size
    fp_values = np.where(sweep.in_window, 0.0, corpus.unweighted[sweep.rows] * profile.fp_weight)
    # Each window's part as the threshold drops: the running max of its detections' values
    # (NAB's ``max(scoreParts[w], sweepScore)``), starting from -fnWeight. Grouped by window.
    values = np.maximum(corpus.unweighted[sweep.rows[sweep.win_dest]] * profile.tp_weight / MAX_TP,
                        -profile.fn_weight)
    current = pd.Series(values).groupby(sweep.win_groups, sort=False).cummax().to_numpy()
    previous = np.empty_like(current)
    previous[1:] = current[:-1]
    previous[sweep.win_first] = -profile.fn_weight
    win_delta = np.zeros(m)
    win_delta[sweep.win_dest] = current - previous
    base = -profile.fn_weight * sweep.n_scorable_windows
    totals = base + np.cumsum(fp_values) + np.cumsum(win_delta)
    tp = np.cumsum(sweep.in_window)
    fp = np.arange(1, m + 1) - tp
    n_pos = int(sweep.in_window.sum())
    n_neg = m - n_pos
    ends = sweep.run_ends
    thresholds = sweep.sorted_scores[ends]
    score = totals[ends]
    tps, fps = tp[ends], fp[ends]
    if not (m and sweep.sorted_scores[0] == NAB_START_THRESHOLD):
        # NAB's first entry: nothing detected. Above 1.1 NAB would still call it 1.1 (and be wrong);
        # we move it just above the top score so that ">= threshold" keeps meaning "nothing".
        start = NAB_START_THRESHOLD if not m or sweep.sorted_scores[0] <= NAB_START_THRESHOLD else float(
            np.nextafter(sweep.sorted_scores[0], np.inf))
        thresholds = np.concatenate([[start], thresholds])
        score = np.concatenate([[base], score])
        tps = np.concatenate([[0], tps])
        fps = np.concatenate([[0], fps])
    return pd.DataFrame({"threshold": thresholds, "score": score, "tp": tps, "tn": n_neg - fps,
                         "fp": fps, "fn": n_pos - tps, "total": np.full(tps.size, m)})


class NabReport:
    """NAB results of one detector over a corpus, for every profile.

    ``report.profiles[name]`` holds the optimised threshold, the raw and the normalised score.
    ``score_at_threshold`` scores a fixed threshold (the one a detector ships with), ``sweep``
    gives the whole threshold/score curve and ``per_file`` NAB's per-file table.
    """

    def __init__(self, corpus: NabCorpus, scores: np.ndarray, profiles: dict[str, CostMatrix]) -> None:
        self.corpus = corpus
        self.scores = scores
        self.cost_matrices = profiles
        self._sweep = _prepare_sweep(corpus, scores)
        self._tables = {name: _sweep_table(corpus, self._sweep, cm) for name, cm in profiles.items()}
        self._null = {name: corpus.null_score(cm) for name, cm in profiles.items()}
        self.profiles: dict[str, NabProfileResult] = {}
        for name, table in self._tables.items():
            best = int(np.argmax(table["score"].to_numpy()))  # first maximum = highest threshold
            threshold = float(table["threshold"].iat[best])
            self.profiles[name] = self._result(name, threshold)
            logger.debug("NAB %s: best threshold %r, raw %.6f (sweep %.6f)", name, threshold,
                         self.profiles[name].score, table["score"].iat[best])

    def _result(self, name: str, threshold: float) -> NabProfileResult:
        cm = self.cost_matrices[name]
        files = self.corpus.score_detections(self.scores >= threshold, cm)
        score = float(files["score"].sum())
        null, perfect = self._null[name], self.corpus.perfect_score(cm)
        return NabProfileResult(
            profile=name, threshold=threshold, score=score, normalized=_normalize(score, null, perfect),
            null_score=null, perfect_score=perfect, tp=int(files["tp"].sum()), tn=int(files["tn"].sum()),
            fp=int(files["fp"].sum()), fn=int(files["fn"].sum()),
        )

    def score_at_threshold(self, threshold: float | Mapping[str, float]) -> dict[str, NabProfileResult]:
        """Score every profile at a fixed threshold (one for all, or one per profile).

        A row is a detection when ``score >= threshold``, as in NAB's scoring step.
        """
        if isinstance(threshold, Mapping):
            missing = [name for name in self.cost_matrices if name not in threshold]
            if missing:
                raise DataError(f"no threshold given for profile(s) {missing}")
            return {name: self._result(name, float(threshold[name])) for name in self.cost_matrices}
        return {name: self._result(name, float(threshold)) for name in self.cost_matrices}

    def sweep(self, profile: str = "standard") -> pd.DataFrame:
        """The threshold/score curve: ``threshold, score, tp, tn, fp, fn, total``, highest threshold first."""
        self._check_profile(profile)
        return self._tables[profile].copy()

    def per_file(self, profile: str = "standard", threshold: float | None = None) -> pd.DataFrame:
        """NAB's per-file table (``score, tp, tn, fp, fn, total``) at the optimised or a given threshold."""
        self._check_profile(profile)
        t = self.profiles[profile].threshold if threshold is None else float(threshold)
        table = self.corpus.score_detections(self.scores >= t, self.cost_matrices[profile])
        table.insert(0, "threshold", t)
        return table

    def thresholds(self) -> dict[str, dict[str, float]]:
        """``{profile: {"threshold": t, "score": raw}}``, the layout of NAB's ``config/thresholds.json``."""
        return {name: {"threshold": r.threshold, "score": r.score} for name, r in self.profiles.items()}

    def to_frame(self) -> pd.DataFrame:
        """One row per profile: threshold, score, normalized, null/perfect scores and counts."""
        rows = [{**r.__dict__, "total": r.total} for r in self.profiles.values()]
        return pd.DataFrame(rows).set_index("profile")

    def _check_profile(self, profile: str) -> None:
        if profile not in self._tables:
            raise DataError(f"unknown NAB profile {profile!r}; scored: {sorted(self._tables)}")


def nab_score_corpus(
    results: Mapping[str, pd.DataFrame],
    windows: Mapping[str, Sequence[tuple[Any, Any]]],
    profiles: Mapping[str, CostMatrix | Mapping[str, Any]] | None = None,
    *,
    probation_percent: float = NAB_PROBATION_PERCENT,
    time_col: str = "timestamp",
    score_col: str = "anomaly_score",
) -> NabReport:
    """Score a detector's results on a NAB-style corpus, exactly as NAB's optimise+score+normalise.

    Parameters
    ----------
    results : mapping of str to pandas.DataFrame
        File key (``"realKnownCause/nyc_taxi.csv"``) -> one row per data row, in file order, with
        ``timestamp`` and ``anomaly_score`` columns (NAB's results files).
    windows : mapping of str to sequence of (start, end)
        File key -> inclusive windows; must cover every key of ``results``. Only these files'
        windows count towards the perfect score.
    profiles : mapping, optional
        Profile name -> :class:`CostMatrix` or profiles.json entry; default :data:`NAB_PROFILES`.
    probation_percent : float
        NAB's probationary fraction.

    Returns
    -------
    NabReport

    Raises
    ------
    DataError
        A missing column, file or windows entry; a boundary not in the timestamps; a non-finite score.

    Examples
    --------
    A perfect detector (one detection on the first row of the window) scores 100, the null one 0:

    >>> ts = pd.date_range("2024-01-01", periods=40, freq="5min")
    >>> win = {"a.csv": [(ts[20], ts[27])]}
    >>> perfect = pd.DataFrame({"timestamp": ts, "anomaly_score": np.eye(40)[20]})
    >>> report = nab_score_corpus({"a.csv": perfect}, win)
    >>> r = report.profiles["standard"]
    >>> r.normalized, r.score, r.null_score, r.threshold
    (100.0, 1.0, -1.0, 1.0)
    >>> nab_score_corpus({"a.csv": perfect.assign(anomaly_score=0.0)}, win).profiles["standard"].normalized
    0.0
    """
    stamps: dict[str, Any] = {}
    scores: dict[str, Any] = {}
    for name, frame in results.items():
        for col in (time_col, score_col):
            if col not in frame.columns:
                raise DataError(f"{name}: results need a {col!r} column; found {list(frame.columns)}")
        stamps[name] = frame[time_col]
        scores[name] = pd.to_numeric(frame[score_col], errors="coerce").to_numpy(dtype=np.float64)
    corpus = NabCorpus.build(stamps, windows, probation_percent)
    return corpus.score(scores, profiles)


# -------------------------------------------------------------------------------------------- SKAB


@dataclass(frozen=True)
class BinaryMetrics:
    """Pointwise outlier-detection counts pooled over files, as SKAB's ``chp_score(metric="binary")``.

    Rates are ratios in [0, 1]; :meth:`skab_rounded` gives SKAB's printed form (percentages).
    """

    tp: int
    tn: int
    fp: int
    fn: int

    @property
    def f1(self) -> float:
        """``TP / (TP + (FN + FP) / 2)``; NaN when there are no positives at all."""
        denominator = self.tp + (self.fn + self.fp) / 2
        return self.tp / denominator if denominator else float("nan")

    @property
    def far(self) -> float:
        """False alarm rate ``FP / (FP + TN)``; NaN without negative rows."""
        return self.fp / (self.fp + self.tn) if (self.fp + self.tn) else float("nan")

    @property
    def mar(self) -> float:
        """Missed alarm rate ``FN / (FN + TP)``; NaN without positive rows."""
        return self.fn / (self.fn + self.tp) if (self.fn + self.tp) else float("nan")

    def skab_rounded(self) -> tuple[float, float, float]:
        """``(F1, FAR %, MAR %)`` rounded to 2 decimals, exactly as SKAB's leaderboard prints them."""
        return round(self.f1, 2), round(self.far * 100, 2), round(self.mar * 100, 2)


def _as_files(values: Any) -> list[np.ndarray]:
    if isinstance(values, (np.ndarray, pd.Series, pd.Index)):
        return [np.asarray(values)]
    if isinstance(values, Sequence) and values and not np.isscalar(values[0]):
        return [np.asarray(v) for v in values]
    return [np.asarray(values)]


def skab_binary_metrics(true: Any, predicted: Any) -> BinaryMetrics:
    """F1, FAR and MAR of pointwise predictions, counts pooled over all files (SKAB's way).

    Parameters
    ----------
    true, predicted : array-like or sequence of array-like
        One array per file (or a single array), aligned row by row. A row is positive where the
        value equals 1; anything else (0, NaN for an unscored row) is negative, as in SKAB.

    Returns
    -------
    BinaryMetrics

    Raises
    ------
    DataError
        Different numbers of files, or of rows within a file.

    Examples
    --------
    >>> m = skab_binary_metrics([[0, 0, 1, 1], [0, 1, 1, 0]], [[0, 1, 1, 0], [0, 0, 1, 0]])
    >>> (m.tp, m.tn, m.fp, m.fn), m.skab_rounded()
    ((2, 3, 1, 2), (0.57, 25.0, 50.0))
    """
    true_files, pred_files = _as_files(true), _as_files(predicted)
    if len(true_files) != len(pred_files):
        raise DataError(f"expected as many prediction files as label files: {len(true_files)} "
                        f"vs {len(pred_files)}")
    tp = tn = fp = fn = 0
    for i, (t, p) in enumerate(zip(true_files, pred_files, strict=True)):
        t, p = t.reshape(-1), p.reshape(-1)
        if t.size != p.size:
            raise DataError(f"file {i}: {t.size} labels but {p.size} predictions")
        t1, p1 = t == 1, p == 1
        tp += int(np.sum(t1 & p1))
        tn += int(np.sum(~t1 & ~p1))
        fp += int(np.sum(~t1 & p1))
        fn += int(np.sum(t1 & ~p1))
    return BinaryMetrics(tp=tp, tn=tn, fp=fp, fn=fn)


# --------------------------------------------------------------------------------------- Telemanom


@dataclass(frozen=True)
class EventCounts:
    """Event-level counts (Telemanom's): sums over channels give the totals (``a + b``)."""

    tp: int
    fp: int
    fn: int

    def __add__(self, other: EventCounts) -> EventCounts:
        return EventCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def precision(self) -> float:
        """``TP / (TP + FP)``; NaN when nothing was predicted."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        """``TP / (TP + FN)``; NaN without labelled sequences."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def f1(self) -> float:
        """``2 TP / (2 TP + FP + FN)``; NaN when all three are 0."""
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else float("nan")


def predicted_sequences(flags: Any) -> list[tuple[int, int]]:
    """Maximal runs of flagged rows as inclusive ``(start, end)`` row indices.

    >>> predicted_sequences([0, 1, 1, 0, 1, 0, 0, 1])
    [(1, 2), (4, 4), (7, 7)]
    """
    f = np.asarray(flags).reshape(-1).astype(bool)
    edges = np.diff(np.concatenate([[0], f.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def telemanom_event_counts(labelled: Sequence[tuple[int, int]],
                           predicted: Sequence[tuple[int, int]]) -> EventCounts:
    """Count one channel's predicted sequences against its labelled ones, as Telemanom does.

    Parameters
    ----------
    labelled : inclusive ``(start, end)`` row indices, in the label file's order (a predicted sequence
        over two labelled ones matches the one listed first).
    predicted : inclusive ``(start, end)`` row indices (e.g. :func:`predicted_sequences`).

    Examples
    --------
    A run over both labelled sequences matches only the first; a run touching none is one false
    positive; the second labelled sequence, matched by nothing else, is a false negative:

    >>> telemanom_event_counts([(10, 20), (30, 40)], [(15, 35), (50, 52)])
    EventCounts(tp=1, fp=1, fn=1)

    A labelled sequence touched by several runs counts once:

    >>> telemanom_event_counts([(10, 20)], [(10, 11), (15, 16), (20, 25)])
    EventCounts(tp=1, fp=0, fn=0)
    """
    for start, end in (*labelled, *predicted):
        if start > end:
            raise DataError(f"sequence ({start}, {end}) ends before it starts")
    matched: set[int] = set()
    fp = 0
    for p_start, p_end in predicted:
        hit = next((i for i, (l_start, l_end) in enumerate(labelled) if p_start <= l_end and l_start <= p_end), None)
        if hit is None:
            fp += 1
        else:
            matched.add(hit)
    return EventCounts(tp=len(matched), fp=fp, fn=len(labelled) - len(matched))
