"""Per-device state in a compacted changelog topic: encode at commit, restore on assignment.

Why it exists: a device's LSTM memory must survive crashes and rebalances. At every commit the
processor writes the snapshots of the devices touched since the last commit to
``<group>-state-changelog`` — compacted, with the input topic's partition count, each snapshot in
the partition of its device's input partition (co-partitioned), keyed by device id — and one
*commit marker* per input partition committed. When a partition is assigned, the processor reads
that changelog partition to its end and loads every device before it processes a single reading
of that partition (:func:`restore_partitions`).

Record values (all little-endian)::

    snapshot  b"SACL" | u8 format version | i64 next input offset | DeviceStateStore snapshot
    marker    b"SACM" | u8 format version | i64 next input offset       (key b"", see below)
    tombstone None                                                       (the device was evicted)

The snapshot itself (:meth:`anomaly.state.DeviceStateStore.snapshot`) is versioned, checksummed
and carries the model version. A marker says "every snapshot of this commit is in the log before
me, and the input partition's next offset was N". Its key is the empty byte string, which no
device can have (the codec rejects empty device ids), so compaction keeps exactly the newest
marker per partition. In exactly-once mode the marker, the snapshots and the consumer offsets are
one transaction; a restore that has fetched the (stable) committed offset N reads until it has
seen a marker >= N, so it never loads state older than the offsets it resumes from, even while
the transaction's markers are still being written to the changelog partition.

Rules on restore (each counted in ``sensor_anomaly_state_snapshots_discarded_total{reason}``):

* a record that does not decode (``corrupt``: bad magic, checksum, length, key mismatch) or has an
  unknown changelog format version (``format``; the metric counts it under ``corrupt``) is
  skipped, so that device warms up again; processing continues;
* a snapshot of another model version (``model_version``) is discarded: hidden state of one
  model means nothing to another, and the device warms up under the new model.

The newest record per key wins (log order, as compaction would decide). In exactly-once mode the
restore reads with ``read_committed``, so snapshots of aborted transactions (a fenced zombie's)
are never loaded. What this module must not do: decide when to commit (the processor does), open
group consumers, or know the model (it only moves bytes and calls the store).

Cost of a restore: one sequential read of the partitions (compaction keeps them near one record
per device, plus not-yet-compacted older versions) and one vectorised write into the store; see
``benchmarks/bench_recovery.py`` for seconds per 100,000 devices.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from anomaly.errors import StateFormatError, StateModelMismatchError
from anomaly.state import DeviceSnapshot, DeviceStateStore

__all__ = [
    "MARKER_KEY",
    "ChangelogRecordError",
    "RestoreReport",
    "decode_marker",
    "decode_value",
    "encode_marker",
    "encode_value",
    "is_marker",
    "restore_partitions",
]

logger = logging.getLogger(__name__)

_MAGIC = b"SACL"
_MARKER_MAGIC = b"SACM"
_VERSION = 1
_HEADER = struct.Struct("<4sBq")

MARKER_KEY = b""
"""Key of commit markers: empty, which no device id can be (the codec rejects empty ids)."""

POLL_RECORDS = 50_000
"""Records per poll of the restore consumer: large, so a restore is a few big fetches."""


class ChangelogRecordError(ValueError):
    """A changelog record that cannot be used; ``reason`` is ``corrupt`` or ``format``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def encode_value(snapshot: bytes, next_offset: int) -> bytes:
    """Wrap a device snapshot with the next input offset of its partition at the commit.

    >>> decode_value(encode_value(b"xyz", 42))
    (42, b'xyz')
    """
    return _HEADER.pack(_MAGIC, _VERSION, next_offset) + snapshot


