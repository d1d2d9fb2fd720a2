"""Core benchmark: detector throughput against a naive per-reading loop, and state memory per device.

Why it exists: the design rests on two claims (see ``../shared/ARCHITECTURE.md``): batching every
device of a poll through ONE forward pass is far faster than running the model once per message, and
a device's state costs little more than its (h, c) tensors. This script measures both, in one run,
on whatever machine runs it. It is a benchmark, not a test: it asserts nothing and never fails on
slow hardware.

What it measures (fleet of ``--devices`` devices, 4 features, hidden 64, 1 layer by default):

* ``readings_per_s``: ``StreamingDetector.process`` with one reading per device per batch (10,000
  readings per call), devices past warm-up, batches built beforehand (decoding is not timed).
* ``windowed_readings_per_s``: the same with windows of ``--window`` readings per device per call.
* ``naive_readings_per_s``: what a hand-rolled consumer does per reading: look up the device's
  (h, c) in a dict, scale the reading, run the model on ``[1, 1, F]``, store the state back, score
  the residual against the same normal-error model and smooth it. Same model, same readings.
* ``bytes_per_device``: growth of the process's resident memory (RSS, after ``gc.collect``) while a
  :class:`~anomaly.state.DeviceStateStore` takes ``--memory-devices`` devices with realistic ids,
  through the same ``slots_for`` path the detector uses. It includes the slabs (h/c and per-device
  scalars, with the slack of capacity doubling), the id dictionary, the slot list and the id
  strings themselves. tracemalloc's view (Python objects only) is printed beside it.

Threads: torch runs with ONE intra-op thread by default (``--threads``). On a shared 2-core machine two
OpenMP threads spinning against other processes made every figure 3-4x slower (measured: 92k vs 310k
readings/s batched at load average ~3.5); the service should pin its threads the same way.

Each throughput figure is the median of ``--repeats`` timed repetitions, run in rounds (one batched,
one windowed, one naive repetition per round) so that all three see the same machine load; ``speedup``
is the median of the per-round ratios. Progress lines go to stdout
as the run goes; the line before last (``details: {...}``) holds the context (load average before and
after, torch threads, memory breakdown), so a reader can judge a noisy machine; the LAST line is one
JSON object with exactly the five headline numbers.

Run: ``.venv/bin/python benchmarks/bench_core.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from anomaly.bundle import ModelBundle, Scaler
from anomaly.detector import StreamingDetector
from anomaly.events import ReadingStatus
from anomaly.readings import ReadingBatch
from anomaly.scoring import NormalErrorModel, calibrate_threshold, smooth_surprise
from anomaly.state import DeviceStateStore
from anomaly.synthetic import FleetSpec, FleetStream

logger = logging.getLogger("benchmarks.bench_core")

FEATURES = ("temp", "vibration", "current", "pressure")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux); 0 where unavailable."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def make_bundle(hidden: int, layers: int, calibration_devices: int = 500, calibration_steps: int = 300) -> ModelBundle:
    """A bundle with realistic scoring: untrained network, but scaler and normal-error model fitted on the fleet.

    The network's weights do not change throughput (a random head only keeps the forecasts from being
    plain persistence); the scaler, normal-error model and threshold do change how many events fire,
    and events cost Python time. They are fitted the way training does it: scaler on the readings,
    normal-error model and threshold (false-alarm rate 1e-4) on the residuals of another simulated fleet
    (``calibration_devices`` devices, another seed) streamed through the detector, so the timed runs
    raise about as many events as a calibrated service does on normal data: few.
    """
    ids, ts, values = make_ticks(calibration_devices, calibration_steps, seed=1)
    torch.manual_seed(0)
    bundle = ModelBundle.untrained(FEATURES, hidden_size=hidden, num_layers=layers, name="bench")
    with torch.no_grad():
        bundle.model.head.weight.normal_(0, 0.05)
    bundle = replace(bundle, scaler=Scaler.fit(values.reshape(-1, len(FEATURES)))).with_config(warmup_steps=5)
    batch = batch_of(ids, ts, values, 0, len(ts))  # device-major: each device's readings in time order
    result = StreamingDetector(bundle, capacity=len(ids)).process(batch)
    scored = result.status == ReadingStatus.SCORED
    residuals = bundle.scaler.transform(batch.values[scored]) - bundle.scaler.transform(result.expected[scored])
    scorer = NormalErrorModel.fit(residuals)
    surprise = scorer.surprise(residuals).reshape(len(ids), -1)
    smoothed = smooth_surprise(surprise, np.ones_like(surprise, dtype=bool), np.zeros(len(ids), np.float32),
                               bundle.config.smoothing_alpha)
    threshold = max(calibrate_threshold(smoothed.ravel(), 1e-4), 1.0)
    return replace(bundle, scorer=scorer).with_config(threshold=threshold)


def make_ticks(devices: int, steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``steps`` readings of every device: ids [D], timestamps [steps], values [steps, D, F] float32."""
    spec = FleetSpec(n_devices=devices, features=FEATURES, seed=seed, cycle_period_steps=600)
    stream = FleetStream(spec)
    values = np.empty((steps, devices, len(FEATURES)), dtype=np.float32)
    for t in range(steps):
        stream.next_tick_into(values[t])
    ts = np.asarray([spec.ts_of(t) for t in range(steps)], dtype=np.int64)
    return np.asarray(stream.device_ids, dtype=object), ts, values


