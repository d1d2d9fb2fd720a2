"""Message schemas of the service's topics: decode and validate readings, encode events and dead letters.

Why this module exists: it is the only place that knows the JSON layout of the topics, and the
place where untrusted bytes become the columnar :class:`~anomaly.readings.ReadingBatch` that the
detector takes. It must not raise on bad input (a bad message becomes a :class:`DeadLetter` and the
service goes on), must not talk to Kafka (it takes already-polled records and returns bytes), and
must not loop over readings in numpy: it collects plain Python lists for a whole poll and converts
them to arrays once.

Input topic (``sensor.readings``, key = device id), value is UTF-8 JSON, either one reading::

    {"device_id": "pump-7", "ts": "2024-06-10T06:13:20.123Z", "values": {"temp": 71.2, "rpm": 1500}}

or a window of readings of one device::

    {"device_id": "pump-7", "readings": [{"ts": 1718000000123, "values": {"temp": 71.2}}, ...]}

Validation rules (each failure names a :class:`DeadLetterReason`):

* **All or nothing per message.** A message is accepted whole or dead-lettered whole: a window with
  one bad reading goes to the DLQ with all its readings, so a replay of the DLQ re-sends exactly
  what the producer sent, and a device never gets half a window.
* **Features.** The model's inputs are its features, then its context inputs (commands, setpoints,
  modes: ``ModelBundle.inputs``); both come in ``values`` under the same rules, and "feature" below means
  either. Names the model does not know are ignored and counted
  (:attr:`DecodedBatch.unknown_features`), and their values are not checked. Model features that
  are absent or ``null`` become NaN, which the detector treats as missing (a context input: its last
  known value). A reading with no model feature carrying a number is dead-lettered
  (``no_known_features``); one with context values only is valid (it updates the device's context). Values must be JSON
  numbers (``true``/``false`` and numeric strings are ``wrong_type``), finite and inside float32
  range (``non_finite_value``; this includes the non-standard ``NaN``/``Infinity`` tokens that
  Python's ``json.dumps`` writes).
* **Timestamps** (``ts``): an ISO-8601 string, with or without zone (naive means UTC), or epoch
  milliseconds as a JSON number (a fraction of a millisecond is truncated). Anything outside
  [2000-01-01, 2100-01-01) is ``bad_timestamp``; the range catches epoch *seconds* or
  *microseconds* sent by mistake. A numeric string such as ``"1718000000123"`` is not ISO-8601 and
  is ``bad_timestamp``. Order within a window or across messages is not checked here: the detector
  handles duplicates and out-of-order readings per device.
* **Device id**: a non-empty string of at most :data:`MAX_DEVICE_ID_CHARS` characters. Readings
  inside a window may repeat it but not name another device.
* **Key.** When the record has a key it must equal the device id (``key_mismatch``): the key picks
  the partition, and the partition decides which service instance holds the device's state, so a
  message keyed by another id would be scored against the wrong state, or against none, after a
  rebalance. A record without a key is accepted unless ``require_key`` is set (``missing_key``); a
  keyless producer spreads a device over partitions, which breaks state ownership the same way.
* **Size**: a value longer than ``max_message_bytes`` is ``oversized`` without being parsed; so is a
  window of more than ``max_window_readings`` readings. Extra top-level fields are ignored, so
  producers can add fields without breaking older services.

Events topic (``sensor.anomalies``, key = device id): :meth:`AnomalyEvent.to_dict` plus ``ts`` as an
ISO-8601 UTC string beside ``ts_ms`` and ``source`` {topic, partition, offset}; non-finite floats are
written as ``null``. DLQ (``sensor.readings.dlq``): the original key and value bytes unchanged, the
original headers, and the headers of :func:`dead_letter_headers`.

JSON parsing uses ``orjson`` when it is installed (about 7x faster than the standard library on
these messages) and falls back to :mod:`json`; a value ``orjson`` rejects is re-read with :mod:`json`,
so both give the same dead-letter reasons.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

import numpy as np

from anomaly.events import AnomalyEvent
from anomaly.readings import ReadingBatch
from streams.errors import CodecError, ConfigError

try:  # optional speed-up; the stdlib path gives identical results
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised by tests that switch the backend off
    _orjson = None

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_WINDOW_READINGS",
    "DLQ_HEADER_PREFIX",
    "EVENT_FIELDS",
    "MAX_DEVICE_ID_CHARS",
    "MAX_TS_MS",
    "MIN_TS_MS",
    "DeadLetter",
    "DeadLetterReason",
    "DecodedBatch",
    "RecordLike",
    "dead_letter_headers",
    "decode_event",
    "decode_records",
    "encode_event",
    "encode_reading",
    "encode_window",
    "iso_from_ms",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 1_048_576
"""1 MiB, Kafka's default ``max.message.bytes``: a bigger value cannot be a message a sane producer sent."""
DEFAULT_MAX_WINDOW_READINGS = 10_000
"""Readings per window message. Bounds the work (and the rows) one message can put into a poll."""
MAX_DEVICE_ID_CHARS = 256
"""Device ids are Kafka keys, state-store keys and log fields; 256 characters is generous for all three."""
MIN_TS_MS = 946_684_800_000
"""2000-01-01T00:00:00Z. Epoch *seconds* of today (~1.7e9) fall below this and are rejected."""
MAX_TS_MS = 4_102_444_800_000
"""2100-01-01T00:00:00Z (exclusive). Epoch *microseconds* of today (~1.7e15) fall above this."""
DLQ_HEADER_PREFIX = "x-dlq-"
"""Prefix of the headers :func:`dead_letter_headers` adds (old ones are dropped on a re-dead-letter)."""
EVENT_FIELDS = ("device_id", "ts", "ts_ms", "kind", "score", "threshold", "expected", "actual",
                "contributions", "model", "source")
