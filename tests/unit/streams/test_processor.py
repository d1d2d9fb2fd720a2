"""StreamProcessor's bookkeeping with in-process fakes: commit order, discards, rebalances, fencing.

These fakes record calls; they do not imitate a broker. They pin down the *order* in which the
processor makes results durable and what it forgets after a failure, which is the processor's own
logic. Whether Kafka then keeps its promises (transactions, fencing, read_committed, restarts) is
tested against a real broker in tests/integration/test_state_*.py.
"""

from __future__ import annotations

import time
from collections import namedtuple
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from kafka import TopicPartition
from kafka.errors import CommitFailedError, KafkaError, KafkaTimeoutError, ProducerFencedError

from anomaly.bundle import ModelBundle
from anomaly.scoring import NormalErrorModel
from anomaly.snapshots import decode_states
from streams.codec import encode_reading
from streams.config import ServiceConfig
from streams.errors import FencedError
from streams.processor import StreamProcessor
from streams.state.changelog import (
    MARKER_KEY,
    bucket_key,
    bucket_of,
    decode_bucket,
    decode_marker,
    encode_bucket,
    encode_marker,
)

Record = namedtuple("Record", "topic partition offset key value timestamp headers")
TOPIC = "in"
FEATURES = ["temp", "load"]


class Future:
    def __init__(self, error: Exception | None = None, done: bool = True):
        self.is_done = done
        self.exception = error

    def failed(self) -> bool:
        return self.exception is not None


class FakeProducer:
    """Records every call in ``log``; ``fail_topic`` makes sends to that topic fail."""

    def __init__(self, log: list):
        self.log = log
        self.sent: list[tuple[str, bytes | None, bytes | None, int]] = []
        self.fail_topic: str | None = None
        self.commit_error: Exception | None = None
        self.closed = False
        self.hold = False  # sends stay in flight until ``deliver()`` (or a flush)
        self.in_flight: list[Future] = []

    def send(self, topic, key=None, value=None, partition=None, headers=None):
        self.log.append(("send", topic))
        self.sent.append((topic, key, value, partition))
        future = Future(KafkaTimeoutError("expired") if topic == self.fail_topic else None, done=not self.hold)
        if self.hold:
            self.in_flight.append(future)
        return future

    def deliver(self):
        for future in self.in_flight:
            future.is_done = True
        self.in_flight.clear()

    def flush(self, timeout=None):
        self.log.append(("flush",))
        self.deliver()

    def begin_transaction(self):
        self.log.append(("begin",))

    def send_offsets_to_transaction(self, offsets, group_metadata):
        self.log.append(("send_offsets", {tp.partition: o.offset for tp, o in offsets.items()}, group_metadata))

    def commit_transaction(self):
        if self.commit_error is not None:
            raise self.commit_error
        self.log.append(("commit_transaction",))

    def abort_transaction(self):
        self.log.append(("abort_transaction",))

    def close(self, timeout=None):
        self.closed = True


class FakeConsumer:
    """Group consumer stand-in: a fixed assignment, committed offsets, a queue of poll results."""

    def __init__(self, log: list, partitions: list[int]):
        self.log = log
        self.owned = {TopicPartition(TOPIC, p) for p in partitions}
        self.committed_offsets: dict[int, int] = {}
        self.polls: list[dict] = []

    def poll(self, timeout_ms=None, max_records=None):
        return self.polls.pop(0) if self.polls else {}

    def assignment(self):
        return set(self.owned)

    def committed(self, tp, timeout_ms=None):
        self.log.append(("committed", tp.partition))
        return self.committed_offsets.get(tp.partition)

    def seek(self, tp, offset):
        self.log.append(("seek", tp.partition, offset))

    def beginning_offsets(self, tps):
        return {tp: 0 for tp in tps}

    def commit(self, offsets, timeout_ms=None):
        self.log.append(("commit", {tp.partition: o.offset for tp, o in offsets.items()}))
        self.committed_offsets.update({tp.partition: o.offset for tp, o in offsets.items()})

    def group_metadata(self):
        return "group-metadata"

    def end_offsets(self, tps):
        return {tp: 0 for tp in tps}

    def position(self, tp):
        return 0

    def close(self, autocommit=False):
        pass