def batch_of(ids: np.ndarray, ts: np.ndarray, values: np.ndarray, first: int, count: int) -> ReadingBatch:
    """Readings of steps ``first .. first+count-1`` of every device, device-major (windows of ``count``)."""
    d = len(ids)
    block = values[first:first + count]  # [count, D, F]
    return ReadingBatch(
        device_ids=np.repeat(ids, count),
        timestamps_ms=np.tile(ts[first:first + count], d),
        values=np.ascontiguousarray(block.transpose(1, 0, 2).reshape(d * count, -1)),
    )


Runner = Callable[[], int]
"""One timed repetition: processes some readings and returns how many."""


def interleaved(runners: dict[str, Runner], rounds: int) -> dict[str, list[float]]:
    """Readings/s of each runner, one repetition of each per round, so all see the same machine load.

    On a shared machine the load changes within seconds; running the three measurements one after
    the other would compare them under different loads. Rounds interleave them instead.
    """
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            readings = run()
            elapsed = time.perf_counter() - start
            rates[name].append(readings / elapsed)
            log(f"  round {r + 1}/{rounds} {name}: {readings:,} readings in {elapsed:.3f} s "
                f"= {rates[name][-1]:,.0f} readings/s (load {load_average()[:1]})")
    for name, values in rates.items():
        log(f"{name}: median {statistics.median(values):,.0f} readings/s "
            f"(min {min(values):,.0f}, max {max(values):,.0f})")
    return rates


def batched_runner(bundle: ModelBundle, ids: np.ndarray, ts: np.ndarray, values: np.ndarray, window: int,
                   batches_per_repeat: int, repeats: int, warm_steps: int) -> tuple[Runner, list[int]]:
    """A repetition of ``StreamingDetector.process`` calls with ``window`` readings per device per call,
    and a one-element list counting the anomaly events they raised."""
    detector = StreamingDetector(bundle, capacity=len(ids))
    detector.process(batch_of(ids, ts, values, 0, warm_steps))  # past warm-up: every timed reading is scored
    step = warm_steps
    # built beforehand: decoding messages into batches is the codec's cost, not the detector's
    batches = []
    for _ in range(repeats * batches_per_repeat):
        batches.append(batch_of(ids, ts, values, step, window))
        step += window
    it = iter(batches)
    events = [0]

    def run() -> int:
        n = 0
        for _ in range(batches_per_repeat):
            batch = next(it)
            result = detector.process(batch)
            events[0] += len(result.events)
            n += len(batch)
        if result.counts()["scored"] != len(batch):  # a sanity check of the setup, not a test
            raise RuntimeError(f"expected every reading scored, got {result.counts()}")
        return n

    return run, events


