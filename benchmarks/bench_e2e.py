"""End-to-end throughput and latency of the service on a local Kafka broker (issue 3's benchmark).

What it measures, all in one run on one broker (so the figures are comparable on a noisy machine):

1. ``readings_per_s_single``: the service (StreamProcessor, at-least-once) draining a pre-loaded
   topic of single-reading messages from 10,000 devices (median of the repetitions).
2. ``readings_per_s_windowed``: the same with windows of 10 readings per message.
3. ``consume_ceiling_msgs_per_s``: kafka-python alone consuming the single-reading topic and decoding
   it with the service's codec, no model (the ceiling the service cannot beat).
4. ``p50_ms`` / ``p99_ms``: latency from a reading's produce time (Kafka CreateTime) to its score,
   while one producer process (librdkafka) sends single readings at half the measured
   single-message maximum; medians over ``--latency-repeats`` runs of ``--latency-seconds`` each
   (every run's figures are printed).

Run: ``.venv/bin/python benchmarks/bench_e2e.py [--devices 10000] [--messages 100000]``.
Its LAST line is one JSON object with the keys above. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly.bundle import ModelBundle
from streams.codec import decode_records, encode_reading, encode_window
from streams.config import ServiceConfig
from streams.dev.localkafka import LocalKafka
from streams.kafka.admin import TopicSpec, admin_client, ensure_topics
from streams.processor import StreamProcessor

FEATURES = ("temp", "vibration", "current", "pressure")
PARTITIONS = 4


def log(msg: str) -> None:
    print(msg, flush=True)


def messages(devices: int, total_readings: int, window: int, start_ms: int) -> list[tuple[bytes, bytes]]:
    rng = np.random.default_rng(0)
    ids = [f"dev-{i:05d}" for i in range(devices)]
    out = []
    steps = max(1, total_readings // devices // window)
    for step in range(steps):
        values = rng.normal(size=(devices, window, len(FEATURES))).round(3)
        for d, device in enumerate(ids):
            base = start_ms + (step * window) * 1000
            if window == 1:
                out.append(encode_reading(device, base, dict(zip(FEATURES, values[d, 0].tolist(), strict=True))))
            else:
                rows = [(base + k * 1000, dict(zip(FEATURES, values[d, k].tolist(), strict=True)))
                        for k in range(window)]
                out.append(encode_window(device, rows))
    return out


def message_count(devices: int, total_readings: int, window: int) -> int:
    """How many messages :func:`messages` makes for these arguments."""
    return max(1, total_readings // devices // window) * devices


def _producer_proc(bootstrap: str, topic: str, spec: tuple[int, int, int, int], rate: float | None,
                   sent_per_s: Any = None) -> None:
    """Generate the messages of ``spec`` (devices, readings, window, start ms) and send them with librdkafka.

    At ``rate`` messages/s, or as fast as possible; the achieved rate goes to ``sent_per_s`` (a
    shared double). The messages are generated here, in the producer's own process: a list of
    hundreds of thousands of tuples in the measured service's process made its garbage collector's
    full passes take 0.1-0.2 s, which showed up as latency. And the load generator is confluent-kafka,
    not kafka-python, on purpose: kafka-python spends ~20-50 µs of Python per send, so generating half
    the service's maximum rate took most of one of this machine's two cores away from the service
    being measured. librdkafka sends from C (~1 µs of Python per message); in production the
    producers run on other machines anyway.
    """
    from confluent_kafka import Producer

    payload = messages(*spec)
    producer = Producer({"bootstrap.servers": bootstrap, "acks": 1, "linger.ms": 5,
                         "batch.size": 512 * 1024, "queue.buffering.max.messages": 1_000_000})
    produce, poll = producer.produce, producer.poll
    started = time.perf_counter()
    for i, (key, value) in enumerate(payload):
        if i % 200 == 0:
            poll(0)
            if rate:
                ahead = i / rate - (time.perf_counter() - started)
                if ahead > 0:
                    time.sleep(ahead)
        while True:
            try:
                produce(topic, value=value, key=key)
                break
            except BufferError:  # the local queue is full: let librdkafka drain it
                poll(0.05)
    if producer.flush(60) != 0:
        raise RuntimeError("the load generator could not deliver every message within 60 s")
    if sent_per_s is not None:
        sent_per_s.value = len(payload) / (time.perf_counter() - started)


def preload(bootstrap: str, topic: str, spec: tuple[int, int, int, int]) -> float:
    """Send the messages of ``spec`` as fast as one producer process can; returns its messages/s."""
    sent_per_s = mp.Value("d", 0.0)
    worker = mp.Process(target=_producer_proc, args=(bootstrap, topic, spec, None, sent_per_s))
    worker.start()
    worker.join()
    if worker.exitcode != 0:
        raise RuntimeError(f"the producer process failed (exit code {worker.exitcode})")
    return sent_per_s.value


def make_topic(bootstrap: str, name: str) -> str:
    admin = admin_client(bootstrap)
    ensure_topics(admin, {name: TopicSpec(PARTITIONS)})
    admin.close()
    return name


def drain(bootstrap: str, model_dir: Path, topic: str, expected_readings: int, guarantee: str = "at_least_once",
          collect_latency: bool = False, stop_after_s: float = 600.0,
          commit_interval_s: float = 1.0,
          when_ready: Callable[[], None] | None = None) -> tuple[float, np.ndarray, StreamProcessor]:
    """Run a processor until it has scored ``expected_readings``; returns readings/s (first record to last)."""
    config = ServiceConfig(bootstrap_servers=bootstrap, model_dir=model_dir, input_topic=topic,
                           events_topic=f"{topic}.events", dlq_topic=f"{topic}.dlq",
                           group_id=f"bench-{uuid.uuid4().hex[:6]}",
                           processing_guarantee=guarantee, commit_interval_s=commit_interval_s, max_poll_records=10_000,
                           input_partitions=PARTITIONS)
    torch.set_num_threads(config.torch_threads)
    processor = StreamProcessor(config, ModelBundle.load(model_dir))
    processor.connect()
    latencies: list[np.ndarray] = []
    if collect_latency:
        original = processor._observe

        def observe(decoded, result, duration_s):  # type: ignore[no-untyped-def]
            produced = decoded.produce_ts_ms
            latencies.append((time.time() * 1000.0 - produced[produced >= 0]) / 1000.0)
            original(decoded, result, duration_s)

        processor._observe = observe  # type: ignore[method-assign]
    gc.freeze()  # as run_service does after start-up
    if when_ready is not None:  # producers start once the partitions are assigned and restored
        while not processor.metrics.is_ready():
            processor.step()
        when_ready()
    first = None
    deadline = time.monotonic() + stop_after_s
    while time.monotonic() < deadline:
        before = time.perf_counter()
        processor.step()
        done = processor.stats.readings["scored"] + processor.stats.readings["warmup"]
        if done and first is None:
            first = before  # the clock starts with the first poll that returned readings
        if done >= expected_readings:
            break
    elapsed = time.perf_counter() - (first or time.perf_counter())
    processor.commit(final=True)
    processor.close()
    done = processor.stats.readings["scored"] + processor.stats.readings["warmup"]
    return done / max(elapsed, 1e-9), np.concatenate(latencies) if latencies else np.empty(0), processor


def consume_ceiling(bootstrap: str, topic: str, expected: int) -> float:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"ceiling-{uuid.uuid4().hex[:6]}",
                             auto_offset_reset="earliest", enable_auto_commit=False, max_poll_records=10_000,
                             max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)
    seen, first = 0, None
    deadline = time.monotonic() + 300
    while seen < expected and time.monotonic() < deadline:
        polled = consumer.poll(timeout_ms=200, max_records=10_000)
        records = [r for rs in polled.values() for r in rs]
        if records and first is None:
            first = time.perf_counter()
        if records:
            seen += len(decode_records(records, FEATURES))
    elapsed = time.perf_counter() - (first or time.perf_counter())
    consumer.close()
    return seen / max(elapsed, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=100_000, help="single-reading messages to pre-load")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--latency-repeats", type=int, default=3, help="latency runs; the medians are reported")
    parser.add_argument("--latency-fraction", type=float, default=0.5,
                        help="latency is measured at this fraction of the measured single-message maximum")
    parser.add_argument("--max-rate", type=float, help="skip the throughput runs; take this as the maximum")
    parser.add_argument("--commit-interval", type=float, default=1.0, help="the service's commit_interval_s")
    args = parser.parse_args()
    log(f"# bench_e2e: {args.devices} devices, {args.messages} single-reading messages, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        ModelBundle.untrained(FEATURES, hidden_size=64, name="bench", version="1").save(model_dir)
        broker = LocalKafka(Path(tmp) / "kafka", jvm_options=["-XX:TieredStopAtLevel=4", "-Xmx1g"])
        broker.start()
        try:
            bootstrap = broker.bootstrap
            start_ms = 1_700_000_000_000
            ceilings, singles, windows = [], [], []
            if not args.max_rate:
                single = make_topic(bootstrap, "bench.single")
                n_single = message_count(args.devices, args.messages, 1)
                rate = preload(bootstrap, single, (args.devices, args.messages, 1, start_ms))
                log(f"pre-loaded {n_single} single-reading messages at {rate:,.0f} msgs/s")
                windowed = make_topic(bootstrap, "bench.windowed")
                n_windows = message_count(args.devices, args.messages, 10)
                preload(bootstrap, windowed, (args.devices, args.messages, 10, start_ms))
                log(f"pre-loaded {n_windows} windows of 10 ({n_windows * 10} readings)")
            for r in range(0 if args.max_rate else args.repeats):
                ceilings.append(consume_ceiling(bootstrap, single, n_single))
                singles.append(drain(bootstrap, model_dir, single, n_single,
                                     commit_interval_s=args.commit_interval)[0])
                windows.append(drain(bootstrap, model_dir, windowed, n_windows * 10,
                                     commit_interval_s=args.commit_interval)[0])
                log(f"repeat {r + 1}: consume ceiling {ceilings[-1]:,.0f} msgs/s, service single "
                    f"{singles[-1]:,.0f} readings/s, windowed {windows[-1]:,.0f} readings/s")
            single_rate = args.max_rate or statistics.median(singles)

            target = args.latency_fraction * single_rate
            n = int(target * args.latency_seconds)
            n_latency = message_count(args.devices, n, 1)
            p50s, p99s = [], []
            for r in range(args.latency_repeats):
                latency_topic = make_topic(bootstrap, f"bench.latency.{r}")
                sent_per_s = mp.Value("d", 0.0)
                spec = (args.devices, n, 1, start_ms + 10**9)
                # one librdkafka producer sends the whole fleet in order
                worker = mp.Process(target=_producer_proc, args=(bootstrap, latency_topic, spec, target, sent_per_s))
                _, latencies, _ = drain(bootstrap, model_dir, latency_topic, n_latency, collect_latency=True,
                                        when_ready=worker.start, commit_interval_s=args.commit_interval)
                worker.join()
                lat = latencies * 1000.0
                p50s.append(float(np.percentile(lat, 50)))
                p99s.append(float(np.percentile(lat, 99)))
                log(f"latency repeat {r + 1} at a target of {target:,.0f} readings/s (the producer achieved "
                    f"{sent_per_s.value:,.0f}/s): p50 {p50s[-1]:.1f} ms, p99 {p99s[-1]:.1f} ms "
                    f"over {len(lat)} readings")
            p50, p99 = statistics.median(p50s), statistics.median(p99s)
        finally:
            broker.stop()
    result = {"readings_per_s_single": round(single_rate),
              "readings_per_s_windowed": round(statistics.median(windows)) if windows else None,
              "consume_ceiling_msgs_per_s": round(statistics.median(ceilings)) if ceilings else None,
              "p50_ms": round(p50, 1), "p99_ms": round(p99, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