def decode_value(value: bytes) -> tuple[int, bytes]:
    """``(next_input_offset, snapshot bytes)`` of a snapshot record; raises :class:`ChangelogRecordError`.

    >>> decode_value(b"garbage")
    Traceback (most recent call last):
    ...
    streams.changelog.ChangelogRecordError: not a changelog snapshot record (bad magic bytes)
    """
    if len(value) < _HEADER.size or value[:4] != _MAGIC:
        raise ChangelogRecordError("corrupt", "not a changelog snapshot record (bad magic bytes)")
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
    """

    devices: dict[int, list[str]] = field(default_factory=dict)
    discarded: Counter[str] = field(default_factory=Counter)
    markers: dict[int, int] = field(default_factory=dict)
    records: int = 0
    seconds: float = 0.0
    waited_for_marker: bool = False

    @property
    def restored(self) -> int:
        return sum(len(v) for v in self.devices.values())


def restore_partitions(
    consumer: KafkaConsumer | Callable[[], KafkaConsumer], topic: str, partitions: Iterable[int],
    store: DeviceStateStore, *, min_next_offsets: Mapping[int, int | None] | None = None,
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
        Where the devices go (:meth:`DeviceStateStore.restore_snapshots`, one vectorised write).
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

    Cost: one pass over the partitions; per record a dictionary write, per kept device one
    snapshot decode; then one store write.
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
        latest = _read_latest(client, topic, parts, report, wanted, timeout_s,
                              timeout_s / 2 if marker_wait_s is None else marker_wait_s, on_progress)
    finally:
        if owned:
            client.close()
    snaps = _decode_latest(topic, latest, store, report)
    store.restore_snapshots(snaps)
    for partition, snap in zip((latest[s.device_id][0] for s in snaps), snaps, strict=True):
        report.devices[partition].append(snap.device_id)
    report.seconds = time.perf_counter() - started
    if report.discarded.get("model_version"):
        logger.info("discarded %d snapshots of another model version (those devices warm up again)",
                    report.discarded["model_version"])
    logger.info("restored %d devices from %s partitions %s in %.2f s (%d records, markers %s)", report.restored,
                topic, parts, report.seconds, report.records, report.markers)
    return report


def _read_latest(client: KafkaConsumer, topic: str, parts: list[int], report: RestoreReport,
                 wanted: dict[int, int | None], timeout_s: float, marker_wait_s: float,
                 on_progress: Callable[[], Any] | None) -> dict[str, tuple[int, bytes | None]]:
    """Newest (partition, value) per device key, reading until the end and the wanted markers."""
    tps = [TopicPartition(topic, p) for p in parts]
    client.assign(tps)
    client.seek_to_beginning(*tps)
    deadline = time.monotonic() + timeout_s
    latest: dict[str, tuple[int, bytes | None]] = {}
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
                    latest[key.decode("utf-8", "replace")] = (p, record.value)
            report.records += len(records)
        if on_progress is not None:
            on_progress()
    if corrupt_keys:
        report.discarded["corrupt"] += corrupt_keys
        logger.warning("changelog %s: %d records without a key skipped", topic, corrupt_keys)
    return latest


def _decode_latest(topic: str, latest: dict[str, tuple[int, bytes | None]], store: DeviceStateStore,
                   report: RestoreReport) -> list[DeviceSnapshot]:
    """Decode and check the newest snapshot of each device; count and skip the unusable ones."""
    snaps: list[DeviceSnapshot] = []
    decode = DeviceStateStore.decode_snapshot
    check = store.check_compatible
    for device, (partition, value) in latest.items():
        if value is None:
            continue  # tombstone: the device was evicted
        try:
            _, blob = decode_value(value)
            snap = decode(blob)
            if snap.device_id != device:
                raise StateFormatError(f"snapshot names device {snap.device_id!r}, key is {device!r}")
            check(snap)
        except ChangelogRecordError as exc:
            report.discarded[exc.reason] += 1
            logger.warning("changelog %s[%d] device %s: %s; it warms up again", topic, partition, device, exc)
            continue
        except StateModelMismatchError as exc:
            report.discarded["model_version"] += 1
            logger.debug("changelog %s[%d]: %s", topic, partition, exc)
            continue
        except StateFormatError as exc:
            report.discarded["corrupt"] += 1
            logger.warning("changelog %s[%d] device %s: %s; it warms up again", topic, partition, device, exc)
            continue
        snaps.append(snap)
    return snaps
