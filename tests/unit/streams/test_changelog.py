"""streams.changelog without a broker: record formats, and restore rules against an in-process log.

The fake consumer below replays a list of (partition, key, value) records the way a group-less
KafkaConsumer assigned to those partitions would; it is not a broker, and the behaviour that needs
one (read_committed, compaction, transactions) is tested in tests/integration/test_state_*.py.
"""

from __future__ import annotations

import struct
from collections import namedtuple

import numpy as np
import pytest
from kafka import TopicPartition

from anomaly.state import DeviceStateStore
from streams.changelog import (
    MARKER_KEY,
    ChangelogRecordError,
    decode_marker,
    decode_value,
    encode_marker,
    encode_value,
    is_marker,
    restore_partitions,
)

Record = namedtuple("Record", "topic partition offset key value")
TOPIC = "g-state-changelog"


class FakeLog:
    """A group-less consumer over an in-memory log; ``visible`` caps what poll/end_offsets show per partition."""

    def __init__(self, records: list[tuple[int, bytes | None, bytes | None]], visible: dict[int, int] | None = None):
        self.log: dict[int, list[Record]] = {}
        for partition, key, value in records:
            part = self.log.setdefault(partition, [])
            part.append(Record(TOPIC, partition, len(part), key, value))
        self.visible = visible or {}
        self.positions: dict[int, int] = {}
        self.end_calls = 0
        self.on_end_offsets = None
        self.closed = False

    def _end(self, p: int) -> int:
        return min(len(self.log.get(p, [])), self.visible.get(p, 1 << 62))

    def assign(self, tps):
        self.positions = {tp.partition: 0 for tp in tps}

    def seek_to_beginning(self, *tps):
        for tp in tps:
            self.positions[tp.partition] = 0

    def end_offsets(self, tps):
        self.end_calls += 1
        if self.on_end_offsets is not None:
            self.on_end_offsets(self)
        return {tp: self._end(tp.partition) for tp in tps}

    def position(self, tp):
        return self.positions[tp.partition]

    def poll(self, timeout_ms=0, max_records=None):
        out = {}
        for p, pos in self.positions.items():
            records = self.log.get(p, [])[pos:self._end(p)][:max_records]
            if records:
                out[TopicPartition(TOPIC, p)] = records
                self.positions[p] = pos + len(records)
        return out

    def close(self):
        self.closed = True


def make_store(version: str = "1") -> DeviceStateStore:
    return DeviceStateStore(num_layers=1, hidden_size=4, n_features=2, model_version=version)


def snapshot_of(device: str, steps: int, version: str = "1") -> bytes:
    store = make_store(version)
    store.slots_for(np.array([device], dtype=object))
    store.steps[store.slot_of(device)] = steps
    store.h[0, store.slot_of(device)] = float(steps)
    return store.snapshot(device)


def rec(partition: int, device: str, steps: int, offset: int = 0, version: str = "1"):
    return partition, device.encode(), encode_value(snapshot_of(device, steps, version), offset)


def test_value_and_marker_round_trip_and_reject_garbage():
    assert decode_value(encode_value(b"abc", 17)) == (17, b"abc")
    assert decode_marker(encode_marker(99)) == 99
    assert is_marker(MARKER_KEY) and not is_marker(b"d") and not is_marker(None)
    with pytest.raises(ChangelogRecordError) as bad:
        decode_value(b"\x00" * 20)
    assert bad.value.reason == "corrupt"
    future = struct.pack("<4sBq", b"SACL", 9, 0) + b"x"
    with pytest.raises(ChangelogRecordError) as unknown:
        decode_value(future)
    assert unknown.value.reason == "format"
    with pytest.raises(ChangelogRecordError):
        decode_marker(encode_value(b"", 1))  # a snapshot is not a marker