"""Fields every value on the events topic carries (:func:`decode_event` checks them)."""

_F32_MAX = float(np.finfo(np.float32).max)
_NAN = float("nan")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
_ABSENT = object()
_DETAIL_MAX_CHARS = 300
_JSON_TYPE_NAMES = {dict: "object", list: "array", str: "str", int: "int", float: "float"}


class DeadLetterReason(StrEnum):
    """Why a message went to the DLQ: the value of the ``x-dlq-reason`` header and a metric label."""

    OVERSIZED = "oversized"
    """Value longer than ``max_message_bytes``, or a window longer than ``max_window_readings``."""
    EMPTY_VALUE = "empty_value"
    """Null value (a tombstone) or zero bytes."""
    INVALID_JSON = "invalid_json"
    """Not UTF-8 JSON, or the consumer handed over a value that is not bytes/str."""
    NOT_AN_OBJECT = "not_an_object"
    """Valid JSON, but not an object at the top level."""
    UNKNOWN_SCHEMA = "unknown_schema"
    """An object that is neither a reading (``ts``/``values``) nor a window (``readings``), or both."""
    MISSING_FIELD = "missing_field"
    """``device_id``, ``ts`` or ``values`` absent."""
    WRONG_TYPE = "wrong_type"
    """A field of the wrong JSON type, e.g. a string or boolean feature value, ``values`` not an object."""
    BAD_DEVICE_ID = "bad_device_id"
    """Device id empty, too long, or not encodable as UTF-8."""
    KEY_MISMATCH = "key_mismatch"
    """Record key differs from the device id, or a window reading names another device."""
    MISSING_KEY = "missing_key"
    """Record without a key while ``require_key`` is set."""
    BAD_TIMESTAMP = "bad_timestamp"
    """Unparseable ISO-8601 string, or a time outside [2000, 2100)."""
    NON_FINITE_VALUE = "non_finite_value"
    """A model feature's value is NaN, infinite or outside float32 range."""
    NO_KNOWN_FEATURES = "no_known_features"
    """A reading without a number for any of the model's features."""
    EMPTY_WINDOW = "empty_window"
    """A window whose ``readings`` list is empty."""


class RecordLike(Protocol):
    """What the codec reads from a consumed record: kafka-python's ``ConsumerRecord`` fits."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None
    key: bytes | str | None
    value: bytes | str | None
    headers: Sequence[tuple[str, bytes | None]] | None


@dataclass(frozen=True)
class DeadLetter:
    """A message that failed validation, with the record it came from.

    ``reason`` is a :class:`DeadLetterReason` (a ``str``); ``detail`` says in words which field
    failed and how, e.g. ``readings[3].values.temp: expected a number or null, got str``.
    """

    reason: str
    detail: str
    record: RecordLike

    @property
    def key(self) -> bytes | None:
        """The record's key as bytes, unchanged (a ``str`` key from a deserializer is UTF-8 encoded)."""
        return _as_bytes(self.record.key)

    @property
    def value(self) -> bytes | None:
        """The record's value as bytes, unchanged (a ``str`` value from a deserializer is UTF-8 encoded)."""
        return _as_bytes(self.record.value)

    def locate(self) -> str:
        """``topic[partition]@offset``, for log lines."""
        return f"{self.record.topic}[{self.record.partition}]@{self.record.offset}"


