"""The dev/test broker behaves like Kafka where the service depends on it.

Checked against a real broker (see ``tests/kafka_broker.py``): acks=all produce and a manual-commit
consumer group round trip, topics with several partitions, exactly-once transactions (committed
records and offsets visible, aborted records hidden from read_committed consumers) and, on a
dedicated :class:`streams.dev.localkafka.LocalKafka`, that a restart on the same data directory keeps
data and committed offsets. Uses kafka-python 3.0.x, the client the service uses.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata

from streams.dev.localkafka import LocalKafka
from streams.kafka.admin import TopicSpec, admin_client, ensure_topics, partition_counts

pytestmark = pytest.mark.kafka

# Bounds on waiting for records, not timing assertions: a healthy broker answers in well under a
# second; these only stop a broken test from hanging.
POLL_DEADLINE_S = 30.0
CLIENT_TIMEOUT_MS = 20_000

TopicFactory = Callable[..., str]


def _group() -> str:
    return f"tests-{uuid.uuid4().hex[:10]}"


def _consumer(bootstrap: str, *topics: str, **config: object) -> KafkaConsumer:
    settings: dict[str, object] = {
        "bootstrap_servers": bootstrap,
        "auto_offset_reset": "earliest",
        "enable_auto_commit": False,
        "request_timeout_ms": CLIENT_TIMEOUT_MS + 5_000,
    }
    settings.update(config)
    return KafkaConsumer(*topics, **settings)


def _poll_until(consumer: KafkaConsumer, count: int) -> list[ConsumerRecord]:
    """Poll until ``count`` records arrived; fail (naming what did arrive) after POLL_DEADLINE_S."""
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + POLL_DEADLINE_S
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    assert len(records) >= count, f"expected {count} records, got {len(records)}: {[r.value for r in records]}"
    return records


def _read_all(consumer: KafkaConsumer, expected: int, quiet_polls: int = 2) -> list[bytes]:
    """Values of at least ``expected`` records, plus whatever else arrives before ``quiet_polls``
    polls in a row come back empty (so an unexpected extra record would be seen)."""
    records = _poll_until(consumer, expected)
    quiet = 0
    deadline = time.monotonic() + POLL_DEADLINE_S
    while quiet < quiet_polls and time.monotonic() < deadline:
        got = [r for batch in consumer.poll(timeout_ms=300).values() for r in batch]
        records.extend(got)
        quiet = 0 if got else quiet + 1
    return [r.value for r in records]


def _produce(bootstrap: str, topic: str, values: list[bytes], **config: object) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", **config)
    try:
        futures = [producer.send(topic, key=b"dev-%d" % (i % 3), value=v) for i, v in enumerate(values)]
        producer.flush(timeout=CLIENT_TIMEOUT_MS / 1000)
        for future in futures:
            future.get(timeout=CLIENT_TIMEOUT_MS / 1000)
    finally:
        producer.close()


def test_produce_consume_round_trip_with_manual_commit(kafka_bootstrap: str, kafka_topic: TopicFactory) -> None:
    topic = kafka_topic(partitions=1)
    values = [b"reading-%d" % i for i in range(10)]
    _produce(kafka_bootstrap, topic, values)

    group = _group()
    consumer = _consumer(kafka_bootstrap, topic, group_id=group)
    try:
        records = _poll_until(consumer, len(values))
        assert [r.value for r in records] == values
        assert [r.key for r in records[:3]] == [b"dev-0", b"dev-1", b"dev-2"]
        consumer.commit()
        assert consumer.committed(TopicPartition(topic, 0)) == len(values)
    finally:
        consumer.close()

    # A new member of the same group resumes after the committed offset: nothing is re-read.
    _produce(kafka_bootstrap, topic, [b"after-commit"])
    again = _consumer(kafka_bootstrap, topic, group_id=group)
    try:
        assert [r.value for r in _poll_until(again, 1)] == [b"after-commit"]
    finally:
        again.close()


def test_topic_with_partitions_is_created_once_and_usable(kafka_bootstrap: str, kafka_topic: TopicFactory) -> None:
    topic = kafka_topic(partitions=3)
    admin = admin_client(kafka_bootstrap)
    try:
        assert partition_counts(admin, [topic]) == {topic: 3}
        # ensure_topics is idempotent: an existing topic is neither recreated nor an error.
        assert ensure_topics(admin, {topic: TopicSpec(partitions=3)}) == []
    finally:
        admin.close()

    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        metadata = [producer.send(topic, value=b"p%d" % p, partition=p) for p in range(3)]
        assert sorted(m.get(timeout=CLIENT_TIMEOUT_MS / 1000).partition for m in metadata) == [0, 1, 2]
    finally:
        producer.close()

    consumer = _consumer(kafka_bootstrap, topic, group_id=_group())
    try:
        records = _poll_until(consumer, 3)
        assert {(r.partition, r.value) for r in records} == {(0, b"p0"), (1, b"p1"), (2, b"p2")}
    finally:
        consumer.close()


def test_transactions_commit_records_and_offsets_and_hide_aborted(
    kafka_bootstrap: str, kafka_topic: TopicFactory
) -> None:
    """Consume-transform-produce in one transaction, as the exactly-once processor will do it."""
    source, sink = kafka_topic(partitions=1, prefix="eos-in"), kafka_topic(partitions=1, prefix="eos-out")
    _produce(kafka_bootstrap, source, [b"r0", b"r1", b"r2"])

    group = _group()
    consumer = _consumer(kafka_bootstrap, source, group_id=group, isolation_level="read_committed")
    producer = KafkaProducer(
        bootstrap_servers=kafka_bootstrap,
        transactional_id=f"tests-tx-{uuid.uuid4().hex[:10]}",
        acks="all",
        max_block_ms=CLIENT_TIMEOUT_MS,
    )
    try:
        producer.init_transactions()
        inputs = _poll_until(consumer, 3)

        producer.begin_transaction()
        for record in inputs:
            producer.send(sink, key=record.key, value=b"scored-" + record.value)
        tp = TopicPartition(source, 0)
        next_offset = inputs[-1].offset + 1
        producer.send_offsets_to_transaction({tp: OffsetAndMetadata(next_offset, "", -1)}, consumer.group_metadata())
        producer.commit_transaction()

        producer.begin_transaction()
        producer.send(sink, value=b"aborted")
        producer.flush()
        producer.abort_transaction()

        # Offsets committed by the transaction are the group's committed offsets.
        assert consumer.committed(tp) == next_offset
    finally:
        producer.close()
        consumer.close()

    committed_reader = _consumer(kafka_bootstrap, sink, group_id=_group(), isolation_level="read_committed")
    try:
        seen = _read_all(committed_reader, 3)
    finally:
        committed_reader.close()
    assert seen == [b"scored-r0", b"scored-r1", b"scored-r2"]

    # The aborted record is in the log: a read_uncommitted reader sees it, read_committed did not.
    raw_reader = _consumer(kafka_bootstrap, sink, group_id=_group(), isolation_level="read_uncommitted")
    try:
        raw = _read_all(raw_reader, 4)
    finally:
        raw_reader.close()
    assert b"aborted" in raw


@pytest.mark.slow
def test_restart_on_same_data_dir_keeps_records_and_offsets(local_kafka: LocalKafka) -> None:
    bootstrap = local_kafka.bootstrap
    topic = "restart-check"
    admin = admin_client(bootstrap)
    try:
        ensure_topics(admin, {topic: TopicSpec(partitions=2)})
    finally:
        admin.close()
    values = [b"before-restart-%d" % i for i in range(6)]
    _produce(bootstrap, topic, values)
    group = _group()
    consumer = _consumer(bootstrap, topic, group_id=group)
    try:
        _poll_until(consumer, len(values))
        consumer.commit()
    finally:
        consumer.close()

    local_kafka.restart()
    assert local_kafka.bootstrap == bootstrap  # same ports: clients' configs stay valid

    _produce(bootstrap, topic, [b"after-restart"])
    resumed = _consumer(bootstrap, topic, group_id=group)
    try:
        assert _read_all(resumed, 1) == [b"after-restart"]
    finally:
        resumed.close()
    fresh = _consumer(bootstrap, topic, group_id=_group())
    try:
        assert sorted(_read_all(fresh, len(values) + 1)) == sorted([*values, b"after-restart"])
    finally:
        fresh.close()
