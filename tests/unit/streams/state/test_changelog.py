"""streams.state.changelog without a broker: record formats, and restore rules against an in-process log.

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

from anomaly.snapshots import encode_states
from anomaly.state import DeviceStateStore
from streams.state.changelog import (
    MARKER_KEY,
    ChangelogRecordError,
    bucket_key,
    bucket_of,
    decode_bucket,
    decode_marker,
    encode_bucket,
    encode_marker,
    is_marker,
    parse_bucket_key,
    restore_partitions,
)

Record = namedtuple("Record", "topic partition offset key value")
TOPIC = "g-state-changelog"
BUCKETS = 4


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


def states_of(devices: dict[str, int], version: str = "1") -> bytes:
    """The state blob of ``devices`` (name → steps; h is set to the steps too)."""
    store = make_store(version)
    store.slots_for(np.array(list(devices), dtype=object))
    for device, steps in devices.items():
        store.steps[store.slot_of(device)] = steps
        store.h[0, store.slot_of(device)] = float(steps)
    return encode_states(store, list(devices))


def rec(partition: int, devices: dict[str, int], offset: int = 0, version: str = "1"):
    """One bucket record holding ``devices`` (name → steps), which must share a bucket."""
    (bucket,) = {bucket_of(d, BUCKETS) for d in devices}
    return partition, bucket_key(bucket, BUCKETS), encode_bucket(states_of(devices, version), offset)


def same_bucket(n: int, bucket: int = 0) -> list[str]:
    """``n`` device names in ``bucket`` (of BUCKETS)."""
    names = (f"dev-{i}" for i in range(10_000))
    return [d for d in names if bucket_of(d, BUCKETS) == bucket][:n]


A, B, C = same_bucket(2, 0) + same_bucket(1, 1)


def test_bucket_values_keys_and_markers_round_trip_and_reject_garbage():
    assert decode_bucket(encode_bucket(b"abc", 17)) == (17, b"abc")
    assert decode_marker(encode_marker(99)) == 99
    assert parse_bucket_key(bucket_key(3, BUCKETS)) == (BUCKETS, 3)
    assert parse_bucket_key(b"dev-1") is None and parse_bucket_key(MARKER_KEY) is None
    assert parse_bucket_key(b"\xff\x04\x00\x09\x00") is None  # bucket 9 of 4
    assert is_marker(MARKER_KEY) and not is_marker(b"d") and not is_marker(None)
    assert all(0 <= bucket_of(f"d{i}", BUCKETS) < BUCKETS for i in range(100))
    with pytest.raises(ChangelogRecordError) as bad:
        decode_bucket(b"\x00" * 20)
    assert bad.value.reason == "corrupt"
    future = struct.pack("<4sBq", b"SACB", 9, 0)
    with pytest.raises(ChangelogRecordError) as unknown:
        decode_bucket(future)
    assert unknown.value.reason == "format"
    with pytest.raises(ChangelogRecordError):
        decode_marker(encode_bucket(b"", 1))  # a bucket is not a marker


def test_restore_loads_the_newest_record_of_each_bucket_and_honours_tombstones():
    log = FakeLog([
        rec(0, {A: 1, B: 1}), rec(1, {C: 5}),
        rec(0, {A: 2}),  # newer version of A's bucket: B was evicted
        (0, MARKER_KEY, encode_marker(10)), (1, MARKER_KEY, encode_marker(4)),
        rec(0, {C: 7}), (0, bucket_key(1, BUCKETS), None),  # C moved to partition 0, then its bucket emptied
    ])
    store = make_store()
    report = restore_partitions(log, TOPIC, [0, 1], store, buckets=BUCKETS)
    assert sorted(store.devices()) == sorted([A, C])
    assert int(store.steps[store.slot_of(A)]) == 2 and float(store.h[0, store.slot_of(A), 0]) == 2.0
    assert int(store.steps[store.slot_of(C)]) == 5
    assert report.devices == {0: [A], 1: [C]}
    assert report.markers == {0: 10, 1: 4}
    assert report.records == 7 and not report.discarded and not report.stale_keys
    assert not log.closed  # a consumer passed in is the caller's


def test_restore_only_reads_the_partitions_asked_for_and_closes_a_factory_consumer():
    log = FakeLog([rec(0, {A: 1}), rec(1, {C: 5})])
    store = make_store()
    report = restore_partitions(lambda: log, TOPIC, [1], store, buckets=BUCKETS)
    assert store.devices() == [C] and report.restored == 1 and log.closed


def test_corrupt_unknown_format_other_model_and_other_layout_records_are_counted_and_skipped():
    good, other, old = same_bucket(3, 2)
    stray = same_bucket(1, 0)[0]  # a device in a bucket that is not its own
    corrupt = bytearray(states_of({A: 3}))
    corrupt[-6] ^= 0xFF  # breaks the state checksum
    log = FakeLog([
        (0, bucket_key(2, BUCKETS), encode_bucket(states_of({good: 3, stray: 3}), 0)),
        (1, bucket_key(2, BUCKETS), encode_bucket(states_of({other: 3}, version="0"), 0)),  # another model
        (0, bucket_key(0, BUCKETS), encode_bucket(bytes(corrupt), 0)),
        (0, bucket_key(3, BUCKETS), b"not a record at all"),
        (0, bucket_key(1, BUCKETS), struct.pack("<4sBq", b"SACB", 2, 0) + states_of({C: 1})),  # a future format
        (0, old.encode(), b"a per-device record of an older release"),
        (0, bucket_key(0, 8), encode_bucket(states_of({A: 1}), 0)),  # written with changelog_buckets=8
        (0, b"gone", b"old"), (0, b"gone", None),  # a stale key already deleted
        (0, None, b"keyless"),
        (0, MARKER_KEY, b"bad marker"),
    ])
    store = make_store()
    report = restore_partitions(log, TOPIC, [0, 1], store, buckets=BUCKETS)
    assert store.devices() == [good] and report.devices == {0: [good], 1: []}
    # corrupt: the stray device, the bad checksum, the junk bucket, the keyless record, the bad marker
    assert report.discarded == {"corrupt": 5, "format": 3, "model_version": 1}
    assert sorted(report.stale_keys[0]) == sorted([old.encode(), bucket_key(0, 8)])
    assert report.markers == {}


def test_restore_waits_until_the_marker_of_the_committed_offset_is_visible():
    records = [rec(0, {A: 1}, offset=5), (0, MARKER_KEY, encode_marker(5)),
               rec(0, {A: 2}, offset=9), (0, MARKER_KEY, encode_marker(9))]
    log = FakeLog(records, visible={0: 2})  # the last transaction's markers are not written yet

    def land(consumer: FakeLog) -> None:
        if consumer.end_calls >= 3:
            consumer.visible = {}

    log.on_end_offsets = land
    store = make_store()
    report = restore_partitions(log, TOPIC, [0], store, buckets=BUCKETS, min_next_offsets={0: 9}, marker_wait_s=30)
    assert report.waited_for_marker and report.markers == {0: 9}
    assert int(store.steps[store.slot_of(A)]) == 2  # the state of the committed offset, not the older one


def test_restore_without_the_wanted_marker_gives_up_waiting_and_restores_what_is_there():
    log = FakeLog([rec(0, {A: 1}, offset=5), (0, MARKER_KEY, encode_marker(5))])
    store = make_store()
    report = restore_partitions(log, TOPIC, [0], store, buckets=BUCKETS, min_next_offsets={0: 9}, marker_wait_s=0.2)
    assert report.waited_for_marker and store.devices() == [A]


def test_restore_that_cannot_reach_the_end_times_out():
    log = FakeLog([rec(0, {A: 1})])
    log.end_offsets = lambda tps: {tp: 10 for tp in tps}  # the log claims more than it ever delivers
    with pytest.raises(TimeoutError, match="restoring"):
        restore_partitions(log, TOPIC, [0], make_store(), buckets=BUCKETS, timeout_s=0.3)


def test_empty_partition_list_restores_nothing():
    report = restore_partitions(FakeLog([]), TOPIC, [], make_store(), buckets=BUCKETS)
    assert report.restored == 0 and report.records == 0


def test_a_store_with_context_inputs_restores_its_last_context_from_the_changelog():
    store = DeviceStateStore(num_layers=1, hidden_size=4, n_features=2, model_version="1", n_context=3)
    store.slots_for(np.array([A, B], dtype=object))
    store.last_context[store.slot_of(A)] = [1.0, np.nan, -2.0]
    store.steps[store.slot_of(B)] = 4
    blobs = {}
    for device in (A, B):
        blobs.setdefault(bucket_of(device, BUCKETS), []).append(device)
    log = FakeLog([(0, bucket_key(bucket, BUCKETS), encode_bucket(encode_states(store, devices), 3))
                   for bucket, devices in blobs.items()])
    restored = DeviceStateStore(num_layers=1, hidden_size=4, n_features=2, model_version="1", n_context=3)
    report = restore_partitions(log, TOPIC, [0], restored, buckets=BUCKETS)
    assert sorted(report.devices[0]) == sorted([A, B]) and not report.discarded
    np.testing.assert_array_equal(restored.last_context[restored.slot_of(A)], [1.0, np.nan, -2.0])
    assert restored.steps[restored.slot_of(B)] == 4 and np.isnan(restored.last_context[restored.slot_of(B)]).all()