class FakeChangelog:
    """Group-less consumer over the records a FakeProducer sent to the changelog topic."""

    def __init__(self, producer: FakeProducer, topic: str, log: list):
        self.producer, self.topic, self.log = producer, topic, log
        self.positions: dict[int, int] = {}

    def _records(self, p: int) -> list:
        rows = [(k, v) for t, k, v, part in self.producer.sent if t == self.topic and part == p]
        return [Record(self.topic, p, i, k, v, 0, []) for i, (k, v) in enumerate(rows)]

    def assign(self, tps):
        self.log.append(("restore", sorted(tp.partition for tp in tps)))
        self.positions = {tp.partition: 0 for tp in tps}

    def seek_to_beginning(self, *tps):
        pass

    def end_offsets(self, tps):
        return {tp: len(self._records(tp.partition)) for tp in tps}

    def position(self, tp):
        return self.positions[tp.partition]

    def poll(self, timeout_ms=0, max_records=None):
        out = {}
        for p, pos in self.positions.items():
            records = self._records(p)[pos:]
            if records:
                out[TopicPartition(self.topic, p)] = records
                self.positions[p] = pos + len(records)
        return out

    def close(self):
        pass


T0 = 1_700_000_000_000


def reading(partition: int, offset: int, device: str, t_s: int, value: float = 1.0) -> Record:
    """Input record at ``partition``/``offset``: ``device``'s reading at T0 + ``t_s`` seconds."""
    key, val = encode_reading(device, T0 + 1000 * t_s, {"temp": value, "load": value / 2})
    return Record(TOPIC, partition, offset, key, val, T0, [])


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return ModelBundle.untrained(FEATURES, hidden_size=8, name="unit", version="1").with_config(warmup_steps=1)


def make(bundle: ModelBundle, guarantee: str = "at_least_once", partitions: tuple[int, ...] = (0, 1)):
    config = ServiceConfig(bootstrap_servers="unused:9092", model_dir=Path("unused"), input_topic=TOPIC,
                           events_topic="ev", dlq_topic="dlq", group_id="g", processing_guarantee=guarantee,
                           commit_interval_s=3600.0)
    proc = StreamProcessor(config, bundle)
    log: list = []
    proc.producer = FakeProducer(log)
    proc._producer_ok = True
    proc.consumer = FakeConsumer(log, list(partitions))
    proc._n_partitions = 2
    proc._make_producer = lambda: _install_producer(proc, log)  # type: ignore[method-assign]
    changelog = FakeChangelog(proc.producer, config.changelog_topic, log)
    proc._restore_consumer = lambda: changelog  # type: ignore[method-assign]
    proc._events.put(("assigned", {TopicPartition(TOPIC, p) for p in partitions}))
    return proc, log


def _install_producer(proc: StreamProcessor, log: list) -> None:
    log.append(("new_producer",))
    old = proc.producer
    proc.producer = FakeProducer(log)
    proc.producer.sent = old.sent  # the "broker" keeps what was produced
    proc._producer_ok = True
    proc._in_transaction = False


def calls(log: list, *names: str) -> list:
    return [entry for entry in log if entry[0] in names]


