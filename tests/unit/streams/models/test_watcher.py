"""Hot reload without a broker: pointer polling, validation and rejection, the state rule at a switch.

The stream tests drive a detector batch by batch exactly as the processor's loop does (poll the
watcher between two batches, apply the hand-over, use the new detector), over a simulated fleet with
known anomalies. The Kafka side (commit before the switch, closing events to the events topic) is
covered by tests/integration/test_model_reload.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytest

from anomaly.bundle import METADATA_FILE, ModelBundle, Scaler
from anomaly.detector import StreamingDetector
from anomaly.events import ReadingStatus
from anomaly.readings import ReadingBatch
from anomaly.registry import LIVE_FILE, ModelRegistry
from streams.config import ServiceConfig
from streams.metrics import ServiceMetrics
from streams.models.watcher import ModelWatcher
from tests.unit.streams.fleet import FLEET, decoded_batches, stream_frame, trained

FEATURES = ("temp", "vibration", "current", "pressure")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def untrained(version: str = "0", features=FEATURES) -> ModelBundle:
    return ModelBundle.untrained(features, hidden_size=8, name="pumps").with_config(warmup_steps=3)


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    reg = ModelRegistry(tmp_path / "models", create=True)
    reg.publish(untrained(), live=True)
    return reg


@pytest.fixture
def metrics() -> ServiceMetrics:
    return ServiceMetrics()


def watcher_for(registry: ModelRegistry, metrics: ServiceMetrics, clock=None) -> ModelWatcher:
    return ModelWatcher(registry, registry.load_live(), metrics, poll_interval_s=5.0, clock=clock or FakeClock())


def reloads(metrics: ServiceMetrics) -> tuple[float | None, float | None]:
    return metrics.sample("model_reloads_total", outcome="success"), metrics.sample("model_reloads_total",
                                                                                   outcome="failure")


def test_nothing_happens_while_the_pointer_names_the_serving_version(registry, metrics):
    watcher = watcher_for(registry, metrics)
    registry.publish(untrained())  # published, not live
    assert watcher.check() is None
    assert reloads(metrics) == (0.0, 0.0)


def test_poll_reads_the_pointer_at_most_every_interval(registry, metrics):
    clock = FakeClock()
    watcher = watcher_for(registry, metrics, clock)
    registry.publish(untrained(), live=True)
    clock.now += 4.9
    assert watcher.poll() is None, "polled before the interval passed"
    clock.now += 0.2
    switch = watcher.poll()
    assert switch is not None and switch.bundle.version == "2"
    assert watcher.poll() is None and watcher.current_version == "2"


def test_a_new_live_version_is_validated_and_handed_over(registry, metrics):
    watcher = watcher_for(registry, metrics)
    old = StreamingDetector(registry.load_live())
    registry.publish(untrained(), live=True)
    switch = watcher.check()
    assert (switch.previous_version, switch.bundle.version, switch.detector.model_version) == ("1", "2", "2")
    assert switch.detector.store.model_version == "2", "changelog snapshots must carry the new version"
    handover = watcher.apply(switch, old)
    assert handover.devices_reset == 0 and handover.closing_events == []
    assert reloads(metrics) == (1.0, 0.0)
    assert metrics.sample("model_info", name="pumps", version="2", features="4") == 1.0


def test_a_broken_bundle_is_rejected_with_a_logged_reason_and_not_retried(registry, metrics, caplog):
    watcher = watcher_for(registry, metrics)
    broken = registry.root / "versions" / "2"
    broken.mkdir()
    (broken / METADATA_FILE).write_text("{ not json")
    (broken / "weights.safetensors").write_bytes(b"\x00" * 64)
    (registry.root / LIVE_FILE).write_text("2\n")  # an operator pointing at it by hand, skipping set_live's checks
    with caplog.at_level(logging.ERROR, logger="streams.models.watcher"):
        assert watcher.check() is None
        assert watcher.check() is None
    rejections = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejections) == 1, "a rejected version is not retried while its files are unchanged"
    assert rejections[0].startswith("model version 2 rejected, still serving version 1: version 2 does not load")
    assert "not valid JSON" in rejections[0]
    assert reloads(metrics) == (0.0, 1.0)
    assert watcher.current_version == "1"
    # a good version made live afterwards is taken
    registry.publish(untrained(), "3", live=True)
    assert watcher.check().bundle.version == "3"
    assert reloads(metrics) == (0.0, 1.0), "success is counted when the switch is applied"


def test_a_rejected_version_is_retried_once_its_files_change(registry, metrics):
    watcher = watcher_for(registry, metrics)
    target = registry.root / "versions" / "2"
    target.mkdir()
    (target / METADATA_FILE).write_text("{}")
    (registry.root / LIVE_FILE).write_text("2\n")
    assert watcher.check() is None
    untrained().with_version("2").save(target)  # repaired in place
    assert watcher.check().bundle.version == "2"
    assert reloads(metrics) == (0.0, 1.0)


def test_a_version_over_other_features_is_rejected(registry, metrics, caplog):
    watcher = watcher_for(registry, metrics)
    registry.publish(untrained(features=("temp", "current")), "2")
    registry.set_live("2", validate=False)
    with caplog.at_level(logging.ERROR, logger="streams.models.watcher"):
        assert watcher.check() is None
    assert "feature schema of version 2 is incompatible with version 1" in caplog.text
    assert reloads(metrics) == (0.0, 1.0)


def test_a_missing_or_garbled_pointer_keeps_the_model_and_warns_once(registry, metrics, caplog):
    watcher = watcher_for(registry, metrics)
    (registry.root / LIVE_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="streams.models.watcher"):
        assert watcher.check() is None and watcher.check() is None
        (registry.root / LIVE_FILE).write_text("!!\n")
        assert watcher.check() is None
    messages = [r.getMessage() for r in caplog.records]
    assert sum("has no LIVE pointer" in m for m in messages) == 1
    assert sum("does not name a valid version" in m for m in messages) == 1
    assert reloads(metrics) == (0.0, 0.0)


def test_for_config_watches_registries_only(registry, tmp_path):
    single = untrained().save(tmp_path / "single")
    config = ServiceConfig(bootstrap_servers="localhost:9092", model_dir=single)
    assert ModelWatcher.for_config(config, untrained()) is None
    config = ServiceConfig(bootstrap_servers="localhost:9092", model_dir=registry.root, model_poll_interval_s=0.5)
    watcher = ModelWatcher.for_config(config, registry.load_live())
    assert watcher is not None and watcher.poll_interval_s == 0.5 and watcher.current_version == "1"


def test_hand_over_carries_timestamps_and_closes_open_episodes(registry, metrics):
    old = StreamingDetector(registry.load_live())
    old.process(ReadingBatch.from_arrays(["a", "b", "a", "b"], [1000, 1000, 2000, 2000], np.zeros((4, 4))))
    old.store.in_episode[old.store.slot_of("b")] = True
    old.store.episode_start[old.store.slot_of("b")] = 1500
    watcher = watcher_for(registry, metrics)
    registry.publish(untrained(), live=True)
    switch = watcher.check()
    handover = watcher.apply(switch, old)
    assert handover.devices_reset == 2
    (end,) = handover.closing_events
    assert (end.device_id, end.kind, end.ts_ms, end.episode_start_ms, end.model_version, end.row) == \
        ("b", "end", 2000, 1500, "1", -1)
    assert metrics.sample("model_switch_state_resets_total") == 2.0
    assert metrics.sample("anomaly_events_total", kind="end") == 1.0, "the closing end event is an event too"
    new = switch.detector
    again = new.process(ReadingBatch.from_arrays(["a", "a"], [2000, 3000], np.zeros((2, 4))))
    assert [ReadingStatus(s).label for s in again.status] == ["duplicate", "warmup"]


def run_stream(registry: ModelRegistry, metrics: ServiceMetrics, switch_at_batch: int | None,
               publish: Callable[[], object], batch_rows: int = 200) -> tuple[list, list[str], list, list]:
    """The processor loop without Kafka: poll the watcher between batches, hand over, process.

    Returns per-batch results, the model version that processed each batch, the (partition, offset) of
    every reading processed, and the closing events.
    """
    clock = FakeClock()
    watcher = ModelWatcher(registry, registry.load_live(), metrics, poll_interval_s=1.0, clock=clock)
    detector = StreamingDetector(watcher.current)
    results, versions, processed, closing = [], [], [], []
    for i, decoded in enumerate(decoded_batches(stream_frame(), batch_rows)):
        if i == switch_at_batch:
            publish()
        clock.now += 0.5
        switch = watcher.poll()
        if switch is not None:
            closing += watcher.apply(switch, detector).closing_events
            detector = switch.detector
        result = detector.process(decoded.batch)
        results.append((decoded, result))
        versions.append(detector.model_version)
        processed += list(zip(decoded.source_partition.tolist(), decoded.source_offset.tolist(), strict=True))
    return results, versions, processed, closing


@pytest.fixture
def fleet_registry(tmp_path) -> ModelRegistry:
    reg = ModelRegistry(tmp_path / "fleet-models", create=True)
    reg.publish(trained(), "1", live=True)
    return reg


def test_a_switch_in_the_middle_of_a_stream_scores_every_reading_once(fleet_registry, metrics):
    bundle = trained()
    results, versions, processed, closing = run_stream(
        fleet_registry, metrics, switch_at_batch=5,
        publish=lambda: fleet_registry.publish(bundle.with_config(smoothing_alpha=0.5), "2", live=True))
    frame = stream_frame()
    assert len(processed) == len(set(processed)) == len(frame), "every reading processed exactly once"
    first_new = versions.index("2")
    assert versions[:first_new] == ["1"] * first_new and set(versions[first_new:]) == {"2"}
    statuses = np.concatenate([r.status for _, r in results])
    assert set(np.unique(statuses).tolist()) <= {ReadingStatus.SCORED, ReadingStatus.WARMUP}
    for _, result in results[first_new:]:
        assert all(e.model_version == "2" for e in result.events)
    for _, result in results[:first_new]:
        assert all(e.model_version == "1" for e in result.events)
    # the state rule: each device's first warmup_steps readings under version 2 are not scored
    decoded, result = results[first_new]
    warm = bundle.config.warmup_steps
    for device in FLEET.device_ids():
        rows = np.flatnonzero(decoded.batch.device_ids == device)
        assert [ReadingStatus(s).label for s in result.status[rows[:warm]]] == ["warmup"] * warm
    assert metrics.sample("model_switch_state_resets_total") == FLEET.n_devices
    assert metrics.sample("model_reloads_total", outcome="success") == 1.0
    assert closing == []


def test_a_switch_during_an_episode_closes_it_with_an_end_event_of_the_old_version(fleet_registry, metrics):
    bundle = trained()
    # find a batch after which a device is inside an episode, in a run without a switch
    results, *_ = run_stream(fleet_registry, ServiceMetrics(), None, publish=lambda: None, batch_rows=20)
    open_after = next(i for i, (decoded, result) in enumerate(results)
                      if result.anomalous[np.flatnonzero(decoded.batch.device_ids == "dev-00001")].any()
                      and result.anomalous[np.flatnonzero(decoded.batch.device_ids == "dev-00001")[-1]])
    results, versions, processed, closing = run_stream(
        fleet_registry, metrics, switch_at_batch=open_after + 1, batch_rows=20,
        publish=lambda: fleet_registry.publish(bundle, "2", live=True))
    assert versions[open_after] == "1" and versions[open_after + 1] == "2"
    assert [(e.device_id, e.kind, e.model_version) for e in closing] == [("dev-00001", "end", "1")]
    started = [e for _, r in results[:open_after + 1] for e in r.events if e.device_id == "dev-00001"]
    assert started[-1].kind == "start" and closing[0].episode_start_ms == started[-1].ts_ms
    assert len(processed) == len(set(processed)) == len(stream_frame())


def test_a_bundle_with_context_is_handed_over_only_to_one_with_the_same_context(tmp_path, metrics, caplog):
    def with_context(context):
        return ModelBundle.untrained(FEATURES, hidden_size=8, name="pumps", context=context).with_config(
            warmup_steps=3)

    registry = ModelRegistry(tmp_path / "models", create=True)
    registry.publish(with_context(("valve", "mode")), live=True)
    watcher = watcher_for(registry, metrics)
    old = StreamingDetector(registry.load_live())
    registry.publish(with_context(("mode", "valve")), "2")
    registry.set_live("2", validate=False)
    with caplog.at_level(logging.ERROR, logger="streams.models.watcher"):
        assert watcher.check() is None
    assert "context schema of version 2 is incompatible with version 1" in caplog.text
    registry.publish(with_context(("valve", "mode")), "3")
    registry.set_live("3", validate=False)  # the registry would compare it with version 2, the pointer's
    switch = watcher.check()
    assert switch is not None and switch.bundle.context == ("valve", "mode")
    assert switch.detector.store.n_context == 2
    values = np.zeros((1, 6), dtype=np.float32)
    values[0, 4:] = [2.0, np.nan]
    old.process(ReadingBatch.from_arrays(["d"], [1000], values))
    switch.detector.bundle.context_scaler = Scaler(np.array([1.0, 0.0], np.float32), np.array([2.0, 1.0], np.float32))
    watcher.apply(switch, old)
    new_store = switch.detector.store
    np.testing.assert_array_equal(new_store.last_context[new_store.slot_of("d")], [0.5, np.nan])  # (2 - 1) / 2
    assert reloads(metrics) == (1.0, 1.0)
