"""Hot reload and shadow mode against the real broker.

* A model switch in the middle of a stream loses no reading (every offset is scored exactly once, by
  the old model or the new one), and events after the switch carry the new version.
* A broken bundle made live is rejected with a logged reason while the old model keeps serving.
* Shadow mode publishes the candidate's events to the shadow topic, and its agreement metrics count
  correctly on a stream with known anomalies.

Needs the processor wiring of streams/models/watcher.py and streams/models/shadow.py (``StreamProcessor.swap_model``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from anomaly.bundle import METADATA_FILE, WEIGHTS_FILE
from anomaly.registry import LIVE_FILE, ModelRegistry
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

pytestmark = [
    pytest.mark.kafka,
]

HALF = 250
"""Steps of the fleet per half of the stream (8 devices: 2000 readings)."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    return train_bundle(tmp_path_factory.mktemp("model"))


@pytest.fixture
def registry(tmp_path, trained) -> ModelRegistry:
    reg = ModelRegistry(tmp_path / "models", create=True)
    reg.publish(trained, "1", live=True)
    return reg


def config_for(bootstrap: str, registry: ModelRegistry, topic: str, **extra) -> ServiceConfig:
    settings = {"bootstrap_servers": bootstrap, "model_dir": registry.root, "input_topic": topic,
                "events_topic": f"{topic}.events", "dlq_topic": f"{topic}.dlq", "group_id": f"g-{uuid.uuid4().hex[:8]}",
                "commit_interval_s": 0.2, "poll_timeout_ms": 50, "model_poll_interval_s": 0.2,
                "extra": {"scores_topic": f"{topic}.scores"}}
    return ServiceConfig(**(settings | extra))


def wait_until(condition: Callable[[], bool], what: str, worker: ProcessorThread, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if worker.error is not None:
            raise worker.error
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}: {worker.processor.stats}")
        time.sleep(0.05)


def halves(anomalies: list[InjectedAnomaly]):
    """Messages of the two halves of the stream (each half simulated only as far as it goes)."""
    early = [a for a in anomalies if a.start_step < TRAIN_STEPS + HALF]
    first, _ = fleet_messages(HALF, anomalies=early)
    second, run = fleet_messages(HALF, first_step=TRAIN_STEPS + HALF, anomalies=anomalies)
    return first, second, run


def test_a_switch_mid_stream_loses_no_reading_and_later_events_carry_the_new_version(kafka_bootstrap, kafka_topic,
                                                                                       registry, trained):
    topic = kafka_topic(partitions=3)
    injected = [
        InjectedAnomaly("dev-00001", "level_shift", start_step=TRAIN_STEPS + 100, duration=60, features="current",
                        magnitude=30.0),
        InjectedAnomaly("dev-00002", "level_shift", start_step=TRAIN_STEPS + HALF + 100, duration=60,
                        features="current", magnitude=30.0),
    ]
    first, second, _ = halves(injected)
    worker = ProcessorThread(config_for(kafka_bootstrap, registry, topic), trained)
    sent = produce(kafka_bootstrap, topic, first)
    wait_until(lambda: worker.processor.stats.records >= sent, "the first half", worker)

    registry.publish(trained.with_config(smoothing_alpha=0.4), "2", live=True)
    wait_until(lambda: worker.processor.stats.model_switches == 1, "the model switch", worker)
    sent += produce(kafka_bootstrap, topic, second)
    wait_until(lambda: worker.processor.stats.records >= sent, "the second half", worker)
    metrics = worker.processor.metrics
    stats = worker.stop()

    scores = scores_of(consume_all(kafka_bootstrap, f"{topic}.scores"))
    offsets = Counter((s["partition"], s["offset"]) for s in scores)
    if stats.rewinds == 0:
        assert len(offsets) == sent and set(offsets.values()) == {1}, "every offset scored exactly once"
    else:  # at-least-once after a failure: redone, never lost
        assert len(offsets) == sent
    assert {s["status"] for s in scores} <= {"scored", "warmup"}

    second_start = FLEET.ts_of(TRAIN_STEPS + HALF)
    warm = trained.config.warmup_steps
    for device in FLEET.device_ids():
        after = sorted((s for s in scores if s["device_id"] == device and s["ts_ms"] >= second_start),
                       key=lambda s: s["ts_ms"])
        assert [s["status"] for s in after[:warm]] == ["warmup"] * warm, f"{device} did not warm up after the switch"
        assert after[warm]["status"] == "scored"

    events = [decode_event(r.value) for r in consume_all(kafka_bootstrap, f"{topic}.events")]
    for event in events:
        expected = "2" if event["ts_ms"] >= second_start and event["source"]["offset"] >= 0 else "1"
        assert event["model"]["version"] == expected, event
    starts_v2 = [e for e in events if e["kind"] == "start" and e["model"]["version"] == "2"]
    assert any(e["device_id"] == "dev-00002" for e in starts_v2), "the new model detects the second anomaly"
    assert any(e["device_id"] == "dev-00001" and e["model"]["version"] == "1" for e in events)
    assert metrics.sample("model_reloads_total", outcome="success") == 1.0
    assert metrics.sample("model_switch_state_resets_total") == FLEET.n_devices
    assert metrics.sample("model_info", name="test-fleet", version="2", features=str(len(FLEET.features))) == 1.0


