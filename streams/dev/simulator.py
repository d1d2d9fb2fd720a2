"""A simulated sensor fleet producing to Kafka, with injected anomalies, for demos and load tests.

Why this module exists: the demo, the end-to-end tests and the load benchmarks need a stream of
realistic readings on ``sensor.readings`` whose anomalies are known. The readings come from
:class:`anomaly.synthetic.FleetStream` (vectorised across devices); this module only paces them,
encodes them with :mod:`streams.codec` and hands them to a kafka-python ``KafkaProducer``. It must not
invent its own message format (the codec owns it) or its own signal model (the core owns it).

**Pacing rule.** Wall-clock pacing and event time are independent:

* *Wall clock*: a token bucket admits ``rate_per_s`` readings per second on average (bursts up to
  ``burst_s * rate_per_s`` readings); a window message of W readings takes W tokens. ``rate_per_s=None``
  sends as fast as the producer accepts.
* *Event time* advances by ticks: each tick is one reading per device, ``interval_ms`` after the
  previous tick. So event time advances ``rate_per_s * interval_ms / n_devices`` ms per wall second:
  it runs faster than wall time when ``rate_per_s > n_devices * 1000 / interval_ms`` and slower when
  it is lower (event time then drifts behind the wall clock). ``spec.start_ms=None`` starts event
  time at the wall clock.

**Windowing.** With ``window=W`` the simulator generates W ticks, then sends one message per device
carrying that device's W consecutive readings (:func:`~streams.codec.encode_window`); ``window=1``
sends single readings (:func:`~streams.codec.encode_reading`). Each device's readings go out in
event-time order; devices interleave in device order within a block. Values are rounded to 4
decimals on the wire (far below any sensor's noise), so a decoded value may differ from the
generator's by < 1e-4.

Every injected anomaly is logged at INFO (device, kind, start) and passed to ``on_anomaly`` when its
tick is generated, i.e. just before its first reading is sent. :class:`SimulatorSummary` lists only
those whose first reading was actually sent.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import pandas as pd

from anomaly.synthetic import AnomalyRecord, FleetSpec, FleetStream, InjectedAnomaly, records_frame
from streams.codec import encode_reading, encode_window
from streams.errors import BrokerUnavailableError, ConfigError

__all__ = ["DEFAULT_PRODUCER_CONFIG", "ProducerLike", "SimulatorSummary", "TokenBucket", "run_simulator"]

logger = logging.getLogger(__name__)

DEFAULT_PRODUCER_CONFIG: dict[str, Any] = {
    "client_id": "sensor-anomaly-simulator",
    "linger_ms": 10,          # a few ms of batching lifts kafka-python's throughput several-fold
    "batch_size": 256 * 1024,  # readings are ~150 bytes: room for ~1,700 per partition batch
}
"""KafkaProducer settings the simulator uses unless ``producer_config`` overrides them."""

_WIRE_DECIMALS = 4
"""Decimals kept on the wire: below every simulated sensor's noise, and short JSON."""


class ProducerLike(Protocol):
    """What the simulator needs of a producer; kafka-python's ``KafkaProducer`` fits.

    ``send`` may return a future with ``add_errback`` (failures are then counted); ``close`` is
    optional.
    """

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> Any: ...

    def flush(self, timeout: float | None = None) -> None: ...


