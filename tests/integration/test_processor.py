"""The stream processor against the real broker: detection, dead letters, scaling out, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition

from anomaly.synthetic import InjectedAnomaly
from streams.codec import decode_event
from streams.config import ServiceConfig
from tests.integration.helpers import (
    FLEET,
    TRAIN_STEPS,
    ProcessorThread,
    consume_all,
    fleet_messages,
    produce,
    scores_of,
    train_bundle,
)

pytestmark = pytest.mark.kafka

DETECTION_DELAY_STEPS = 20
"""A start event must come within this many readings of an injected anomaly's first reading."""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("model")
    return directory, train_bundle(directory)


def config_for(bootstrap: str, model_dir: Path, topic: str, **extra) -> ServiceConfig:
    tag = uuid.uuid4().hex[:8]
    settings = {"bootstrap_servers": bootstrap, "model_dir": model_dir, "input_topic": topic,
                "events_topic": f"{topic}.events", "dlq_topic": f"{topic}.dlq", "group_id": f"g-{tag}",
                "commit_interval_s": 0.2, "poll_timeout_ms": 50, "extra": {"scores_topic": f"{topic}.scores"}}
    return ServiceConfig(**(settings | extra))


def test_injected_anomalies_raise_start_events_and_clean_devices_stay_quiet(kafka_bootstrap, kafka_topic, model):
    model_dir, bundle = model
    topic = kafka_topic(partitions=3)
    at = TRAIN_STEPS + 200
    injected = [
        InjectedAnomaly("dev-00001", "level_shift", start_step=at, duration=100, features="current", magnitude=30.0),
        InjectedAnomaly("dev-00002", "spike", start_step=at + 50, duration=3, features="vibration", magnitude=20.0),
        InjectedAnomaly("dev-00003", "noise", start_step=at + 100, duration=100, features="pressure", magnitude=10.0),
    ]
    messages, run = fleet_messages(500, anomalies=injected)
    sent = produce(kafka_bootstrap, topic, messages)
    worker = ProcessorThread(config_for(kafka_bootstrap, model_dir, topic), bundle)
    worker.wait_for(lambda s: s.records >= sent)
    stats = worker.stop()
    assert stats.readings["scored"] + stats.readings["warmup"] == sent
    events = [decode_event(r.value) for r in consume_all(kafka_bootstrap, f"{topic}.events")]
    starts = [e for e in events if e["kind"] == "start"]
    for anomaly in run.anomalies.itertuples():
        hits = [e for e in starts if e["device_id"] == anomaly.device_id
                and anomaly.start_ms <= e["ts_ms"] <= anomaly.start_ms + DETECTION_DELAY_STEPS * FLEET.interval_ms]
        assert hits, f"no start event for {anomaly.kind} on {anomaly.device_id} within {DETECTION_DELAY_STEPS} readings"
        assert hits[0]["model"] == {"name": "test-fleet", "version": "1"}
        assert hits[0]["source"]["topic"] == topic
    clean = {f"dev-{i:05d}" for i in range(4, FLEET.n_devices)}
    # 4 clean devices x 500 readings at a 1e-4 false-alarm target: expect none, allow one
    assert sum(e["device_id"] in clean for e in starts) <= 1


def test_poison_messages_go_to_the_dlq_and_offsets_move_on(kafka_bootstrap, kafka_topic, model):
    model_dir, bundle = model
    topic = kafka_topic(partitions=1)
    good, _ = fleet_messages(20)
    poison = [
        (b"dev-00000", b"{not json", "invalid_json"),
        (b"dev-00000", b'{"device_id": "dev-00000", "ts": 1700000000000, "values": {"temp": "hot"}}', "wrong_type"),
        (b"dev-00000", b'{"device_id": "dev-00000", "ts": 1700000000000, "values": {"temp": NaN}}',
         "non_finite_value"),
        (b"dev-00000", b'{"device": "dev-00000", "when": 5}', "unknown_schema"),
        (b"dev-00000", b'{"device_id": "dev-00000", "ts": "yesterday", "values": {"temp": 1.0}}', "bad_timestamp"),
        (b"dev-00000", b'{"device_id": "dev-00000", "ts": 1700000000000, "values": {"rpm": 1.0}}',
         "no_known_features"),
        (b"dev-99999", b'{"device_id": "dev-00000", "ts": 1700000000000, "values": {"temp": 1.0}}', "key_mismatch"),
        (b"dev-00000", b'{"device_id": "dev-00000", "pad": "' + b"x" * 200_000 + b'"}', "oversized"),
    ]
    mixed: list[tuple[bytes, bytes]] = []
    for i, message in enumerate(good):
        mixed.append(message)
        if i == 5:
            mixed.extend((k, v) for k, v, _ in poison)
    sent = produce(kafka_bootstrap, topic, mixed)
    worker = ProcessorThread(config_for(kafka_bootstrap, model_dir, topic, max_message_bytes=100_000), bundle)
    worker.wait_for(lambda s: s.records >= sent)
    stats = worker.stop()
    dlq = consume_all(kafka_bootstrap, f"{topic}.dlq")
    reasons = Counter(dict(r.headers)["x-dlq-reason"].decode() for r in dlq)
    assert reasons == Counter(reason for _, _, reason in poison)
    by_reason = {dict(r.headers)["x-dlq-reason"].decode(): r for r in dlq}
    for key, value, reason in poison:
        assert by_reason[reason].value == value and by_reason[reason].key == key
        assert dict(by_reason[reason].headers)["x-dlq-source-topic"].decode() == topic
    assert stats.readings["scored"] + stats.readings["warmup"] == len(good)
    scored_offsets = {row["offset"] for row in scores_of(consume_all(kafka_bootstrap, f"{topic}.scores"))}
    poison_offsets = {int(dict(r.headers)["x-dlq-source-offset"]) for r in dlq}
    assert scored_offsets | poison_offsets == set(range(sent)) and not scored_offsets & poison_offsets
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=worker.config.group_id)
    assert consumer.committed(TopicPartition(topic, 0)) == sent
    consumer.close()


