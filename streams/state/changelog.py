"""Per-device state in a compacted changelog topic: encode at commit, restore on assignment.

Why it exists: a device's LSTM memory must survive crashes and rebalances. At every commit the
processor writes the state of the devices touched since the last commit to
``<group>-state-changelog`` — compacted, with the input topic's partition count, co-partitioned
(a device's state lives in the changelog partition of its input partition) — plus one *commit
marker* per input partition committed. When a partition is assigned, the processor reads that
changelog partition to its end and loads every device before it processes a single reading of
that partition (:func:`restore_partitions`).

Devices are packed into *buckets*: each changelog partition has ``buckets`` keys (the
``changelog_buckets`` setting), a device belongs to bucket ``hash(device id) % buckets``, and a
bucket's record holds the state of ALL its devices, column-wise (:mod:`anomaly.snapshots`). A commit
rewrites every bucket with a touched (or evicted) device. Why not one record per device, as Kafka
Streams does: kafka-python spends 15-40 µs of Python per ``send``, so 10,000 touched devices stalled
the processing loop for 0.2-0.4 s at every commit (that stall was the service's p99 latency), and
encoding device by device another ~0.1 s per 10,000; a few hundred column-wise bucket records cost a
few milliseconds. The price is write amplification when few devices of a bucket are touched per
commit; the bucket count trades one against the other (README, "Configuration").

Records (all little-endian)::

    bucket    key   0xFF | u16 buckets | u16 bucket        (0xFF never occurs in UTF-8: no device id collides)
              value b"SACB" | u8 format version | i64 next input offset | state blob (anomaly.snapshots)
              value None                                   (the bucket has no device left: all evicted)
    marker    key   b""                                    (no device id is empty: the codec rejects it)
              value b"SACM" | u8 format version | i64 next input offset

The state blob is versioned, checksummed and carries the model version. A marker says "every record
of this commit is in the log before me, and the input partition's next offset was N"; compaction
keeps exactly the newest marker and the newest record of each bucket per partition. In exactly-once
mode the markers, the bucket records and the consumer offsets are one transaction; a restore that
has fetched the (stable) committed offset N reads until it has seen a marker >= N, so it never loads
state older than the offsets it resumes from, even while the transaction's markers are still being
written to the changelog partition.

Rules on restore (each counted in ``sensor_anomaly_state_snapshots_discarded_total{reason}``):

* a bucket record that does not decode (``corrupt``: bad magic, checksum, length; counted once) is
  skipped — its devices warm up again; processing continues; a device found in a bucket that is
  not its own is skipped the same way (counted per device);
* state of another model version (``model_version``, counted per device) is discarded: hidden
  state of one model means nothing to another, and the devices warm up under the new model;
* a record of another layout (``format``, counted under ``corrupt`` by the metric): an unknown
  format version, a key of another bucket count (``changelog_buckets`` was changed), or a
  per-device record of an older release. Its devices warm up; the processor deletes those keys
  (tombstones) at its next commit, so they do not linger in the compacted log.

In exactly-once mode the restore reads with ``read_committed``, so records of aborted
transactions (a fenced zombie's) are never loaded. What this module must not do: decide when to
commit (the processor does), open group consumers, or know the model (it only moves bytes and
calls the store).

Cost of a restore: one sequential read of the partitions (compaction keeps them near one record
per bucket, plus not-yet-compacted older versions) and one vectorised write into the store; see
``benchmarks/bench_recovery.py`` for seconds per 100,000 devices.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kafka import KafkaConsumer, TopicPartition

from anomaly.errors import StateFormatError, StateModelMismatchError
from anomaly.snapshots import StateBatch, check_compatible, decode_states, load_states
from anomaly.state import DeviceStateStore

__all__ = [
    "MARKER_KEY",
    "ChangelogRecordError",
    "RestoreReport",
    "bucket_key",
    "bucket_of",
    "decode_bucket",
    "decode_marker",
    "encode_bucket",
    "encode_marker",
    "is_marker",
    "parse_bucket_key",
    "restore_partitions",
]

logger = logging.getLogger(__name__)

_BUCKET_MAGIC = b"SACB"
_MARKER_MAGIC = b"SACM"
_VERSION = 1
_HEADER = struct.Struct("<4sBq")
_BUCKET_KEY = struct.Struct("<BHH")
_KEY_TAG = 0xFF

MARKER_KEY = b""
"""Key of commit markers: empty, which no device id can be (the codec rejects empty ids)."""

POLL_RECORDS = 50_000
"""Records per poll of the restore consumer: large, so a restore is a few big fetches."""


class ChangelogRecordError(ValueError):
    """A changelog record that cannot be used; ``reason`` is ``corrupt`` or ``format``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def bucket_of(device_id: str, buckets: int) -> int:
    """The bucket a device's state is written in: a BLAKE2b hash of its UTF-8 id, modulo ``buckets``.

    Not CRC-32 or murmur2: producers partition by those (librdkafka's and the Java client's default
    partitioners), and a bucket hash correlated with the partition would leave most buckets of a
    partition empty — with CRC-32, 64 buckets over 4 partitions gave 16 per partition.

    >>> bucket_of("pump-7", 64), bucket_of("pump-7", 1)
    (57, 0)
    """
    return int.from_bytes(hashlib.blake2b(device_id.encode(), digest_size=8).digest(), "little") % buckets


