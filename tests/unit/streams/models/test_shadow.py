"""Shadow scoring without a broker: shadow-topic records, and agreement counts on a stream with known anomalies.

Each case pairs the live model with a shadow whose behaviour is known relative to it (the same model;
one that never alarms; one that is still warming up), so the expected agreement counts follow from
the live model's own events. The matching rule itself is tested on hand-made starts.
"""

from __future__ import annotations

import logging
from collections import Counter

import pytest

from anomaly.bundle import ModelBundle
from anomaly.detector import StreamingDetector
from anomaly.registry import ModelRegistry
from streams.codec import decode_event
from streams.config import ServiceConfig
from streams.errors import ConfigError
from streams.metrics import ServiceMetrics
from streams.models.shadow import ShadowScorer, match_starts
from tests.unit.streams.fleet import ANOMALIES, FLEET, decoded_batches, stream_frame, trained


def run(live_bundle: ModelBundle, shadow_bundle: ModelBundle, metrics: ServiceMetrics | None = None,
        batch_rows: int = 200):
    """Live and shadow over the stream as the processor runs them; returns (live events, shadow messages, scorer)."""
    live = StreamingDetector(live_bundle)
    shadow = ShadowScorer(shadow_bundle, live_bundle, metrics)
    live_events, messages = [], []
    for decoded in decoded_batches(stream_frame(), batch_rows):
        result = live.process(decoded.batch)
        live_events += result.events
        messages += shadow.process(decoded, result)
    return live_events, messages, shadow


def starts(events) -> int:
    return sum(e.kind == "start" for e in events)


@pytest.fixture(scope="module")
def live_events():
    events, _, _ = run(trained(), trained().with_version("2"))
    return events


def test_the_stream_has_the_known_anomalies_detected(live_events):
    """Precondition of the agreement tests: the live model raises a start for every injected anomaly."""
    for anomaly in ANOMALIES:
        begin = FLEET.ts_of(anomaly.start_step)
        assert any(e.kind == "start" and e.device_id == anomaly.device_id and begin <= e.ts_ms < begin + 20_000
                   for e in live_events), anomaly


def test_identical_shadow_agrees_on_every_start_and_publishes_its_own_version(live_events):
    metrics = ServiceMetrics()
    _, messages, shadow = run(trained(), trained().with_version("2", name="candidate"), metrics)
    assert shadow.agreement == Counter({"both": starts(live_events)})
    assert shadow.flush() == Counter()
    shadow_events = [decode_event(m.value) for m in messages]
    assert [(e["device_id"], e["ts_ms"], e["kind"]) for e in shadow_events] == \
        [(e.device_id, e.ts_ms, e.kind) for e in live_events]
    assert {(e["model"]["name"], e["model"]["version"]) for e in shadow_events} == {("candidate", "2")}
    for message, event in zip(messages, shadow_events, strict=True):
        assert message.key == event["device_id"].encode()
        assert message.partition == event["source"]["partition"] == int(event["device_id"][-5:]) % 3
    assert metrics.sample("shadow_agreement_total", outcome="both") == starts(live_events)
    assert metrics.sample("shadow_agreement_total", outcome="live_only") == 0.0
    assert metrics.sample("shadow_events_total", kind="start") == starts(live_events)
    assert metrics.sample("shadow_model_info", name="candidate", version="2") == 1.0


def test_a_shadow_that_never_alarms_counts_every_live_start_as_live_only(live_events):
    metrics = ServiceMetrics()
    _, messages, shadow = run(trained(), trained().with_version("2").with_config(threshold=300.0), metrics)
    assert messages == []
    total = shadow.agreement + shadow.flush()
    assert total == Counter({"live_only": starts(live_events)})
    assert metrics.sample("shadow_agreement_total", outcome="live_only") == starts(live_events)


def test_a_shadow_that_alarms_alone_counts_shadow_only(live_events):
    _, messages, shadow = run(trained().with_config(threshold=300.0), trained().with_version("2"))
    total = shadow.agreement + shadow.flush()
    assert total == Counter({"shadow_only": starts(live_events)})
    assert sum(decode_event(m.value)["kind"] == "start" for m in messages) == starts(live_events)


def test_starts_while_the_shadow_warms_up_are_not_comparable(live_events):
    _, messages, shadow = run(trained(), trained().with_version("2").with_config(warmup_steps=100_000))
    assert messages == []
    assert shadow.agreement + shadow.flush() == Counter({"not_comparable": starts(live_events)})


def test_a_mixed_shadow_counts_each_start_once(live_events):
    """A more sensitive shadow: every live start is matched, and each further shadow start is shadow_only."""
    _, messages, shadow = run(trained(), trained().with_version("2").with_config(threshold=1.0))
    total = shadow.agreement + shadow.flush()
    shadow_starts = sum(decode_event(m.value)["kind"] == "start" for m in messages)
    assert shadow_starts > starts(live_events), "precondition: the lower threshold raises more starts"
    assert total["both"] + total["live_only"] == starts(live_events)
    assert total["both"] + total["shadow_only"] == shadow_starts
    assert total["both"] >= len(ANOMALIES)


