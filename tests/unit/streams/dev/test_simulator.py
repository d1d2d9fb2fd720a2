"""Unit tests for streams/dev/simulator.py: pacing, windowing, stop conditions and anomaly reporting.

No broker here: an in-process collaborator stands in for the producer and a fake clock for time, so
these tests check the simulator's own logic (what it sends, in which order, how fast by its clock).
Delivery to a real Kafka is the integration tests' job.
"""

from __future__ import annotations

import json
import logging
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from anomaly.synthetic import FleetSpec, FleetStream, InjectedAnomaly, simulate_fleet
from streams.codec import decode_records
from streams.dev.simulator import TokenBucket, run_simulator
from streams.errors import ConfigError

START_MS = 1_718_000_000_000
FEATURES = ["temp", "vibration", "current", "pressure"]


class FakeClock:
    """Monotonic seconds that move only when someone sleeps (or ``advance`` is called)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeFuture:
    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def add_errback(self, fn) -> FakeFuture:
        if self.fail:
            fn(RuntimeError("broker said no"))
        return self


class FakeProducer:
    """Records what is sent, with the fake clock's time of each send."""

    def __init__(self, clock: FakeClock | None = None, fail_every: int = 0, on_send=None) -> None:
        self.clock = clock
        self.sent: list[tuple[str, bytes, bytes, float]] = []
        self.flushed = self.closed = 0
        self.fail_every = fail_every
        self.on_send = on_send

    def send(self, topic, value=None, key=None):
        self.sent.append((topic, key, value, self.clock() if self.clock else 0.0))
        if self.on_send:
            self.on_send(len(self.sent))
        return FakeFuture(bool(self.fail_every) and len(self.sent) % self.fail_every == 0)

    def flush(self, timeout=None):
        self.flushed += 1

    def close(self, timeout=None):
        self.closed += 1

    def records(self):
        return [SimpleNamespace(topic=t, partition=0, offset=i, key=k, value=v, timestamp=-1, headers=[])
                for i, (t, k, v, _) in enumerate(self.sent)]


def _spec(**kw) -> FleetSpec:
    return FleetSpec(**{"n_devices": 5, "seed": 3, "start_ms": START_MS, "cycle_period_steps": 600, **kw})


def test_single_readings_match_the_generator_and_the_codec():
    spec = _spec()
    producer = FakeProducer()
    summary = run_simulator(spec, topic="t.in", producer_factory=lambda: producer, rate_per_s=None,
                            max_readings=23)
    assert (summary.readings_sent, summary.messages_sent, summary.stop_reason) == (23, 23, "max_readings")
    assert summary.ticks == 5  # 23 readings of 5 devices need 5 ticks; the rest of tick 5 is not sent
    assert producer.flushed == 1 and producer.closed == 1
    assert {t for t, *_ in producer.sent} == {"t.in"}
    assert [k for _, k, _, _ in producer.sent[:6]] == [d.encode() for d in spec.device_ids()] + [b"dev-00000"]
    decoded = decode_records(producer.records(), FEATURES, require_key=True)
    assert decoded.dead_letters == [] and len(decoded) == 23
    expected = simulate_fleet(spec, 5).readings.iloc[:23]
    np.testing.assert_array_equal(decoded.batch.device_ids, expected["device_id"].to_numpy(dtype=object))
    np.testing.assert_array_equal(decoded.batch.timestamps_ms, expected["ts"].to_numpy())
    np.testing.assert_allclose(decoded.batch.values, expected[FEATURES].to_numpy(), atol=1e-4)
    assert (summary.first_ts_ms, summary.last_ts_ms) == (START_MS, START_MS + 4_000)


def test_windows_carry_consecutive_readings_of_one_device_and_stop_exactly():
    spec = _spec(n_devices=3)
    producer = FakeProducer()
    summary = run_simulator(spec, producer_factory=lambda: producer, rate_per_s=None, window=4,
                            max_readings=30)
    assert summary.readings_sent == 30
    bodies = [json.loads(v) for _, _, v, _ in producer.sent]
    sizes = [len(b["readings"]) for b in bodies]
    assert sizes == [4] * 7 + [2]  # 7 full windows, then the last one cut to reach exactly 30
    devices = spec.device_ids()
    assert [b["device_id"] for b in bodies] == devices * 2 + devices[:2]
    for (_, key, _, _), body in zip(producer.sent, bodies, strict=True):
        assert key == body["device_id"].encode()
        ts = [r["ts"] for r in body["readings"]]
        assert np.all(np.diff(ts) == spec.interval_ms)
    # per device, windows follow each other in event time without gaps
    dev0 = [r["ts"] for b in bodies if b["device_id"] == "dev-00000" for r in b["readings"]]
    assert dev0 == [START_MS + i * 1000 for i in range(12)]
    decoded = decode_records(producer.records(), FEATURES)
    assert decoded.dead_letters == [] and len(decoded) == 30


