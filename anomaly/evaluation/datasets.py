"""Readers for tables on disk and loaders for the benchmarks we score against (NAB, SKAB, MSL).

Why this module exists: training, the CLI and the benchmark scripts all need the same tolerant,
strict-where-it-matters reading of CSV/Parquet files, and the NAB and SKAB folders have quirks
(CRLF line endings, a missing final newline, semicolon separators, repeated NAB timestamps around
the US DST change) that must be handled once, in one place, with errors that name the file.

What it must not do: it never reorders, de-duplicates or resamples rows. NAB scoring is positional
(row i of a detector's results is row i of the data file), and several NAB files repeat timestamps
(``2014-03-09 03:00:00`` twelve times; ``machine_temperature_system_failure`` steps back an hour), so
dropping or sorting would silently shift every later row. It holds no data itself and never writes
into the data folders. No Kafka, no HTTP.

Layouts (see the data README):

- NAB root: ``data/<category>/<file>.csv`` with header ``timestamp,value``;
  ``labels/combined_windows.json`` maps ``"<category>/<file>.csv"`` to ``[[start, end], ...]``.
- SKAB root: ``data/<group>/<n>.csv`` and ``data/anomaly-free/anomaly-free.csv``, ``;``-separated,
  column ``datetime``, eight sensor columns, and (except anomaly-free) ``anomaly`` and ``changepoint``.
- MSL root (Telemanom's layout): ``train/<chan>.npy`` and ``test/<chan>.npy`` (``[rows, columns]``,
  column 0 the telemetry, the others context) and ``labeled_anomalies.csv`` with
  ``chan_id,spacecraft,anomaly_sequences,...``; ``anomaly_sequences`` is a list of inclusive
  ``[start, end]`` test-row indices.
"""

from __future__ import annotations

import csv
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from anomaly.errors import DataError

__all__ = [
    "MSL_LABELS",
    "NAB_TIME_FORMAT",
    "SKAB_FEATURES",
    "SKAB_LABEL_COLUMNS",
    "SKAB_TIME_COLUMN",
    "MslChannel",
    "NabFile",
    "SkabFile",
    "label_segments",
    "load_msl",
    "load_nab",
    "load_skab",
    "load_skab_anomaly_free",
    "nab_windows",
    "read_table",
]

logger = logging.getLogger(__name__)

#: Timestamp layout of NAB's and SKAB's CSV files. Parsing with an explicit format is ~10x faster
#: than inference and rejects a malformed row instead of guessing.
NAB_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

#: SKAB's time column, kept under its upstream name so notebooks written against SKAB still read.
SKAB_TIME_COLUMN = "datetime"

#: SKAB's eight sensor columns in upstream order (note the space in ``Volume Flow RateRMS``).
SKAB_FEATURES: tuple[str, ...] = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
)

#: SKAB's inline label columns (written ``0.0``/``1.0`` upstream, loaded as int8).
SKAB_LABEL_COLUMNS: tuple[str, ...] = ("anomaly", "changepoint")

#: Telemanom's label file, one row per channel.
MSL_LABELS = "labeled_anomalies.csv"

_CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.zip", ".csv.xz", ".tsv")
_PARQUET_SUFFIXES = (".parquet", ".pq")


def _sniff_separator(path: Path) -> str:
    """Pick the separator from the header line: ``;`` (SKAB), tab, else ``,``.

    Only plain-text CSVs are sniffed; compressed ones default to ``,``.
    """
    if path.suffix.lower() != ".csv":
        return "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open("r", encoding="utf-8", errors="replace", newline="") as handle:
        header = handle.readline()
    counts = {sep: header.count(sep) for sep in (",", ";", "\t")}
    best = max(counts, key=lambda sep: counts[sep])
    return best if counts[best] > 0 else ","