def naive_runner(bundle: ModelBundle, ids: np.ndarray, ts: np.ndarray, values: np.ndarray, readings: int,
                 warm_steps: int) -> Runner:
    """A repetition of a hand-rolled consumer that runs the model once per reading.

    Per reading: dict lookup of the device's state, scale, model on ``[1, 1, F]``, store the state
    back, residual against the previous forecast, surprise from the same normal-error model, EMA.
    """
    model, scaler, scorer, cfg = bundle.model.eval(), bundle.scaler, bundle.scorer, bundle.config
    alpha = float(cfg.smoothing_alpha)
    states: dict[str, tuple[torch.Tensor, torch.Tensor, np.ndarray, float, int]] = {}
    zero = model.zero_state(1)
    d = len(ids)

    def consume(device: str, value: np.ndarray) -> float:
        h, c, last_pred, smoothed, steps = states.get(device, (zero[0], zero[1], None, 0.0, 0))
        x = scaler.transform(value[None, :])  # [1, F]
        with torch.inference_mode():
            pred, (h, c) = model(torch.from_numpy(x[None]), (h, c))  # [1, 1, F]
        score = float("nan")
        if last_pred is not None and steps >= cfg.warmup_steps:
            surprise = float(scorer.surprise(x - last_pred)[0])
            smoothed = alpha * surprise + (1.0 - alpha) * smoothed  # the EMA the detector applies
            score = 1.0 - 10.0 ** -smoothed
        states[device] = (h, c, pred[0].numpy(), smoothed, steps + 1)
        return score

    k = min(d, readings)  # the devices the naive loop cycles through
    for t in range(warm_steps):  # the same warm-up as the batched runs, for every device it times
        for j in range(k):
            consume(ids[j], values[t, j])
    cursor = [0]

    def run() -> int:
        for _ in range(readings):
            t, j = divmod(cursor[0], k)
            consume(ids[j], values[(warm_steps + t) % len(values), j])
            cursor[0] += 1
        return readings

    return run


def realistic_ids(n: int, start: int = 0) -> np.ndarray:
    """Device ids shaped like real Kafka keys: ``site-0042/line-07/sensor-00123456`` (33 characters)."""
    return np.asarray([f"site-{i % 97:04d}/line-{i % 13:02d}/sensor-{i:08d}" for i in range(start, start + n)],
                      dtype=object)


def bench_memory(devices: int, hidden: int, layers: int, n_features: int, chunk: int = 10_000) -> dict[str, float]:
    """Bytes per device of a DeviceStateStore holding ``devices`` devices (RSS growth and a breakdown)."""
    gc.collect()
    rss0 = rss_bytes()
    tracemalloc.start()
    store = DeviceStateStore(layers, hidden, n_features, model_version="bench")
    done = 0
    while done < devices:
        count = min(chunk, devices - done)
        store.slots_for(realistic_ids(count, done))  # the detector's path for new devices
        done += count
        if done % 200_000 == 0 or done == devices:
            grown = (rss_bytes() - rss0) / 2**20
            log(f"  memory: {done:,} devices, capacity {store.capacity:,}, RSS +{grown:,.0f} MiB")
    gc.collect()
    python_objects, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = rss_bytes()
    out = {
        "devices": len(store),
        "capacity": store.capacity,
        "rss_bytes_per_device": (rss1 - rss0) / devices,
        "slab_bytes_per_device": store.nbytes() / devices,
        "slab_bytes_per_slot": store.nbytes() / store.capacity,
        "tracemalloc_bytes_per_device": python_objects / devices,
        "tracemalloc_peak_bytes_per_device": python_peak / devices,
        "hc_bytes_per_device": 2 * layers * hidden * 4,
    }
    del store
    gc.collect()
    return out


