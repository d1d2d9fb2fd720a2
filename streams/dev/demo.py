"""``sensor-anomaly demo`` (``make demo``): the whole pipeline on one machine, narrated.

Why it exists: a new user's first command. It starts a local Kafka broker, trains a model on the
simulated fleet's normal history (or reuses the one a previous demo trained), starts the service
and the simulator, prints each anomaly event as it arrives, and on Ctrl-C or after ``--seconds``
(``DEMO_SECONDS``) stops everything and prints a summary: readings scored, anomalies injected,
detected, and false alarms.

Matching rule of the summary: an injected anomaly counts as detected when a ``start`` event of its
device falls inside its window or within :data:`DETECTION_GRACE_STEPS` readings after it; any other
``start`` event is a false alarm.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from anomaly.bundle import ModelBundle
from anomaly.errors import BundleError
from anomaly.synthetic import AnomalyRecord, FleetSpec, simulate_fleet
from anomaly.training import fit
from streams.codec import decode_event
from streams.config import ServiceConfig
from streams.dev.localkafka import LocalKafka
from streams.dev.simulator import run_simulator
from streams.http import MetricsServer
from streams.metrics import ServiceMetrics
from streams.processor import StreamProcessor

__all__ = ["DemoOptions", "run_demo"]

logger = logging.getLogger(__name__)

DETECTION_GRACE_STEPS = 30
FLEET_SEED = 7
TRAIN_STEPS = 1500
CYCLE_STEPS = 600


@dataclass
class DemoOptions:
    """Knobs of the demo (see ``sensor-anomaly demo --help``)."""

    seconds: float | None = None
    devices: int = 50
    rate: float = 500.0
    workdir: Path = Path("demo-run")
    metrics_port: int = 9400
    anomaly_rate: float = 1.0


@dataclass
class _Tally:
    injected: list[AnomalyRecord] = field(default_factory=list)
    events: list[dict[str, object]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _spec(devices: int, start_ms: int | None, clean_steps: int) -> FleetSpec:
    return FleetSpec(n_devices=devices, seed=FLEET_SEED, cycle_period_steps=CYCLE_STEPS, start_ms=start_ms,
                     clean_steps=clean_steps)


def _model(workdir: Path, devices: int) -> ModelBundle:
    """Reuse the demo model if it loads and fits this fleet; train it otherwise."""
    path = workdir / "model"
    try:
        bundle = ModelBundle.load(path)
        if bundle.training.get("demo_devices") == devices:
            print(f"[model] reusing {path} ({bundle.name} v{bundle.version}); delete it to retrain")
            return bundle
    except BundleError:
        pass
    print(f"[model] training on {TRAIN_STEPS} normal readings of each of {devices} simulated devices "
          "(once; later demos reuse it)...")
    history = simulate_fleet(_spec(devices, None, TRAIN_STEPS), TRAIN_STEPS).readings
    started = time.perf_counter()
    bundle = fit(history, list(_spec(devices, None, 0).features), time_col="ts", device_col="device_id",
                 name="demo-fleet", version="1", epochs=8, hidden_size=32, progress=True)
    bundle.training.update({"demo_devices": devices, "time_col": "ts", "device_col": "device_id"})
    bundle.save(path)
    print(f"[model] trained in {time.perf_counter() - started:.0f} s; saved to {path}")
    return bundle


def _describe(event: dict[str, object]) -> str:
    ts = datetime.fromtimestamp(int(event["ts_ms"]) / 1000, tz=UTC).strftime("%H:%M:%S")  # type: ignore[arg-type]
    if event["kind"] == "end":
        return f"  ✓ end    {event['device_id']} at {ts}: back to normal"
    contrib = event.get("contributions") or {}
    top = max(contrib, key=contrib.get) if contrib else "?"  # type: ignore[arg-type]
    expected = event.get("expected") or {}
    actual = event.get("actual") or {}
    detail = ""
    if top in expected and top in actual:
        detail = f": {top} expected {expected[top]:.2f}, got {actual[top]:.2f}"  # type: ignore[index]
    share = contrib.get(top, 0.0) if contrib else 0.0  # type: ignore[union-attr]
    return (f"  ! start  {event['device_id']} at {ts} score {float(event['score']):.5f} "  # type: ignore[arg-type]
            f"(threshold {float(event['threshold']):.5f}), driven by {top} ({share:.0%}){detail}")  # type: ignore[arg-type]


def _watch_events(bootstrap: str, topic: str, tally: _Tally, stop: threading.Event) -> None:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None)
    try:
        while not stop.is_set():
            for records in consumer.poll(timeout_ms=300).values():
                for record in records:
                    event = decode_event(record.value)
                    with tally.lock:
                        tally.events.append(event)
                    print(_describe(event), flush=True)
    finally:
        consumer.close()


def summarize(injected: list[AnomalyRecord], events: list[dict[str, object]], interval_ms: int) -> dict[str, int]:
    """Detected injected anomalies and false alarms by the module's matching rule."""
    grace = DETECTION_GRACE_STEPS * interval_ms
    starts = [(str(e["device_id"]), int(e["ts_ms"])) for e in events if e["kind"] == "start"]  # type: ignore[arg-type]
    matched: set[int] = set()
    detected = 0
    for anomaly in injected:
        hit = [i for i, (d, ts) in enumerate(starts)
               if d == anomaly.device_id and anomaly.start_ms <= ts <= anomaly.end_ms + grace]
        if hit:
            detected += 1
            matched.update(hit)
    return {"injected": len(injected), "detected": detected, "false_alarms": len(starts) - len(matched),
            "events": len(events)}


