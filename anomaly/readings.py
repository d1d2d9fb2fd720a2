"""Columnar batches of sensor readings: the input contract of :class:`~anomaly.StreamingDetector`.

Why columnar: the detector's hot path must never loop over readings in Python. A batch is three
aligned arrays (device ids, epoch-millisecond timestamps, a float32 value matrix in the model's
feature order), so grouping, sorting and gathering are numpy/torch operations. Converting from
records or a DataFrame happens once, at the edge. No Kafka here.

Shapes (N readings, F features): ``device_ids`` [N] object (str), ``timestamps_ms`` [N] int64,
``values`` [N, F] float32. A NaN value means "this feature is missing in this reading"; an
infinite value is rejected.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from anomaly.errors import DataError, InvalidReadingError

__all__ = ["ReadingBatch", "to_epoch_ms"]


_FLOAT32_MAX = float(np.finfo(np.float32).max)
_MAX_EPOCH_MS = 9.2e15
"""Largest numeric timestamp taken as epoch ms (about year 293,000): beyond it int64 nanosecond maths fails."""


def to_epoch_ms(values: pd.Series | Sequence[object] | np.ndarray) -> np.ndarray:
    """Convert timestamps (ISO-8601 strings, datetimes or epoch milliseconds) to int64 epoch ms.

    Naive timestamps are taken as UTC. Numbers are epoch milliseconds, also when they are mixed with
    text in one column (messages may use either form). Booleans, missing or unparseable values raise
    :class:`InvalidReadingError`.

    >>> to_epoch_ms(["1970-01-01T00:00:01", "1970-01-01 00:00:02.5"]).tolist()
    [1000, 2500]
    >>> to_epoch_ms(np.array([5, 6])).tolist()
    [5, 6]
    >>> to_epoch_ms([1000, "1970-01-01T00:00:02Z"]).tolist()
    [1000, 2000]
    """
    arr = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values, dtype=object))
    if len(arr) == 0:
        return np.empty(0, dtype=np.int64)
    if arr.isna().any():
        raise InvalidReadingError(f"timestamps contain missing values (first at row {int(np.argmax(arr.isna()))})")
    kind = pd.api.types.infer_dtype(arr, skipna=False)
    if pd.api.types.is_bool_dtype(arr.dtype) or kind == "boolean":
        raise InvalidReadingError("timestamps must be epoch milliseconds or date-times, got booleans")
    if pd.api.types.is_numeric_dtype(arr.dtype) or kind in ("integer", "floating", "mixed-integer-float", "decimal"):
        return _numeric_epoch_ms(arr)
    if kind.startswith("mixed"):  # numbers and text in one column: each by its own rule (Python loop, at the edge)
        is_number = np.fromiter((isinstance(v, (int, float, np.integer, np.floating)) for v in arr), dtype=bool,
                                count=len(arr))
        if any(isinstance(v, (bool, np.bool_)) for v in arr):
            raise InvalidReadingError("timestamps must be epoch milliseconds or date-times, got a boolean")
        out = np.empty(len(arr), dtype=np.int64)
        out[is_number] = _numeric_epoch_ms(arr[is_number]) if is_number.any() else 0
        out[~is_number] = _parse_epoch_ms(arr[~is_number]) if (~is_number).any() else 0
        return out
    return _parse_epoch_ms(arr)


def _numeric_epoch_ms(arr: pd.Series) -> np.ndarray:
    numeric = pd.to_numeric(arr, errors="raise").to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(numeric)):
        raise InvalidReadingError("timestamps must be finite epoch milliseconds (found an infinite one)")
    if np.any(np.abs(numeric) > _MAX_EPOCH_MS):
        raise InvalidReadingError(f"timestamp {numeric[np.abs(numeric) > _MAX_EPOCH_MS][0]:g} is out of range "
                                  f"for epoch milliseconds (|ts| <= {_MAX_EPOCH_MS:g})")
    return numeric.astype(np.int64)


def _parse_epoch_ms(arr: pd.Series) -> np.ndarray:
    try:
        parsed = pd.to_datetime(arr, utc=True, format="mixed")
        return (parsed.astype("datetime64[ns, UTC]").astype(np.int64) // 1_000_000).to_numpy(dtype=np.int64)
    except (ValueError, TypeError, OverflowError) as exc:  # OutOfBoundsDatetime is a ValueError
        raise InvalidReadingError(f"cannot parse timestamps: {exc}") from exc


@dataclass(frozen=True)
class ReadingBatch:
    """Readings of many devices, in arrival order, as aligned columns.

    Attributes
    ----------
    device_ids : numpy.ndarray
        [N] object array of device id strings.
    timestamps_ms : numpy.ndarray
        [N] int64 epoch milliseconds.
    values : numpy.ndarray
        [N, F] float32 in the model's feature order; NaN marks a missing feature.

    Examples
    --------
    >>> b = ReadingBatch.from_records(
    ...     [{"device_id": "a", "ts": 1000, "values": {"x": 1.0}},
    ...      {"device_id": "b", "ts": "1970-01-01T00:00:02Z", "values": {"x": 2.0, "y": 3.0}}],
    ...     features=["x", "y"])
    >>> len(b), b.values.shape, bool(np.isnan(b.values[0, 1]))
    (2, (2, 2), True)
    """

    device_ids: np.ndarray
    timestamps_ms: np.ndarray
    values: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.device_ids)
        if self.timestamps_ms.shape != (n,):
            raise InvalidReadingError(f"expected timestamps_ms of shape ({n},), got {self.timestamps_ms.shape}")
        if self.values.ndim != 2 or self.values.shape[0] != n:
            raise InvalidReadingError(f"expected values of shape ({n}, F), got {self.values.shape}")
        if self.values.dtype != np.float32:
            raise InvalidReadingError(f"expected float32 values, got {self.values.dtype}")
        if self.timestamps_ms.dtype != np.int64:
            raise InvalidReadingError(f"expected int64 timestamps_ms, got {self.timestamps_ms.dtype}")
        if np.isinf(self.values).any():
            row = int(np.nonzero(np.isinf(self.values).any(axis=1))[0][0])
            raise InvalidReadingError(f"reading {row} (device {self.device_ids[row]!r}) has an infinite value")

    def __len__(self) -> int:
        return len(self.device_ids)

    @property
    def n_features(self) -> int:
        return int(self.values.shape[1])

    @classmethod
    def from_arrays(
        cls, device_ids: Sequence[str] | np.ndarray, timestamps_ms: Sequence[int] | np.ndarray,
        values: Sequence[Sequence[float]] | np.ndarray,
    ) -> ReadingBatch:
        """Build a batch from array-likes, converting dtypes (values to float32, timestamps to int64)."""
        ids = np.asarray(device_ids, dtype=object)
        ts = np.asarray(timestamps_ms, dtype=np.int64)
        vals = np.asarray(values, dtype=np.float32)
        if vals.ndim == 1:
            vals = vals.reshape(len(ids), -1) if len(ids) else vals.reshape(0, 0)
        return cls(ids, ts, vals)

    @classmethod
    def empty(cls, n_features: int) -> ReadingBatch:
        return cls(np.empty(0, dtype=object), np.empty(0, dtype=np.int64),
                   np.empty((0, n_features), dtype=np.float32))

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, object]], features: Sequence[str]) -> ReadingBatch:
        """Build a batch from ``{"device_id", "ts", "values": {feature: number}}`` mappings.

        Features absent from a record or ``None`` become NaN (missing); features not in ``features``
        are ignored. A record without those fields, a value that is not a number (text, a boolean) or
        one outside the float32 range raises :class:`InvalidReadingError` naming the record.
        """
        index = {name: i for i, name in enumerate(features)}
        ids: list[str] = []
        ts: list[object] = []
        rows: list[list[float]] = []
        for n, rec in enumerate(records):
            row = [np.nan] * len(features)
            try:
                device, stamp, values = rec["device_id"], rec["ts"], rec["values"]
            except (KeyError, TypeError) as exc:
                raise InvalidReadingError(f"record {n} lacks field {exc} (needs device_id, ts, values)") from None
            if not isinstance(values, Mapping):
                raise InvalidReadingError(f"record {n}: 'values' must be a mapping of feature to number, "
                                          f"got {type(values).__name__}")
            for name, value in values.items():
                i = index.get(name)
                if i is None or value is None:  # unknown feature: ignored; null: missing
                    continue
                if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                                  np.floating)):
                    raise InvalidReadingError(f"record {n} (device {device!r}): feature {name!r} must be a "
                                              f"number, got {type(value).__name__} {value!r}")
                if abs(float(value)) > _FLOAT32_MAX and np.isfinite(float(value)):
                    raise InvalidReadingError(f"record {n} (device {device!r}): feature {name!r} value {value!r} "
                                              f"is outside the float32 range")
                row[i] = float(value)
            ids.append(str(device))
            ts.append(stamp)
            rows.append(row)
        if not ids:
            return cls.empty(len(features))
        return cls(np.asarray(ids, dtype=object), to_epoch_ms(ts),
                   np.asarray(rows, dtype=np.float32).reshape(len(ids), len(features)))

    @classmethod
    def from_frame(
        cls, frame: pd.DataFrame, features: Sequence[str], time_col: str, device_col: str | None = None,
        default_device: str = "device-0",
    ) -> ReadingBatch:
        """Build a batch from a DataFrame with one row per reading.

        Raises :class:`~anomaly.errors.DataError` naming the column (and row) when a column is
        missing, a feature value is not numeric, infinite or outside the float32 range, a device id
        is missing, or the timestamps cannot be read. NaN feature values are kept (missing).
        """
        missing = [c for c in [time_col, *features, *([device_col] if device_col else [])] if c not in frame]
        if missing:
            raise DataError(f"missing column(s) {missing}; available: {list(frame.columns)}")
        for name in features:
            if not pd.api.types.is_numeric_dtype(frame[name].dtype):
                converted = pd.to_numeric(frame[name], errors="coerce")
                bad = converted.isna() & frame[name].notna()
                if bad.any():
                    row = int(np.nonzero(bad.to_numpy())[0][0])
                    raise DataError(f"column {name!r} has a non-numeric value {frame[name].iloc[row]!r} "
                                    f"at row {row}")
        wide = frame[list(features)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        if np.isinf(wide).any():
            row, col = (int(x[0]) for x in np.nonzero(np.isinf(wide)))
            raise DataError(f"column {features[col]!r} has an infinite value at row {row}")
        if (np.abs(wide) > _FLOAT32_MAX).any():
            row, col = (int(x[0]) for x in np.nonzero(np.abs(wide) > _FLOAT32_MAX))
            raise DataError(f"column {features[col]!r} has a value {wide[row, col]:g} at row {row} outside "
                            f"the float32 range (|x| <= {_FLOAT32_MAX:.3g})")
        values = wide.astype(np.float32)
        if device_col:
            if frame[device_col].isna().any():
                row = int(np.flatnonzero(frame[device_col].isna().to_numpy())[0])
                raise DataError(f"column {device_col!r} has a missing device id at row {row}")
            ids = frame[device_col].astype(str).to_numpy(dtype=object)
        else:
            ids = np.full(len(frame), default_device, dtype=object)
        try:
            ts = to_epoch_ms(frame[time_col])
        except InvalidReadingError as exc:
            raise DataError(f"column {time_col!r}: {exc}") from exc
        return cls(ids, ts, np.ascontiguousarray(values))

    @classmethod
    def concat(cls, batches: Sequence[ReadingBatch]) -> ReadingBatch:
        if not batches:
            raise InvalidReadingError("cannot concatenate zero batches")
        return cls(np.concatenate([b.device_ids for b in batches]),
                   np.concatenate([b.timestamps_ms for b in batches]),
                   np.concatenate([b.values for b in batches]))

    def take(self, rows: np.ndarray) -> ReadingBatch:
        """The readings at ``rows`` (an index or boolean mask), in that order."""
        return ReadingBatch(self.device_ids[rows], self.timestamps_ms[rows], self.values[rows])
