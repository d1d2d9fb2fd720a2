"""Helpers for tests that run the stream processor against the real broker.

Why a module: the processor, state and model-reload tests all need to train a small model once,
produce a simulated fleet, run processors in threads and read topics back to the end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from anomaly.bundle import ModelBundle
from anomaly.synthetic import FleetSpec, InjectedAnomaly, simulate_fleet
from anomaly.training import fit
from streams.codec import encode_reading, encode_window
from streams.config import ServiceConfig
from streams.processor import ProcessorStats, StreamProcessor

__all__ = ["FLEET", "ProcessorThread", "consume_all", "fleet_messages", "produce", "train_bundle"]

FLEET = FleetSpec(n_devices=8, seed=11, cycle_period_steps=300, start_ms=1_700_000_000_000, clean_steps=50)
TRAIN_STEPS = 1200


def train_bundle(directory: Path, version: str = "1") -> ModelBundle:
    """A small model trained on the first TRAIN_STEPS clean readings of FLEET, saved to ``directory``."""
    history = simulate_fleet(FLEET, TRAIN_STEPS).readings
    bundle = fit(history, list(FLEET.features), time_col="ts", device_col="device_id", epochs=6,
                 hidden_size=16, progress=False, name="test-fleet", version=version)
    bundle.save(directory)
    return bundle


def fleet_messages(steps: int, first_step: int = TRAIN_STEPS, anomalies: Iterable[InjectedAnomaly] = (),
                   window: int = 1) -> tuple[list[tuple[bytes, bytes]], Any]:
    """Messages (key, value) of FLEET steps [first_step, first_step + steps), time-ordered, with anomalies."""
    run = simulate_fleet(FLEET, first_step + steps, anomalies=list(anomalies))
    frame = run.readings[run.readings["ts"] >= FLEET.ts_of(first_step)]
    features = list(FLEET.features)
    messages = []
    if window == 1:
        for row in frame.itertuples(index=False):
            values = {f: float(getattr(row, f)) for f in features}
            messages.append(encode_reading(row.device_id, int(row.ts), values))
    else:
        for device, part in frame.groupby("device_id", sort=False):
            rows = [(int(r.ts), {f: float(getattr(r, f)) for f in features}) for r in part.itertuples(index=False)]
            for i in range(0, len(rows), window):
                messages.append(encode_window(str(device), rows[i:i + window]))
    return messages, run


def produce(bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes]],
            headers: list[tuple[str, bytes]] | None = None) -> int:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, batch_size=256 * 1024)
    n = 0
    for key, value in messages:
        producer.send(topic, key=key, value=value, headers=headers)
        n += 1
    producer.flush(timeout=60)
    producer.close()
    return n


def consume_all(bootstrap: str, topic: str, *, read_committed: bool = False, idle_s: float = 2.0,
                timeout_s: float = 60.0) -> list[Any]:
    """Every record of ``topic`` from the beginning to its end (waits until ``idle_s`` without news)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest",
                             isolation_level="read_committed" if read_committed else "read_uncommitted")
    parts = consumer.partitions_for_topic(topic) or set()
    if not parts:  # not created yet
        consumer.close()
        return []
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    last_news = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - last_news < idle_s:
        polled = consumer.poll(timeout_ms=200)
        for records in polled.values():
            out.extend(records)
            last_news = time.monotonic()
        if polled:
            continue
        ends = consumer.end_offsets(tps)
        if all(consumer.position(tp) >= ends[tp] for tp in tps) and time.monotonic() - last_news >= idle_s / 2:
            break
    consumer.close()
    return out


def scores_of(records: Iterable[Any]) -> list[dict[str, Any]]:
    """Flatten score-stream records into one dict per reading (partition, offset, device, ts, score, status)."""
    rows = []
    for record in records:
        payload = orjson.loads(record.value)
        for i, offset in enumerate(payload["offset"]):
            rows.append({"partition": payload["partition"], "offset": offset, "device_id": payload["device_id"][i],
                         "ts_ms": payload["ts_ms"][i], "score": payload["score"][i], "status": payload["status"][i]})
    return rows


@dataclass
class ProcessorThread:
    """A StreamProcessor running in a daemon thread until :meth:`stop`."""

    config: ServiceConfig
    bundle: ModelBundle
    processor: StreamProcessor = field(init=False)
    thread: threading.Thread = field(init=False)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.processor = StreamProcessor(self.config, self.bundle)
        self.processor.connect(timeout_s=60)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.processor.run()
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def wait_for(self, condition: Any, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition(self.processor.stats):
            if self.error is not None:
                raise self.error
            if time.monotonic() > deadline:
                raise TimeoutError(f"processor did not reach the condition in {timeout_s} s: {self.processor.stats}")
            time.sleep(0.1)

    def stop(self) -> ProcessorStats:
        self.processor.stop()
        self.thread.join(timeout=60)
        if self.error is not None:
            raise self.error
        return self.processor.stats