def test_at_least_once_flushes_events_then_writes_the_changelog_then_commits_offsets(bundle):
    proc, log = make(bundle)
    proc.step()  # assignment: restore (nothing there), seek to the beginning
    proc.consumer.polls.append({TopicPartition(TOPIC, 0): [reading(0, 0, "a", 1), reading(0, 1, "a", 2)],
                                TopicPartition(TOPIC, 1): [reading(1, 0, "b", 1)]})
    proc.step()
    log.clear()
    assert proc.commit()
    order = [e[0] if e[0] != "send" else f"send:{e[1]}" for e in log]
    first_changelog = order.index("send:g-state-changelog")
    assert order.index("flush") < first_changelog < order.index("commit")
    assert order[order.index("commit") - 1] == "flush"  # changelog flushed before the offsets
    assert calls(log, "commit") == [("commit", {0: 2, 1: 1})]
    changelog = [(k, v, p) for t, k, v, p in proc.producer.sent if t == "g-state-changelog"]
    buckets = proc.config.changelog_buckets
    records = {(k, p): decode_bucket(v) for k, v, p in changelog if k != MARKER_KEY}
    assert set(records) == {(bucket_key(bucket_of("a", buckets), buckets), 0),
                            (bucket_key(bucket_of("b", buckets), buckets), 1)}
    assert sorted((offset, decode_states(blob).device_ids, p)
                  for (_, p), (offset, blob) in records.items()) == [(1, ["b"], 1), (2, ["a"], 0)]
    assert sorted((p, decode_marker(v)) for k, v, p in changelog if k == MARKER_KEY) == [(0, 2), (1, 1)]


def _changelog_buckets(proc: StreamProcessor) -> dict[tuple[bytes, int], list[str] | None]:
    """Newest value per (key, partition) the processor wrote to its changelog: device ids, or None (tombstone)."""
    out: dict[tuple[bytes, int], list[str] | None] = {}
    for t, k, v, p in proc.producer.sent:
        if t == proc.config.changelog_topic and k != MARKER_KEY:
            out[(k, p)] = None if v is None else decode_states(decode_bucket(v)[1]).device_ids
    return out


def test_a_commit_rewrites_whole_buckets_drops_evicted_devices_and_deletes_empty_buckets(bundle):
    proc = make(bundle)[0]
    proc.config = ServiceConfig(**{**proc.config.__dict__, "changelog_buckets": 2})
    proc.step()
    names = [f"d{i}" for i in range(40)]
    same = [d for d in names if bucket_of(d, 2) == 0][:3]
    alone = [d for d in names if bucket_of(d, 2) == 1][:1]
    proc.consumer.polls.append({TopicPartition(TOPIC, 0): [reading(0, i, d, 1) for i, d in enumerate(same + alone)]})
    proc.step()
    assert proc.commit()
    key0, key1 = bucket_key(0, 2), bucket_key(1, 2)
    assert {k: sorted(v or []) for k, v in _changelog_buckets(proc).items()} == {(key0, 0): sorted(same),
                                                                                 (key1, 0): alone}
    proc.producer.sent.clear()
    proc.consumer.polls.append({TopicPartition(TOPIC, 0): [reading(0, 4, same[0], 2)]})  # one device of the bucket
    proc.step()
    assert proc.commit()
    assert {k: sorted(v or []) for k, v in _changelog_buckets(proc).items()} == {(key0, 0): sorted(same)}, \
        "the touched device's bucket is rewritten whole; the other bucket is left alone"
    proc.producer.sent.clear()
    proc._forget([same[1], alone[0]], rewrite=True)  # what idle eviction does
    proc.detector.store.remove([same[1], alone[0]])
    assert proc.commit()
    assert _changelog_buckets(proc) == {(key0, 0): sorted(d for d in same if d != same[1]), (key1, 0): None}


def test_keys_of_another_layout_found_by_a_restore_are_deleted_at_the_next_commit(bundle):
    proc = make(bundle)[0]
    stale = bucket_key(0, 8)  # written when changelog_buckets was 8
    proc.producer.sent.append((proc.config.changelog_topic, stale, encode_bucket(b"", 0), 0))
    proc.producer.sent.append((proc.config.changelog_topic, b"legacy-device", b"per-device record", 1))
    proc.step()  # restore finds both
    assert proc.stats.discarded_snapshots["format"] == 2
    proc.producer.sent.clear()
    assert proc.commit()
    tombstones = sorted((k, p) for t, k, v, p in proc.producer.sent if t == proc.config.changelog_topic and v is None)
    assert tombstones == [(b"legacy-device", 1), (stale, 0)]
    proc.producer.sent.clear()
    assert proc.commit() and not proc.producer.sent  # deleted once