@dataclass(frozen=True)
class DecodedBatch:
    """The accepted readings of one poll, each mapped back to its source record, and the rejects.

    Attributes (N accepted readings; a window message contributes several rows with the same source)
    ----------
    batch : ReadingBatch
        [N] readings in record order, values [N, F] float32 in the model's feature order.
    source_topic : numpy.ndarray
        [N] object, the topic of each reading's record (an array even when the poll had one topic,
        so ``source_topic[row]`` always works).
    source_partition : numpy.ndarray
        [N] int32 partition of each reading's record.
    source_offset : numpy.ndarray
        [N] int64 offset of each reading's record.
    produce_ts_ms : numpy.ndarray
        [N] int64 Kafka record timestamp (CreateTime or LogAppendTime), -1 when unknown; for
        end-to-end latency.
    dead_letters : list[DeadLetter]
        Rejected messages, in record order.
    messages : int
        Accepted messages (a window counts once).
    unknown_features : int
        Feature values ignored in accepted messages because the model does not know their name.
    """

    batch: ReadingBatch
    source_topic: np.ndarray
    source_partition: np.ndarray
    source_offset: np.ndarray
    produce_ts_ms: np.ndarray
    dead_letters: list[DeadLetter]
    messages: int
    unknown_features: int

    def __len__(self) -> int:
        return len(self.batch)