def bucket_key(bucket: int, buckets: int) -> bytes:
    """The record key of ``bucket`` of a ``buckets``-bucket layout.

    >>> parse_bucket_key(bucket_key(5, 64))
    (64, 5)
    """
    return _BUCKET_KEY.pack(_KEY_TAG, buckets, bucket)


def parse_bucket_key(key: bytes) -> tuple[int, int] | None:
    """``(buckets, bucket)`` of a bucket key; None for any other key (a marker, a device id, garbage).

    >>> parse_bucket_key(b"pump-7") is None, parse_bucket_key(MARKER_KEY) is None
    (True, True)
    """
    if len(key) != _BUCKET_KEY.size or key[0] != _KEY_TAG:
        return None
    _tag, buckets, bucket = _BUCKET_KEY.unpack(key)
    return (buckets, bucket) if buckets and bucket < buckets else None


def encode_bucket(states: bytes, next_offset: int) -> bytes:
    """A bucket record's value: the state blob of its devices and the partition's next input offset.

    >>> decode_bucket(encode_bucket(b"state", 42))
    (42, b'state')
    """
    return _HEADER.pack(_BUCKET_MAGIC, _VERSION, next_offset) + states


def decode_bucket(value: bytes) -> tuple[int, bytes]:
    """``(next_input_offset, state blob)`` of a bucket record; raises :class:`ChangelogRecordError`.

    >>> decode_bucket(b"garbage")
    Traceback (most recent call last):
    ...
    streams.state.changelog.ChangelogRecordError: not a changelog bucket record (bad magic bytes)
    """
    if len(value) < _HEADER.size or value[:4] != _BUCKET_MAGIC:
        raise ChangelogRecordError("corrupt", "not a changelog bucket record (bad magic bytes)")
    _magic, version, offset = _HEADER.unpack_from(value)
    if version != _VERSION:
        raise ChangelogRecordError("format", f"unknown changelog format version {version} (supported: {_VERSION})")
    return offset, value[_HEADER.size:]


def encode_marker(next_offset: int) -> bytes:
    """The value of a commit marker: the input partition's next offset at that commit.

    >>> decode_marker(encode_marker(7))
    7
    """
    return _HEADER.pack(_MARKER_MAGIC, _VERSION, next_offset)


def is_marker(key: bytes | None) -> bool:
    """Whether a changelog record with this key is a commit marker (the empty key).

    >>> is_marker(MARKER_KEY), is_marker(b"dev-1"), is_marker(None)
    (True, False, False)
    """
    return key is not None and len(key) == 0


def decode_marker(value: bytes | None) -> int:
    """The next input offset a commit marker carries; raises :class:`ChangelogRecordError`."""
    if value is None or len(value) != _HEADER.size or value[:4] != _MARKER_MAGIC:
        raise ChangelogRecordError("corrupt", "not a changelog commit marker")
    _magic, version, offset = _HEADER.unpack(value)
    if version != _VERSION:
        raise ChangelogRecordError("format", f"unknown changelog marker version {version} (supported: {_VERSION})")
    return offset