def test_exactly_once_checks_every_send_before_adding_offsets_and_committing(bundle):
    proc, log = make(bundle, "exactly_once")
    proc.step()
    proc.consumer.polls.append({TopicPartition(TOPIC, 0): [reading(0, 0, "a", 1)]})
    proc.step()
    assert proc._in_transaction and calls(log, "begin")
    log.clear()
    assert proc.commit()
    order = [e[0] for e in log]
    assert order.index("flush") < order.index("send_offsets") < order.index("commit_transaction")
    assert all(i < order.index("flush") for i, e in enumerate(order) if e == "send")
    assert calls(log, "send_offsets") == [("send_offsets", {0: 1}, "group-metadata")]


def test_a_failed_send_in_exactly_once_commits_nothing_and_the_partition_is_restored_and_read_again(bundle):
    proc, log = make(bundle, "exactly_once")
    proc.step()
    proc.consumer.committed_offsets = {0: 0}
    proc.producer.fail_topic = "g-state-changelog"
    proc.consumer.polls.append({TopicPartition(TOPIC, 0): [reading(0, 0, "a", 1)]})
    proc.step()
    log.clear()
    assert proc.commit() is False
    assert not calls(log, "send_offsets", "commit_transaction")
    assert not proc._producer_ok  # a send expired: the producer is recreated, its epoch bump aborts the transaction
    assert proc._to_restore == {0} and "a" not in proc.detector.store and proc.stats.rewinds == 1
    proc.step()
    assert calls(log, "new_producer") and ("seek", 0, 0) in log
    assert 0 in proc._ready


def test_commit_failed_by_a_rebalance_aborts_the_transaction_on_the_broker(bundle):
    proc, log = make(bundle, "exactly_once")
    proc.step()
    proc.consumer.polls.append({TopicPartition(TOPIC, 1): [reading(1, 0, "b", 1)]})
    proc.step()
    proc.producer.commit_error = CommitFailedError("generation moved on")
    assert proc.commit() is False
    assert calls(log, "abort_transaction") and proc._producer_ok and proc._to_restore == {1}


def test_fencing_stops_the_instance(bundle):
    proc, _ = make(bundle, "exactly_once")
    proc.step()
    proc.consumer.polls.append({TopicPartition(TOPIC, 0): [reading(0, 0, "a", 1)]})
    proc.step()
    proc.producer.commit_error = ProducerFencedError()
    with pytest.raises(FencedError, match="fenced"):
        proc.commit()
    assert proc._stop.is_set()


def test_revocation_with_uncommitted_work_discards_it_and_a_returning_partition_is_restored(bundle):
    proc, log = make(bundle, "exactly_once")
    proc.step()
    proc.consumer.polls.append({TopicPartition(TOPIC, 0): [reading(0, 0, "a", 1)]})
    proc.step()
    assert "a" in proc.detector.store
    proc._events.put(("revoked", {TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)}))
    proc._events.put(("assigned", {TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)}))
    log.clear()
    proc.step()
    assert calls(log, "abort_transaction")
    assert ("restore", [0]) in log  # the partition with discarded work is read from the changelog
    assert ("seek", 0, 0) in log and "a" not in proc.detector.store
    assert proc.stats.kept_partitions == 1  # partition 1 had nothing uncommitted: its state was kept


def test_a_partition_back_after_a_rebalance_keeps_its_state_unless_someone_else_committed(bundle):
    proc, log = make(bundle)
    proc.step()
    proc.consumer.polls.append({TopicPartition(TOPIC, 0): [reading(0, 0, "a", 1)],
                                TopicPartition(TOPIC, 1): [reading(1, 0, "b", 1)]})
    proc.step()
    assert proc.commit()
    steps_a = int(proc.detector.store.steps[proc.detector.store.slot_of("a")])
    proc.consumer.committed_offsets[1] = 7  # another instance owned partition 1 in between and committed
    everything = {TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)}
    proc._events.put(("revoked", everything))
    proc._events.put(("assigned", everything))
    log.clear()
    proc.step()
    assert calls(log, "restore") == [("restore", [1])]
    assert int(proc.detector.store.steps[proc.detector.store.slot_of("a")]) == steps_a
    assert ("seek", 0, 1) in log and ("seek", 1, 7) in log


