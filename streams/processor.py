"""The stream processor: poll → decode → detect → produce → commit, in one batched loop.

Why it exists: it is the service. It owns the Kafka clients and the order in which results
become durable; the detector (``anomaly``) owns the maths and knows nothing of Kafka.

One loop iteration (:meth:`StreamProcessor.step`)::

    poll up to max_poll_records records
    apply rebalance events queued by the listener (revoked: drop those devices' state;
        assigned: pause, restore the partition's devices from the changelog, seek to the
        committed offset, resume) — records of partitions not ready are dropped and re-read
    decode every record (bad ones become dead letters) → ONE StreamingDetector.process call
    send anomaly events, dead letters (and, if configured, the score stream)
    every commit_interval_s: commit (below)

Commit order (:meth:`StreamProcessor.commit`), which is what "nothing lost" rests on:

* at-least-once: (1) flush events and dead letters, (2) send the snapshots of devices touched
  since the last commit to the changelog and flush, (3) commit offsets. If any send failed, the
  processor rewinds instead: drops its state, restores it from the changelog and seeks back to
  the committed offsets, so the readings are processed again. A snapshot is only written after
  the events of its readings are durable; a replay of readings that its device's state has
  already seen is dropped as duplicates (timestamps not newer), so a crash between (2) and (3)
  neither loses events nor corrupts state. A crash between (1) and (2) replays the batch against
  the older state and produces its events again: the only duplicates.
* exactly-once: everything since the last commit — events, dead letters, changelog snapshots
  and the consumer offsets (``send_offsets_to_transaction`` with the group metadata) — is one
  Kafka transaction. On any failure the transaction is aborted and the processor rewinds as
  above. A zombie instance is fenced by the broker (same transactional id, or an older group
  generation) and stops.

Rebalance callbacks run on kafka-python's IO thread, which must not block (heartbeats and
commits go through it), so the listener only queues the event; restores run on this thread.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue
from typing import Any

import numpy as np
import orjson
import pandas as pd
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import (
    CommitFailedError,
    KafkaError,
    KafkaTimeoutError,
    ProducerFencedError,
)

from anomaly.bundle import ModelBundle
from anomaly.detector import StreamingDetector
from anomaly.events import ProcessResult, ReadingStatus
from streams.changelog import encode_value, restore_partitions
from streams.codec import DecodedBatch, dead_letter_headers, decode_records, encode_event
from streams.config import ServiceConfig
from streams.errors import BrokerUnavailableError, FencedError
from streams.kafka_admin import TopicSpec, admin_client, ensure_topics, partition_counts, wait_for_broker
from streams.metrics import ServiceMetrics

__all__ = ["ProcessorStats", "StreamProcessor"]

logger = logging.getLogger(__name__)

LAG_INTERVAL_S = 5.0
EVICTION_INTERVAL_S = 60.0


@dataclass
class ProcessorStats:
    """Counters of one processor's life, for tests, the demo summary and logs."""

    batches: int = 0
    records: int = 0
    readings: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    commits: int = 0
    rewinds: int = 0
    restored_devices: int = 0


class _QueueingListener(ConsumerRebalanceListener):
    """Hands rebalance events to the processing thread; never blocks kafka-python's IO thread."""

    def __init__(self, events: SimpleQueue[tuple[str, set[TopicPartition]]]):
        self._events = events

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._events.put(("revoked", set(revoked)))

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._events.put(("assigned", set(assigned)))

    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self._events.put(("revoked", set(lost)))