def test_restore_loads_newest_snapshot_per_device_and_honours_tombstones():
    log = FakeLog([
        rec(0, "a", 1), rec(0, "b", 1), rec(1, "c", 5),
        rec(0, "a", 2),  # newer version of a
        (0, b"b", None),  # b evicted
        (0, MARKER_KEY, encode_marker(10)), (1, MARKER_KEY, encode_marker(4)),
    ])
    store = make_store()
    report = restore_partitions(log, TOPIC, [0, 1], store)
    assert sorted(store.devices()) == ["a", "c"]
    assert int(store.steps[store.slot_of("a")]) == 2 and float(store.h[0, store.slot_of("a"), 0]) == 2.0
    assert report.devices == {0: ["a"], 1: ["c"]}
    assert report.markers == {0: 10, 1: 4}
    assert report.records == 7 and not report.discarded
    assert not log.closed  # a consumer passed in is the caller's


def test_restore_only_reads_the_partitions_asked_for_and_closes_a_factory_consumer():
    log = FakeLog([rec(0, "a", 1), rec(1, "c", 5)])
    store = make_store()
    report = restore_partitions(lambda: log, TOPIC, [1], store)
    assert store.devices() == ["c"] and report.restored == 1 and log.closed


def test_corrupt_unknown_format_and_other_model_snapshots_are_counted_and_skipped():
    good = rec(0, "good", 3)
    corrupt_blob = bytearray(snapshot_of("crc", 3))
    corrupt_blob[-6] ^= 0xFF  # breaks the snapshot checksum
    log = FakeLog([
        good,
        (0, b"junk", b"not a record at all"),
        (0, b"crc", encode_value(bytes(corrupt_blob), 0)),
        (0, b"future", struct.pack("<4sBq", b"SACL", 2, 0) + snapshot_of("future", 3)),
        (0, b"renamed", encode_value(snapshot_of("other", 3), 0)),  # key and snapshot disagree
        rec(0, "old-model", 3, version="0"),
        (0, None, b"keyless"),
        (0, MARKER_KEY, b"bad marker"),
    ])
    store = make_store()
    report = restore_partitions(log, TOPIC, [0], store)
    assert store.devices() == ["good"]
    assert report.discarded == {"corrupt": 5, "format": 1, "model_version": 1}
    assert report.markers == {}


def test_restore_waits_until_the_marker_of_the_committed_offset_is_visible():
    records = [rec(0, "a", 1, offset=5), (0, MARKER_KEY, encode_marker(5)),
               rec(0, "a", 2, offset=9), (0, MARKER_KEY, encode_marker(9))]
    log = FakeLog(records, visible={0: 2})  # the last transaction's markers are not written yet

    def land(consumer: FakeLog) -> None:
        if consumer.end_calls >= 3:
            consumer.visible = {}

    log.on_end_offsets = land
    store = make_store()
    report = restore_partitions(log, TOPIC, [0], store, min_next_offsets={0: 9}, marker_wait_s=30)
    assert report.waited_for_marker and report.markers == {0: 9}
    assert int(store.steps[store.slot_of("a")]) == 2  # the state of the committed offset, not the older one


def test_restore_without_the_wanted_marker_gives_up_waiting_and_restores_what_is_there():
    log = FakeLog([rec(0, "a", 1, offset=5), (0, MARKER_KEY, encode_marker(5))])
    store = make_store()
    report = restore_partitions(log, TOPIC, [0], store, min_next_offsets={0: 9}, marker_wait_s=0.2)
    assert report.waited_for_marker and store.devices() == ["a"]


def test_restore_that_cannot_reach_the_end_times_out():
    log = FakeLog([rec(0, "a", 1)])
    log.end_offsets = lambda tps: {tp: 10 for tp in tps}  # the log claims more than it ever delivers
    with pytest.raises(TimeoutError, match="restoring"):
        restore_partitions(log, TOPIC, [0], make_store(), timeout_s=0.3)


def test_empty_partition_list_restores_nothing():
    report = restore_partitions(FakeLog([]), TOPIC, [], make_store())
    assert report.restored == 0 and report.records == 0