def test_between_a_revocation_and_the_next_assignment_nothing_is_restored_or_processed(bundle):
    proc, log = make(bundle)
    proc.step()
    proc.consumer.polls.append({TopicPartition(TOPIC, 0): [reading(0, 0, "a", 1)]})
    proc.step()
    assert proc.commit()
    everything = {TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)}
    proc._events.put(("revoked", everything))  # the group is rejoining; the consumer still reports the old assignment
    proc.consumer.polls.append({TopicPartition(TOPIC, 0): [reading(0, 1, "a", 2)]})
    log.clear()
    proc.step()
    assert not calls(log, "committed", "restore", "seek"), "no consumer call while the group rejoins"
    assert proc.stats.records == 1 and proc._ready == set() and not proc.metrics.is_ready()
    proc._events.put(("assigned", everything))
    proc.step()
    assert not calls(log, "restore"), "both came back with nothing committed by others: their state is kept"
    assert ("seek", 0, 1) in log and proc._ready == {0, 1}


def test_revoked_partitions_lose_their_devices(bundle):
    proc, _ = make(bundle)
    proc.step()
    proc.consumer.polls.append({TopicPartition(TOPIC, 0): [reading(0, 0, "a", 1)],
                                TopicPartition(TOPIC, 1): [reading(1, 0, "b", 1)]})
    proc.step()
    assert proc.commit()
    proc.consumer.owned = {TopicPartition(TOPIC, 0)}
    proc._events.put(("revoked", {TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)}))
    proc._events.put(("assigned", {TopicPartition(TOPIC, 0)}))
    proc.step()
    assert proc._ready == {0} and "a" in proc.detector.store and "b" not in proc.detector.store


def test_records_fetched_before_a_seek_are_never_processed_twice(bundle):
    proc, _ = make(bundle, partitions=(0,))
    proc.step()
    batch = [reading(0, i, "a", i + 1) for i in range(3)]
    proc.consumer.polls.append({TopicPartition(TOPIC, 0): batch})
    proc.step()
    proc.consumer.polls.append({TopicPartition(TOPIC, 0): [*batch[1:], reading(0, 3, "a", 4)]})
    proc.step()
    assert proc.stats.records == 4 and proc._position[0] == 4


def test_records_of_a_partition_restored_in_the_same_step_are_dropped(bundle):
    proc, _ = make(bundle, partitions=(0,))
    proc.consumer.polls.append({TopicPartition(TOPIC, 0): [reading(0, 0, "a", 1)]})
    proc.step()  # the assignment and the records arrive together: the records predate the seek
    assert proc.stats.records == 0 and proc._ready == {0}


def test_a_step_that_fails_is_recovered_by_run_and_the_work_redone(bundle, monkeypatch):
    proc, log = make(bundle, "exactly_once", partitions=(0,))
    proc.step()
    proc.consumer.polls.append({TopicPartition(TOPIC, 0): [reading(0, 0, "a", 1)]})
    proc.step()
    original = proc.commit

    def flaky(final: bool = False, wait: bool = True) -> bool:
        if not final and not calls(log, "new_producer"):
            raise KafkaTimeoutError("broker gone")  # e.g. the sender could not reach the broker
        return original(final, wait)

    monkeypatch.setattr(proc, "commit", flaky)
    monkeypatch.setattr(proc, "close", lambda: None)
    monkeypatch.setattr("streams.processor.BACKOFF_INITIAL_S", 0.01)
    proc.config = ServiceConfig(**{**proc.config.__dict__, "commit_interval_s": 0.001})
    # the failing step, the step that restores and seeks back, then the re-delivered record
    proc.consumer.polls.extend([{}, {}, {TopicPartition(TOPIC, 0): [reading(0, 0, "a", 1)]}])
    proc.run(max_seconds=1.0)
    assert proc.stats.recoveries >= 1 and calls(log, "new_producer")
    assert ("seek", 0, 0) in log  # re-read from the committed offset after the restore
    assert calls(log, "commit_transaction") and proc.consumer.committed_offsets == {}  # fakes: offsets via txn
    assert any(e[0] == "send_offsets" and e[1] == {0: 1} for e in log)