def run_demo(options: DemoOptions) -> int:
    seconds = options.seconds
    if seconds is None and os.environ.get("DEMO_SECONDS"):
        seconds = float(os.environ["DEMO_SECONDS"])
    workdir = options.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    kafka_dir = workdir / "kafka"
    shutil.rmtree(kafka_dir, ignore_errors=True)
    print("[kafka] starting a local single-node KRaft broker (first run downloads the jars)...")
    broker = LocalKafka(data_dir=kafka_dir)
    broker.start()
    print(f"[kafka] broker at {broker.bootstrap}")
    stop = threading.Event()
    tally = _Tally()
    spec = _spec(options.devices, None, clean_steps=60)
    threads: list[threading.Thread] = []
    processor: StreamProcessor | None = None
    server: MetricsServer | None = None
    try:
        bundle = _model(workdir, options.devices)
        config = ServiceConfig(bootstrap_servers=broker.bootstrap, model_dir=workdir / "model",
                               input_partitions=4, metrics_port=options.metrics_port, metrics_host="127.0.0.1")
        metrics = ServiceMetrics(topics=[config.input_topic], process_metrics=True)
        server = MetricsServer(metrics, host=config.metrics_host, port=config.metrics_port).start()
        torch.set_num_threads(config.torch_threads)
        processor = StreamProcessor(config, bundle, metrics)
        processor.connect()
        threads.append(threading.Thread(target=processor.run, name="processor", daemon=True))
        threads.append(threading.Thread(target=_watch_events, args=(broker.bootstrap, config.events_topic, tally, stop),
                                        name="events", daemon=True))
        def injected(record: AnomalyRecord) -> None:
            with tally.lock:
                tally.injected.append(record)
            print(f"  ~ injected {record.kind} on {record.device_id} ({','.join(record.features)})", flush=True)

        threads.append(threading.Thread(
            target=run_simulator, name="simulator", daemon=True,
            kwargs={"spec": spec, "topic": config.input_topic, "bootstrap_servers": broker.bootstrap,
                    "rate_per_s": options.rate, "anomaly_rate": options.anomaly_rate, "on_anomaly": injected,
                    "stop_event": stop}))
        for t in threads:
            t.start()
        print(f"[service] scoring {options.devices} devices at {options.rate:.0f} readings/s; metrics at "
              f"{server.url}/metrics (also /healthz, /readyz). "
              + (f"Stopping after {seconds:.0f} s." if seconds else "Ctrl-C to stop."), flush=True)
        deadline = None if not seconds else time.monotonic() + seconds
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\n[demo] stopping...")
    finally:
        stop.set()
        if processor is not None:
            processor.stop()
        for t in threads:
            t.join(timeout=30)
        if server is not None:
            server.stop()
        broker.stop()
    stats = processor.stats if processor else None
    with tally.lock:
        result = summarize(tally.injected, tally.events, spec.interval_ms)
    print("\n=== summary ===")
    if stats is not None:
        print(f"readings scored: {stats.readings.get('scored', 0)} (warm-up {stats.readings.get('warmup', 0)}, "
              f"dead letters {sum(stats.dead_letters.values())}); commits: {stats.commits}")
    print(f"anomalies injected: {result['injected']}, detected: {result['detected']}, "
          f"false alarms: {result['false_alarms']} (events: {result['events']})")
    print(f"(an injected anomaly counts as detected when a start event of its device falls in its window or "
          f"{DETECTION_GRACE_STEPS} readings after)")
    return 0