class StreamProcessor:
    """Consumes readings, scores them, produces events; see the module docstring for the order.

    Parameters
    ----------
    config : ServiceConfig
    bundle : ModelBundle
        The live model (hot reload swaps it between batches, see :meth:`swap_model`).
    metrics : ServiceMetrics
    """

    def __init__(self, config: ServiceConfig, bundle: ModelBundle, metrics: ServiceMetrics | None = None):
        self.config = config
        self.metrics = metrics or ServiceMetrics(topics=[config.input_topic])
        self.detector = StreamingDetector(bundle)
        self.stats = ProcessorStats()
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self._events: SimpleQueue[tuple[str, set[TopicPartition]]] = SimpleQueue()
        self._ready: set[int] = set()  # input partitions restored and being processed
        self._device_partition: dict[str, int] = {}
        self._dirty: dict[str, int] = {}  # devices touched since the last commit → partition
        self._tombstones: dict[str, int] = {}
        self._offsets: dict[int, int] = {}  # partition → next offset to commit
        self._futures: list[Any] = []
        self._in_transaction = False
        self._last_commit = time.monotonic()
        self._last_lag = 0.0
        self._last_evict = time.monotonic()
        self._max_event_ts = 0
        self._joined = False
        self._n_partitions = 0
        self._stop = threading.Event()
        self.metrics.set_model(bundle.name, bundle.version, len(bundle.features), 0.0)

    # ----------------------------------------------------------------- setup
    def _client_config(self) -> dict[str, Any]:
        cfg = self.config
        return {"bootstrap_servers": cfg.bootstrap_servers.split(","), "client_id": cfg.client_id,
                "reconnect_backoff_max_ms": int(cfg.reconnect_backoff_max_s * 1000), **cfg.kafka_security()}

    def connect(self, timeout_s: float = 120.0) -> None:
        """Wait for the broker (with backoff), create missing topics, open the consumer and producer."""
        cfg = self.config
        try:
            wait_for_broker(cfg.bootstrap_servers, timeout_s=timeout_s, **cfg.kafka_security())
        except TimeoutError as exc:
            raise BrokerUnavailableError(str(exc)) from exc
        admin = admin_client(cfg.bootstrap_servers, **cfg.kafka_security())
        try:
            self._n_partitions = self._ensure_topics(admin)
        finally:
            admin.close()
        common = self._client_config()
        self.consumer = KafkaConsumer(
            group_id=cfg.group_id, enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=cfg.max_poll_records, max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            isolation_level="read_committed" if cfg.exactly_once else "read_uncommitted", **common)
        producer_cfg: dict[str, Any] = {"acks": "all", "linger_ms": 5, "batch_size": 256 * 1024,
                                        "max_request_size": max(cfg.max_message_bytes * 2, 2 * 1024 * 1024),
                                        "enable_idempotence": True, **common}
        if cfg.exactly_once:
            producer_cfg["transactional_id"] = cfg.transactional_id or f"{cfg.group_id}-{socket.gethostname()}"
        self.producer = KafkaProducer(**producer_cfg)
        if cfg.exactly_once:
            try:
                self.producer.init_transactions()
            except ProducerFencedError as exc:
                raise FencedError(f"transactional id {producer_cfg['transactional_id']!r} is fenced: {exc}") from exc
        self.consumer.subscribe([cfg.input_topic], listener=_QueueingListener(self._events))
        logger.info("connected to %s: group %s on %s[%d], %s", cfg.bootstrap_servers, cfg.group_id, cfg.input_topic,
                    self._n_partitions, cfg.processing_guarantee)

    def _ensure_topics(self, admin: Any) -> int:
        cfg = self.config
        if cfg.create_topics:
            ensure_topics(admin, {cfg.input_topic: TopicSpec(cfg.input_partitions, cfg.replication_factor)})
        counts = partition_counts(admin, [cfg.input_topic])
        if cfg.input_topic not in counts:
            raise BrokerUnavailableError(f"input topic {cfg.input_topic!r} does not exist and create_topics is off")
        n = counts[cfg.input_topic]
        specs = {
            cfg.events_topic: TopicSpec(n, cfg.replication_factor),
            cfg.dlq_topic: TopicSpec(n, cfg.replication_factor),
            cfg.changelog_topic: TopicSpec(n, cfg.replication_factor,
                                           {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}),
        }
        if cfg.shadow_model:
            specs[cfg.shadow_topic] = TopicSpec(n, cfg.replication_factor)
        if cfg.extra.get("scores_topic"):
            specs[str(cfg.extra["scores_topic"])] = TopicSpec(n, cfg.replication_factor)
        if cfg.create_topics:
            ensure_topics(admin, specs)
        have = partition_counts(admin, [cfg.changelog_topic])
        if have.get(cfg.changelog_topic, n) != n:
            from streams.errors import ConfigError

            raise ConfigError(
                f"changelog topic {cfg.changelog_topic} has {have[cfg.changelog_topic]} partitions but the input topic "
                f"{cfg.input_topic} has {n}: they must be co-partitioned. Delete the changelog topic (state is "
                "rebuilt by warm-up) or use a new group_id.")
        return n

    # ------------------------------------------------------------------ loop
    def stop(self) -> None:
        """Ask the loop to finish its batch, commit and leave the group (thread-safe)."""
        self._stop.set()

    def run(self, max_seconds: float | None = None) -> ProcessorStats:
        """Run until :meth:`stop` (or ``max_seconds``); always commits and closes on the way out."""
        if self.consumer is None:
            self.connect()
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        try:
            while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
                self.step()
            self.commit(final=True)
        finally:
            self.close()
        return self.stats

    def step(self) -> None:
        """One poll, one batch, maybe one commit."""
        assert self.consumer is not None
        polled = self.consumer.poll(timeout_ms=self.config.poll_timeout_ms, max_records=self.config.max_poll_records)
        ready_before = set(self._ready)
        self._apply_rebalance_events()
        # records of a partition restored in this step were fetched before its seek: they come again
        ready = self._ready & ready_before
        records = [r for tp, rs in polled.items() if tp.partition in ready for r in rs]
        if records:
            self.process_records(records)
        now = time.monotonic()
        if now - self._last_commit >= self.config.commit_interval_s:
            self.commit()
        if now - self._last_lag >= LAG_INTERVAL_S:
            self._update_lag()
        if now - self._last_evict >= EVICTION_INTERVAL_S:
            self._evict_idle()
        self.metrics.mark_progress()

    def process_records(self, records: Sequence[Any]) -> ProcessResult:
        """Decode, score and produce the results of one poll's records (offsets are committed later)."""
        assert self.producer is not None
        started = time.perf_counter()
        cfg = self.config
        if cfg.exactly_once and not self._in_transaction:
            self.producer.begin_transaction()
            self._in_transaction = True
        decoded = decode_records(records, self.detector.features, max_message_bytes=cfg.max_message_bytes)
        result = self.detector.process(decoded.batch)
        send = self.producer.send
        futures = self._futures
        for event in result.events:
            row = event.row
            key, value = encode_event(event, str(decoded.source_topic[row]), int(decoded.source_partition[row]),
                                      int(decoded.source_offset[row]))
            futures.append(send(cfg.events_topic, key=key, value=value,
                                partition=int(decoded.source_partition[row]) % self._n_partitions))
        for dl in decoded.dead_letters:
            futures.append(send(cfg.dlq_topic, key=dl.key, value=dl.value, headers=dead_letter_headers(dl),
                                partition=dl.record.partition % self._n_partitions))
        if cfg.extra.get("scores_topic"):
            self._send_scores(str(cfg.extra["scores_topic"]), decoded, result)
        for record in records:
            if record.offset + 1 > self._offsets.get(record.partition, -1):
                self._offsets[record.partition] = record.offset + 1
        self._track_devices(decoded, result)
        self._observe(decoded, result, time.perf_counter() - started)
        return result

    def _track_devices(self, decoded: DecodedBatch, result: ProcessResult) -> None:
        """Remember each touched device's partition (for the changelog and for revocation)."""
        advanced = result.status <= ReadingStatus.WARMUP
        if not advanced.any():
            return
        ids = decoded.batch.device_ids[advanced]
        codes, uniques = pd.factorize(ids)
        first = np.zeros(len(uniques), dtype=np.int64)
        first[codes[::-1]] = np.arange(len(codes))[::-1]
        parts = decoded.source_partition[advanced][first].tolist()
        touched = dict(zip(uniques.tolist(), parts, strict=True))
        self._device_partition.update(touched)
        self._dirty.update(touched)
        ts = decoded.batch.timestamps_ms
        if len(ts):
            self._max_event_ts = max(self._max_event_ts, int(ts.max()))

    def _send_scores(self, topic: str, decoded: DecodedBatch, result: ProcessResult) -> None:
        """One record per source partition with every reading's score (debugging, replay comparisons)."""
        assert self.producer is not None
        for p in np.unique(decoded.source_partition).tolist():
            rows = np.flatnonzero(decoded.source_partition == p)
            payload = {"partition": p, "offset": decoded.source_offset[rows].tolist(),
                       "device_id": decoded.batch.device_ids[rows].tolist(),
                       "ts_ms": decoded.batch.timestamps_ms[rows].tolist(),
                       "score": [None if np.isnan(s) else float(s) for s in result.scores[rows]],
                       "status": [ReadingStatus(s).label for s in result.status[rows]]}
            self._futures.append(self.producer.send(topic, value=orjson.dumps(payload),
                                                    partition=p % self._n_partitions))

    def _observe(self, decoded: DecodedBatch, result: ProcessResult, duration_s: float) -> None:
        stats = self.stats
        counts = result.counts()
        counts["invalid"] = len(decoded.dead_letters)
        dl = Counter(str(d.reason) for d in decoded.dead_letters)
        ev = Counter(e.kind for e in result.events)
        stats.batches += 1
        stats.records += decoded.messages + len(decoded.dead_letters)
        stats.readings.update(counts)
        stats.dead_letters.update(dl)
        stats.events.update(ev)
        produced = decoded.produce_ts_ms
        latency = (time.time() * 1000.0 - produced[produced >= 0]) / 1000.0
        self.metrics.observe_batch(counts=counts, duration_s=duration_s,
                                   messages_by_topic={self.config.input_topic: decoded.messages + len(dl)},
                                   dead_letters=dl, events_by_kind=ev, e2e_latencies_s=latency,
                                   scores=result.scores, gap_resets=result.gap_resets)
        self.metrics.set_active_devices(len(self.detector.store))
        self.metrics.set_open_episodes(int(self.detector.store.in_episode.sum()))

    # ---------------------------------------------------------------- commit
    def commit(self, final: bool = False) -> bool:
        """Make everything since the last commit durable, then commit offsets (see the module docstring).

        Returns False when the work was not committed (it will be reprocessed).
        """
        self._last_commit = time.monotonic()
        if not self._offsets and not self._dirty and not self._tombstones and not self._in_transaction:
            return True
        assert self.producer is not None and self.consumer is not None
        cfg = self.config
        try:
            if not cfg.exactly_once:
                self.producer.flush(timeout=60)
                if self._failed():
                    raise KafkaTimeoutError("an event or dead letter could not be produced")
            written = self._send_changelog()
            if cfg.exactly_once:
                offsets = {TopicPartition(cfg.input_topic, p): _offset(o) for p, o in self._offsets.items()}
                if offsets:
                    self.producer.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
                self.producer.commit_transaction()
                self._in_transaction = False
                if self._failed():
                    raise KafkaTimeoutError("a record of the committed transaction failed")
            else:
                self.producer.flush(timeout=60)
                if self._failed():
                    raise KafkaTimeoutError("a changelog record could not be produced")
                if self._offsets:
                    self.consumer.commit({TopicPartition(cfg.input_topic, p): _offset(o)
                                          for p, o in self._offsets.items()})
        except ProducerFencedError as exc:
            self._stop.set()
            raise FencedError(f"this instance was fenced by another with the same transactional id: {exc}") from exc
        except (CommitFailedError, KafkaError) as exc:
            if isinstance(exc, KafkaError) and "fenc" in type(exc).__name__.lower():
                self._stop.set()
                raise FencedError(f"this instance was fenced: {exc}") from exc
            logger.warning("commit failed (%s: %s); rewinding to the last committed offsets", type(exc).__name__, exc)
            self._rewind()
            return False
        self.metrics.add_changelog_bytes(written)
        self.stats.commits += 1
        self._offsets.clear()
        self._dirty.clear()
        self._tombstones.clear()
        self._futures.clear()
        if final:
            logger.info("final commit done")
        return True

    def _failed(self) -> bool:
        failed = [f for f in self._futures if f.is_done and f.failed()]
        if failed:
            logger.warning("%d of %d sends failed, e.g. %s", len(failed), len(self._futures), failed[0].exception)
        return bool(failed)

    def _send_changelog(self) -> int:
        assert self.producer is not None
        cfg = self.config
        store = self.detector.store
        devices = [d for d in self._dirty if d in store]
        written = 0
        blobs = store.snapshot_many(devices) if devices else []
        send = self.producer.send
        for device, blob in zip(devices, blobs, strict=True):
            p = self._dirty[device]
            value = encode_value(blob, self._offsets.get(p, -1))
            key = device.encode()
            written += len(value) + len(key)
            self._futures.append(send(cfg.changelog_topic, key=key, value=value, partition=p % self._n_partitions))
        for device, p in self._tombstones.items():
            self._futures.append(send(cfg.changelog_topic, key=device.encode(), value=None,
                                      partition=p % self._n_partitions))
        return written

    def _rewind(self) -> None:
        """Throw away uncommitted work: abort, drop state, restore from the changelog, seek to committed."""
        self.stats.rewinds += 1
        if self._in_transaction:
            try:
                assert self.producer is not None
                self.producer.abort_transaction()
            except KafkaError as exc:
                logger.warning("abort_transaction failed: %s", exc)
            self._in_transaction = False
        self._offsets.clear()
        self._dirty.clear()
        self._tombstones.clear()
        self._futures.clear()
        partitions = set(self._ready)
        self._drop_partitions(partitions)
        self._restore(partitions)

    # ------------------------------------------------------------- rebalance
    def _apply_rebalance_events(self) -> None:
        while True:
            try:
                kind, tps = self._events.get_nowait()
            except Empty:
                break
            parts = {tp.partition for tp in tps if tp.topic == self.config.input_topic}
            if kind == "revoked":
                logger.info("partitions revoked: %s", sorted(parts))
                self._drop_partitions(parts)
                if self._in_transaction:
                    self._rewind()  # the open transaction can no longer commit: redo the partitions kept
            else:
                logger.info("partitions assigned: %s", sorted(parts))
                self._joined = True
                new = parts - self._ready
                if new:
                    self._restore(new)
        assigned = {tp.partition for tp in (self.consumer.assignment() if self.consumer else set())}
        self.metrics.set_assignment((self.config.input_topic, p) for p in sorted(assigned))
        ready = self._joined and not (assigned - self._ready)
        self.metrics.set_ready(ready, "" if ready else "waiting for assignment or state restore")

    def _drop_partitions(self, parts: set[int]) -> None:
        if not parts:
            return
        gone = [d for d, p in self._device_partition.items() if p in parts]
        self.detector.store.remove(gone)
        for d in gone:
            self._device_partition.pop(d, None)
            self._dirty.pop(d, None)
            self._tombstones.pop(d, None)
        for p in parts:
            self._offsets.pop(p, None)
        self._ready -= parts
        self.metrics.set_active_devices(len(self.detector.store))

    def _restore(self, parts: set[int]) -> None:
        """Pause, load the partitions' devices from the changelog, seek to the committed offsets, resume."""
        if not parts:
            return
        assert self.consumer is not None
        cfg = self.config
        tps = [TopicPartition(cfg.input_topic, p) for p in sorted(parts)]
        self.consumer.pause(*tps)
        self.metrics.set_restoring_partitions(len(parts))
        report = restore_partitions(self._changelog_consumer, cfg.changelog_topic, parts, self.detector.store)
        for p, devices in report.devices.items():
            for d in devices:
                self._device_partition[d] = p
        committed = {tp: self.consumer.committed(tp) for tp in tps}
        # an explicit offset, not seek_to_beginning(): a pending reset racing with the automatic one of
        # the assignment was seen to move the position back to 0 after records had been processed
        beginnings = self.consumer.beginning_offsets([tp for tp, o in committed.items() if o is None])
        for tp, offset in committed.items():
            position = beginnings[tp] if offset is None else offset
            self.consumer.seek(tp, position)
            logger.info("%s[%d]: %d devices restored, resuming at offset %d", tp.topic, tp.partition,
                        len(report.devices.get(tp.partition, [])), position)
        self._ready |= parts
        self.consumer.resume(*tps)
        self.metrics.set_restoring_partitions(0)
        self.metrics.observe_restore(report.seconds, report.restored, dict(report.discarded))
        self.stats.restored_devices += report.restored

    def _changelog_consumer(self) -> KafkaConsumer:
        return KafkaConsumer(enable_auto_commit=False, group_id=None, auto_offset_reset="earliest",
                             isolation_level="read_committed" if self.config.exactly_once else "read_uncommitted",
                             max_partition_fetch_bytes=8 * 1024 * 1024, **self._client_config())

    # ------------------------------------------------------------- periodic
    def _update_lag(self) -> None:
        self._last_lag = time.monotonic()
        if self.consumer is None:
            return
        tps = [tp for tp in self.consumer.assignment() if tp.partition in self._ready]
        if not tps:
            return
        try:
            ends = self.consumer.end_offsets(tps)
            self.metrics.set_consumer_lag({(tp.topic, tp.partition): max(0, ends[tp] - self.consumer.position(tp))
                                           for tp in tps})
        except KafkaError as exc:
            logger.debug("lag update failed: %s", exc)

    def _evict_idle(self) -> None:
        self._last_evict = time.monotonic()
        ttl_ms = int(self.config.idle_ttl_s * 1000)
        gone = self.detector.evict_idle(self._max_event_ts, ttl_ms)
        for device in gone:
            p = self._device_partition.pop(device, None)
            self._dirty.pop(device, None)
            if p is not None:
                self._tombstones[device] = p
        if gone:
            self.metrics.add_evictions(len(gone))

    def close(self) -> None:
        """Leave the group and close the clients (idempotent)."""
        if self._in_transaction and self.producer is not None:
            with contextlib.suppress(KafkaError):
                self.producer.abort_transaction()
            self._in_transaction = False
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False)
            except KafkaError as exc:
                logger.warning("closing the consumer failed: %s", exc)
            self.consumer = None
        if self.producer is not None:
            try:
                self.producer.close(timeout=10)
            except KafkaError as exc:
                logger.warning("closing the producer failed: %s", exc)
            self.producer = None
        self.metrics.set_ready(False, "stopped")


def _offset(offset: int) -> Any:
    """kafka-python's OffsetAndMetadata for a commit (its signature grew a leader epoch in 2.x)."""
    from kafka.structs import OffsetAndMetadata

    try:
        return OffsetAndMetadata(offset, "", -1)
    except TypeError:  # pragma: no cover - older kafka-python
        return OffsetAndMetadata(offset, "")


def run_until_signalled(processor: StreamProcessor, signals: Iterable[int] | None = None,
                        on_start: Callable[[], None] | None = None) -> ProcessorStats:
    """Run ``processor`` in this thread until SIGTERM/SIGINT: finish the batch, commit, leave the group."""
    import signal

    def _handler(signum: int, _frame: Any) -> None:
        logger.info("signal %d: finishing the batch, committing and leaving the group", signum)
        processor.stop()

    for sig in signals or (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _handler)
    if on_start is not None:
        on_start()
    return processor.run()