def test_a_periodic_commit_never_waits_for_the_broker_and_keeps_the_order_events_changelog_offsets(bundle):
    proc, log = make(bundle)
    proc.step()
    proc.producer.hold = True
    proc.consumer.polls.append({TopicPartition(TOPIC, 0): [reading(0, 0, "a", 1, value=1.0),
                                                           reading(0, 1, "a", 2, value=2.0)]})
    proc.step()
    proc._futures.append(proc.producer.send("ev", key=b"a", value=b"an event of this window"))  # in flight
    steps_at_capture = int(proc.detector.store.steps[proc.detector.store.slot_of("a")])
    log.clear()
    assert proc.commit(wait=False)
    assert not calls(log, "flush", "commit") and not any(e == ("send", "g-state-changelog") for e in log), \
        "nothing of the changelog may be sent while the window's events are in flight"
    proc.consumer.polls.append({TopicPartition(TOPIC, 0): [reading(0, 2, "a", 3)]})  # the next window
    proc.step()
    assert not any(e == ("send", "g-state-changelog") for e in log)
    proc.producer.deliver()  # the events are acknowledged
    proc.step()
    changelog = [(k, v) for t, k, v, _ in proc.producer.sent if t == "g-state-changelog" and k != MARKER_KEY]
    assert len(changelog) == 1 and not calls(log, "commit")
    written = decode_states(decode_bucket(changelog[0][1])[1])
    assert written.steps.tolist() == [steps_at_capture], "the changelog holds the state as of the window's offsets"
    assert int(proc.detector.store.steps[proc.detector.store.slot_of("a")]) == steps_at_capture + 1
    proc.producer.deliver()  # the changelog is acknowledged
    proc.step()
    assert calls(log, "commit") == [("commit", {0: 2})]  # the captured window's offsets, not the next one's
    assert not calls(log, "flush"), "the loop never blocked on the broker"
    assert proc.commit() and calls(log, "commit")[-1] == ("commit", {0: 3})


def test_a_failed_event_in_a_pending_commit_discards_the_window_before_any_state_is_written(bundle):
    proc, log = make(bundle)
    proc.step()
    proc.producer.hold = True
    proc.consumer.polls.append({TopicPartition(TOPIC, 0): [reading(0, 0, "a", 1)]})
    proc.step()
    expiring = Future(KafkaTimeoutError("expired"), done=False)  # an event still in flight
    proc._futures.append(expiring)
    assert proc.commit(wait=False) and proc._pending is not None
    expiring.is_done = True  # ... and then it expired
    with pytest.raises(KafkaError, match="an event"):
        proc.step()
    proc._discard_uncommitted(None, "a send failed")  # what run() does with that error
    assert not any(t == "g-state-changelog" and k != MARKER_KEY for t, k, _, _ in proc.producer.sent)
    assert not calls(log, "commit") and proc._pending is None and 0 in proc._to_restore


def test_bucket_records_carry_the_offset_they_are_consistent_with(bundle):
    assert decode_bucket(encode_bucket(b"s", 5)) == (5, b"s") and decode_marker(encode_marker(5)) == 5


class _Result:
    def __init__(self, done: bool):
        self.done = done

    def wait(self, timeout_ms=None):
        if not self.done:
            time.sleep((timeout_ms or 0) / 1000)
        return self.done