def read_table(path: str | Path, *, sep: str | None = None) -> pd.DataFrame:
    """Read a CSV (``,`` ``;`` or tab separated, LF or CRLF) or Parquet file into a DataFrame.

    Rows keep their file order; nothing is parsed beyond pandas' number inference (timestamps stay
    strings, so callers choose the format).

    Parameters
    ----------
    path : str or Path
        ``.csv`` (optionally compressed: ``.csv.gz`` ...), ``.tsv``, ``.parquet`` or ``.pq``.
    sep : str, optional
        CSV separator. By default it is sniffed from the header line.

    Returns
    -------
    pandas.DataFrame

    Raises
    ------
    DataError
        The file is missing, has an unsupported extension, cannot be parsed, or holds no columns.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.csv"
    >>> _ = p.write_bytes(b"a;b\\r\\n1;2.5\\r\\n3;4")   # CRLF, no final newline
    >>> read_table(p)
       a    b
    0  1  2.5
    1  3  4.0
    """
    p = Path(path)
    name = p.name.lower()
    is_csv = name.endswith(_CSV_SUFFIXES)
    is_parquet = name.endswith(_PARQUET_SUFFIXES)
    if not (is_csv or is_parquet):
        raise DataError(
            f"unsupported table format for {p}: expected one of "
            f"{', '.join(_CSV_SUFFIXES + _PARQUET_SUFFIXES)}"
        )
    if not p.is_file():
        raise DataError(f"table file not found: {p}")
    try:
        if is_parquet:
            frame = pd.read_parquet(p)
        else:
            with warnings.catch_warnings():
                # A row with more fields than the header would otherwise silently become the index
                # (or, with index_col=False, be truncated with only a warning).
                warnings.simplefilter("error", pd.errors.ParserWarning)
                frame = pd.read_csv(p, sep=sep if sep is not None else _sniff_separator(p), index_col=False)
    except (pd.errors.ParserError, pd.errors.ParserWarning, pd.errors.EmptyDataError, UnicodeDecodeError,
            csv.Error, OSError, ValueError) as exc:
        raise DataError(f"cannot parse {p}: {exc}") from exc
    if frame.shape[1] == 0:
        raise DataError(f"{p} holds no columns")
    logger.debug("read %s: %d rows x %d columns", p, frame.shape[0], frame.shape[1])
    return frame


def _parse_times(values: pd.Series, path: Path, column: str) -> pd.Series:
    """Parse ``YYYY-MM-DD HH:MM:SS`` strings to naive datetime64[ns], naming the file on failure."""
    try:
        parsed = pd.to_datetime(values, format=NAB_TIME_FORMAT)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path}: column {column!r} is not {NAB_TIME_FORMAT!r} timestamps: {exc}") from exc
    if parsed.isna().any():
        raise DataError(f"{path}: column {column!r} has {int(parsed.isna().sum())} missing timestamps")
    return parsed.astype("datetime64[ns]")