def test_agreement_does_not_depend_on_the_batch_size():
    lower = trained().with_version("2").with_config(threshold=1.0)
    counts = []
    for rows in (101, 1000):
        _, _, shadow = run(trained(), lower, batch_rows=rows)
        counts.append(shadow.agreement + shadow.flush())
    assert counts[0] == counts[1]


def test_a_failing_shadow_turns_itself_off_without_touching_the_live_path(monkeypatch, caplog):
    live = StreamingDetector(trained())
    shadow = ShadowScorer(trained().with_version("2"), trained())

    def explode(_batch):
        raise RuntimeError("boom")

    monkeypatch.setattr(shadow.detector, "process", explode)
    batches = decoded_batches(stream_frame())[:2]
    with caplog.at_level(logging.ERROR, logger="streams.models.shadow"):
        for decoded in batches:
            result = live.process(decoded.batch)
            assert shadow.process(decoded, result) == []
    assert not shadow.enabled
    assert sum("shadow scoring is off" in r.getMessage() for r in caplog.records) == 1


def test_dropped_devices_forget_pending_starts():
    shadow = ShadowScorer(trained().with_version("2"), trained())
    shadow._pending["live"]["dev-00001"] = 5
    shadow.drop_devices(["dev-00001"])
    assert shadow.flush() == Counter()


# ---------------------------------------------------------------------- the matching rule
def fresh() -> dict[str, dict[str, int]]:
    return {"live": {}, "shadow": {}}


def test_starts_within_the_window_match_and_outside_do_not():
    pending = fresh()
    assert match_starts(pending, [(0, "live", "a"), (3000, "shadow", "a")], {"a": 3000}, 3000) == {"both": 1}
    assert match_starts(pending, [(0, "live", "b"), (3001, "shadow", "b")], {"b": 3001}, 3000) == \
        Counter({"live_only": 1})
    assert pending == {"live": {}, "shadow": {"b": 3001}}
    assert match_starts(pending, [], {"b": 6002}, 3000) == Counter({"shadow_only": 1})


def test_a_pending_start_waits_until_its_device_moves_past_the_window():
    pending = fresh()
    assert match_starts(pending, [(1000, "shadow", "a")], {"a": 1000, "b": 99_000}, 500) == Counter()
    assert match_starts(pending, [], {"a": 1500}, 500) == Counter(), "still inside the window"
    assert match_starts(pending, [(1400, "live", "a")], {"a": 1500}, 500) == {"both": 1}


def test_a_second_start_of_the_same_model_leaves_the_first_unmatched():
    pending = fresh()
    counts = match_starts(pending, [(0, "live", "a"), (100, "live", "a"), (150, "shadow", "a")], {"a": 150}, 1000)
    assert counts == Counter({"live_only": 1, "both": 1})


def test_other_devices_never_match():
    pending = fresh()
    counts = match_starts(pending, [(0, "live", "a"), (0, "shadow", "b")], {"a": 10_000, "b": 10_000}, 1000)
    assert counts == Counter({"live_only": 1, "shadow_only": 1})


# ---------------------------------------------------------------------- configuration
@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    reg = ModelRegistry(tmp_path / "models", create=True)
    reg.publish(trained(), "1", live=True)
    reg.publish(trained(), "2")
    return reg


def config(model_dir, **extra) -> ServiceConfig:
    return ServiceConfig(bootstrap_servers="localhost:9092", model_dir=model_dir, **extra)


def test_for_config_builds_the_shadow_from_the_registry(registry):
    assert ShadowScorer.for_config(config(registry.root), trained()) is None
    shadow = ShadowScorer.for_config(config(registry.root, shadow_model="2"), registry.load_live(), ServiceMetrics())
    assert shadow.detector.model_version == "2"
    assert shadow.match_window_ms == 30 * trained().config.nominal_interval_ms


def test_for_config_names_what_is_wrong(registry, tmp_path):
    with pytest.raises(ConfigError, match=r"shadow_model='9': version '9' is not in"):
        ShadowScorer.for_config(config(registry.root, shadow_model="9"), registry.load_live())
    single = trained().save(tmp_path / "single")
    with pytest.raises(ConfigError, match="needs model_dir to be a model registry"):
        ShadowScorer.for_config(config(single, shadow_model="2"), trained())
    registry.publish(ModelBundle.untrained(["temp", "current"], hidden_size=4), "3")
    with pytest.raises(ConfigError, match="shadow_model='3': feature schema of version 3 is incompatible"):
        ShadowScorer.for_config(config(registry.root, shadow_model="3"), registry.load_live())