class TokenBucket:
    """Admits ``rate`` tokens per second on average, with bursts of up to ``capacity`` tokens.

    The balance may go negative (debt): :meth:`acquire` only waits once the debt amounts to
    ``min_wait_s`` of tokens, and then waits until it is paid off. That keeps the long-run rate
    exact while sleeping in chunks of at least ``min_wait_s`` instead of once per message. At any
    time, tokens taken since the start <= ``capacity + rate * elapsed + rate * min_wait_s``.

    Examples
    --------
    >>> now = [0.0]
    >>> bucket = TokenBucket(rate=100.0, capacity=10.0, clock=lambda: now[0],
    ...                      wait=lambda s: now.__setitem__(0, now[0] + s), min_wait_s=0.01)
    >>> for _ in range(30):
    ...     bucket.acquire(1)
    >>> round(now[0], 3)  # 10 from the burst, then 20 more at 100/s
    0.2
    """

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic,
                 wait: Callable[[float], object] = time.sleep, min_wait_s: float = 0.005) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ConfigError(f"token bucket rate must be > 0 per second, got {rate}")
        if capacity < 0:
            raise ConfigError(f"token bucket capacity must be >= 0, got {capacity}")
        self.rate = float(rate)
        self.capacity = float(capacity)
        self.min_wait_s = float(min_wait_s)
        self._clock = clock
        self._wait = wait
        self._tokens = self.capacity
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def acquire(self, n: float) -> None:
        """Take ``n`` tokens, waiting (via ``wait``) when the debt reaches ``min_wait_s`` of tokens."""
        self._refill()
        self._tokens -= n
        if self._tokens < 0:
            debt_s = -self._tokens / self.rate
            if debt_s >= self.min_wait_s:
                self._wait(debt_s)
                self._refill()


@dataclass(frozen=True)
class SimulatorSummary:
    """What a :func:`run_simulator` run did.

    Attributes
    ----------
    readings_sent, messages_sent : int
        Readings and messages handed to the producer (a window message carries several readings).
    send_errors : int
        Messages whose delivery failed (reported by the producer's futures, counted after the flush).
    ticks : int
        Ticks generated (each is one reading per device).
    first_ts_ms, last_ts_ms : int or None
        Event time of the first and the last reading sent.
    wall_s : float
        Wall-clock duration (by the ``clock`` in use).
    stop_reason : str
        ``max_readings``, ``duration`` or ``stopped`` (the stop event was set).
    anomalies : tuple of AnomalyRecord
        Anomalies whose first reading was sent, in start order (windows may run past the end).
    """

    readings_sent: int
    messages_sent: int
    send_errors: int
    ticks: int
    first_ts_ms: int | None
    last_ts_ms: int | None
    wall_s: float
    stop_reason: str
    anomalies: tuple[AnomalyRecord, ...]

    @property
    def readings_per_s(self) -> float:
        """Achieved rate over the run."""
        return self.readings_sent / self.wall_s if self.wall_s > 0 else float("nan")

    def anomalies_frame(self) -> pd.DataFrame:
        """The anomalies as a truth table, columns as :attr:`anomaly.synthetic.SimulatedFleet.anomalies`."""
        return records_frame(self.anomalies)


def _make_producer(bootstrap_servers: str, config: Mapping[str, Any]) -> ProducerLike:
    from kafka import KafkaProducer  # imported here so the pacing logic can be used without kafka-python
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError

    try:  # kafka-python 3 bootstraps in the constructor and times out (bootstrap_timeout_ms) without a broker
        return KafkaProducer(bootstrap_servers=bootstrap_servers, **{**DEFAULT_PRODUCER_CONFIG, **config})
    except (KafkaTimeoutError, KafkaConnectionError) as exc:
        raise BrokerUnavailableError(f"no Kafka broker answered at {bootstrap_servers!r}: {exc}") from exc


class _Errors:
    """Counts failed deliveries; kafka-python calls errbacks from its I/O thread."""

    def __init__(self, topic: str) -> None:
        self.count = 0
        self._lock = threading.Lock()
        self._topic = topic

    def __call__(self, exc: BaseException) -> None:
        with self._lock:
            self.count += 1
            first = self.count == 1
        if first:
            logger.warning("delivery to %s failed (further failures are only counted): %r", self._topic, exc)