@dataclass
class RestoreReport:
    """What one restore loaded.

    Attributes
    ----------
    devices : dict[int, list[str]]
        Devices loaded, per changelog (= input) partition.
    discarded : Counter[str]
        Records not loaded, by reason (``corrupt``, ``format``, ``model_version``).
    markers : dict[int, int]
        Newest commit marker per partition (the input offset the changelog is consistent with).
    records : int
        Records read (snapshots, markers, tombstones, older versions).
    seconds : float
        Wall time of the restore.
    waited_for_marker : bool
        Whether the restore had to wait for a commit marker to become visible.
    stale_keys : dict[int, list[bytes]]
        Keys of another layout still holding a value, per partition (counted under ``format``): the
        processor writes tombstones for them at its next commit.
    """

    devices: dict[int, list[str]] = field(default_factory=dict)
    discarded: Counter[str] = field(default_factory=Counter)
    markers: dict[int, int] = field(default_factory=dict)
    records: int = 0
    seconds: float = 0.0
    waited_for_marker: bool = False
    stale_keys: dict[int, list[bytes]] = field(default_factory=dict)

    @property
    def restored(self) -> int:
        return sum(len(v) for v in self.devices.values())


def restore_partitions(
    consumer: KafkaConsumer | Callable[[], KafkaConsumer], topic: str, partitions: Iterable[int],
    store: DeviceStateStore, *, buckets: int, min_next_offsets: Mapping[int, int | None] | None = None,
    timeout_s: float = 300.0, marker_wait_s: float | None = None, on_progress: Callable[[], Any] | None = None,
) -> RestoreReport:
    """Read changelog ``partitions`` of ``topic`` to their end and load the newest snapshot per device.

    Parameters
    ----------
    consumer
        A group-less consumer (``read_committed`` in exactly-once mode), or a factory of one that
        is closed afterwards. A consumer passed in is re-assigned and left open, so a processor
        can reuse one for every restore.
    topic, partitions
        The changelog topic and the partitions to load (the input partitions just assigned).
    store
        Where the devices go (:func:`anomaly.snapshots.load_states`, vectorised per bucket).
    buckets
        The bucket count records are written with (``changelog_buckets``); keys of another count
        are stale (see the module docstring).
    min_next_offsets
        Exactly-once: the committed input offset per partition. The restore reads on until it has
        seen a commit marker at least that high (the transaction's markers may still be landing in
        the changelog), so the state is never older than the offset processing resumes from.
    timeout_s
        Give up (``TimeoutError``) if the end is not reached within this long; the caller retries.
    marker_wait_s
        At the end, wait at most this long (default ``timeout_s / 2``) for the wanted markers, then
        warn and restore what is there (a changelog written without markers never gets them).
    on_progress
        Called after every poll (e.g. to keep a liveness probe fresh during a long restore).

    Cost: one pass over the partitions; per record a dictionary write; per bucket kept one
    column-wise decode and one store write.
    """
    started = time.perf_counter()
    parts = sorted(set(partitions))
    report = RestoreReport(devices={p: [] for p in parts})
    if not parts:
        return report
    owned = callable(consumer) and not isinstance(consumer, KafkaConsumer)
    client: KafkaConsumer = consumer() if owned else consumer  # type: ignore[operator,assignment]
    try:
        wanted = {p: o for p, o in (min_next_offsets or {}).items() if p in report.devices}
        latest = _read_latest(client, topic, parts, report, wanted, buckets, timeout_s,
                              timeout_s / 2 if marker_wait_s is None else marker_wait_s, on_progress)
    finally:
        if owned:
            client.close()
    for partition, batch in _decode_latest(topic, latest, buckets, store, report):
        load_states(store, batch)
        report.devices[partition].extend(batch.device_ids)
    report.seconds = time.perf_counter() - started
    if report.discarded.get("model_version"):
        logger.info("discarded %d snapshots of another model version (those devices warm up again)",
                    report.discarded["model_version"])
    logger.info("restored %d devices from %s partitions %s in %.2f s (%d records, markers %s)", report.restored,
                topic, parts, report.seconds, report.records, report.markers)
    return report