def _require_columns(frame: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")


def _numeric(frame: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    """Convert ``columns`` to float64 in place; reject text that is not a number."""
    for col in columns:
        try:
            frame[col] = pd.to_numeric(frame[col], errors="raise").astype(np.float64)
        except (ValueError, TypeError) as exc:
            raise DataError(f"{path}: column {col!r} is not numeric: {exc}") from exc


# --------------------------------------------------------------------------------------------- NAB


@dataclass(frozen=True)
class NabFile:
    """One NAB data file with its anomaly windows.

    Attributes
    ----------
    category : str
        Folder under ``data/``, e.g. ``"realKnownCause"``.
    name : str
        File stem, e.g. ``"nyc_taxi"``.
    path : Path
        The CSV that was read.
    frame : pandas.DataFrame
        Columns ``timestamp`` (naive datetime64[ns]) and ``value`` (float64), rows in file order
        (timestamps may repeat or step back; they are kept as they are).
    windows : tuple of (pandas.Timestamp, pandas.Timestamp)
        Inclusive anomaly windows from ``labels/combined_windows.json``, in label-file order; empty
        when the file has no anomalies or no labels were found (see ``labelled``).
    labelled : bool
        Whether the label file has an entry for this file.
    """

    category: str
    name: str
    path: Path
    frame: pd.DataFrame = field(repr=False)
    windows: tuple[tuple[pd.Timestamp, pd.Timestamp], ...]
    labelled: bool

    @property
    def key(self) -> str:
        """The label-file key, ``"<category>/<name>.csv"``."""
        return f"{self.category}/{self.name}.csv"


def _read_windows(labels_path: Path) -> dict[str, list[tuple[pd.Timestamp, pd.Timestamp]]] | None:
    if not labels_path.is_file():
        return None
    try:
        raw = json.loads(labels_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read NAB windows {labels_path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{labels_path}: expected a JSON object of file -> windows")
    out: dict[str, list[tuple[pd.Timestamp, pd.Timestamp]]] = {}
    for key, windows in raw.items():
        parsed = []
        for window in windows:
            if not (isinstance(window, list) and len(window) == 2):
                raise DataError(f"{labels_path}: window {window!r} of {key!r} is not [start, end]")
            try:
                start, end = (pd.Timestamp(w).as_unit("ns") for w in window)
            except (ValueError, TypeError) as exc:
                raise DataError(f"{labels_path}: bad timestamp in window {window!r} of {key!r}") from exc
            if end < start:
                raise DataError(f"{labels_path}: window {window!r} of {key!r} ends before it starts")
            parsed.append((start, end))
        out[key] = parsed
    return out


def load_nab(root: str | Path, categories: tuple[str, ...] | None = None) -> list[NabFile]:
    """Load every NAB data file under ``root/data`` with its windows, sorted by label key.

    Parameters
    ----------
    root : str or Path
        The NAB folder holding ``data/`` and (optionally) ``labels/combined_windows.json``.
    categories : tuple of str, optional
        Only these folders under ``data/`` (e.g. ``("realKnownCause",)``); default all.

    Returns
    -------
    list of NabFile

    Raises
    ------
    DataError
        ``root/data`` is missing or empty, a file lacks ``timestamp``/``value`` columns or has a
        bad timestamp, or a window boundary does not occur in its file.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "data" / "demo").mkdir(parents=True)
    >>> _ = (root / "data" / "demo" / "a.csv").write_text(
    ...     "timestamp,value\\n2014-03-09 03:00:00,1\\n2014-03-09 03:00:00,2\\n")
    >>> files = load_nab(root)
    >>> files[0].key, len(files[0].frame), files[0].labelled
    ('demo/a.csv', 2, False)
    """
    root = Path(root)
    data_dir = root / "data"
    if not data_dir.is_dir():
        raise DataError(f"NAB data folder not found: {data_dir}")
    windows = _read_windows(root / "labels" / "combined_windows.json")
    if windows is None:
        logger.warning("no labels/combined_windows.json under %s: NAB files load without windows", root)
    paths = sorted(data_dir.glob("*/*.csv"))
    if categories is not None:
        paths = [p for p in paths if p.parent.name in categories]
    if not paths:
        raise DataError(f"no NAB CSV files under {data_dir}" + (f" for {categories}" if categories else ""))
    files: list[NabFile] = []
    for path in paths:
        frame = read_table(path, sep=",")
        _require_columns(frame, path, ("timestamp", "value"))
        frame = frame[["timestamp", "value"]].copy()
        frame["timestamp"] = _parse_times(frame["timestamp"], path, "timestamp")
        _numeric(frame, path, ("value",))
        key = f"{path.parent.name}/{path.name}"
        labelled = windows is not None and key in windows
        file_windows = tuple(windows[key]) if labelled and windows is not None else ()
        if windows is not None and not labelled:
            logger.warning("no windows for NAB file %s in combined_windows.json", key)
        stamps = frame["timestamp"].to_numpy()
        for start, end in file_windows:
            for bound in (start, end):
                if not np.any(stamps == bound.to_datetime64()):
                    raise DataError(f"NAB window boundary {bound} of {key} does not occur in {path}")
        files.append(NabFile(path.parent.name, path.stem, path, frame, file_windows, labelled))
    logger.info("loaded %d NAB files (%d rows, %d windows) from %s", len(files),
                sum(len(f.frame) for f in files), sum(len(f.windows) for f in files), root)
    return files


def nab_windows(files: list[NabFile]) -> dict[str, list[tuple[pd.Timestamp, pd.Timestamp]]]:
    """The ``key -> windows`` mapping that :func:`anomaly.evaluation.scorers.nab_score_corpus` takes.

    Raises
    ------
    DataError
        A file has no entry in the label file (scoring it would count it as anomaly-free).

    Examples
    --------
    >>> nab_windows([])
    {}
    """
    unlabelled = [f.key for f in files if not f.labelled]
    if unlabelled:
        raise DataError(f"NAB files without labels cannot be scored: {unlabelled}")
    return {f.key: list(f.windows) for f in files}


# -------------------------------------------------------------------------------------------- SKAB


@dataclass(frozen=True)
class SkabFile:
    """One SKAB experiment.

    Attributes
    ----------
    group : str
        Folder under ``data/``, e.g. ``"valve1"``.
    name : str
        File stem, e.g. ``"0"``.
    path : Path
        The CSV that was read.
    frame : pandas.DataFrame
        ``datetime`` (naive datetime64[ns]), the :data:`SKAB_FEATURES` as float64, and
        ``anomaly``/``changepoint`` as int8 (0/1), in file order.
    """

    group: str
    name: str
    path: Path
    frame: pd.DataFrame = field(repr=False)

    @property
    def features(self) -> pd.DataFrame:
        """The eight sensor columns."""
        return self.frame[list(SKAB_FEATURES)]

    @property
    def anomaly(self) -> np.ndarray:
        """[N] int8 outlier labels (1 = anomalous row)."""
        return self.frame["anomaly"].to_numpy()

    @property
    def windows(self) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
        """Each run of ``anomaly == 1`` as an inclusive ``(first, last)`` timestamp pair."""
        return label_segments(self.frame[SKAB_TIME_COLUMN], self.anomaly)


def label_segments(timestamps: pd.Series | np.ndarray, labels: np.ndarray) -> list[tuple[Any, Any]]:
    """Inclusive ``(first, last)`` timestamps of each run of consecutive rows labelled 1.

    Examples
    --------
    >>> label_segments(np.arange(8), np.array([0, 1, 1, 0, 0, 1, 0, 1]))
    [(1, 2), (5, 5), (7, 7)]
    """
    ts = np.asarray(timestamps)
    flags = np.asarray(labels).reshape(-1) == 1
    if ts.shape[0] != flags.size:
        raise DataError(f"label_segments: {ts.shape[0]} timestamps but {flags.size} labels")
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    convert = pd.Timestamp if ts.dtype.kind == "M" else (lambda v: v.item() if hasattr(v, "item") else v)
    return [(convert(ts[a]), convert(ts[b])) for a, b in zip(starts, ends, strict=True)]


def _load_skab_csv(path: Path, *, labelled: bool) -> pd.DataFrame:
    frame = read_table(path, sep=";")
    needed = (SKAB_TIME_COLUMN, *SKAB_FEATURES) + (SKAB_LABEL_COLUMNS if labelled else ())
    _require_columns(frame, path, needed)
    frame = frame[list(needed)].copy()
    frame[SKAB_TIME_COLUMN] = _parse_times(frame[SKAB_TIME_COLUMN], path, SKAB_TIME_COLUMN)
    _numeric(frame, path, SKAB_FEATURES)
    if labelled:
        for col in SKAB_LABEL_COLUMNS:
            values = pd.to_numeric(frame[col], errors="coerce")
            if not values.isin([0.0, 1.0]).all():
                raise DataError(f"{path}: label column {col!r} must hold only 0/1")
            frame[col] = values.astype(np.int8)
    return frame


def load_skab(root: str | Path, group: str = "valve1") -> list[SkabFile]:
    """Load the labelled SKAB experiments of one group, in numeric file order (0, 1, ..., 15).

    Parameters
    ----------
    root : str or Path
        The SKAB folder holding ``data/``.
    group : str
        Folder under ``data/``: ``"valve1"``, ``"valve2"`` or ``"other"`` upstream.

    Raises
    ------
    DataError
        The group folder is missing or empty, or a file lacks a column or has a bad value.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "data" / "g").mkdir(parents=True)
    >>> header = ";".join(("datetime",) + SKAB_FEATURES + SKAB_LABEL_COLUMNS)
    >>> row = "2020-03-09 10:14:33;" + ";".join(["1.0"] * 8) + ";1.0;0.0"
    >>> _ = (root / "data" / "g" / "0.csv").write_text(header + "\\r\\n" + row + "\\r\\n")
    >>> f = load_skab(root, "g")[0]
    >>> f.name, f.anomaly.tolist(), f.features.shape
    ('0', [1], (1, 8))
    """
    folder = Path(root) / "data" / group
    if not folder.is_dir():
        raise DataError(f"SKAB group folder not found: {folder}")
    paths = sorted(folder.glob("*.csv"),
                   key=lambda p: (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem))
    if not paths:
        raise DataError(f"no SKAB CSV files in {folder}")
    files = [SkabFile(group, p.stem, p, _load_skab_csv(p, labelled=True)) for p in paths]
    logger.info("loaded %d SKAB files of %s (%d rows) from %s", len(files), group,
                sum(len(f.frame) for f in files), root)
    return files


def load_skab_anomaly_free(root: str | Path) -> pd.DataFrame:
    """Load SKAB's normal-operation recording ``data/anomaly-free/anomaly-free.csv``.

    Returns
    -------
    pandas.DataFrame
        ``datetime`` and the :data:`SKAB_FEATURES`, in file order.

    Raises
    ------
    DataError
        The file is missing or malformed.
    """
    path = Path(root) / "data" / "anomaly-free" / "anomaly-free.csv"
    return _load_skab_csv(path, labelled=False)


# --------------------------------------------------------------------------------------------- MSL


@dataclass(frozen=True)
class MslChannel:
    """One channel of a Telemanom-layout data set (MSL or SMAP).

    Attributes
    ----------
    chan_id : str, e.g. ``"M-6"``; spacecraft : str, e.g. ``"MSL"``.
    train, test : ``[n_train, C]`` and ``[n_test, C]`` float64; column 0 is the telemetry value, columns
        1.. are context (commands), in time order; rows have no timestamps (the index is the time step).
    sequences : labelled anomalies as inclusive ``(start, end)`` test-row indices, in the label file's order
        (which is not always time order; the event counting depends on it).
    """

    chan_id: str
    spacecraft: str
    train: np.ndarray = field(repr=False)
    test: np.ndarray = field(repr=False)
    sequences: tuple[tuple[int, int], ...]


def _parse_sequences(text: str, path: Path, chan: str, n_test: int) -> tuple[tuple[int, int], ...]:
    try:
        raw = json.loads(text)
        pairs = tuple((int(a), int(b)) for a, b in raw)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path}: channel {chan}: anomaly_sequences {text!r} is not a list of [start, end]") from exc
    for a, b in pairs:
        if not 0 <= a <= b < n_test:
            raise DataError(f"{path}: channel {chan}: sequence [{a}, {b}] outside its {n_test} test rows")
    return pairs


def load_msl(root: str | Path, channels: tuple[str, ...] | None = None) -> list[MslChannel]:
    """Load every channel of ``labeled_anomalies.csv`` (or only ``channels``), in the file's order.

    Raises
    ------
    DataError
        The label file or a channel's arrays are missing, arrays are not 2-D with the same columns in
        train and test, or a sequence lies outside the test rows.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for part in ("train", "test"):
    ...     (root / part).mkdir()
    ...     np.save(root / part / "A-1.npy", np.zeros((20, 3)))
    >>> _ = (root / MSL_LABELS).write_text('chan_id,spacecraft,anomaly_sequences,class,num_values\\n'
    ...                                    'A-1,MSL,"[[5, 9]]",[point],20\\n')
    >>> ch = load_msl(root)[0]
    >>> ch.chan_id, ch.spacecraft, ch.sequences, ch.test.shape
    ('A-1', 'MSL', ((5, 9),), (20, 3))
    """
    root = Path(root)
    labels_path = root / MSL_LABELS
    if not labels_path.is_file():
        raise DataError(f"MSL label file not found: {labels_path}")
    labels = pd.read_csv(labels_path, dtype=str)
    _require_columns(labels, labels_path, ("chan_id", "spacecraft", "anomaly_sequences"))
    if channels is not None:
        unknown = sorted(set(channels) - set(labels["chan_id"]))
        if unknown:
            raise DataError(f"{labels_path}: no channel(s) {unknown}")
        labels = labels[labels["chan_id"].isin(channels)]
    out = []
    for row in labels.itertuples(index=False):
        arrays = []
        for part in ("train", "test"):
            path = root / part / f"{row.chan_id}.npy"
            if not path.is_file():
                raise DataError(f"MSL channel {row.chan_id}: {path} not found")
            array = np.load(path, allow_pickle=False)
            if array.ndim != 2 or array.shape[0] == 0:
                raise DataError(f"{path}: expected a [rows, columns] array, got shape {array.shape}")
            arrays.append(array.astype(np.float64, copy=False))
        train, test = arrays
        if train.shape[1] != test.shape[1]:
            raise DataError(f"MSL channel {row.chan_id}: train has {train.shape[1]} columns, test {test.shape[1]}")
        out.append(MslChannel(row.chan_id, row.spacecraft, train, test,
                              _parse_sequences(row.anomaly_sequences, labels_path, row.chan_id, len(test))))
    logger.info("loaded %d MSL channels (%d test rows) from %s", len(out), sum(len(c.test) for c in out), root)
    return out
