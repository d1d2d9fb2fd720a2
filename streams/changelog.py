"""Per-device state in a compacted changelog topic: encode at commit, restore on assignment.

Why it exists: a device's LSTM memory must survive crashes and rebalances. At every commit the
processor writes the snapshots of the devices touched since the last commit to
``<group>-state-changelog`` — compacted, with the input topic's partition count, each snapshot in
the partition of its device's input partition (co-partitioned), keyed by device id. When a
partition is assigned, the processor reads that changelog partition to its end and loads every
device before it processes a single reading of that partition.

Record value: ``b"SACL" | u8 format version | i64 next input offset of the partition | snapshot``
(the snapshot is :meth:`anomaly.state.DeviceStateStore.snapshot`, versioned, checksummed and
carrying the model version). A ``None`` value (tombstone) deletes a device (idle eviction).

Rules on restore (each counted in ``sensor_anomaly_state_snapshots_discarded_total{reason}``):

* a record that does not decode (``corrupt``) or has an unknown format version (``format``) is
  skipped, so that device warms up again; processing continues;
* a snapshot of another model version (``model_version``) is discarded: hidden state of one
  model means nothing to another, and the device warms up under the new model.

In exactly-once mode the restore reads with ``read_committed``, so snapshots of aborted
transactions are never loaded. What this module must not do: decide when to commit (the processor
does) or know the model (it only moves bytes and calls the store).
"""

from __future__ import annotations

import logging
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kafka import KafkaConsumer, TopicPartition

from anomaly.errors import StateFormatError, StateModelMismatchError
from anomaly.state import DeviceSnapshot, DeviceStateStore

__all__ = ["ChangelogRecordError", "RestoreReport", "decode_value", "encode_value", "restore_partitions"]

logger = logging.getLogger(__name__)

_MAGIC = b"SACL"
_VERSION = 1
_HEADER = struct.Struct("<4sBq")


class ChangelogRecordError(ValueError):
    """A changelog record that cannot be used; ``reason`` is ``corrupt`` or ``format``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def encode_value(snapshot: bytes, next_offset: int) -> bytes:
    """Wrap a device snapshot with the input offset it is consistent with.

    >>> decode_value(encode_value(b"xyz", 42))
    (42, b'xyz')
    """
    return _HEADER.pack(_MAGIC, _VERSION, next_offset) + snapshot


def decode_value(value: bytes) -> tuple[int, bytes]:
    """``(next_input_offset, snapshot bytes)``; raises :class:`ChangelogRecordError`."""
    if len(value) < _HEADER.size or value[:4] != _MAGIC:
        raise ChangelogRecordError("corrupt", "not a changelog record (bad magic bytes)")
    _magic, version, offset = _HEADER.unpack_from(value)
    if version != _VERSION:
        raise ChangelogRecordError("format", f"unknown changelog format version {version} (supported: {_VERSION})")
    return offset, value[_HEADER.size:]


@dataclass
class RestoreReport:
    """What one restore loaded: devices per partition, discarded records by reason, duration."""

    devices: dict[int, list[str]] = field(default_factory=dict)
    discarded: Counter[str] = field(default_factory=Counter)
    records: int = 0
    seconds: float = 0.0

    @property
    def restored(self) -> int:
        return sum(len(v) for v in self.devices.values())


def restore_partitions(
    consumer_factory: Callable[[], KafkaConsumer], topic: str, partitions: Iterable[int],
    store: DeviceStateStore, timeout_s: float = 300.0,
) -> RestoreReport:
    """Read changelog ``partitions`` of ``topic`` to their end and load the latest snapshot per device.

    ``consumer_factory`` returns a group-less consumer (``read_committed`` in exactly-once mode).
    Cost: one pass over the partitions (compaction keeps them near one record per device); the
    store is written once, vectorised, at the end.
    """
    started = time.perf_counter()
    parts = sorted(set(partitions))
    report = RestoreReport(devices={p: [] for p in parts})
    if not parts:
        return report
    consumer = consumer_factory()
    try:
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        latest: dict[str, tuple[int, bytes | None]] = {}
        pending = {tp for tp in tps if ends[tp] > consumer.position(tp)}
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"restoring {topic} partitions {parts} took longer than {timeout_s} s")
            polled = consumer.poll(timeout_ms=500, max_records=50_000)
            for tp, records in polled.items():
                for record in records:
                    report.records += 1
                    if record.key is None:
                        report.discarded["corrupt"] += 1
                        continue
                    latest[record.key.decode("utf-8", "replace")] = (tp.partition, record.value)
            for tp in list(pending):
                if consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        snaps: list[tuple[int, DeviceSnapshot]] = []
        for device, (partition, value) in latest.items():
            if value is None:
                continue  # tombstone: the device was evicted
            try:
                _, blob = decode_value(value)
                snap = DeviceStateStore.decode_snapshot(blob)
                if snap.device_id != device:
                    raise StateFormatError(f"snapshot names device {snap.device_id!r}, key is {device!r}")
                store.check_compatible(snap)
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
            snaps.append((partition, snap))
        store.restore_snapshots([s for _, s in snaps])
        for partition, snap in snaps:
            report.devices[partition].append(snap.device_id)
    finally:
        consumer.close()
    report.seconds = time.perf_counter() - started
    if report.discarded.get("model_version"):
        logger.info("discarded %d snapshots of another model version (those devices warm up again)",
                    report.discarded["model_version"])
    logger.info("restored %d devices from %s partitions %s in %.2f s (%d records)", report.restored, topic, parts,
                report.seconds, report.records)
    return report