def _read_latest(client: KafkaConsumer, topic: str, parts: list[int], report: RestoreReport,
                 wanted: dict[int, int | None], buckets: int, timeout_s: float, marker_wait_s: float,
                 on_progress: Callable[[], Any] | None) -> dict[tuple[int, int], bytes | None]:
    """Newest value per (partition, bucket), reading until the end and the wanted markers."""
    tps = [TopicPartition(topic, p) for p in parts]
    client.assign(tps)
    client.seek_to_beginning(*tps)
    deadline = time.monotonic() + timeout_s
    latest: dict[tuple[int, int], bytes | None] = {}
    stale: dict[tuple[int, bytes], bool] = {}  # keys of another layout → whether their newest value is live
    ends = client.end_offsets(tps)  # the last stable offset under read_committed
    corrupt_keys = 0
    at_end_since: float | None = None
    while True:
        behind = [tp for tp in tps if client.position(tp) < ends[tp]]
        short = [p for p, want in wanted.items() if want is not None and report.markers.get(p, -1) < want]
        if not behind:
            if not short:
                break
            # the marker of the committed transaction is not visible yet: its markers are still being
            # written, or an older open transaction (a crashed instance's) holds the last stable offset back
            report.waited_for_marker = True
            at_end_since = at_end_since or time.monotonic()
            if time.monotonic() - at_end_since > marker_wait_s:
                logger.warning("changelog %s partitions %s: no commit marker reached %s after %.0f s (markers %s); "
                               "restoring what is there", topic, short, {p: wanted[p] for p in short},
                               marker_wait_s, {p: report.markers.get(p) for p in short})
                break
            ends = client.end_offsets(tps)
            if all(client.position(tp) >= ends[tp] for tp in tps):
                time.sleep(0.05)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"restoring {topic} partitions {parts} took longer than {timeout_s} s "
                f"(positions {[client.position(tp) for tp in tps]}, ends {[ends[tp] for tp in tps]}, "
                f"markers {report.markers}, waiting for {wanted})")
        polled = client.poll(timeout_ms=200, max_records=POLL_RECORDS)
        for tp, records in polled.items():
            p = tp.partition
            for record in records:
                key = record.key
                if key is None:
                    corrupt_keys += 1
                elif len(key) == 0:
                    try:
                        report.markers[p] = max(report.markers.get(p, -1), decode_marker(record.value))
                    except ChangelogRecordError as exc:
                        report.discarded[exc.reason] += 1
                        logger.warning("changelog %s[%d] offset %d: %s", topic, p, record.offset, exc)
                else:
                    layout = parse_bucket_key(key)
                    if layout is not None and layout[0] == buckets:
                        latest[(p, layout[1])] = record.value
                    else:
                        stale[(p, key)] = record.value is not None
            report.records += len(records)
        if on_progress is not None:
            on_progress()
    if corrupt_keys:
        report.discarded["corrupt"] += corrupt_keys
        logger.warning("changelog %s: %d records without a key skipped", topic, corrupt_keys)
    live = [(p, key) for (p, key), alive in stale.items() if alive]
    if live:
        report.discarded["format"] += len(live)
        for p, key in live:
            report.stale_keys.setdefault(p, []).append(key)
        logger.warning("changelog %s: %d records of another layout skipped (per-device records of an older release, "
                       "or a changelog_buckets other than %d): their devices warm up; the keys are deleted at the "
                       "next commit", topic, len(live), buckets)
    return latest


def _decode_latest(topic: str, latest: dict[tuple[int, int], bytes | None], buckets: int,
                   store: DeviceStateStore, report: RestoreReport) -> list[tuple[int, StateBatch]]:
    """Decode and check the newest record of each bucket; count and skip what cannot be used."""
    located: list[tuple[int, StateBatch]] = []
    for (partition, bucket), value in latest.items():
        if value is None:
            continue  # tombstone: every device of the bucket was evicted
        try:
            batch = decode_states(decode_bucket(value)[1])
            check_compatible(store, batch)
        except ChangelogRecordError as exc:
            report.discarded[exc.reason] += 1
            logger.warning("changelog %s[%d] bucket %d: %s; its devices warm up again", topic, partition, bucket, exc)
            continue
        except StateModelMismatchError as exc:
            report.discarded["model_version"] += max(1, len(batch))
            logger.debug("changelog %s[%d] bucket %d: %s", topic, partition, bucket, exc)
            continue
        except StateFormatError as exc:
            report.discarded["corrupt"] += 1
            logger.warning("changelog %s[%d] bucket %d: %s; its devices warm up again", topic, partition, bucket, exc)
            continue
        home = np.fromiter((bucket_of(d, buckets) == bucket for d in batch.device_ids), dtype=bool, count=len(batch))
        if not home.all():
            strays = [d for d, ok in zip(batch.device_ids, home.tolist(), strict=True) if not ok]
            report.discarded["corrupt"] += len(strays)
            logger.warning("changelog %s[%d] bucket %d holds devices of other buckets %s; they warm up again",
                           topic, partition, bucket, strays[:5])
            batch = batch.select(home)
        located.append((partition, batch))
    return located