def test_token_bucket_paces_to_the_rate_by_the_clock_in_use():
    clock = FakeClock()
    spec = _spec(n_devices=10)
    producer = FakeProducer(clock)
    summary = run_simulator(spec, producer_factory=lambda: producer, rate_per_s=500.0, duration_s=4.0,
                            burst_s=0.1, clock=clock, sleep=clock.sleep)
    assert summary.stop_reason == "duration"
    assert 0.95 * 2_000 <= summary.readings_sent <= 2_000 + 50 + 5  # rate*duration, + burst, + one wait
    t0 = 100.0
    for i, (*_, t) in enumerate(producer.sent):
        assert i + 1 <= 50 + 500.0 * (t - t0) + 500.0 * 0.005 + 1  # the bucket's invariant
    assert min(clock.sleeps) >= 0.005  # waits come in chunks, not one per message
    # event time is tick-driven: 500 readings/s over 10 devices is 50 ticks (50 s of event time) per second
    assert summary.first_ts_ms == START_MS
    assert summary.last_ts_ms == START_MS + (-(-summary.readings_sent // 10) - 1) * 1000
    assert 190 <= summary.ticks <= 206


def test_windowed_pacing_counts_readings_not_messages():
    clock = FakeClock()
    producer = FakeProducer(clock)
    summary = run_simulator(_spec(n_devices=4), producer_factory=lambda: producer, rate_per_s=200.0,
                            duration_s=5.0, window=10, clock=clock, sleep=clock.sleep)
    assert 0.95 * 1_000 <= summary.readings_sent <= 1_000 + 20 + 10
    assert summary.messages_sent * 10 == summary.readings_sent


def test_token_bucket_rejects_bad_rates_and_waits_only_in_debt():
    with pytest.raises(ConfigError, match="rate"):
        TokenBucket(rate=0.0, capacity=1.0)
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, capacity=5.0, clock=clock, wait=clock.sleep, min_wait_s=0.05)
    for _ in range(5):
        bucket.acquire(1)
    assert clock.sleeps == []  # the burst is free
    bucket.acquire(1)  # 0.1 s of debt >= min_wait_s
    assert clock.sleeps == [pytest.approx(0.1)]


def test_anomalies_are_logged_reported_and_summarised(caplog):
    spec = _spec(n_devices=4)
    seen = []
    anomalies = [InjectedAnomaly("dev-00001", "level_shift", 2, 50, ("temp",)),
                 InjectedAnomaly("dev-00003", "spike", 6, 2, ("current",)),  # tick 6 is generated, not sent
                 InjectedAnomaly("dev-00000", "stuck", 40, 5, ("pressure",))]  # never reached
    producer = FakeProducer()
    with caplog.at_level(logging.INFO, logger="streams.dev.simulator"):
        summary = run_simulator(spec, producer_factory=lambda: producer, rate_per_s=None, max_readings=26,
                                anomalies=anomalies, on_anomaly=seen.append)
    assert [(r.device_id, r.kind, r.start_step) for r in seen] == [("dev-00001", "level_shift", 2),
                                                                   ("dev-00003", "spike", 6)]
    assert [(r.device_id, r.kind) for r in summary.anomalies] == [("dev-00001", "level_shift")]
    assert summary.anomalies[0].start_ms == START_MS + 2_000
    frame = summary.anomalies_frame()
    assert frame[["device_id", "kind", "start_ms"]].to_dict("records") == [
        {"device_id": "dev-00001", "kind": "level_shift", "start_ms": START_MS + 2_000}]
    logged = [r.getMessage() for r in caplog.records if "injected" in r.getMessage()]
    assert len(logged) == 2
    assert "level_shift" in logged[0] and "dev-00001" in logged[0] and str(START_MS + 2_000) in logged[0]


def test_rate_based_anomalies_follow_the_stream_and_its_clean_steps():
    spec = _spec(n_devices=40, anomaly_rate=60.0, clean_steps=20)
    producer = FakeProducer()
    summary = run_simulator(spec, producer_factory=lambda: producer, rate_per_s=None, max_readings=40 * 100)
    reference = FleetStream(spec)
    for _ in range(100):
        reference.next_tick()
    assert len(summary.anomalies) > 0
    assert list(summary.anomalies) == reference.records
    assert all(a.start_step >= 20 for a in summary.anomalies)


def test_stop_event_ends_the_run_and_still_flushes():
    stop = threading.Event()
    producer = FakeProducer(on_send=lambda n: stop.set() if n == 7 else None)
    summary = run_simulator(_spec(), producer_factory=lambda: producer, rate_per_s=None, stop_event=stop)
    assert (summary.readings_sent, summary.stop_reason) == (7, "stopped")
    assert producer.flushed == 1 and producer.closed == 1


def test_send_errors_are_counted(caplog):
    producer = FakeProducer(fail_every=4)
    with caplog.at_level(logging.WARNING, logger="streams.dev.simulator"):
        summary = run_simulator(_spec(), producer_factory=lambda: producer, rate_per_s=None, max_readings=20)
    assert summary.send_errors == 5
    assert sum("delivery to" in r.getMessage() for r in caplog.records) == 1


def test_producer_is_closed_when_sending_raises():
    class Exploding(FakeProducer):
        def send(self, topic, value=None, key=None):
            raise RuntimeError("buffer full")

    producer = Exploding()
    with pytest.raises(RuntimeError, match="buffer full"):
        run_simulator(_spec(), producer_factory=lambda: producer, rate_per_s=None, max_readings=5)
    assert producer.flushed == 1 and producer.closed == 1


def test_start_ms_none_starts_event_time_at_the_wall_clock():
    import time

    producer = FakeProducer()
    before = int(time.time() * 1000)
    summary = run_simulator(FleetSpec(n_devices=2, seed=1), producer_factory=lambda: producer,
                            rate_per_s=None, max_readings=2)
    assert before <= summary.first_ts_ms <= int(time.time() * 1000)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "exactly one of bootstrap_servers and producer_factory"),
    ({"producer_factory": FakeProducer, "bootstrap_servers": "localhost:9092"}, "exactly one"),
    ({"producer_factory": FakeProducer, "rate_per_s": 0.0}, "rate_per_s"),
    ({"producer_factory": FakeProducer, "window": 0}, "window"),
    ({"producer_factory": FakeProducer, "max_readings": 0}, "max_readings"),
    ({"producer_factory": FakeProducer, "duration_s": -1.0}, "duration_s"),
    ({"producer_factory": FakeProducer, "burst_s": -1.0}, "burst_s"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        run_simulator(_spec(), **kwargs)
