"""Tests for streams/metrics.py: metric values after known calls (private registries), label values
created at startup, and /metrics /healthz /readyz over real HTTP on a free port."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from streams.codec import DeadLetterReason
from streams.metrics import (
    DEAD_LETTER_REASONS,
    EVENT_KINDS,
    LATENCY_BUCKETS_S,
    METRIC_PREFIX,
    READING_OUTCOMES,
    RELOAD_OUTCOMES,
    SCORE_BUCKETS,
    SNAPSHOT_DISCARD_REASONS,
    BatchHistogram,
    ServiceMetrics,
)
from tests.unit.streams.fakes import FakeClock

ALLOWED_LABELS = {"topic", "partition", "kind", "reason", "outcome", "le", "name", "version", "features"}


# ---------------------------------------------------------------------------- registration


def test_known_label_values_exist_at_zero_before_any_observation(metrics: ServiceMetrics) -> None:
    for outcome in READING_OUTCOMES:
        assert metrics.sample("readings_total", outcome=outcome) == 0.0
    for reason in (*DEAD_LETTER_REASONS, "other"):
        assert metrics.sample("dead_letters_total", reason=reason) == 0.0
    for kind in EVENT_KINDS:
        assert metrics.sample("anomaly_events_total", kind=kind) == 0.0
    for reason in SNAPSHOT_DISCARD_REASONS:
        assert metrics.sample("state_snapshots_discarded_total", reason=reason) == 0.0
    for outcome in RELOAD_OUTCOMES:
        assert metrics.sample("model_reloads_total", outcome=outcome) == 0.0
    assert metrics.sample("messages_consumed_total", topic="sensor.readings") == 0.0
    assert metrics.sample("score_count") == 0.0
    assert metrics.sample("end_to_end_latency_seconds_count") == 0.0
    assert metrics.sample("ready") == 0.0
    assert metrics.sample("live") == 1.0


def test_label_values_come_from_the_detector_and_the_codec() -> None:
    assert READING_OUTCOMES == ("scored", "warmup", "duplicate", "out_of_order", "empty", "context", "invalid")
    assert set(DEAD_LETTER_REASONS) == {r.value for r in DeadLetterReason}
    assert {"invalid_json", "missing_field", "non_finite_value", "key_mismatch"} <= set(DEAD_LETTER_REASONS)


def test_every_metric_has_the_prefix_and_only_bounded_labels(metrics: ServiceMetrics) -> None:
    metrics.set_assignment([("sensor.readings", 0)])
    metrics.set_model("lstm", "3", 4, 0.5)
    families = list(metrics.registry.collect())
    assert len(families) > 20
    for family in families:
        assert family.name.startswith(METRIC_PREFIX + "_"), family.name
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, (sample.name, sample.labels)


def test_counters_end_in_total_and_durations_in_seconds(metrics: ServiceMetrics) -> None:
    for family in metrics.registry.collect():
        if family.type == "counter":
            assert any(s.name.endswith("_total") for s in family.samples), family.name
        if "duration" in family.name or "latency" in family.name:
            assert family.name.endswith("_seconds"), family.name


def test_two_instances_with_default_registries_do_not_clash() -> None:
    a, b = ServiceMetrics(), ServiceMetrics()
    a.observe_batch(counts={"scored": 1}, duration_s=0.01)
    assert a.sample("readings_total", outcome="scored") == 1.0
    assert b.sample("readings_total", outcome="scored") == 0.0


def test_process_metrics_are_opt_in() -> None:
    assert "process_cpu_seconds_total" not in ServiceMetrics().metric_names()
    assert "process_cpu_seconds_total" in ServiceMetrics(process_metrics=True).metric_names()


# ---------------------------------------------------------------------------- observe_batch


def test_observe_batch_counts_everything_once(metrics: ServiceMetrics) -> None:
    # float32, as the detector returns them
    scores = np.array([0.05, 0.5, 0.98, 0.99995, np.nan, np.nan], dtype=np.float32)
    latencies = np.array([0.0005, 0.002, 0.002, 0.3, 12.0, np.nan])
    metrics.observe_batch(
        counts={"scored": 4, "warmup": 2, "duplicate": 1, "out_of_order": 0, "invalid": 3},
        duration_s=0.0125,
        messages_by_topic={"sensor.readings": 8, "sensor.readings.b": 2},
        dead_letters=Counter({"invalid_json": 2, "missing_field": 1}),
        events_by_kind={"start": 2, "end": 1},
        e2e_latencies_s=latencies,
        scores=scores,
        gap_resets=1,
    )
    assert metrics.sample("readings_total", outcome="scored") == 4.0
    assert metrics.sample("readings_total", outcome="invalid") == 3.0
    assert metrics.sample("readings_total", outcome="out_of_order") == 0.0
    assert metrics.sample("messages_consumed_total", topic="sensor.readings") == 8.0
    assert metrics.sample("messages_consumed_total", topic="sensor.readings.b") == 2.0
    assert metrics.sample("dead_letters_total", reason="invalid_json") == 2.0
    assert metrics.sample("dead_letters_total", reason="missing_field") == 1.0
    assert metrics.sample("anomaly_events_total", kind="start") == 2.0
    assert metrics.sample("anomaly_events_total", kind="end") == 1.0
    assert metrics.sample("gap_resets_total") == 1.0
    assert metrics.sample("batch_duration_seconds_count") == 1.0
    assert metrics.sample("batch_duration_seconds_sum") == pytest.approx(0.0125)
    assert metrics.sample("batch_duration_seconds_bucket", le="0.01") == 0.0
    assert metrics.sample("batch_duration_seconds_bucket", le="0.025") == 1.0
    # batch size = readings of every outcome
    assert metrics.sample("batch_size_readings_sum") == 10.0
    assert metrics.sample("batch_size_readings_bucket", le="10.0") == 1.0
    # NaN scores (unscored readings) are skipped
    assert metrics.sample("score_count") == 4.0
    assert metrics.sample("score_bucket", le="0.1") == 1.0
    assert metrics.sample("score_bucket", le="0.99") == 3.0
    assert metrics.sample("score_bucket", le="0.9999") == 3.0
    assert metrics.sample("score_bucket", le="0.99999") == 4.0
    assert metrics.sample("score_sum") == pytest.approx(float(np.nansum(scores.astype(np.float64))))
    assert metrics.sample("end_to_end_latency_seconds_count") == 5.0
    assert metrics.sample("end_to_end_latency_seconds_bucket", le="0.001") == 1.0
    assert metrics.sample("end_to_end_latency_seconds_bucket", le="0.0025") == 3.0
    assert metrics.sample("end_to_end_latency_seconds_bucket", le="10.0") == 4.0
    assert metrics.sample("end_to_end_latency_seconds_bucket", le="+Inf") == 5.0


def test_negative_end_to_end_latency_counts_as_zero(metrics: ServiceMetrics) -> None:
    metrics.observe_batch(counts={"scored": 2}, duration_s=0.001, e2e_latencies_s=np.array([-2.0, 0.5]))
    assert metrics.sample("end_to_end_latency_seconds_bucket", le="0.001") == 1.0
    assert metrics.sample("end_to_end_latency_seconds_sum") == 0.5


def test_observe_batch_accumulates_across_batches(metrics: ServiceMetrics) -> None:
    for _ in range(3):
        metrics.observe_batch(counts={"scored": 5}, duration_s=0.001, scores=np.full(5, 0.5))
    assert metrics.sample("readings_total", outcome="scored") == 15.0
    assert metrics.sample("score_count") == 15.0
    assert metrics.sample("batch_duration_seconds_count") == 3.0


def test_unknown_dead_letter_reason_is_counted_as_other(
    metrics: ServiceMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    metrics.observe_batch(counts={}, duration_s=0.001, dead_letters={"brand_new_reason": 3})
    metrics.observe_batch(counts={}, duration_s=0.001, dead_letters={"brand_new_reason": 1})
    assert metrics.sample("dead_letters_total", reason="other") == 4.0
    assert metrics.sample("dead_letters_total", reason="brand_new_reason") is None
    assert sum("brand_new_reason" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"counts": {"exploded": 1}}, "unknown reading outcome 'exploded'"),
        ({"counts": {"scored": -1}}, "must be >= 0"),
        ({"counts": {}, "events_by_kind": {"middle": 1}}, "unknown anomaly event kind 'middle'"),
    ],
)
def test_observe_batch_rejects_unknown_labels(metrics: ServiceMetrics, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        metrics.observe_batch(duration_s=0.001, **kwargs)


def test_batch_histogram_matches_prometheus_histogram() -> None:
    rng = np.random.default_rng(7)
    bounds = LATENCY_BUCKETS_S
    values = np.concatenate([rng.exponential(0.2, 2000), np.array(bounds), [0.0, 50.0, np.inf]])
    ours_reg, ref_reg = CollectorRegistry(), CollectorRegistry()
    ours = BatchHistogram("x_seconds", "x", bounds, registry=ours_reg)
    ref = Histogram("x_seconds", "x", buckets=bounds, registry=ref_reg)
    ours.observe_many(values[:1000])
    ours.observe_many(values[1000:])
    for v in values:
        ref.observe(float(v))
    for le in [*(str(float(b)) for b in bounds), "+Inf"]:
        assert ours_reg.get_sample_value("x_seconds_bucket", {"le": le}) == ref_reg.get_sample_value(
            "x_seconds_bucket", {"le": le}
        ), le
    assert ours_reg.get_sample_value("x_seconds_count") == len(values)
    assert ours_reg.get_sample_value("x_seconds_sum") == ref_reg.get_sample_value("x_seconds_sum") == np.inf
    finite = values[np.isfinite(values)]
    reg2, ref_reg2 = CollectorRegistry(), CollectorRegistry()
    BatchHistogram("y", "y", bounds, registry=reg2).observe_many(finite)
    ref2 = Histogram("y", "y", buckets=bounds, registry=ref_reg2)
    for v in finite:
        ref2.observe(float(v))
    assert reg2.get_sample_value("y_sum") == pytest.approx(ref_reg2.get_sample_value("y_sum"))


def test_batch_histogram_rejects_unsorted_buckets() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        BatchHistogram("z", "z", (1.0, 0.5))


def test_score_buckets_are_dense_near_one() -> None:
    assert SCORE_BUCKETS[-1] == 1.0
    assert sum(b >= 0.99 for b in SCORE_BUCKETS) >= 5


# ---------------------------------------------------------------------------- other state


def test_assignment_creates_lag_series_at_zero_and_removes_revoked(metrics: ServiceMetrics) -> None:
    metrics.set_assignment([("sensor.readings", 0), ("sensor.readings", 1)])
    assert metrics.sample("consumer_lag_messages", topic="sensor.readings", partition="1") == 0.0
    assert metrics.sample("assigned_partitions") == 2.0
    metrics.set_consumer_lag({("sensor.readings", 0): 120, ("sensor.readings", 1): 7})
    assert metrics.sample("consumer_lag_messages", topic="sensor.readings", partition="0") == 120.0
    metrics.set_assignment([("sensor.readings", 1), ("sensor.readings", 2)])
    assert metrics.sample("consumer_lag_messages", topic="sensor.readings", partition="0") is None
    assert metrics.sample("consumer_lag_messages", topic="sensor.readings", partition="1") == 7.0
    assert metrics.sample("consumer_lag_messages", topic="sensor.readings", partition="2") == 0.0
    assert metrics.sample("assigned_partitions") == 2.0
    metrics.set_assignment([])
    assert metrics.sample("assigned_partitions") == 0.0
    assert metrics.sample("consumer_lag_messages", topic="sensor.readings", partition="1") is None


def test_state_restore_changelog_and_device_gauges(metrics: ServiceMetrics) -> None:
    metrics.set_restoring_partitions(2)
    metrics.observe_restore(4.2, devices=1500, discarded={"model_version": 3, "corrupt": 1})
    metrics.set_restoring_partitions(0)
    metrics.add_changelog_bytes(4096)
    metrics.add_changelog_bytes(0)
    metrics.set_active_devices(1499)
    metrics.set_open_episodes(3)
    metrics.add_evictions(5)
    assert metrics.sample("state_restore_duration_seconds_count") == 1.0
    assert metrics.sample("state_restore_duration_seconds_bucket", le="5.0") == 1.0
    assert metrics.sample("state_restore_duration_seconds_bucket", le="2.5") == 0.0
    assert metrics.sample("state_restored_devices_total") == 1500.0
    assert metrics.sample("state_snapshots_discarded_total", reason="model_version") == 3.0
    assert metrics.sample("state_snapshots_discarded_total", reason="corrupt") == 1.0
    assert metrics.sample("restoring_partitions") == 0.0
    assert metrics.sample("changelog_written_bytes_total") == 4096.0
    assert metrics.sample("active_devices") == 1499.0
    assert metrics.sample("open_episodes") == 3.0
    assert metrics.sample("evictions_total") == 5.0
    with pytest.raises(ValueError, match="unknown snapshot discard reason 'stale'"):
        metrics.observe_restore(1.0, devices=0, discarded={"stale": 1})


def test_model_info_is_replaced_on_reload(metrics: ServiceMetrics) -> None:
    metrics.set_model("lstm-fleet", "1", 3, load_duration_s=0.8)
    metrics.observe_model_reload(ok=False)
    metrics.set_model("lstm-fleet", "2", 4, load_duration_s=0.6)
    metrics.observe_model_reload(ok=True)
    assert metrics.sample("model_info", name="lstm-fleet", version="2", features="4") == 1.0
    assert metrics.sample("model_info", name="lstm-fleet", version="1", features="3") is None
    assert metrics.sample("model_load_duration_seconds") == 0.6
    assert metrics.sample("model_reloads_total", outcome="failure") == 1.0
    assert metrics.sample("model_reloads_total", outcome="success") == 1.0


def test_liveness_follows_progress_and_timeout(metrics: ServiceMetrics, clock: FakeClock) -> None:
    assert metrics.liveness()[0]
    clock.now += 31
    live, detail = metrics.liveness()
    assert not live
    assert "no progress for 31.0 s" in detail and "liveness_timeout_s=30" in detail
    assert metrics.sample("live") == 0.0
    metrics.mark_progress()
    assert metrics.liveness()[0]
    assert metrics.sample("live") == 1.0
    assert metrics.sample("last_progress_timestamp_seconds") > 1.6e9


def test_readiness_carries_the_reason(metrics: ServiceMetrics) -> None:
    assert metrics.readiness() == (False, "not ready: starting")
    metrics.set_ready(False, "restoring state for 2 partitions")
    assert metrics.readiness() == (False, "not ready: restoring state for 2 partitions")
    metrics.set_ready(True)
    assert metrics.readiness() == (True, "ready")
    assert metrics.sample("ready") == 1.0


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="liveness_timeout_s"):
        ServiceMetrics(liveness_timeout_s=0)
