"""Metric values after a known sequence of readings through the stream processor (no broker).

Why these tests exist: ``tests/unit/streams/test_metrics.py`` checks :class:`ServiceMetrics` when it is
called by hand; these check that :meth:`StreamProcessor.process_records`, the code that runs in
production, feeds it: readings by outcome, dead letters by reason, anomaly events by kind, the score
and latency histograms, batch duration, active devices and open episodes.

How: a processor built without ``connect()`` gets kafka-python ``ConsumerRecord`` objects made in
memory, the way ``KafkaConsumer.poll`` hands them over. Its producer is a recording stand-in for the
Kafka client (a collaborator inside this one process); nothing here claims broker behaviour, which
``tests/integration`` and ``tests/e2e/test_prometheus_live.py`` test against a real broker.

The model is an untrained, nearly persistence-like LSTM with a normal-error model fitted on N(0, 0.3):
a steady device scores low, a jump of 60 units scores ~1 and opens an episode that a few steady
readings close again. The episode assertions rest on that, not on any trained weights.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import CollectorRegistry

from anomaly.bundle import ModelBundle
from anomaly.events import ProcessResult
from anomaly.scoring import NormalErrorModel
from streams.codec import encode_reading
from streams.config import ServiceConfig
from streams.metrics import SCORE_BUCKETS, ServiceMetrics
from streams.processor import StreamProcessor

FEATURES = ("temp", "vibration")
T0_MS = 1_700_000_000_000
STEADY = (20.0, 1.0)
SPIKE = (80.0, 1.0)
WARMUP = 3
N_PARTITIONS = 2
DEVICE_PARTITION = {"a": 0, "b": 1, "c": 0}


@dataclass
class RecordingProducer:
    """Stands in for ``KafkaProducer``: keeps every ``send`` (topic, key, value, headers, partition)."""

    sent: list[tuple[str, bytes | None, bytes | None, Any, int | None]] = field(default_factory=list)

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None, headers: Any = None,
             partition: int | None = None) -> None:
        self.sent.append((topic, key, value, headers, partition))

    def topics(self) -> Counter[str]:
        return Counter(topic for topic, *_ in self.sent)


class RecordFactory:
    """kafka-python ``ConsumerRecord`` objects with consecutive offsets per partition, timestamped now."""

    def __init__(self, topic: str):
        self.topic = topic
        self.offsets: Counter[int] = Counter()

    def record(self, partition: int, key: bytes | None, value: bytes) -> ConsumerRecord:
        offset = self.offsets[partition]
        self.offsets[partition] += 1
        return ConsumerRecord(topic=self.topic, partition=partition, leader_epoch=-1, offset=offset,
                              timestamp=int(time.time() * 1000), timestamp_type=0, key=key, value=value,
                              headers=[], checksum=None, serialized_key_size=len(key or b""),
                              serialized_value_size=len(value), serialized_header_size=-1)

    def reading(self, device: str, step: int, values: tuple[float, float] = STEADY) -> ConsumerRecord:
        key, value = encode_reading(device, T0_MS + step * 1000, dict(zip(FEATURES, values, strict=True)))
        return self.record(DEVICE_PARTITION[device], key, value)


@pytest.fixture
def bundle() -> ModelBundle:
    torch.manual_seed(0)
    scorer = NormalErrorModel.fit(np.random.default_rng(0).normal(scale=0.3, size=(2000, len(FEATURES))))
    untrained = ModelBundle.untrained(FEATURES, hidden_size=8, scorer=scorer, name="unit-model", version="5")
    return untrained.with_config(warmup_steps=WARMUP, threshold=2.0, cooldown=2, gap_factor=5.0,
                                 nominal_interval_ms=1000)


@pytest.fixture
def config() -> ServiceConfig:
    return ServiceConfig(bootstrap_servers="unused:9092", model_dir=Path("unused"), input_topic="readings",
                         events_topic="events", dlq_topic="readings.dlq")


@pytest.fixture
def metrics(config: ServiceConfig) -> ServiceMetrics:
    return ServiceMetrics(CollectorRegistry(), topics=[config.input_topic])


@pytest.fixture
def processor(config: ServiceConfig, bundle: ModelBundle, metrics: ServiceMetrics) -> StreamProcessor:
    """A processor that was never connected: a recording producer, and the partition count connect() reads."""
    proc = StreamProcessor(config, bundle, metrics)
    proc.producer = RecordingProducer()  # type: ignore[assignment]
    proc._n_partitions = N_PARTITIONS  # set by connect() from the input topic; no broker here
    return proc


def steady_then_spike(records: RecordFactory, steps: range, spikes: dict[tuple[str, int], tuple[float, float]]
                      ) -> list[ConsumerRecord]:
    """Readings of devices a, b, c at each step, interleaved as a poll returns them; some steps spike."""
    return [records.reading(d, s, spikes.get((d, s), STEADY)) for s in steps for d in DEVICE_PARTITION]


def poison(records: RecordFactory) -> list[ConsumerRecord]:
    """Four messages the codec rejects: two not JSON, one JSON array, one reading without ``ts``."""
    return [
        records.record(0, b"a", b"not json"),
        records.record(1, b"b", b"{\"device_id\": "),
        records.record(0, b"a", b"[1, 2]"),
        records.record(1, b"b", b'{"device_id": "b", "values": {"temp": 1.0}}'),
    ]


def cumulative_buckets(scores: np.ndarray) -> dict[str, float]:
    """Expected ``le`` → cumulative count of the score histogram, computed independently of BatchHistogram."""
    s = scores[~np.isnan(scores)]
    return {f"{b}": float((s <= b).sum()) for b in SCORE_BUCKETS} | {"+Inf": float(len(s))}


@pytest.fixture
def two_batches(processor: StreamProcessor, config: ServiceConfig) -> list[ProcessResult]:
    """The known sequence, in two polls.

    Poll 1: devices a, b, c, steps 0-9 (3 warm-up + 7 scored each); a spikes at step 6, b at step 9.
    Poll 2: steps 10-29 steady (a's and b's episodes end), c spikes at step 29 (its episode stays open);
    plus a again at step 29 (duplicate), a at step 5 (out of order) and four poison messages.
    """
    records = RecordFactory(config.input_topic)
    first = steady_then_spike(records, range(10), {("a", 6): SPIKE, ("b", 9): SPIKE})
    second = steady_then_spike(records, range(10, 30), {("c", 29): SPIKE})
    second += [records.reading("a", 29), records.reading("a", 5), *poison(records)]
    return [processor.process_records(first), processor.process_records(second)]


def test_readings_are_counted_by_outcome(two_batches: list[ProcessResult], metrics: ServiceMetrics) -> None:
    assert metrics.sample("readings_total", outcome="warmup") == 3 * WARMUP
    assert metrics.sample("readings_total", outcome="scored") == 3 * (30 - WARMUP)
    assert metrics.sample("readings_total", outcome="duplicate") == 1
    assert metrics.sample("readings_total", outcome="out_of_order") == 1
    assert metrics.sample("readings_total", outcome="invalid") == 4  # messages rejected by the codec


def test_dead_letters_are_counted_by_reason_and_sent_to_the_dlq(
    two_batches: list[ProcessResult], metrics: ServiceMetrics, processor: StreamProcessor
) -> None:
    assert metrics.sample("dead_letters_total", reason="invalid_json") == 2
    assert metrics.sample("dead_letters_total", reason="not_an_object") == 1
    assert metrics.sample("dead_letters_total", reason="missing_field") == 1
    assert metrics.sample("dead_letters_total", reason="wrong_type") == 0
    assert metrics.sample("dead_letters_total", reason="other") == 0
    assert processor.producer.topics()["readings.dlq"] == 4  # type: ignore[union-attr]


def test_anomaly_events_and_open_episodes(
    two_batches: list[ProcessResult], metrics: ServiceMetrics, processor: StreamProcessor
) -> None:
    events = [(e.device_id, e.kind) for result in two_batches for e in result.events]
    assert events == [("a", "start"), ("b", "start"), ("a", "end"), ("b", "end"), ("c", "start")]
    assert metrics.sample("anomaly_events_total", kind="start") == 3
    assert metrics.sample("anomaly_events_total", kind="end") == 2
    assert metrics.sample("open_episodes") == 1  # c's
    assert processor.producer.topics()["events"] == 5  # type: ignore[union-attr]


def test_score_histogram_holds_every_scored_reading(two_batches: list[ProcessResult], metrics: ServiceMetrics
                                                    ) -> None:
    scores = np.concatenate([result.scores for result in two_batches])
    expected = cumulative_buckets(scores)
    assert metrics.sample("score_count") == 3 * (30 - WARMUP) == expected["+Inf"]
    for le, count in expected.items():
        assert metrics.sample("score_bucket", le=le) == count, f"le={le}"
    assert metrics.sample("score_sum") == pytest.approx(float(np.nansum(scores)), rel=1e-6)
    # the three spikes score above 0.99; steady readings of an untrained model may score anywhere below
    assert metrics.sample("score_count") - metrics.sample("score_bucket", le="0.99") >= 3


def test_batch_size_duration_and_latency_are_observed_per_poll(
    two_batches: list[ProcessResult], metrics: ServiceMetrics
) -> None:
    assert metrics.sample("batch_duration_seconds_count") == 2
    assert metrics.sample("batch_duration_seconds_sum") > 0
    assert metrics.sample("batch_size_readings_count") == 2
    # poll 1: 30 readings; poll 2: 60 + duplicate + out-of-order + 4 rejected messages
    assert metrics.sample("batch_size_readings_sum") == 30 + 66
    # every accepted reading has a record timestamp (CreateTime, now), so each gets an end-to-end latency
    assert metrics.sample("end_to_end_latency_seconds_count") == 30 + 62
    assert metrics.sample("gap_resets_total") == 0


def test_active_devices_are_the_devices_in_state(two_batches: list[ProcessResult], metrics: ServiceMetrics,
                                                 processor: StreamProcessor) -> None:
    assert metrics.sample("active_devices") == 3 == len(processor.detector.store)


def test_model_info_names_the_bundle(processor: StreamProcessor, metrics: ServiceMetrics) -> None:
    assert metrics.sample("model_info", name="unit-model", version="5", features="2") == 1


def test_messages_consumed_counts_accepted_and_rejected_messages(
    two_batches: list[ProcessResult], metrics: ServiceMetrics
) -> None:
    # 30 + 62 accepted single-reading messages and 4 dead-lettered ones (3 distinct reasons)
    assert metrics.sample("messages_consumed_total", topic="readings") == 30 + 62 + 4