def memory_in_child(devices: int, hidden: int, layers: int) -> dict[str, float]:
    """Run :func:`bench_memory` in a fresh interpreter: its RSS delta then owes nothing to this process's heap."""
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", str(devices), "--hidden", str(hidden),
           "--layers", str(layers)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    lines = proc.stdout.strip().splitlines()
    for line in lines[:-1]:
        print(line, flush=True)
    return dict(json.loads(lines[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000, help="fleet size for throughput (default 10,000)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--window", type=int, default=10, help="readings per device per call, windowed run")
    parser.add_argument("--batches", type=int, default=10, help="process() calls per timed repetition")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--naive-readings", type=int, default=5_000, help="readings per naive repetition")
    parser.add_argument("--memory-devices", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; 0 keeps torch's default (default: 1, see the module docstring)")
    parser.add_argument("--quick", action="store_true", help="small smoke run (not for reporting)")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(bench_memory(args.memory_child, args.hidden, args.layers, len(FEATURES))), flush=True)
        return 0
    if args.quick:
        args.devices, args.batches, args.repeats = 1_000, 3, 3
        args.naive_readings, args.memory_devices = 500, 50_000
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    context = {
        "devices": args.devices, "features": len(FEATURES), "hidden": args.hidden, "layers": args.layers,
        "window": args.window, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
    }
    log(f"bench_core: {context}; load average {load_average()}")

    warm = 8
    steps = warm + args.window * args.batches * args.repeats
    log(f"simulating {args.devices:,} devices x {steps} steps ...")
    ids, ts, values = make_ticks(args.devices, steps)
    bundle = make_bundle(args.hidden, args.layers)
    log(f"bundle calibrated: threshold {bundle.config.threshold:.2f} (smoothed surprise)")

    log(f"memory: DeviceStateStore with {args.memory_devices:,} devices (realistic ids), in a fresh process ...")
    memory = memory_in_child(args.memory_devices, args.hidden, args.layers)
    log("memory: " + ", ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v:,}" for k, v in memory.items()))

    log("throughput: building batches and warming devices up ...")
    run_batched, events_batched = batched_runner(bundle, ids, ts, values, 1, args.window * args.batches,
                                                 args.repeats, warm)
    run_windowed, events_windowed = batched_runner(bundle, ids, ts, values, args.window, args.batches,
                                                   args.repeats, warm)
    run_naive = naive_runner(bundle, ids, ts, values, args.naive_readings, warm)
    load_before = load_average()
    log(f"throughput: {args.repeats} rounds of batched, windowed and naive repetitions; load average {load_before}")
    rates = interleaved({"batched": run_batched, "windowed": run_windowed, "naive": run_naive}, args.repeats)
    load_after = load_average()
    log(f"load average before/after the throughput runs: {load_before} / {load_after}; anomaly events raised: "
        f"{events_batched[0]} batched, {events_windowed[0]} windowed")
    batched, windowed, naive = (statistics.median(rates[k]) for k in ("batched", "windowed", "naive"))
    # the ratio within each round compares runs under the same load
    speedup = statistics.median(b / n for b, n in zip(rates["batched"], rates["naive"], strict=True))

    details = {
        **context, "windowed_speedup": round(statistics.median(
            w / n for w, n in zip(rates["windowed"], rates["naive"], strict=True)), 1),
        "rates": {k: [round(v) for v in vs] for k, vs in rates.items()}, "memory": memory,
        "load_average_before": load_before, "load_average_after": load_after,
    }
    print("details: " + json.dumps(details), flush=True)
    summary = {
        "readings_per_s": round(batched),
        "windowed_readings_per_s": round(windowed),
        "naive_readings_per_s": round(naive),
        "speedup": round(speedup, 1),
        "bytes_per_device": round(memory["rss_bytes_per_device"], 1),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