def run_simulator(
    spec: FleetSpec,
    *,
    topic: str = "sensor.readings",
    bootstrap_servers: str | None = None,
    producer_factory: Callable[[], ProducerLike] | None = None,
    producer_config: Mapping[str, Any] | None = None,
    rate_per_s: float | None = 1_000.0,
    duration_s: float | None = None,
    max_readings: int | None = None,
    window: int = 1,
    anomaly_rate: float | None = None,
    anomalies: Sequence[InjectedAnomaly] | None = None,
    on_anomaly: Callable[[AnomalyRecord], None] | None = None,
    stop_event: threading.Event | None = None,
    burst_s: float = 0.1,
    flush_timeout_s: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] | None = None,
) -> SimulatorSummary:
    """Produce the readings of a simulated fleet to ``topic`` until a stop condition holds.

    Stops at the first of: ``max_readings`` readings sent (exactly; the last window may be short),
    ``duration_s`` wall seconds elapsed, ``stop_event`` set. With none of them it runs until
    interrupted. Flushes, then closes the producer (which it always owns) before returning.

    Parameters
    ----------
    spec : FleetSpec
        The fleet; ``start_ms=None`` starts event time at the wall clock.
    topic : str
        Target topic; key = device id (UTF-8), value from :mod:`streams.codec`.
    bootstrap_servers, producer_factory
        Exactly one: a ``KafkaProducer`` is built from ``bootstrap_servers`` (with
        :data:`DEFAULT_PRODUCER_CONFIG` updated by ``producer_config``, e.g. security options), or
        ``producer_factory()`` returns the producer.
    rate_per_s : float or None
        Wall-clock rate in readings per second (see the module docstring); ``None``: unpaced.
    duration_s, max_readings, stop_event
        Stop conditions.
    window : int
        Readings per message (1: single-reading messages).
    anomaly_rate, anomalies
        Rate-based anomalies per device-hour (``None``: ``spec.anomaly_rate``) and explicit ones,
        as :class:`~anomaly.synthetic.FleetStream` takes them.
    on_anomaly : callable, optional
        Called with each :class:`~anomaly.synthetic.AnomalyRecord` as its tick is generated.
    burst_s : float
        Token-bucket capacity in seconds of ``rate_per_s``.
    flush_timeout_s : float
        Longest wait for outstanding deliveries at the end.
    clock, sleep
        Time source and wait function (injectable for tests); ``sleep=None`` waits on ``stop_event``
        when given (so a stop is immediate), else ``time.sleep``.

    Returns
    -------
    SimulatorSummary

    Notes
    -----
    Cost per tick: one vectorised :meth:`FleetStream.next_tick`; per message: building a dict of F
    values, one JSON encode and one ``producer.send``. The per-message part dominates.

    Examples
    --------
    >>> class Collect:
    ...     def __init__(self): self.sent = []
    ...     def send(self, topic, value=None, key=None): self.sent.append((key, value))
    ...     def flush(self, timeout=None): pass
    >>> out = Collect()
    >>> spec = FleetSpec(n_devices=3, start_ms=1_718_000_000_000)
    >>> summary = run_simulator(spec, producer_factory=lambda: out, rate_per_s=None, max_readings=4)
    >>> summary.readings_sent, summary.ticks, out.sent[3][0]
    (4, 2, b'dev-00000')
    >>> out.sent[0][1]
    b'{"device_id":"dev-00000","ts":1718000000000,"values":{"temp":...,"vibration":...,"current":...,"pressure":...}}'
    """
    if (bootstrap_servers is None) == (producer_factory is None):
        raise ConfigError("run_simulator needs exactly one of bootstrap_servers and producer_factory")
    if rate_per_s is not None and not (math.isfinite(rate_per_s) and rate_per_s > 0):
        raise ConfigError(f"rate_per_s must be > 0 readings per second (or None: unpaced), got {rate_per_s}")
    if int(window) < 1:
        raise ConfigError(f"window must be >= 1 reading per message, got {window}")
    if max_readings is not None and int(max_readings) < 1:
        raise ConfigError(f"max_readings must be >= 1 (or None), got {max_readings}")
    if duration_s is not None and not duration_s > 0:
        raise ConfigError(f"duration_s must be > 0 (or None), got {duration_s}")
    if not burst_s >= 0:
        raise ConfigError(f"burst_s must be >= 0, got {burst_s}")
    window = int(window)
    if spec.start_ms is None:
        spec = replace(spec, start_ms=int(time.time() * 1000))
    stream = FleetStream(spec, anomaly_rate=anomaly_rate, anomalies=anomalies)
    wait = sleep if sleep is not None else (stop_event.wait if stop_event is not None else time.sleep)
    bucket = (TokenBucket(rate_per_s, max(float(window), burst_s * rate_per_s), clock=clock, wait=wait)
              if rate_per_s is not None else None)
    producer = (producer_factory() if producer_factory is not None
                else _make_producer(str(bootstrap_servers), dict(producer_config or {})))
    logger.info("simulating %d devices x %s to %s at %s readings/s, window %d, event interval %d ms, from %d",
                spec.n_devices, list(spec.features), topic, "unpaced" if rate_per_s is None else rate_per_s,
                window, spec.interval_ms, spec.start_ms)

    n_dev, n_feat = spec.n_devices, len(spec.features)
    ids = spec.device_ids()
    features = spec.features
    errors = _Errors(topic)
    last_sent_step = np.full(n_dev, -1, dtype=np.int64)
    block = np.empty((window, n_dev, n_feat), dtype=np.float32)
    started: list[AnomalyRecord] = []
    sent = messages = 0
    first_ts: int | None = None
    last_ts: int | None = None
    stop_reason = "stopped"
    t0 = clock()
    deadline = None if duration_s is None else t0 + float(duration_s)

    def should_stop() -> bool:
        nonlocal stop_reason
        if max_readings is not None and sent >= max_readings:
            stop_reason = "max_readings"
        elif deadline is not None and clock() >= deadline:
            stop_reason = "duration"
        elif stop_event is not None and stop_event.is_set():
            stop_reason = "stopped"
        else:
            return False
        return True

    try:
        done = False
        while not done and not should_stop():
            first_step = stream.step
            for w in range(window):
                stream.next_tick_into(block[w])
                for rec in stream.pop_started():
                    logger.info("injected %s anomaly on device %s at %d ms (step %d), features %s, %d steps",
                                rec.kind, rec.device_id, rec.start_ms, rec.start_step, ",".join(rec.features),
                                rec.end_step - rec.start_step)
                    started.append(rec)
                    if on_anomaly is not None:
                        on_anomaly(rec)
            stamps = [spec.ts_of(first_step + w) for w in range(window)]
            rows = np.ascontiguousarray(  # [D][W][F] nested lists of Python floats, one tolist per block
                np.round(block.astype(np.float64), _WIRE_DECIMALS).transpose(1, 0, 2)).tolist()
            for d in range(n_dev):
                n = window if max_readings is None else min(window, max_readings - sent)
                if bucket is not None:
                    bucket.acquire(n)
                if should_stop():
                    done = True
                    break
                row = rows[d]
                if window == 1:
                    key, value = encode_reading(ids[d], stamps[0], dict(zip(features, row[0], strict=False)))
                else:
                    key, value = encode_window(
                        ids[d], [(stamps[w], dict(zip(features, row[w], strict=False))) for w in range(n)])
                future = producer.send(topic, value=value, key=key)
                if future is not None and hasattr(future, "add_errback"):
                    future.add_errback(errors)
                sent += n
                messages += 1
                last_sent_step[d] = first_step + n - 1
                first_ts = stamps[0] if first_ts is None else first_ts
                last_ts = stamps[n - 1] if last_ts is None else max(last_ts, stamps[n - 1])
    finally:
        producer.flush(timeout=flush_timeout_s)
        close = getattr(producer, "close", None)
        if close is not None:
            close(timeout=flush_timeout_s)

    index = {d: i for i, d in enumerate(ids)}
    delivered = tuple(r for r in started if r.start_step <= last_sent_step[index[r.device_id]])
    summary = SimulatorSummary(
        readings_sent=sent, messages_sent=messages, send_errors=errors.count, ticks=stream.step,
        first_ts_ms=first_ts, last_ts_ms=last_ts, wall_s=clock() - t0, stop_reason=stop_reason,
        anomalies=delivered,
    )
    logger.info("simulator stopped (%s): %d readings in %d messages, %d send errors, %d anomalies, %.1f s",
                stop_reason, sent, messages, errors.count, len(delivered), summary.wall_s)
    return summary
