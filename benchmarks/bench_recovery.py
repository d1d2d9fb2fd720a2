"""Recovery and exactly-once cost on a local Kafka broker (issue 4's benchmark).

What it measures, all in one run on one broker (so the figures are comparable on a noisy machine):

1. ``restore_s_10k`` / ``restore_s_100k``: time to restore 10,000 and 100,000 devices from the
   changelog on assignment — :func:`streams.state.changelog.restore_partitions` over the changelog's
   4 partitions (a fresh ``read_committed`` consumer, as a processor's first restore uses), into a
   fresh state store of the benchmark model (LSTM hidden size 64, 4 features: ~610 bytes of state
   per device). The changelog holds one record per bucket (the default 64 per partition, each with
   the state of all its devices, as after compaction) plus commit markers.
   Median of the repetitions.
2. ``eos_throughput_ratio``: readings/s of the service draining the same pre-loaded topic with
   ``exactly_once`` divided by ``at_least_once`` (median of each; runs alternate). The workload is
   the e2e benchmark's: 10,000 devices, 100,000 single-reading messages, 4 partitions,
   ``commit_interval_s=1``. Both modes pay for the changelog (each bucket with a touched device is
   rewritten at each commit); exactly-once adds the transaction round trips and read_committed fetches.
3. Printed, not in the JSON: the same drains at ``commit_interval_s=5`` (changelog bytes per
   reading fall when devices are touched more than once per interval).

Run: ``.venv/bin/python benchmarks/bench_recovery.py [--repeats 3] [--messages 100000]``.
Its LAST line is one JSON object with the keys above. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from kafka import KafkaConsumer, KafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly.bundle import ModelBundle
from anomaly.snapshots import encode_states
from anomaly.state import DeviceStateStore
from streams.codec import encode_reading
from streams.config import ServiceConfig
from streams.dev.localkafka import LocalKafka
from streams.kafka.admin import TopicSpec, admin_client, ensure_topics
from streams.processor import StreamProcessor
from streams.state.changelog import MARKER_KEY, bucket_key, bucket_of, encode_bucket, encode_marker, restore_partitions

FEATURES = ("temp", "vibration", "current", "pressure")
PARTITIONS = 4
BUCKETS = ServiceConfig.changelog_buckets  # the default of the setting
HIDDEN = 64


def log(msg: str) -> None:
    print(msg, flush=True)


def make_topic(bootstrap: str, name: str, configs: dict[str, str] | None = None) -> str:
    admin = admin_client(bootstrap)
    try:
        ensure_topics(admin, {name: TopicSpec(PARTITIONS, configs=configs or {})})
    finally:
        admin.close()
    return name


def fill_changelog(bootstrap: str, topic: str, devices: int, model: ModelBundle) -> int:
    """One record per bucket (random device state) and a marker per partition; returns bytes written."""
    store = DeviceStateStore(model.model.num_layers, model.model.hidden_size, len(FEATURES),
                             model_version=model.version, capacity=devices)
    ids = np.array([f"dev-{i:06d}" for i in range(devices)], dtype=object)
    slots = store.slots_for(ids)
    rng = np.random.default_rng(0)
    index = torch.as_tensor(slots, dtype=torch.long)
    shape = (store.num_layers, devices, store.hidden_size)
    store.h[:, index] = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    store.c[:, index] = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    store.steps[slots] = 50
    store.last_ts[slots] = 1_700_000_000_000
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=1024 * 1024,
                             max_request_size=4 * 1024 * 1024)
    written = 0
    groups: dict[tuple[int, int], list[str]] = {}
    for i, device in enumerate(ids.tolist()):
        groups.setdefault((i % PARTITIONS, bucket_of(device, BUCKETS)), []).append(device)
    for (p, b), members in sorted(groups.items()):
        value = encode_bucket(encode_states(store, members), 1)
        written += len(value)
        producer.send(topic, key=bucket_key(b, BUCKETS), value=value, partition=p)
    for p in range(PARTITIONS):
        producer.send(topic, key=MARKER_KEY, value=encode_marker(1), partition=p)
    producer.flush()
    producer.close()
    return written


def time_restore(bootstrap: str, topic: str, devices: int, model: ModelBundle) -> tuple[float, int]:
    store = DeviceStateStore(model.model.num_layers, model.model.hidden_size, len(FEATURES),
                             model_version=model.version)

    def consumer() -> KafkaConsumer:
        return KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", isolation_level="read_committed",
                             max_partition_fetch_bytes=16 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)

    started = time.perf_counter()
    report = restore_partitions(consumer, topic, range(PARTITIONS), store, buckets=BUCKETS,
                                min_next_offsets={p: 1 for p in range(PARTITIONS)})
    elapsed = time.perf_counter() - started
    assert report.restored == devices == len(store), (report.restored, devices, len(store))
    return elapsed, report.records


def preload(bootstrap: str, topic: str, devices: int, messages: int) -> int:
    rng = np.random.default_rng(1)
    ids = [f"dev-{i:05d}" for i in range(devices)]
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20, batch_size=1024 * 1024)
    steps = max(1, messages // devices)
    n = 0
    for step in range(steps):
        values = rng.normal(size=(devices, len(FEATURES))).round(3)
        for d, device in enumerate(ids):
            key, value = encode_reading(device, 1_700_000_000_000 + step * 1000,
                                        dict(zip(FEATURES, values[d].tolist(), strict=True)))
            producer.send(topic, key=key, value=value)
            n += 1
    producer.flush()
    producer.close()
    return n


def drain(bootstrap: str, model_dir: Path, topic: str, expected: int, guarantee: str,
          commit_interval_s: float) -> tuple[float, dict[str, float]]:
    """Readings/s of one processor draining ``topic`` from the start, first record to the last commit."""
    tag = uuid.uuid4().hex[:6]
    config = ServiceConfig(bootstrap_servers=bootstrap, model_dir=model_dir, input_topic=topic,
                           events_topic=f"{topic}.events", dlq_topic=f"{topic}.dlq", group_id=f"bench-{tag}",
                           processing_guarantee=guarantee, commit_interval_s=commit_interval_s,
                           max_poll_records=10_000, input_partitions=PARTITIONS, transactional_id=f"bench-{tag}")
    processor = StreamProcessor(config, ModelBundle.load(model_dir))
    processor.connect()
    first = None
    deadline = time.monotonic() + 900
    try:
        while time.monotonic() < deadline:
            processor.step()
            done = processor.stats.readings["scored"] + processor.stats.readings["warmup"]
            if done and first is None:
                first = time.perf_counter()
            if done >= expected:
                break
        assert processor.commit(final=True), "the final commit failed"
        elapsed = time.perf_counter() - (first or time.perf_counter())
        stats = processor.stats
        registry = processor.metrics.registry
        changelog_bytes = registry.get_sample_value("sensor_anomaly_changelog_written_bytes_total") or 0.0
    finally:
        processor.close()
    done = stats.readings["scored"] + stats.readings["warmup"]
    assert done >= expected and stats.rewinds == 0, f"{guarantee}: {done} of {expected}, {stats.rewinds} rewinds"
    return done / max(elapsed, 1e-9), {"commits": stats.commits, "changelog_mb": changelog_bytes / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000, help="fleet of the throughput workload")
    parser.add_argument("--messages", type=int, default=100_000, help="single-reading messages to pre-load")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-interval-5", action="store_true", help="skip the commit_interval_s=5 drains")
    args = parser.parse_args()
    from kafka.record import util as kafka_record_util

    crc = "C (crc32c package)" if kafka_record_util.crc32c_c is not None else "pure Python (pip install crc32c!)"
    log(f"# bench_recovery: restore 10k/100k devices; {args.devices} devices x {args.messages} messages, "
        f"{args.repeats} repeats; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
        f"kafka-python CRC-32C: {crc}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        model = ModelBundle.untrained(FEATURES, hidden_size=HIDDEN, name="bench", version="1")
        model.save(model_dir)
        broker = LocalKafka(Path(tmp) / "kafka", jvm_options=["-XX:TieredStopAtLevel=4", "-Xmx1g"])
        broker.start()
        try:
            bootstrap = broker.bootstrap
            restore: dict[int, float] = {}
            for devices in (10_000, 100_000):
                topic = make_topic(bootstrap, f"bench-changelog-{devices}", {"cleanup.policy": "compact"})
                started = time.perf_counter()
                written = fill_changelog(bootstrap, topic, devices, model)
                log(f"changelog of {devices:,} devices: {written / 1e6:.1f} MB written in "
                    f"{time.perf_counter() - started:.1f} s")
                runs = [time_restore(bootstrap, topic, devices, model) for _ in range(args.repeats)]
                times = [t for t, _ in runs]
                restore[devices] = statistics.median(times)
                log(f"restore {devices:,} devices ({runs[0][1]:,} records, {PARTITIONS} partitions): "
                    f"median {restore[devices]:.2f} s of {[round(t, 2) for t in times]} "
                    f"= {devices / restore[devices]:,.0f} devices/s")

            topic = make_topic(bootstrap, "bench-readings")
            sent = preload(bootstrap, topic, args.devices, args.messages)
            log(f"pre-loaded {sent:,} single-reading messages from {args.devices:,} devices")
            intervals = [1.0] if args.skip_interval_5 else [1.0, 5.0]
            medians: dict[tuple[str, float], float] = {}
            for interval in intervals:
                rates: dict[str, list[float]] = {"at_least_once": [], "exactly_once": []}
                repeats = args.repeats if interval == 1.0 else 1
                for r in range(repeats):
                    for guarantee in ("at_least_once", "exactly_once"):
                        rate, extra = drain(bootstrap, model_dir, topic, sent, guarantee, interval)
                        rates[guarantee].append(rate)
                        log(f"commit_interval_s={interval:g} repeat {r + 1} {guarantee}: {rate:,.0f} readings/s, "
                            f"{extra['commits']} commits, {extra['changelog_mb']:.1f} MB of changelog")
                for guarantee, values in rates.items():
                    medians[(guarantee, interval)] = statistics.median(values)
                log(f"commit_interval_s={interval:g}: median at-least-once "
                    f"{medians[('at_least_once', interval)]:,.0f}, exactly-once "
                    f"{medians[('exactly_once', interval)]:,.0f} readings/s, ratio "
                    f"{medians[('exactly_once', interval)] / medians[('at_least_once', interval)]:.2f}")
        finally:
            broker.stop()
    ratio = medians[("exactly_once", 1.0)] / medians[("at_least_once", 1.0)]
    print(json.dumps({"restore_s_10k": round(restore[10_000], 2), "restore_s_100k": round(restore[100_000], 2),
                      "eos_throughput_ratio": round(ratio, 2)}))


if __name__ == "__main__":
    main()