class _StuckCommitManager:
    """kafka-python's transaction manager as seen during a broker outage: EndTxn never completes."""

    def send_offsets_to_transaction(self, offsets, group_metadata):
        return _Result(True)

    def begin_commit(self):
        return _Result(False)

    def begin_abort(self):
        return _Result(False)


class _Sender:
    def wakeup(self):
        pass


def test_a_transaction_step_that_never_completes_is_given_up_after_the_commit_timeout(bundle):
    proc, _ = make(bundle, "exactly_once", partitions=(0,))
    proc.config = ServiceConfig(**{**proc.config.__dict__, "extra": {"commit_timeout_s": 0.3}})
    proc.step()
    proc.consumer.polls.append({TopicPartition(TOPIC, 0): [reading(0, 0, "a", 1)]})
    proc.step()
    proc.producer._transaction_manager = _StuckCommitManager()
    proc.producer._sender = _Sender()
    started = time.monotonic()
    assert proc.commit() is False
    assert time.monotonic() - started < 5.0
    assert not proc._producer_ok and proc._to_restore == {0}  # re-initialised next step: the broker aborts it


def test_a_seasonal_bundles_profiles_travel_through_the_changelog(bundle):
    scorer = NormalErrorModel.fit(np.random.default_rng(2).normal(scale=0.4, size=(500, len(FEATURES))))
    seasonal = replace(bundle, seasonal_scorer=scorer).with_config(episode_rule="novelty", seasonal_period=5)
    first = make(seasonal)[0]
    first.step()
    first.consumer.polls.append({TopicPartition(TOPIC, p): [reading(p, t, d, t, value=float(t % 5))
                                                            for t in range(12)]
                                 for p, d in ((0, "a"), (1, "b"))})
    first.step()
    assert first.commit()
    second = make(seasonal)[0]
    second.producer.sent = first.producer.sent  # the same "broker"
    second.step()  # restores both partitions from the changelog
    one, two = first.detector.store, second.detector.store
    assert one.season is not None and two.season is not None and sorted(two.devices()) == ["a", "b"]
    for device in ("a", "b"):
        profile = one.season[one.slot_of(device)]
        assert np.isfinite(profile).any(), "the profile learned something"
        np.testing.assert_array_equal(two.season[two.slot_of(device)], profile)
        assert two.steps[two.slot_of(device)] == one.steps[one.slot_of(device)]


def test_a_bundle_with_context_takes_commands_from_values_and_its_context_travels_through_the_changelog(bundle):
    with_context = ModelBundle.untrained(FEATURES, hidden_size=8, name="unit", version="1",
                                         context=["valve"]).with_config(warmup_steps=1)
    first = make(with_context)[0]
    first.step()
    records = [Record(TOPIC, 0, t, *encode_reading("a", T0 + 1000 * t, {"temp": 1.0, "load": 0.5}), T0, [])
               for t in range(3)]
    records.append(Record(TOPIC, 0, 3, *encode_reading("a", T0 + 3500, {"valve": 1.0}), T0, []))  # a command
    bad = b'{"device_id": "a", "ts": %d, "values": {"valve": "shut"}}' % (T0 + 3600)
    records.append(Record(TOPIC, 0, 4, b"a", bad, T0, []))
    first.consumer.polls.append({TopicPartition(TOPIC, 0): records})
    first.step()
    assert len([sent for sent in first.producer.sent if sent[0] == "dlq"]) == 1  # the string value
    assert first.metrics.sample("dead_letters_total", reason="wrong_type") == 1.0
    assert first.metrics.sample("readings_total", outcome="context") == 1.0
    assert first.metrics.sample("readings_total", outcome="scored") == 2.0
    assert first.commit()
    second = make(with_context)[0]
    second.producer.sent = first.producer.sent  # the same "broker"
    second.step()  # restores partition 0 from the changelog
    store = second.detector.store
    assert store.last_context[store.slot_of("a")].tolist() == [1.0] and store.steps[store.slot_of("a")] == 3