class _Reject(Exception):
    """Internal: raised while decoding one message, turned into a DeadLetter by decode_records."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail[:_DETAIL_MAX_CHARS]


def decode_records(
    records: Iterable[RecordLike],
    features: Sequence[str],
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_window_readings: int = DEFAULT_MAX_WINDOW_READINGS,
    require_key: bool = False,
) -> DecodedBatch:
    """Decode and validate the records of one poll into one columnar batch plus dead letters.

    Each message is accepted whole or dead-lettered whole (see the module docstring for every
    rule). Never raises on message content; bad parameters raise :class:`~streams.errors.ConfigError`.

    Parameters
    ----------
    records : iterable of RecordLike
        Consumed records in poll order (``topic``, ``partition``, ``offset``, ``key``, ``value``,
        ``timestamp``, ``headers``), with key and value as bytes, e.g. kafka-python ``ConsumerRecord``.
    features : sequence of str
        The model's input names (``ModelBundle.inputs``: features, then context inputs), in the model's
        order (columns of ``batch.values``).
    max_message_bytes : int
        Longer values are dead-lettered as ``oversized`` without being parsed.
    max_window_readings : int
        Longer windows are dead-lettered as ``oversized``.
    require_key : bool
        Dead-letter records without a key (``missing_key``).

    Returns
    -------
    DecodedBatch
        Accepted readings with their sources, the dead letters and counters.

    Notes
    -----
    Cost: one JSON parse and a short Python loop over the feature values per reading; the arrays
    are built once per call from lists.

    Examples
    --------
    >>> from types import SimpleNamespace as Rec
    >>> good = Rec(topic="sensor.readings", partition=0, offset=7, key=b"pump-7",
    ...            timestamp=1718000000200, headers=[],
    ...            value=b'{"device_id": "pump-7", "ts": 1718000000123, "values": {"temp": 71.5}}')
    >>> bad = Rec(topic="sensor.readings", partition=0, offset=8, key=None, timestamp=-1, headers=[],
    ...           value=b'{"device_id": "pump-7", "ts": 1718000000124, "values": {"temp": "hot"}}')
    >>> out = decode_records([good, bad], features=["temp", "rpm"])
    >>> out.batch.values.tolist(), out.source_offset.tolist()
    ([[71.5, nan]], [7])
    >>> [(str(d.reason), d.detail, d.record.offset) for d in out.dead_letters]
    [('wrong_type', 'values.temp: expected a number or null, got str', 8)]
    """
    index = _feature_index(features)
    if max_message_bytes < 1:
        raise ConfigError(f"max_message_bytes must be >= 1, got {max_message_bytes}")
    if max_window_readings < 1:
        raise ConfigError(f"max_window_readings must be >= 1, got {max_window_readings}")
    n_features = len(index)
    ids: list[str] = []
    stamps: list[int] = []
    flat: list[float] = []
    topics: list[str] = []
    partitions: list[int] = []
    offsets: list[int] = []
    produced: list[int] = []
    dead: list[DeadLetter] = []
    messages = 0
    unknown = 0
    for rec in records:
        try:
            device_id, rec_stamps, rec_values, rec_unknown = _decode_message(
                rec, index, n_features, max_message_bytes, max_window_readings, require_key)
        except _Reject as rej:
            dead.append(DeadLetter(rej.reason, rej.detail, rec))
            continue
        messages += 1
        unknown += rec_unknown
        stamps.extend(rec_stamps)
        flat.extend(rec_values)
        ts = rec.timestamp
        if ts is None:
            ts = -1
        n = len(rec_stamps)
        if n == 1:
            ids.append(device_id)
            topics.append(rec.topic)
            partitions.append(rec.partition)
            offsets.append(rec.offset)
            produced.append(ts)
        else:
            ids.extend([device_id] * n)
            topics.extend([rec.topic] * n)
            partitions.extend([rec.partition] * n)
            offsets.extend([rec.offset] * n)
            produced.extend([ts] * n)
    if dead:
        first = dead[0]
        logger.warning("%d of %d messages dead-lettered; first: %s %s: %s", len(dead), len(dead) + messages,
                       first.locate(), first.reason, first.detail)
    n = len(ids)
    if n:
        batch = ReadingBatch(np.array(ids, dtype=object), np.array(stamps, dtype=np.int64),
                             np.array(flat, dtype=np.float32).reshape(n, n_features))
    else:
        batch = ReadingBatch.empty(n_features)
    return DecodedBatch(
        batch=batch,
        source_topic=np.array(topics, dtype=object),
        source_partition=np.array(partitions, dtype=np.int32),
        source_offset=np.array(offsets, dtype=np.int64),
        produce_ts_ms=np.array(produced, dtype=np.int64),
        dead_letters=dead,
        messages=messages,
        unknown_features=unknown,
    )


def _feature_index(features: Sequence[str]) -> dict[str, int]:
    if isinstance(features, str):
        raise ConfigError(f"features must be a sequence of names, got the string {features!r}")
    index: dict[str, int] = {}
    for i, name in enumerate(features):
        if not isinstance(name, str) or not name:
            raise ConfigError(f"features[{i}] must be a non-empty string, got {name!r}")
        if name in index:
            raise ConfigError(f"features[{i}] repeats {name!r}")
        index[name] = i
    if not index:
        raise ConfigError("features must name at least one feature, got none")
    return index


def _decode_message(
    rec: RecordLike, index: dict[str, int], n_features: int, max_bytes: int, max_window: int,
    require_key: bool,
) -> tuple[str, list[int], list[float], int]:
    """(device_id, [T] epoch ms, [T * F] values row-major, unknown feature count) of one record."""
    value = rec.value
    if value is None:
        raise _Reject(DeadLetterReason.EMPTY_VALUE, "value is null (a tombstone)")
    if type(value) is bytes or isinstance(value, (bytes, bytearray, str)):  # bytes first: the usual case
        size = len(value)
    elif isinstance(value, memoryview):
        size = value.nbytes
    else:
        raise _Reject(DeadLetterReason.INVALID_JSON,
                      f"value is a {type(value).__name__}, expected bytes (consume without a value "
                      "deserializer)")
    if size == 0:
        raise _Reject(DeadLetterReason.EMPTY_VALUE, "value is empty (0 bytes)")
    if size > max_bytes:
        raise _Reject(DeadLetterReason.OVERSIZED,
                      f"value is {size} bytes, more than the limit of {max_bytes}")
    obj = _parse_json(value)
    if type(obj) is not dict:
        raise _Reject(DeadLetterReason.NOT_AN_OBJECT, f"expected a JSON object, got {_json_type(obj)}")
    readings = obj.get("readings", _ABSENT)
    if readings is _ABSENT:
        if "values" not in obj and "ts" not in obj:
            raise _Reject(DeadLetterReason.UNKNOWN_SCHEMA,
                          "expected a reading (ts, values) or a window (readings); got fields "
                          f"{_fields(obj)}")
        device_id = _device_id(obj, rec.key, require_key)
        ts = obj.get("ts", _ABSENT)
        if ts is _ABSENT:
            raise _Reject(DeadLetterReason.MISSING_FIELD, "ts is missing")
        values = obj.get("values", _ABSENT)
        if values is _ABSENT:
            raise _Reject(DeadLetterReason.MISSING_FIELD, "values is missing")
        stamp = _timestamp(ts, -1)
        row, unknown = _values(values, index, n_features, -1)
        return device_id, [stamp], row, unknown
    if "values" in obj or "ts" in obj:
        raise _Reject(DeadLetterReason.UNKNOWN_SCHEMA,
                      f"both a window (readings) and a reading (ts/values); got fields {_fields(obj)}")
    device_id = _device_id(obj, rec.key, require_key)
    if type(readings) is not list:
        raise _Reject(DeadLetterReason.WRONG_TYPE, f"readings: expected an array, got {_json_type(readings)}")
    if not readings:
        raise _Reject(DeadLetterReason.EMPTY_WINDOW, "readings is an empty array")
    if len(readings) > max_window:
        raise _Reject(DeadLetterReason.OVERSIZED,
                      f"window has {len(readings)} readings, more than the limit of {max_window}")
    stamps: list[int] = []
    flat: list[float] = []
    unknown = 0
    for j, item in enumerate(readings):
        if type(item) is not dict:
            raise _Reject(DeadLetterReason.WRONG_TYPE,
                          f"readings[{j}]: expected an object, got {_json_type(item)}")
        ts = item.get("ts", _ABSENT)
        if ts is _ABSENT:
            raise _Reject(DeadLetterReason.MISSING_FIELD, f"readings[{j}].ts is missing")
        values = item.get("values", _ABSENT)
        if values is _ABSENT:
            raise _Reject(DeadLetterReason.MISSING_FIELD, f"readings[{j}].values is missing")
        other = item.get("device_id", device_id)
        if other != device_id:
            raise _Reject(DeadLetterReason.KEY_MISMATCH,
                          f"readings[{j}].device_id {_short(other)} differs from the window's "
                          f"{_short(device_id)}")
        stamps.append(_timestamp(ts, j))
        row, n_unknown = _values(values, index, n_features, j)
        flat.extend(row)
        unknown += n_unknown
    return device_id, stamps, flat, unknown


def _parse_json(value: bytes | bytearray | memoryview | str) -> object:
    if _orjson is not None:
        try:
            return _orjson.loads(value)
        except _orjson.JSONDecodeError:
            pass  # re-read below: the stdlib also accepts NaN/Infinity, so they get non_finite_value
    if isinstance(value, str):
        text = value
    else:
        try:
            text = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Reject(DeadLetterReason.INVALID_JSON, f"not UTF-8: {exc}") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _Reject(DeadLetterReason.INVALID_JSON, f"not JSON: {exc}") from None


def _device_id(obj: dict[str, Any], key: object, require_key: bool) -> str:
    device_id = obj.get("device_id", _ABSENT)
    if device_id is _ABSENT:
        raise _Reject(DeadLetterReason.MISSING_FIELD, "device_id is missing")
    if type(device_id) is not str:
        raise _Reject(DeadLetterReason.WRONG_TYPE,
                      f"device_id: expected a string, got {_json_type(device_id)}")
    if not device_id or len(device_id) > MAX_DEVICE_ID_CHARS:
        raise _Reject(DeadLetterReason.BAD_DEVICE_ID,
                      f"device_id must have 1 to {MAX_DEVICE_ID_CHARS} characters, got {len(device_id)}")
    try:
        encoded = device_id.encode("utf-8")
    except UnicodeEncodeError:
        raise _Reject(DeadLetterReason.BAD_DEVICE_ID,
                      f"device_id {_short(device_id)} cannot be encoded as UTF-8") from None
    if key is None:
        if require_key:
            raise _Reject(DeadLetterReason.MISSING_KEY,
                          f"record has no key; expected the device id {_short(device_id)}")
    elif key != encoded and key != device_id:
        raise _Reject(DeadLetterReason.KEY_MISMATCH,
                      f"record key {_short(key)} differs from device_id {_short(device_id)}; the key picks "
                      "the partition, which decides where the device's state lives")
    return device_id


def _timestamp(ts: object, j: int) -> int:
    """Epoch ms of a ``ts`` field; ``j`` is the window position (-1 for a single reading), for messages."""
    kind = type(ts)
    if kind is int:
        ms = ts
    elif kind is float:
        if not (MIN_TS_MS <= ts < MAX_TS_MS):  # type: ignore[operator]  # also false for NaN
            raise _Reject(DeadLetterReason.BAD_TIMESTAMP, f"{_path(j, 'ts')}: {_short(ts)} is not epoch ms "
                          "in [2000-01-01, 2100-01-01)")
        ms = int(ts)  # type: ignore[call-overload]
    elif kind is str:
        try:
            parsed = datetime.fromisoformat(ts)  # type: ignore[arg-type]
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            ms = (parsed - _EPOCH) // _ONE_MS
        except (ValueError, OverflowError) as exc:
            raise _Reject(DeadLetterReason.BAD_TIMESTAMP,
                          f"{_path(j, 'ts')}: {_short(ts)} is not an ISO-8601 time ({exc})") from None
    else:
        raise _Reject(DeadLetterReason.WRONG_TYPE,
                      f"{_path(j, 'ts')}: expected an ISO-8601 string or epoch ms, got {_json_type(ts)}")
    if not (MIN_TS_MS <= ms < MAX_TS_MS):  # type: ignore[operator]
        raise _Reject(DeadLetterReason.BAD_TIMESTAMP,
                      f"{_path(j, 'ts')}: {_short(ts)} is outside [2000-01-01, 2100-01-01) (epoch ms {ms})")
    return ms  # type: ignore[return-value]


def _values(values: object, index: dict[str, int], n_features: int, j: int) -> tuple[list[float], int]:
    """One reading's [F] row (NaN = missing) and how many of its names the model does not know."""
    if type(values) is not dict:
        raise _Reject(DeadLetterReason.WRONG_TYPE, f"{_path(j, 'values')}: expected an object, got "
                      f"{_json_type(values)}")
    row = [_NAN] * n_features
    known = 0
    unknown = 0
    for name, v in values.items():
        i = index.get(name)
        if i is None:
            unknown += 1
            continue
        kind = type(v)
        if kind is float:
            if not (-_F32_MAX <= v <= _F32_MAX):  # false for NaN and ±inf too
                raise _Reject(DeadLetterReason.NON_FINITE_VALUE,
                              f"{_path(j, 'values')}.{name}: {v!r} is not a finite float32")
            row[i] = v
            known += 1
        elif kind is int:
            if not (-_F32_MAX <= v <= _F32_MAX):
                raise _Reject(DeadLetterReason.NON_FINITE_VALUE,
                              f"{_path(j, 'values')}.{name}: {_short(v)} is outside float32 range")
            row[i] = float(v)
            known += 1
        elif v is not None:
            raise _Reject(DeadLetterReason.WRONG_TYPE,
                          f"{_path(j, 'values')}.{name}: expected a number or null, got {_json_type(v)}")
    if not known:
        raise _Reject(DeadLetterReason.NO_KNOWN_FEATURES,
                      f"{_path(j, 'values')}: no number for any model feature; got {_fields(values)}, "
                      f"model has {list(index)[:8]}")
    return row, unknown


