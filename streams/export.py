"""``sensor-anomaly export``: a time range of a topic into a tidy Parquet or CSV table, for notebooks.

Why it exists: retraining starts from history, and the history is in Kafka. This reads the records
of ``topic`` whose Kafka timestamps lie in ``[since, until)`` — the range is found per partition with
``offsets_for_times`` (the earliest offset at or after a time), so nothing before ``since`` is read —
and writes one row per reading::

    device_id | ts (int64 epoch ms, the reading's own time) | <feature> ... [| partition | offset]

or, with ``--events``, one row per anomaly event (:func:`events_frame`). Readings are decoded with
the service's own codec (:func:`streams.codec.decode_records`): a bad message is skipped and counted
by reason, never fatal. Features are the ``--features`` given, those of a model (``--model``), or every
feature name found in the messages (sorted). The output format follows the extension: ``.parquet`` /
``.pq``, or ``.csv`` (optionally ``.csv.gz``); the file is written to a temporary name and renamed, so
a reader never sees half a table. Rows are sorted by ``ts`` then ``device_id``; duplicates (a
producer's retries) are kept, as training drops them per device.

Records are read with ``read_committed``, so events of aborted exactly-once transactions never reach
a notebook. The whole table is built in memory (about 100 bytes per reading plus 4 per feature):
sized for notebook history, tens of millions of readings at most.

What it must not do: join a consumer group or commit offsets (it reads with ``group_id=None``), or
stop on a bad message.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
import pandas as pd
from kafka import KafkaConsumer, TopicPartition
from tqdm.auto import tqdm

from anomaly.cli import csv_list
from streams.codec import decode_event, decode_records
from streams.errors import CodecError, StreamsError

__all__ = [
    "ExportError",
    "ExportSummary",
    "add_export_arguments",
    "events_frame",
    "export_topic",
    "parse_time",
    "write_table",
]

logger = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 30.0
"""A partition that yields nothing for this long before reaching its end offset is reported incomplete
(a broker that stopped answering, or an open transaction holding back read_committed consumers)."""

_PARQUET = (".parquet", ".pq")
_CSV = (".csv", ".csv.gz", ".csv.bz2", ".csv.xz", ".csv.zip")
_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)([smhd])$")
_UNIT_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


class ExportError(StreamsError):
    """The export cannot run: unknown topic, bad time range or output path. The message names which."""


@dataclass
class ExportSummary:
    """What an export read and wrote."""

    path: Path
    rows: int = 0
    messages: int = 0
    """Records read inside the offset range (good and bad)."""
    bad_messages: Counter[str] = field(default_factory=Counter)
    """Skipped records by reason (the codec's dead-letter reasons; ``not_an_event`` for --events)."""
    outside_range: int = 0
    """Records inside the offset range whose timestamp lies outside [since, until) (clock skew)."""
    features: list[str] = field(default_factory=list)
    partitions: int = 0
    incomplete_partitions: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def describe(self) -> str:
        bad = sum(self.bad_messages.values())
        text = (f"exported {self.rows} rows from {self.messages} messages of {self.partitions} partition(s) "
                f"to {self.path} in {self.seconds:.1f} s")
        if bad:
            reasons = ", ".join(f"{k}={v}" for k, v in self.bad_messages.most_common())
            text += f"; {bad} bad messages skipped ({reasons})"
        if self.outside_range:
            text += f"; {self.outside_range} records outside the time range skipped"
        if self.incomplete_partitions:
            text += f"; INCOMPLETE: partitions {self.incomplete_partitions} stopped before their end offset"
        return text


def parse_time(text: str | int, *, now_ms: int | None = None) -> int:
    """Epoch ms from epoch ms, ISO-8601 (naive = UTC), ``now``, or a relative ``-<n>{s,m,h,d}``.

    >>> parse_time("2024-01-01T00:00:00Z"), parse_time("1704067200000"), parse_time("-1h", now_ms=3_600_000)
    (1704067200000, 1704067200000, 0)
    """
    if isinstance(text, int | np.integer):
        return int(text)
    value = str(text).strip()
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if value == "now":
        return now
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    match = _RELATIVE.match(value)
    if match:
        return now - int(float(match.group(1)) * _UNIT_MS[match.group(2)])
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError) as exc:
        raise ExportError(f"cannot read time {text!r}: expected ISO-8601, epoch ms, 'now' or -<n>[smhd] ({exc})") \
            from None
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return int(stamp.value // 1_000_000)


def _table_format(path: Path) -> Literal["parquet", "csv"]:
    name = path.name.lower()
    if name.endswith(_PARQUET):
        return "parquet"
    if name.endswith(_CSV):
        return "csv"
    raise ExportError(f"output {path}: unsupported extension; use one of {', '.join(_PARQUET + _CSV)}")


def write_table(frame: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``frame`` as Parquet or CSV (by extension) through a temporary file and a rename."""
    out = Path(path)
    kind = _table_format(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{uuid.uuid4().hex[:8]}-{out.name}"  # keeps the suffix: compression is inferred
    try:
        if kind == "parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------------- tables
def _discover_features(records: Sequence[Any]) -> set[str]:
    """Feature names in the ``values`` of readings and windows (unparseable records are skipped here)."""
    names: set[str] = set()
    for rec in records:
        try:
            obj = orjson.loads(rec.value)
        except (orjson.JSONDecodeError, TypeError):
            continue
        if not isinstance(obj, dict):
            continue
        items = obj.get("readings") if isinstance(obj.get("readings"), list) else [obj]
        for item in items:
            values = item.get("values") if isinstance(item, dict) else None
            if isinstance(values, dict):
                names.update(k for k, v in values.items() if isinstance(k, str) and isinstance(v, int | float)
                             and not isinstance(v, bool))
    return names


def _readings_chunk(records: Sequence[Any], features: list[str], with_source: bool,
                    bad: Counter[str]) -> pd.DataFrame:
    decoded = decode_records(records, features)
    bad.update(str(d.reason) for d in decoded.dead_letters)
    batch = decoded.batch
    columns: dict[str, Any] = {"device_id": batch.device_ids, "ts": batch.timestamps_ms}
    for i, name in enumerate(features):
        columns[name] = batch.values[:, i]
    if with_source:
        columns["partition"] = decoded.source_partition
        columns["offset"] = decoded.source_offset
    return pd.DataFrame(columns)


def events_frame(events: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per decoded event (:func:`streams.codec.decode_event` dicts): a tidy events table.

    Columns: ``device_id``, ``ts`` (epoch ms), ``kind``, ``score``, ``threshold``, ``model_name``,
    ``model_version``, ``episode_start_ms``, ``source_topic``, ``source_partition``, ``source_offset``,
    then ``contribution_<f>``, ``expected_<f>`` and ``actual_<f>`` per feature seen.

    >>> events_frame([{"device_id": "a", "ts_ms": 5, "kind": "start", "score": 0.9, "threshold": 0.8,
    ...                "model": {"name": "m", "version": "2"}, "contributions": {"x": 1.0},
    ...                "expected": {"x": 0.0}, "actual": {"x": 3.0}, "source": {"partition": 1, "offset": 7}}]
    ...             ).loc[0, ["device_id", "model_version", "contribution_x", "source_offset"]].astype(str).tolist()
    ['a', '2', '1.0', '7']
    """
    rows = []
    for e in events:
        model = e.get("model") or {}
        source = e.get("source") or {}
        row: dict[str, Any] = {
            "device_id": e.get("device_id"), "ts": e.get("ts_ms"), "kind": e.get("kind"), "score": e.get("score"),
            "threshold": e.get("threshold"), "model_name": model.get("name"), "model_version": model.get("version"),
            "episode_start_ms": e.get("episode_start_ms"), "source_topic": source.get("topic"),
            "source_partition": source.get("partition"), "source_offset": source.get("offset"),
        }
        for prefix, key in (("contribution_", "contributions"), ("expected_", "expected"), ("actual_", "actual")):
            for name, value in (e.get(key) or {}).items():
                row[prefix + name] = value
        rows.append(row)
    base = ["device_id", "ts", "kind", "score", "threshold", "model_name", "model_version", "episode_start_ms",
            "source_topic", "source_partition", "source_offset"]
    frame = pd.DataFrame(rows, columns=base + sorted({k for r in rows for k in r} - set(base)))
    frame["ts"] = frame["ts"].astype("int64")
    for col in ("episode_start_ms", "source_partition", "source_offset"):
        frame[col] = frame[col].astype("Int64")
    return frame


# ---------------------------------------------------------------------- reading
def _read_range(consumer: KafkaConsumer, topic: str, since_ms: int | None, until_ms: int | None,
                summary: ExportSummary, progress: bool, idle_timeout_s: float) -> Iterator[list[Any]]:
    """Yield lists of records of ``topic`` in the offset range that [since, until) maps to, per poll."""
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise ExportError(f"topic {topic!r} does not exist (or is not visible to this client)")
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    summary.partitions = len(tps)
    end = consumer.end_offsets(tps)
    if since_ms is None:
        start = dict(consumer.beginning_offsets(tps))
    else:
        found = consumer.offsets_for_times({tp: since_ms for tp in tps})
        start = {tp: end[tp] if found.get(tp) is None else found[tp].offset for tp in tps}
    if until_ms is None:
        stop = dict(end)
    else:
        found = consumer.offsets_for_times({tp: until_ms for tp in tps})
        stop = {tp: end[tp] if found.get(tp) is None else found[tp].offset for tp in tps}
    todo = {tp for tp in tps if stop[tp] > start[tp]}
    logger.info("export %s: %d records in range over %d partitions (%s)", topic,
                sum(stop[tp] - start[tp] for tp in todo), len(todo),
                ", ".join(f"{tp.partition}:{start[tp]}-{stop[tp]}" for tp in sorted(todo, key=lambda t: t.partition)))
    if not todo:
        return
    consumer.assign(sorted(todo, key=lambda t: t.partition))
    for tp in todo:
        consumer.seek(tp, start[tp])
    done_of = {tp: 0 for tp in todo}
    bar = tqdm(total=sum(stop[tp] - start[tp] for tp in todo), unit="msg", desc=f"export {topic}",
               disable=not progress, leave=False)
    last_news = time.monotonic()
    try:
        while todo:
            polled = consumer.poll(timeout_ms=500)
            for tp, records in polled.items():
                if tp not in todo:
                    continue
                keep = [r for r in records if r.offset < stop[tp]]
                if keep:
                    yield keep
            for tp in list(todo):
                position = consumer.position(tp)
                advanced = min(position, stop[tp]) - start[tp]
                if advanced > done_of[tp]:
                    bar.update(advanced - done_of[tp])
                    done_of[tp] = advanced
                    last_news = time.monotonic()
                if position >= stop[tp]:
                    todo.discard(tp)
                    consumer.pause(tp)
            if todo and time.monotonic() - last_news > idle_timeout_s:
                summary.incomplete_partitions = sorted(tp.partition for tp in todo)
                logger.warning("export %s: no progress for %.0f s on partitions %s; stopping (incomplete)", topic,
                               idle_timeout_s, summary.incomplete_partitions)
                return
    finally:
        bar.close()


def export_topic(bootstrap_servers: str, topic: str, out: str | os.PathLike[str], *,
                 since: str | int | None = None, until: str | int | None = None,
                 events: bool = False, features: Sequence[str] | None = None, with_source: bool = False,
                 progress: bool = True, idle_timeout_s: float = IDLE_TIMEOUT_S,
                 client_config: Mapping[str, Any] | None = None) -> ExportSummary:
    """Export the records of ``topic`` with Kafka timestamps in ``[since, until)`` to ``out``.

    Parameters
    ----------
    bootstrap_servers : str
        ``host:port[,...]``.
    topic : str
        The readings topic (or, with ``events=True``, the events or shadow topic).
    out : path
        ``.parquet``/``.pq`` or ``.csv`` (``.csv.gz`` ...).
    since, until : str or int, optional
        Bounds (see :func:`parse_time`); open when None.
    events : bool
        Export anomaly events (:func:`events_frame`) instead of readings.
    features : sequence of str, optional
        Feature columns (readings); default: every name found in the messages, sorted.
    with_source : bool
        Add ``partition`` and ``offset`` columns (readings).
    progress : bool
        Show a tqdm progress bar over the records in range.
    client_config : mapping, optional
        Extra kafka-python client settings (TLS/SASL).

    Returns
    -------
    ExportSummary
    """
    started = time.perf_counter()
    path = Path(out)
    _table_format(path)  # fail before reading anything
    since_ms = None if since is None else parse_time(since)
    until_ms = None if until is None else parse_time(until)
    if since_ms is not None and until_ms is not None and until_ms <= since_ms:
        raise ExportError(f"empty time range: until ({until}) must be after since ({since})")
    summary = ExportSummary(path=path)
    lo = -(2 ** 63) if since_ms is None else since_ms
    hi = 2 ** 63 - 1 if until_ms is None else until_ms
    names: list[str] = list(features or [])
    discover = not names and not events
    chunks: list[pd.DataFrame] = []
    event_dicts: list[dict[str, Any]] = []
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers.split(","), group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", isolation_level="read_committed",
                             client_id="sensor-anomaly-export", max_partition_fetch_bytes=8 * 1024 * 1024,
                             **dict(client_config or {}))
    try:
        for records in _read_range(consumer, topic, since_ms, until_ms, summary, progress, idle_timeout_s):
            summary.messages += len(records)
            inside = [r for r in records if lo <= r.timestamp < hi]
            summary.outside_range += len(records) - len(inside)
            if not inside:
                continue
            if events:
                for r in inside:
                    try:
                        event_dicts.append(decode_event(r.value if r.value is not None else b""))
                    except CodecError:
                        summary.bad_messages["not_an_event"] += 1
                continue
            if discover:
                new = sorted(_discover_features(inside) - set(names))
                if new:
                    names.extend(new)
                    names.sort()
            if not names:  # nothing parseable yet: every record here is bad; let the codec say why
                summary.bad_messages.update(str(d.reason) for d in decode_records(inside, ["_"]).dead_letters)
                continue
            chunks.append(_readings_chunk(inside, names, with_source, summary.bad_messages))
    finally:
        consumer.close()
    if events:
        frame = events_frame(event_dicts).sort_values(["ts", "device_id"], kind="stable")
    else:
        columns = ["device_id", "ts", *names] + (["partition", "offset"] if with_source else [])
        frame = pd.concat(chunks, ignore_index=True) if chunks else pd.DataFrame(columns=columns)
        frame = frame.reindex(columns=columns)
        frame["ts"] = frame["ts"].astype("int64")
        for name in names:
            frame[name] = frame[name].astype("float32")
        frame = frame.sort_values(["ts", "device_id"], kind="stable")
    summary.features = names
    summary.rows = len(frame)
    write_table(frame.reset_index(drop=True), path)
    summary.seconds = time.perf_counter() - started
    logger.info(summary.describe())
    return summary


# ---------------------------------------------------------------------- CLI
def _cmd_export(args: argparse.Namespace) -> int:
    from streams.config import ServiceConfig

    # the serve settings machinery gives export the same TLS/SASL environment variables; model_dir is unused
    config = ServiceConfig.from_sources({"bootstrap_servers": args.bootstrap, "model_dir": Path(".")})
    features = args.features
    if args.model is not None and not features:
        from anomaly.registry import load_model_dir

        features = list(load_model_dir(args.model)[0].inputs)
    security = config.kafka_security()
    summary = export_topic(config.bootstrap_servers, args.topic, args.out, since=args.since, until=args.until,
                           events=args.events, features=features, with_source=args.with_source,
                           progress=not args.no_progress, idle_timeout_s=args.idle_timeout,
                           client_config=security)
    print(summary.describe())
    return 1 if summary.incomplete_partitions else 0


def add_export_arguments(export: argparse.ArgumentParser) -> None:
    """Add ``export``'s flags to its parser (``streams.cli`` registers the command lazily)."""
    export.add_argument("--bootstrap", help="Kafka bootstrap servers host:port[,...] (or KAFKA_BOOTSTRAP_SERVERS)")
    export.add_argument("--topic", default="sensor.readings", help="topic to read (default: sensor.readings)")
    export.add_argument("--since", help="start, inclusive: ISO-8601, epoch ms, 'now' or a relative time written "
                                        "--since=-<n>[smhd] (default: the beginning)")
    export.add_argument("--until", help="end, exclusive: same forms (default: the end of each partition now)")
    export.add_argument("--out", required=True, type=Path, help="output file: .parquet, .pq, .csv or .csv.gz")
    export.add_argument("--events", action="store_true",
                        help="the topic holds anomaly events (sensor.anomalies or the shadow topic): one row per event")
    export.add_argument("--features", type=csv_list, help="comma-separated feature columns (default: all found)")
    export.add_argument("--model", type=Path, help="take the feature columns from this bundle or registry's live model")
    export.add_argument("--with-source", action="store_true", help="add partition and offset columns")
    export.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT_S,
                        help=f"give up on a partition after this many seconds without progress (default: "
                             f"{IDLE_TIMEOUT_S:g})")
    export.add_argument("--no-progress", action="store_true", help="no progress bar")
    export.set_defaults(func=_cmd_export)