def test_a_broken_bundle_is_rejected_with_a_logged_reason_and_the_old_model_keeps_serving(
        kafka_bootstrap, kafka_topic, registry, trained, caplog):
    topic = kafka_topic(partitions=2)
    injected = [InjectedAnomaly("dev-00003", "level_shift", start_step=TRAIN_STEPS + HALF + 100, duration=60,
                                features="current", magnitude=30.0)]
    first, second, _ = halves(injected)
    worker = ProcessorThread(config_for(kafka_bootstrap, registry, topic), trained)
    sent = produce(kafka_bootstrap, topic, first)
    wait_until(lambda: worker.processor.stats.records >= sent, "the first half", worker)

    broken = registry.root / "versions" / "2"
    trained.with_version("2").save(broken)
    weights = Path(broken, WEIGHTS_FILE)
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated upload
    assert Path(broken, METADATA_FILE).is_file()
    metrics = worker.processor.metrics
    with caplog.at_level(logging.ERROR, logger="streams.models.watcher"):
        (registry.root / LIVE_FILE).write_text("2\n")  # by hand: set_live would have refused it
        wait_until(lambda: metrics.sample("model_reloads_total", outcome="failure") == 1.0, "the rejection", worker)
        sent += produce(kafka_bootstrap, topic, second)
        wait_until(lambda: worker.processor.stats.records >= sent, "the second half", worker)
    stats = worker.stop()

    (message,) = [r.getMessage() for r in caplog.records if r.name == "streams.models.watcher"]
    assert message.startswith("model version 2 rejected, still serving version 1: version 2 does not load")
    assert "SHA-256" in message or "weights" in message
    assert stats.model_switches == 0
    assert metrics.sample("model_reloads_total", outcome="failure") == 1.0, "rejected once, not on every poll"
    assert metrics.sample("model_reloads_total", outcome="success") == 0.0
    assert stats.readings["scored"] + stats.readings["warmup"] == sent
    events = [decode_event(r.value) for r in consume_all(kafka_bootstrap, f"{topic}.events")]
    assert {e["model"]["version"] for e in events} == {"1"}
    assert any(e["device_id"] == "dev-00003" and e["kind"] == "start" for e in events), \
        "the old model kept detecting after the rejection"


def test_shadow_mode_publishes_to_the_shadow_topic_and_counts_agreement(kafka_bootstrap, kafka_topic, registry,
                                                                       trained):
    topic = kafka_topic(partitions=3)
    registry.publish(trained.with_version("2", name="candidate"), "2")
    injected = [
        InjectedAnomaly("dev-00001", "level_shift", start_step=TRAIN_STEPS + 100, duration=60, features="current",
                        magnitude=30.0),
        InjectedAnomaly("dev-00004", "spike", start_step=TRAIN_STEPS + 200, duration=3, features="vibration",
                        magnitude=25.0),
        InjectedAnomaly("dev-00006", "level_shift", start_step=TRAIN_STEPS + 300, duration=60, features="temp",
                        magnitude=40.0),
    ]
    messages, run = fleet_messages(2 * HALF, anomalies=injected)
    shadow_topic = f"{topic}.shadow"
    worker = ProcessorThread(config_for(kafka_bootstrap, registry, topic, shadow_model="2", shadow_topic=shadow_topic),
                             trained)
    sent = produce(kafka_bootstrap, topic, messages)
    worker.wait_for(lambda s: s.records >= sent)
    metrics = worker.processor.metrics
    shadow = worker.processor.shadow
    worker.stop()

    live = [decode_event(r.value) for r in consume_all(kafka_bootstrap, f"{topic}.events")]
    shadowed = [decode_event(r.value) for r in consume_all(kafka_bootstrap, shadow_topic)]
    assert {(e["model"]["name"], e["model"]["version"]) for e in live} == {("test-fleet", "1")}
    assert {(e["model"]["name"], e["model"]["version"]) for e in shadowed} == {("candidate", "2")}
    key = lambda e: (e["device_id"], e["ts_ms"], e["kind"], e["source"]["partition"], e["source"]["offset"])  # noqa: E731
    assert sorted(map(key, shadowed)) == sorted(map(key, live)), "the same model raises the same events"
    live_starts = sum(e["kind"] == "start" for e in live)
    for anomaly in run.anomalies.itertuples():
        assert any(e["device_id"] == anomaly.device_id and e["kind"] == "start" for e in shadowed)
    assert metrics.sample("shadow_agreement_total", outcome="both") == live_starts
    for outcome in ("live_only", "shadow_only", "not_comparable"):
        assert metrics.sample("shadow_agreement_total", outcome=outcome) == 0.0
    assert metrics.sample("shadow_events_total", kind="start") == live_starts
    assert metrics.sample("shadow_model_info", name="candidate", version="2") == 1.0
    assert shadow.flush() == Counter()