def _path(j: int, field: str) -> str:
    return field if j < 0 else f"readings[{j}].{field}"


def _json_type(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    return _JSON_TYPE_NAMES.get(type(v), type(v).__name__)


def _short(v: object, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fields(obj: dict[str, Any]) -> str:
    names = list(obj)
    shown = ", ".join(_short(n, 40) for n in names[:8])
    return f"[{shown}{', ...' if len(names) > 8 else ''}]"


def _as_bytes(v: object) -> bytes | None:
    if v is None or isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode("utf-8", "surrogatepass")
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    raise CodecError(f"cannot write a {type(v).__name__} as message bytes")


# --------------------------------------------------------------------------------------- dead letters

def dead_letter_headers(dl: DeadLetter) -> list[tuple[str, bytes]]:
    """Headers for the DLQ copy of a dead letter: the record's own headers, then the ``x-dlq-*`` ones.

    Previous ``x-dlq-*`` headers (a record replayed from the DLQ that failed again) are dropped so
    each name appears once. Send the result with ``dl.key`` and ``dl.value`` unchanged.

    Examples
    --------
    >>> from types import SimpleNamespace as Rec
    >>> rec = Rec(topic="sensor.readings", partition=2, offset=41, key=b"k", value=b"{",
    ...           timestamp=1718000000000, headers=[("trace", b"abc")])
    >>> dead_letter_headers(DeadLetter("invalid_json", "not JSON", rec))  # doctest: +NORMALIZE_WHITESPACE
    [('trace', b'abc'), ('x-dlq-reason', b'invalid_json'), ('x-dlq-detail', b'not JSON'),
     ('x-dlq-source-topic', b'sensor.readings'), ('x-dlq-source-partition', b'2'),
     ('x-dlq-source-offset', b'41'), ('x-dlq-source-timestamp', b'1718000000000')]
    """
    rec = dl.record
    headers = [(k, v) for k, v in (rec.headers or ()) if not k.startswith(DLQ_HEADER_PREFIX)]
    ts = rec.timestamp if rec.timestamp is not None else -1
    headers += [
        (DLQ_HEADER_PREFIX + "reason", str(dl.reason).encode()),
        (DLQ_HEADER_PREFIX + "detail", dl.detail.encode("utf-8", "backslashreplace")),
        (DLQ_HEADER_PREFIX + "source-topic", str(rec.topic).encode()),
        (DLQ_HEADER_PREFIX + "source-partition", str(int(rec.partition)).encode()),
        (DLQ_HEADER_PREFIX + "source-offset", str(int(rec.offset)).encode()),
        (DLQ_HEADER_PREFIX + "source-timestamp", str(int(ts)).encode()),
    ]
    return headers


# --------------------------------------------------------------------------------------- encoding

def iso_from_ms(ts_ms: int) -> str:
    """ISO-8601 UTC string with milliseconds and a ``Z`` for epoch milliseconds.

    >>> iso_from_ms(1718000000123)
    '2024-06-10T06:13:20.123Z'
    """
    return (_EPOCH + timedelta(milliseconds=int(ts_ms))).isoformat(timespec="milliseconds")[:-6] + "Z"


def encode_reading(device_id: str, ts: int | str, values: Mapping[str, float | None]) -> tuple[bytes, bytes]:
    """Key and value of one input-topic reading (for the simulator and tests).

    ``ts`` is epoch milliseconds (int) or an ISO-8601 string, written as given. NaN and ``None``
    values are written as ``null`` (missing); infinite values and booleans raise
    :class:`~streams.errors.CodecError`.

    >>> encode_reading("pump-7", 1718000000123, {"temp": 71.5, "rpm": None})
    (b'pump-7', b'{"device_id":"pump-7","ts":1718000000123,"values":{"temp":71.5,"rpm":null}}')
    """
    key = _encode_device_id(device_id)
    return key, _dumps({"device_id": device_id, "ts": _encode_ts(ts, "ts"),
                        "values": _encode_values(values, "values")})


def encode_window(device_id: str, readings: Iterable[tuple[int | str, Mapping[str, float | None]]]
                  ) -> tuple[bytes, bytes]:
    """Key and value of one input-topic window: ``readings`` are ``(ts, values)`` pairs, at least one.

    >>> encode_window("pump-7", [(1000000000000, {"temp": 1.0}), ("2001-09-09T01:46:41Z", {"temp": 2.0})])[1]
    b'{"device_id":"pump-7","readings":[{"ts":1000000000000,"values":{"temp":1.0}},{"ts":"2001-09-09T01:46:41Z","values":{"temp":2.0}}]}'
    """
    key = _encode_device_id(device_id)
    items = [{"ts": _encode_ts(ts, f"readings[{j}].ts"),
              "values": _encode_values(values, f"readings[{j}].values")}
             for j, (ts, values) in enumerate(readings)]
    if not items:
        raise CodecError("a window needs at least one reading, got none")
    return key, _dumps({"device_id": device_id, "readings": items})


def encode_event(event: AnomalyEvent, source_topic: str, source_partition: int, source_offset: int
                 ) -> tuple[bytes, bytes]:
    """Key (device id) and JSON value of an events-topic message for ``event``.

    The value is ``event.to_dict()`` with ``ts`` (ISO-8601 UTC) beside ``ts_ms``, ``episode_start``
    beside ``episode_start_ms`` and ``source`` {topic, partition, offset} of the triggering reading;
    non-finite floats are written as ``null``.

    >>> ev = AnomalyEvent("pump-7", 1718000000123, "start", 0.999, 0.99, {"temp": 70.0}, {"temp": 90.0},
    ...                   {"temp": 1.0}, "lstm", "3", row=0)
    >>> key, value = encode_event(ev, "sensor.readings", 2, 41)
    >>> key, decode_event(value)["ts"], decode_event(value)["source"]
    (b'pump-7', '2024-06-10T06:13:20.123Z', {'topic': 'sensor.readings', 'partition': 2, 'offset': 41})
    """
    if event.kind not in ("start", "end"):
        raise CodecError(f"event kind must be 'start' or 'end', got {event.kind!r}")
    key = _encode_device_id(event.device_id)
    start = event.episode_start_ms
    out: dict[str, object] = {
        "device_id": event.device_id,
        "ts": iso_from_ms(event.ts_ms),
        "ts_ms": int(event.ts_ms),
        "kind": event.kind,
        "score": _json_float(event.score),
        "threshold": _json_float(event.threshold),
        "expected": _sanitize(event.expected),
        "actual": _sanitize(event.actual),
        "contributions": _sanitize(event.contributions),
        "model": {"name": str(event.model_name), "version": str(event.model_version)},
        "episode_start": None if start is None else iso_from_ms(start),
        "episode_start_ms": None if start is None else int(start),
        "source": {"topic": str(source_topic), "partition": int(source_partition),
                   "offset": int(source_offset)},
    }
    for name, value in event.to_dict().items():  # fields added to AnomalyEvent later flow through
        if name not in out:
            out[name] = _sanitize(value)
    return key, _dumps(out)


def decode_event(data: bytes | str) -> dict[str, Any]:
    """Parse an events-topic value (for tests and tools); raises CodecError if it is not one.

    >>> decode_event(b'{"device_id": "a"}')
    Traceback (most recent call last):
    ...
    streams.errors.CodecError: event is missing field(s) ['ts', 'ts_ms', ...]
    """
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"event is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CodecError(f"event must be a JSON object, got {_json_type(obj)}")
    missing = [name for name in EVENT_FIELDS if name not in obj]
    if missing:
        raise CodecError(f"event is missing field(s) {missing}")
    return obj


def _encode_device_id(device_id: str) -> bytes:
    if not isinstance(device_id, str) or not device_id or len(device_id) > MAX_DEVICE_ID_CHARS:
        raise CodecError(f"device_id must be a string of 1 to {MAX_DEVICE_ID_CHARS} characters, got "
                         f"{_short(device_id)}")
    try:
        return device_id.encode("utf-8")
    except UnicodeEncodeError:
        raise CodecError(f"device_id {_short(device_id)} cannot be encoded as UTF-8") from None


def _encode_ts(ts: object, where: str) -> int | str:
    if isinstance(ts, str):
        return ts
    if isinstance(ts, (int, np.integer)) and not isinstance(ts, bool):
        return int(ts)
    raise CodecError(f"{where}: expected epoch ms (int) or an ISO-8601 string, got {_short(ts)}")


def _encode_values(values: Mapping[str, float | None], where: str) -> dict[str, float | None]:
    if not isinstance(values, Mapping):
        raise CodecError(f"{where}: expected a mapping of feature name to number, got "
                         f"{type(values).__name__}")
    out: dict[str, float | None] = {}
    for name, v in values.items():
        if not isinstance(name, str):
            raise CodecError(f"{where}: feature names must be strings, got {_short(name)}")
        if v is None:
            out[name] = None
            continue
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise CodecError(f"{where}.{name}: expected a number or None, got {_short(v)}")
        f = float(v)
        if f != f:
            out[name] = None
        elif f in (np.inf, -np.inf):
            raise CodecError(f"{where}.{name}: {f} cannot be sent (infinite)")
        else:
            out[name] = f
    return out


def _json_float(v: object) -> float | None:
    f = float(v)  # type: ignore[arg-type]
    return f if np.isfinite(f) else None


def _sanitize(v: object) -> object:
    """Plain JSON types: numpy scalars to Python, non-finite floats to None, tuples to lists."""
    if v is None or isinstance(v, (str, bool)):
        return v
    if isinstance(v, (int, np.integer)) and not isinstance(v, np.bool_):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return _json_float(v)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, Mapping):
        return {str(k): _sanitize(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_sanitize(x) for x in v]
    raise CodecError(f"cannot write a {type(v).__name__} as JSON: {_short(v)}")


def _dumps(obj: object) -> bytes:
    if _orjson is not None:
        return _orjson.dumps(obj)
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode("utf-8")