def test_two_instances_split_partitions_and_score_every_reading_once(kafka_bootstrap, kafka_topic, model):
    model_dir, bundle = model
    topic = kafka_topic(partitions=4)
    config = config_for(kafka_bootstrap, model_dir, topic)
    first, second = ProcessorThread(config, bundle), ProcessorThread(config, bundle)

    def owned(worker: ProcessorThread) -> set[int]:
        return set(worker.processor._ready)

    deadline = time.monotonic() + 60
    while not (owned(first) and owned(second) and owned(first) | owned(second) == {0, 1, 2, 3}):
        assert time.monotonic() < deadline, f"partitions not split: {owned(first)} / {owned(second)}"
        time.sleep(0.2)
    assert not owned(first) & owned(second)
    messages, _ = fleet_messages(150)
    sent = produce(kafka_bootstrap, topic, messages)
    deadline = time.monotonic() + 90
    while first.processor.stats.records + second.processor.stats.records < sent:
        assert time.monotonic() < deadline, "the two instances did not process every message"
        time.sleep(0.2)
    a, b = first.stop(), second.stop()
    assert a.records > 0 and b.records > 0
    rows = scores_of(consume_all(kafka_bootstrap, f"{topic}.scores"))
    keys = Counter((row["partition"], row["offset"]) for row in rows)
    assert len(keys) == sent and max(keys.values()) == 1


def test_sigterm_commits_what_was_produced_and_a_restart_continues_without_gaps(kafka_bootstrap, kafka_topic, model,
                                                                                  tmp_path):
    model_dir, _ = model
    topic = kafka_topic(partitions=2)
    messages, _ = fleet_messages(400)
    sent = len(messages)
    chunks = [messages[i:i + 100] for i in range(0, sent, 100)]

    def trickle() -> None:  # the stream keeps coming while the service is stopped and restarted
        for chunk in chunks:
            produce(kafka_bootstrap, topic, chunk)
            time.sleep(0.25)

    producer = threading.Thread(target=trickle, daemon=True)
    producer.start()
    group = f"g-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "streams.cli", "serve", "--bootstrap", kafka_bootstrap, "--model", str(model_dir),
           "--input-topic", topic, "--events-topic", f"{topic}.events", "--dlq-topic", f"{topic}.dlq",
           "--group", group, "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--commit-interval", "0.2",
           "--max-poll-records", "200", "--scores-topic", f"{topic}.scores"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while len(scores_of(consume_all(kafka_bootstrap, f"{topic}.scores", idle_s=0.3))) < sent // 4:
        assert first.poll() is None, first.stdout.read() if first.stdout else ""
        assert time.monotonic() < deadline, "the service scored nothing"
        time.sleep(0.3)
    first.send_signal(signal.SIGTERM)
    first_out, _ = first.communicate(timeout=60)
    assert first.returncode == 0, first_out
    scored = scores_of(consume_all(kafka_bootstrap, f"{topic}.scores"))
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group)
    committed = {p: consumer.committed(TopicPartition(topic, p)) or 0 for p in (0, 1)}
    consumer.close()
    for p in (0, 1):
        produced_p = [row["offset"] for row in scored if row["partition"] == p]
        # everything it scored was committed, and nothing beyond
        assert committed[p] == (max(produced_p) + 1 if produced_p else 0)
    assert sum(committed.values()) < sent, "SIGTERM came after the whole stream: the test proves nothing"
    producer.join(timeout=120)

    second = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while len(scores_of(consume_all(kafka_bootstrap, f"{topic}.scores", idle_s=0.3))) < sent:
        assert second.poll() is None, second.stdout.read() if second.stdout else ""
        assert time.monotonic() < deadline, "the restarted service did not finish the stream"
        time.sleep(0.3)
    second.send_signal(signal.SIGTERM)
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 0, out
    rows = scores_of(consume_all(kafka_bootstrap, f"{topic}.scores"))
    keys = Counter((row["partition"], row["offset"]) for row in rows)
    dups = sorted(k for k, n in keys.items() if n > 1)
    assert len(keys) == sent and not dups, (
        f"gaps or duplicates across the restart: {len(dups)} dups {dups[:3]}..{dups[-3:]}\n{first_out}\n{out}")
    assert orjson.dumps(rows[0])  # rows are plain JSON values
