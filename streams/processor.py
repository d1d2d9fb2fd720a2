"""The stream processor: poll → decode → detect → produce → commit, in one batched loop.

Why it exists: it is the service. It owns the Kafka clients and the order in which results
become durable; the detector (``anomaly``) owns the maths and knows nothing of Kafka. What it must
not do: score anything itself, block kafka-python's IO thread, or let an error lose uncommitted
work silently (every failure ends in "forget what is not committed, re-read it from Kafka").

One loop iteration (:meth:`StreamProcessor.step`)::

    (re)create the producer if a failure dropped it (exactly-once: init_transactions, which
        aborts this transactional id's open transaction)
    poll up to max_poll_records records
    apply rebalance events queued by the listener: revoked partitions lose their state (open
        work is discarded first: it can no longer commit); new partitions wait for their restore
    restore waiting partitions: committed offsets (read_committed: stable, KIP-447), changelog
        read to its end and to the commit marker of that offset, seek — until then no record of
        the partition is processed, and records of a partition restored in this step were fetched
        before its seek and are dropped
    decode every record (bad ones become dead letters) → ONE StreamingDetector.process call
    send anomaly events, dead letters (and, if configured, the score stream and the shadow
        model's events: streams/models/shadow.py)
    every commit_interval_s: commit (below)
    model registry: every model_poll_interval_s read its LIVE pointer; a new, validated version is
        switched in here, between two batches: commit first, then swap the detector (every device
        warms up again under the new model; open episodes get an end event): streams/models/watcher.py

Commit order (:meth:`StreamProcessor.commit`), which is what "nothing lost" rests on:

* at-least-once: at the commit interval the window is *captured*: its offsets, and its changelog
  records (every bucket with a device touched since the last commit, one marker per partition)
  encoded right then, so they hold the state exactly as of those offsets. Then (1) the window's
  events and dead letters are acknowledged and checked, (2) only then are its changelog records
  sent, acknowledged and checked, (3) then its offsets are committed. The loop does not wait for
  the broker between the stages: each starts in the first step after the previous one's sends are
  done (:meth:`StreamProcessor._advance_pending`), so a commit costs the loop the encoding and the
  sends, not the round trips; the next window is processed meanwhile. A crash between (2) and (3)
  leaves state ahead of the offsets: the replayed readings are older than their device's state and
  are dropped as duplicates, and their events were already durable in (1). A crash before (2)
  replays the window against the older state and produces its events again: the only duplicates.
* exactly-once: everything since the last commit — events, dead letters, scores, changelog
  snapshots, markers and the consumer offsets (``send_offsets_to_transaction`` with
  ``consumer.group_metadata()``, so the broker also fences a consumer of an old generation,
  KIP-447) — is one Kafka transaction. The producer is flushed and every send checked *before*
  the offsets are added and the transaction committed: kafka-python 3.0 commits a transaction
  even when one of its batches expired, so committing blindly could lose events.

On any failure (send, flush, commit, restore, broker gone) the processor discards the work since
its last commit: exactly-once aborts the transaction (or, if the broker is unreachable or the
producer is in a fatal state, drops the producer; the next one's ``init_transactions`` aborts it
on the broker), the affected partitions lose their in-memory state and are restored from the
changelog and re-read from their committed offsets. :meth:`run` retries with exponential backoff
(up to ``reconnect_backoff_max_s``), marking progress so that a broker outage is not reported as a
hung process. Only fencing stops the loop: ``ProducerFencedError`` means another instance now owns
this transactional id (:class:`~streams.errors.FencedError`).

Rebalance callbacks run on kafka-python's IO thread, which must not block (heartbeats and commits
go through it), so the listener only queues the event; restores run on the processing thread.
A partition waiting for its restore is held back by the processor (records dropped, position
reset by the seek), not by ``KafkaConsumer.pause``: in kafka-python 3.0.12, records parked for a
paused partition are only handed back once the fetcher's in-line record set is ``None``, and an
exhausted one is not, so a resumed partition was seen to never be fetched again.
Under the (default, eager) protocol every rebalance revokes all partitions; one that comes back
keeps its in-memory state when nothing was left uncommitted and its committed offset is still
the one this instance committed last, so a rebalance does not force a full restore.
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
    IllegalGenerationError,
    KafkaError,
    KafkaTimeoutError,
    ProducerFencedError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from kafka.structs import OffsetAndMetadata

from anomaly.bundle import ModelBundle
from anomaly.detector import StreamingDetector
from anomaly.events import AnomalyEvent, ProcessResult, ReadingStatus
from anomaly.snapshots import encode_groups
from streams.codec import DecodedBatch, dead_letter_headers, decode_records, encode_event
from streams.config import ServiceConfig
from streams.errors import BrokerUnavailableError, ConfigError, FencedError
from streams.kafka.admin import (
    TopicSpec,
    admin_client,
    check_authentication,
    ensure_topics,
    partition_counts,
    wait_for_broker,
)
from streams.metrics import ServiceMetrics
from streams.models.shadow import ShadowScorer
from streams.models.watcher import ModelSwitch, ModelWatcher
from streams.state.changelog import MARKER_KEY, bucket_key, bucket_of, encode_bucket, encode_marker, restore_partitions

__all__ = ["ProcessorStats", "StreamProcessor"]

logger = logging.getLogger(__name__)

LAG_INTERVAL_S = 5.0
EVICTION_INTERVAL_S = 60.0
SESSION_TIMEOUT_MS = 10_000
"""A SIGKILLed instance's partitions move to the others after this. kafka-python 3 heartbeats from
its IO thread, so long batches and restores do not need a longer one (its default is 45 s)."""
HEARTBEAT_INTERVAL_MS = 3_000
TRANSACTION_TIMEOUT_MS = 60_000
"""The broker aborts (and fences) a transaction open this long. It must exceed commit_interval_s
plus the longest broker outage to ride out in the middle of a commit; a hanging transaction of a
crashed instance that is not restarted with the same id blocks read_committed readers this long."""
MAX_BLOCK_MS = 15_000
"""send() (metadata, buffer) and init_transactions() give up after this; the loop then backs off and retries."""
COMMIT_TIMEOUT_S = 30.0
"""Longest wait for a flush, an offset commit or a transaction step (kafka-python 3.0's own transactional
calls wait forever). Below the transaction timeout, so that in a long broker outage this instance gives
the transaction up and re-initialises, instead of finding it aborted by the broker and itself fenced.
``config.extra["commit_timeout_s"]`` overrides it (tests)."""
COMMITTED_TIMEOUT_MS = 30_000
"""Fetching committed offsets (read_committed waits while a transaction's offsets are pending)."""
RESTORE_TIMEOUT_S = 300.0
"""A restore that has not read its partitions to their end by then fails (and is retried)."""
MARKER_WAIT_S = TRANSACTION_TIMEOUT_MS / 1000 + 10
"""Exactly-once: how long a restore waits for the commit marker of the committed offset. A crashed
instance's open transaction holds read_committed readers back until the broker aborts it (after the
transaction timeout) unless the instance comes back with its transactional id first."""
BACKOFF_INITIAL_S = 0.5
CHANGELOG_MAX_RECORD_BYTES = 8 * 1024 * 1024
"""Largest changelog bucket record the producer and the changelog topic (``max.message.bytes``) accept."""
BUCKET_WARN_BYTES = 1024 * 1024
"""A bucket record larger than this is logged with advice to raise ``changelog_buckets``."""

_GENERATION_ERRORS = (CommitFailedError, IllegalGenerationError, UnknownMemberIdError, RebalanceInProgressError)
_RECOVERABLE = (KafkaError, TimeoutError, OSError, BrokerUnavailableError)


class SendFailedError(KafkaError):
    """A record of the current commit window could not be produced (the window is redone)."""


@dataclass
class _PendingCommit:
    """An at-least-once commit window between its capture and its offset commit (see ``_advance_pending``)."""

    offsets: dict[int, int]  # input partition → next offset, as of the capture
    partitions: set[int]  # partitions whose work is lost if this window fails
    produced: list[Any]  # futures of the window's events, dead letters and scores
    changelog: list[tuple[bytes, bytes | None, int]]  # (key, value, partition), encoded at the capture
    written: int  # bytes of state in ``changelog``
    sent: list[Any] | None = None  # futures of the changelog records once sent


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
    restores: int = 0
    discarded_snapshots: Counter[str] = field(default_factory=Counter)
    kept_partitions: int = 0
    """Partitions that came back in a rebalance and kept their in-memory state (no restore)."""
    recoveries: int = 0
    """Failures the loop recovered from (backoff, discard, restore)."""
    model_switches: int = 0
    """New live models taken from the registry (hot reload)."""


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
        The live model.
    metrics : ServiceMetrics
    watcher : ModelWatcher, optional
        Hot reload; default: one watching ``config.model_dir`` when it is a model registry.
    shadow : ShadowScorer, optional
        Shadow scoring; default: the registry version ``config.shadow_model`` names, if any.
    """

    def __init__(self, config: ServiceConfig, bundle: ModelBundle, metrics: ServiceMetrics | None = None, *,
                 watcher: ModelWatcher | None = None, shadow: ShadowScorer | None = None):
        self.config = config
        self.metrics = metrics or ServiceMetrics(topics=[config.input_topic])
        self.detector = StreamingDetector(bundle)
        self.watcher = watcher if watcher is not None else ModelWatcher.for_config(config, bundle, self.metrics)
        self.shadow = shadow if shadow is not None else ShadowScorer.for_config(config, bundle, self.metrics)
        self.stats = ProcessorStats()
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self._producer_ok = False
        self._restore_client: KafkaConsumer | None = None
        self._events: SimpleQueue[tuple[str, set[TopicPartition]]] = SimpleQueue()
        self._ready: set[int] = set()  # input partitions restored and being processed
        self._to_restore: set[int] = set()  # assigned, waiting for their restore (records dropped until)
        self._kept: set[int] = set()  # back after a rebalance; state kept if nobody committed meanwhile
        self._fresh: set[int] = set()  # restored or dropped in this step: their polled records predate the seek
        self._committed: dict[int, int | None] = {}  # last committed offset known per partition
        self._position: dict[int, int] = {}  # next offset to process per ready partition
        self._device_partition: dict[str, int] = {}
        self._device_bucket: dict[str, int] = {}  # changelog bucket of each device (streams/state/changelog.py)
        self._members: dict[tuple[int, int], set[str]] = {}  # (partition, bucket) → its devices
        self._dirty: dict[str, int] = {}  # devices touched since the last commit → partition
        self._dirty_buckets: set[tuple[int, int]] = set()  # buckets that lost a device (evicted or moved)
        self._stale_keys: dict[int, list[bytes]] = {}  # changelog keys of another layout, to delete
        self._pending: _PendingCommit | None = None  # at-least-once commit sent but not yet committed
        self._offsets: dict[int, int] = {}  # partition → next offset to commit
        self._futures: list[Any] = []
        self._in_transaction = False
        self._commit_deadline: float | None = None
        self._last_commit = time.monotonic()
        self._last_lag = 0.0
        self._last_evict = time.monotonic()
        self._max_event_ts = 0
        self._joined = False
        self._awaiting_assignment = False  # revoked, and the group's next assignment not yet received
        self._failures = 0
        self._n_partitions = 0
        self._stop = threading.Event()
        self.metrics.set_model(bundle.name, bundle.version, len(bundle.features), 0.0)

    @property
    def transactional_id(self) -> str | None:
        """Exactly-once: the producer's transactional id (``<group_id>-<hostname>`` unless configured)."""
        cfg = self.config
        if not cfg.exactly_once:
            return None
        return cfg.transactional_id or f"{cfg.group_id}-{socket.gethostname()}"

    # ----------------------------------------------------------------- setup
    def _client_config(self) -> dict[str, Any]:
        cfg = self.config
        return {"bootstrap_servers": cfg.bootstrap_servers.split(","), "client_id": cfg.client_id,
                "reconnect_backoff_max_ms": int(cfg.reconnect_backoff_max_s * 1000), **cfg.kafka_security()}

    def connect(self, timeout_s: float = 120.0) -> None:
        """Wait for the broker (with backoff), create missing topics, open the consumer and producer."""
        cfg = self.config
        # kafka-python retries refused credentials like an absent broker; find out first (fails fast)
        check_authentication(cfg.bootstrap_servers, timeout_s=min(timeout_s, 10.0), **cfg.kafka_security())
        try:
            wait_for_broker(cfg.bootstrap_servers, timeout_s=timeout_s, **cfg.kafka_security())
        except TimeoutError as exc:
            raise BrokerUnavailableError(str(exc)) from exc
        admin = admin_client(cfg.bootstrap_servers, **cfg.kafka_security())
        try:
            self._n_partitions = self._ensure_topics(admin)
        finally:
            admin.close()
        self._make_producer()
        self.consumer = KafkaConsumer(
            group_id=cfg.group_id, enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=cfg.max_poll_records, max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024, session_timeout_ms=SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
            isolation_level="read_committed" if cfg.exactly_once else "read_uncommitted", **self._client_config())
        # metadata first: a group joined before the consumer knows the topic's partitions can get an
        # empty assignment until the next metadata refresh (kafka-python #2377)
        self.consumer.partitions_for_topic(cfg.input_topic)
        self.consumer.subscribe([cfg.input_topic], listener=_QueueingListener(self._events))
        _warn_if_slow_crc()
        logger.info("connected to %s: group %s on %s[%d], %s%s", cfg.bootstrap_servers, cfg.group_id, cfg.input_topic,
                    self._n_partitions, cfg.processing_guarantee,
                    f", transactional id {self.transactional_id}" if cfg.exactly_once else "")

    def _make_producer(self) -> None:
        """Open the producer; exactly-once: ``init_transactions`` (fences and aborts this id's older epoch)."""
        cfg = self.config
        producer_cfg: dict[str, Any] = {"acks": "all", "linger_ms": 5, "batch_size": 256 * 1024,
                                        "max_request_size": max(cfg.max_message_bytes * 2, CHANGELOG_MAX_RECORD_BYTES),
                                        "enable_idempotence": True, "max_block_ms": MAX_BLOCK_MS,
                                        **self._client_config()}
        if cfg.exactly_once:
            producer_cfg["transactional_id"] = self.transactional_id
            producer_cfg["transaction_timeout_ms"] = TRANSACTION_TIMEOUT_MS
        producer = KafkaProducer(**producer_cfg)
        if cfg.exactly_once:
            try:
                producer.init_transactions()
            except ProducerFencedError as exc:
                _close_quietly(producer)
                raise FencedError(f"transactional id {self.transactional_id!r} is fenced: {exc}") from exc
            except BaseException:
                _close_quietly(producer)
                raise
        old, self.producer = self.producer, producer
        if old is not None:
            _close_quietly(old)
        self._producer_ok = True
        self._in_transaction = False

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
                                           {"cleanup.policy": "compact", "min.compaction.lag.ms": "0",
                                            "max.message.bytes": str(CHANGELOG_MAX_RECORD_BYTES)}),
        }
        if cfg.shadow_model:
            specs[cfg.shadow_topic] = TopicSpec(n, cfg.replication_factor)
        if cfg.extra.get("scores_topic"):
            specs[str(cfg.extra["scores_topic"])] = TopicSpec(n, cfg.replication_factor)
        if cfg.create_topics:
            ensure_topics(admin, specs)
        have = partition_counts(admin, [cfg.changelog_topic])
        if have.get(cfg.changelog_topic, n) != n:
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
        """Run until :meth:`stop` (or ``max_seconds``), recovering from failures; commit and close on the way out.

        Raises :class:`~streams.errors.FencedError` when another instance took over this one's
        transactional id (the open transaction is aborted by the broker; nothing is duplicated).
        """
        if self.consumer is None:
            self.connect()
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        try:
            while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
                try:
                    self.step()
                    self._failures = 0
                except FencedError:
                    raise
                except _RECOVERABLE as exc:
                    self._recover(exc)
            self.commit(final=True)
        finally:
            self.close()
        return self.stats

    def step(self) -> None:
        """One poll, one batch, maybe one commit. Raises Kafka errors; :meth:`run` recovers from them."""
        assert self.consumer is not None
        if not self._producer_ok:
            self._make_producer()
        self._fresh = set()
        polled = self.consumer.poll(timeout_ms=self.config.poll_timeout_ms, max_records=self.config.max_poll_records)
        self._apply_rebalance_events()
        if self._to_restore and not self._awaiting_assignment:
            self._restore_pending()
        if self._pending is not None:  # at-least-once: the previous commit's next stage, if its sends are done
            self._advance_pending(block=False)
        records = self._accepted(polled)
        if records:
            self.process_records(records)
        now = time.monotonic()
        if now - self._last_commit >= self.config.commit_interval_s:
            self.commit(wait=False)
        if self.watcher is not None:
            switch = self.watcher.poll()
            if switch is not None:
                self.commit()  # the old model's work is durable first; if this fails it is redone by the new one
                self.swap_model(switch)
        if now - self._last_lag >= LAG_INTERVAL_S:
            self._update_lag()
        if now - self._last_evict >= EVICTION_INTERVAL_S:
            self._evict_idle()
        self.metrics.mark_progress()

    def _accepted(self, polled: dict[TopicPartition, list[Any]]) -> list[Any]:
        """Records of ready partitions, at or after the partition's expected position (never one twice)."""
        topic = self.config.input_topic
        out: list[Any] = []
        for tp, records in polled.items():
            p = tp.partition
            if tp.topic != topic or p not in self._ready or p in self._fresh or not records:
                continue
            expected = self._position.get(p, 0)
            if records[0].offset < expected:  # a fetch from before a seek: skip what was already processed
                records = [r for r in records if r.offset >= expected]
            out.extend(records)
        return out

    def process_records(self, records: Sequence[Any]) -> ProcessResult:
        """Decode, score and produce the results of one poll's records (offsets are committed later)."""
        assert self.producer is not None
        started = time.perf_counter()
        cfg = self.config
        if cfg.exactly_once and not self._in_transaction:
            self.producer.begin_transaction()
            self._in_transaction = True
        decoded = decode_records(records, self.detector.inputs, max_message_bytes=cfg.max_message_bytes)
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
        if self.shadow is not None:
            for message in self.shadow.process(decoded, result):
                futures.append(send(cfg.shadow_topic, key=message.key, value=message.value,
                                    partition=message.partition % self._n_partitions))
        # a poll returns each partition's records in offset order: the last one seen is the highest
        for p, offset in {record.partition: record.offset for record in records}.items():
            nxt = offset + 1
            if nxt > self._offsets.get(p, -1):
                self._offsets[p] = nxt
            if nxt > self._position.get(p, -1):
                self._position[p] = nxt
        self._track_devices(decoded, result)
        self._observe(decoded, result, time.perf_counter() - started)
        return result

    def swap_model(self, switch: ModelSwitch) -> None:
        """Serve ``switch.detector`` from the next batch on (call between batches, after a commit).

        The state rule of :mod:`streams.models.watcher`: every device warms up again; devices inside an
        episode get an ``end`` event of the old model, sent now and committed with the next window.
        """
        assert self.watcher is not None
        handover = self.watcher.apply(switch, self.detector)
        self.detector = switch.detector
        if handover.closing_events:
            self._send_closing_events(handover.closing_events)
        self.stats.model_switches += 1
        self.metrics.set_active_devices(len(self.detector.store))
        self.metrics.set_open_episodes(0)

    def _send_closing_events(self, events: list[AnomalyEvent]) -> None:
        """``end`` events that no reading caused (``source.offset`` -1), in the partition of their device."""
        if self.producer is None or not self._producer_ok:
            logger.warning("%d end events of episodes closed by the model switch are lost: no producer",
                           len(events))
            return
        cfg = self.config
        if cfg.exactly_once and not self._in_transaction:
            self.producer.begin_transaction()
            self._in_transaction = True
        for event in events:
            p = self._device_partition.get(event.device_id, 0)
            key, value = encode_event(event, cfg.input_topic, p, -1)
            self._futures.append(self.producer.send(cfg.events_topic, key=key, value=value,
                                                    partition=p % self._n_partitions))
        self.stats.events.update(end=len(events))

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
        placed = touched.items() - self._device_partition.items()  # new devices, or ones that changed partition
        if placed:
            self._place(placed)
        self._dirty.update(touched)
        ts = decoded.batch.timestamps_ms
        if len(ts):
            self._max_event_ts = max(self._max_event_ts, int(ts.max()))

    def _place(self, devices: Iterable[tuple[str, int]]) -> None:
        """Record each device's partition and changelog bucket; a device that moved leaves its old bucket dirty."""
        buckets = self.config.changelog_buckets
        partition_of, bucket_of_device, members = self._device_partition, self._device_bucket, self._members
        for device, p in devices:
            b = bucket_of_device.get(device)
            if b is None:
                b = bucket_of_device[device] = bucket_of(device, buckets)
            old = partition_of.get(device)
            if old is not None and old != p:
                members[(old, b)].discard(device)
                self._dirty_buckets.add((old, b))
            partition_of[device] = p
            members.setdefault((p, b), set()).add(device)

    def _forget(self, devices: Iterable[str], *, rewrite: bool) -> None:
        """Drop devices from the bookkeeping; ``rewrite`` marks their buckets to be written without them."""
        for device in devices:
            p = self._device_partition.pop(device, None)
            b = self._device_bucket.pop(device, None)
            self._dirty.pop(device, None)
            if p is None or b is None:
                continue
            members = self._members.get((p, b))
            if members is not None:
                members.discard(device)
                if not members:
                    del self._members[(p, b)]
            if rewrite:
                self._dirty_buckets.add((p, b))

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
        consumed = decoded.messages + len(decoded.dead_letters)  # dead-lettered messages, not distinct reasons
        self.metrics.observe_batch(counts=counts, duration_s=duration_s,
                                   messages_by_topic={self.config.input_topic: consumed},
                                   dead_letters=dl, events_by_kind=ev, e2e_latencies_s=latency,
                                   scores=result.scores, gap_resets=result.gap_resets)
        self.metrics.set_active_devices(len(self.detector.store))
        self.metrics.set_open_episodes(int(self.detector.store.in_episode.sum()))

    # ---------------------------------------------------------------- commit
    def _has_new_work(self) -> bool:
        """Anything since the last capture: offsets to commit, devices or buckets to write, keys to delete."""
        return bool(self._offsets or self._dirty or self._dirty_buckets or self._stale_keys)

    def _has_uncommitted(self) -> bool:
        return self._has_new_work() or self._pending is not None or self._in_transaction

    def commit(self, final: bool = False, wait: bool = True) -> bool:
        """Make everything since the last commit durable, then commit offsets (see the module docstring).

        At least once with ``wait=False`` (the loop's periodic commits): capture the window and send
        what can be sent now; the rest of the commit completes in later steps (:meth:`_advance_pending`)
        without blocking the loop on broker round trips. ``wait`` (or ``final``) completes it here.

        Returns False when the work was not committed: it is discarded and will be processed again
        (by this instance after a restore, or by the partition's next owner). Raises
        :class:`~streams.errors.FencedError` if this instance was fenced.
        """
        self._last_commit = time.monotonic()
        if not self._has_uncommitted():
            return True
        assert self.producer is not None and self.consumer is not None
        if not self._producer_ok:  # a failure dropped the producer: nothing of this window can commit
            self._discard_uncommitted(None, "the producer is being recreated")
            return False
        self._commit_deadline = time.monotonic() + self._commit_timeout_s
        try:
            if self.config.exactly_once:
                self._commit_exactly_once()
            else:
                self._commit_at_least_once(block=final or wait)
        except FencedError:
            self._stop.set()
            raise
        except _RECOVERABLE as exc:
            if self._fenced(exc):
                self._stop.set()
                raise FencedError(f"this instance was fenced: another one uses transactional id "
                                  f"{self.transactional_id!r} ({exc})") from exc
            if final:
                logger.warning("final commit failed (%s: %s); the uncommitted work will be processed again by the "
                               "partitions' next owner", type(exc).__name__, exc)
                self._abandon_transaction(exc)
                self._pending = None
                return False
            self._discard_uncommitted(exc, "commit failed")
            return False
        finally:
            self._commit_deadline = None
        if final:
            logger.info("final commit done")
        return True

    def _committed_window(self, offsets: dict[int, int], written: int) -> None:
        """Bookkeeping once a window's offsets are committed."""
        self.metrics.add_changelog_bytes(written)
        self.stats.commits += 1
        self._committed.update(offsets)

    def _capture(self) -> _PendingCommit:
        """Encode this window's changelog records and move its bookkeeping into a pending commit."""
        records, written = self._changelog_records()
        pending = _PendingCommit(offsets=dict(self._offsets), produced=self._futures, changelog=records,
                                 written=written, partitions=self._window_partitions())
        self._clear_window()
        return pending

    def _window_partitions(self) -> set[int]:
        """Input partitions whose work since the last capture is lost if this window fails."""
        return set(self._offsets) | set(self._dirty.values()) | {p for p, _ in self._dirty_buckets}

    def _clear_window(self) -> None:
        """Forget the bookkeeping of the window since the last capture (captured, committed or discarded)."""
        self._futures = []
        self._offsets.clear()
        self._dirty.clear()
        self._dirty_buckets.clear()
        self._stale_keys.clear()

    def _commit_at_least_once(self, block: bool) -> None:
        """Finish the pending commit (waiting if a new one is due), capture the next, then advance it."""
        if self._pending is not None:
            self._advance_pending(block=block or self._has_new_work())
        if self._pending is None and self._has_new_work():
            self._pending = self._capture()
            self._advance_pending(block=block)

    def _advance_pending(self, block: bool) -> bool:
        """Move the pending at-least-once commit on; True once its offsets are committed.

        The order is what "nothing lost" rests on: (1) the window's events, dead letters and scores
        are acknowledged, (2) only then its changelog records — encoded at capture, so they hold the
        state exactly as of the window's offsets — are sent and acknowledged, (3) then the offsets are
        committed. Without ``block`` each stage only starts when the previous one's sends are done,
        so the loop never waits for the broker; with ``block`` it flushes. A failed send raises
        :class:`SendFailedError`: the caller discards the uncommitted work (this window included).
        """
        pending = self._pending
        assert pending is not None and self.producer is not None and self.consumer is not None
        if pending.sent is None:
            if not block and not all(f.is_done for f in pending.produced):
                return False
            self._check(pending.produced, "an event, dead letter or score", flush=block)
            pending.sent = self._send_changelog(pending.changelog)
            if not block:
                return False
        if not block and not all(f.is_done for f in pending.sent):
            return False
        self._check(pending.sent, "a changelog record", flush=block)
        if pending.offsets:
            self.consumer.commit({TopicPartition(self.config.input_topic, p): _offset(o)
                                  for p, o in pending.offsets.items()},
                                 timeout_ms=max(100, int((self._deadline() - time.monotonic()) * 1000)))
        self._committed_window(pending.offsets, pending.written)
        self._pending = None
        return True

    def _commit_exactly_once(self) -> None:
        assert self.producer is not None and self.consumer is not None
        if not self._in_transaction:  # e.g. only evictions since the last commit
            self.producer.begin_transaction()
            self._in_transaction = True
        records, written = self._changelog_records()
        self._futures += self._send_changelog(records)
        # kafka-python 3.0 commits a transaction even if one of its batches expired: check every send first
        self._check(self._futures, "a record of the transaction", flush=True)
        if self._offsets:
            self._transactional("send_offsets", {TopicPartition(self.config.input_topic, p): _offset(o)
                                                 for p, o in self._offsets.items()})
        self._transactional("commit")
        self._in_transaction = False
        self._committed_window(dict(self._offsets), written)
        self._clear_window()

    @property
    def _commit_timeout_s(self) -> float:
        return float(self.config.extra.get("commit_timeout_s", COMMIT_TIMEOUT_S))

    def _transactional(self, step: str, offsets: dict[TopicPartition, Any] | None = None) -> None:
        """``send_offsets`` / ``commit`` / ``abort`` of the open transaction, waiting at most the commit timeout.

        kafka-python 3.0's public calls (``commit_transaction`` ...) are these three lines with an
        unbounded wait; this uses the same transaction manager calls with a deadline, marking progress
        while it waits. Raises ``KafkaTimeoutError`` on the deadline (the caller drops the producer).
        """
        producer = self.producer
        assert producer is not None and self.consumer is not None
        manager = getattr(producer, "_transaction_manager", None)
        sender = getattr(producer, "_sender", None)
        if manager is None or sender is None:  # not kafka-python 3.0: its public, unbounded calls
            if step == "send_offsets":
                producer.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
            else:
                (producer.commit_transaction if step == "commit" else producer.abort_transaction)()
            return
        if step == "send_offsets":
            result = manager.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
        else:
            result = manager.begin_commit() if step == "commit" else manager.begin_abort()
        sender.wakeup()
        deadline = self._deadline()
        while not result.wait(timeout_ms=200):  # raises the step's error once it failed
            self.metrics.mark_progress()
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(f"transaction {step} did not complete within the commit timeout "
                                        f"({self._commit_timeout_s} s)")

    def _deadline(self) -> float:
        """End of the current commit's time budget (one budget for all of its steps)."""
        if self._commit_deadline is None:
            return time.monotonic() + self._commit_timeout_s
        return self._commit_deadline

    def _check(self, futures: Sequence[Any], what: str, *, flush: bool) -> None:
        """Raise :class:`SendFailedError` unless every send in ``futures`` succeeded; ``flush`` waits for them first."""
        if flush:
            assert self.producer is not None
            self.producer.flush(timeout=max(0.1, self._deadline() - time.monotonic()))
        failed = [f for f in futures if not f.is_done or f.failed()]
        if failed:
            first = failed[0]
            raise SendFailedError(f"{len(failed)} of {len(futures)} sends failed or did not finish, "
                                  f"e.g. {what}: {first.exception if first.is_done else 'not done'}")

    def _send_changelog(self, records: Sequence[tuple[bytes, bytes | None, int]]) -> list[Any]:
        """Send ``(key, value, partition)`` records to the changelog topic; their futures."""
        assert self.producer is not None
        send, topic = self.producer.send, self.config.changelog_topic
        return [send(topic, key=key, value=value, partition=partition) for key, value, partition in records]

    def _changelog_records(self) -> tuple[list[tuple[bytes, bytes | None, int]], int]:
        """``(key, value, partition)`` of this commit's changelog records, and the bytes of state in them.

        Every bucket with a device touched or dropped since the last commit, tombstones for keys of
        another layout, one marker per partition. A bucket record holds the state of all the bucket's
        devices, column-wise (streams/state/changelog.py): one ``send`` and a few array copies per bucket
        instead of one of each per device keep the commit short.
        """
        store = self.detector.store
        bucket = self._device_bucket
        touched = {(p, bucket[d]) for d, p in self._dirty.items()} | self._dirty_buckets
        groups = [(key, sorted(d for d in self._members.get(key, ()) if d in store)) for key in sorted(touched)]
        n, buckets = self._n_partitions, self.config.changelog_buckets
        states = iter(encode_groups(store, [devices for _, devices in groups if devices]))
        records: list[tuple[bytes, bytes | None, int]] = []
        written = 0
        for (p, b), devices in groups:
            value = encode_bucket(next(states), self._offsets.get(p, -1)) if devices else None
            written += len(value) if value is not None else 0
            if value is not None and len(value) > BUCKET_WARN_BYTES:
                logger.warning("changelog bucket %d of partition %d holds %d devices (%d bytes): raise "
                               "changelog_buckets (now %d) to keep records small", b, p, len(devices), len(value),
                               buckets)
            records.append((bucket_key(b, buckets), value, p % n))
        records += [(key, None, p % n) for p, keys in self._stale_keys.items() for key in keys]
        records += [(MARKER_KEY, encode_marker(offset), p % n) for p, offset in self._offsets.items()]
        return records, written

    # -------------------------------------------------------------- failures
    def _fenced(self, exc: BaseException | None) -> bool:
        """Whether ``exc`` (or the producer's stored fatal error) says another producer took our transactional id."""
        if isinstance(exc, (ProducerFencedError, FencedError)):
            return True
        # kafka-python 3.0 re-raises a stored fatal error as a plain KafkaError naming it; the
        # transaction manager keeps the original (``last_error``), so look there, not at the text
        manager = getattr(self.producer, "_transaction_manager", None)
        return isinstance(getattr(manager, "last_error", None), ProducerFencedError)

    def _abandon_transaction(self, exc: BaseException | None) -> None:
        """Exactly-once: end the open transaction without committing it (abort, or drop the producer)."""
        if not self.config.exactly_once or self.producer is None:
            return
        if self._fenced(exc):
            self._stop.set()
            raise FencedError(f"this instance was fenced: another one uses transactional id "
                              f"{self.transactional_id!r}") from exc
        if not self._in_transaction and self._producer_ok:
            return
        self._in_transaction = False
        if self._producer_ok and (exc is None or isinstance(exc, _GENERATION_ERRORS)):
            # the broker answers (a rebalance, not an outage): abort right away
            try:
                self._transactional("abort")
                return
            except KafkaError as abort_exc:
                if self._fenced(abort_exc):
                    self._stop.set()
                    raise FencedError(f"this instance was fenced (transactional id {self.transactional_id!r})"
                                      ) from abort_exc
                logger.warning("abort_transaction failed (%s); recreating the producer", abort_exc)
        # broker unreachable, a send expired, or the producer is in a fatal state: a new producer's
        # init_transactions bumps the epoch, which aborts this transaction on the broker
        self._producer_ok = False
        _close_quietly(self.producer)

    def _discard_uncommitted(self, exc: BaseException | None, why: str) -> None:
        """Forget everything since the last commit; its partitions are restored and re-read from Kafka."""
        tainted = self._window_partitions()
        if self._pending is not None:
            tainted |= self._pending.partitions
            self._pending = None
        self.stats.rewinds += 1
        self._abandon_transaction(exc)
        self._clear_window()  # stale changelog keys among it are found again by the restore that follows
        redo = tainted & (self._ready | self._kept)
        if exc is not None or redo:
            logger.warning("%s%s; discarding the work since the last commit: partitions %s are restored from "
                           "the changelog and re-read from their committed offsets", why,
                           f" ({type(exc).__name__}: {exc})" if exc is not None else "", sorted(redo))
        if redo:
            self._drop_partitions(redo)
            self._kept -= redo
            self._to_restore |= redo

    def _recover(self, exc: BaseException) -> None:
        """After a failed step: discard uncommitted work, back off (marking progress), let the next step retry."""
        if self._fenced(exc):
            self._stop.set()
            raise FencedError(f"this instance was fenced: another one uses transactional id "
                              f"{self.transactional_id!r}") from exc
        self._failures += 1
        self.stats.recoveries += 1
        self._discard_uncommitted(exc, f"step failed (attempt {self._failures})")
        self._close_restore_client()
        delay = min(self.config.reconnect_backoff_max_s, BACKOFF_INITIAL_S * 2 ** min(self._failures - 1, 10))
        self.metrics.set_ready(False, f"recovering from {type(exc).__name__}; retrying in {delay:.1f} s")
        logger.warning("recovering from %s: %s; retrying in %.1f s", type(exc).__name__, exc, delay)
        until = time.monotonic() + delay
        while not self._stop.is_set() and time.monotonic() < until:
            self.metrics.mark_progress()  # waiting for the broker is not a hang
            time.sleep(min(0.2, max(0.0, until - time.monotonic())))

    # ------------------------------------------------------------- rebalance
    def _apply_rebalance_events(self) -> None:
        revoked: set[int] = set()
        got = False
        topic = self.config.input_topic
        while True:
            try:
                kind, tps = self._events.get_nowait()
            except Empty:
                break
            got = True
            parts = {tp.partition for tp in tps if tp.topic == topic}
            logger.info("partitions %s: %s", kind, sorted(parts))
            if kind == "revoked":
                revoked |= parts
                self._awaiting_assignment = True
            else:
                self._joined = True
                self._awaiting_assignment = False
        if got:
            assert self.consumer is not None
            if revoked and self._has_uncommitted():
                # the group generation moved on: this window can no longer commit
                self._discard_uncommitted(None, f"partitions {sorted(revoked)} revoked with uncommitted work")
            back = revoked & self._ready  # kept if the next assignment gives them back
            self._ready -= back
            self._kept |= back
            if not self._awaiting_assignment:
                # only an assignment that came after the last revocation is current: between the two the
                # consumer still reports the old one, and the group is rejoining
                current = {tp.partition for tp in self.consumer.assignment() if tp.topic == topic}
                gone = (self._ready | self._to_restore | self._kept) - current
                if gone:
                    self._drop_partitions(gone)
                    self._to_restore -= gone
                    self._kept -= gone
                self._to_restore |= current - self._ready
        self._update_ready()

    def _update_ready(self) -> None:
        assigned = {tp.partition for tp in (self.consumer.assignment() if self.consumer else set())}
        self.metrics.set_assignment((self.config.input_topic, p) for p in sorted(assigned))
        ready = self._joined and not self._to_restore and not (assigned - self._ready)
        self.metrics.set_ready(ready, "" if ready else "waiting for assignment or state restore")

    def _drop_partitions(self, parts: set[int]) -> None:
        """Forget the state of ``parts`` (revoked, or about to be restored)."""
        if not parts:
            return
        gone = [d for d, p in self._device_partition.items() if p in parts]
        self.detector.store.remove(gone)
        if self.shadow is not None:
            self.shadow.drop_devices(gone)
        self._forget(gone, rewrite=False)
        self._dirty_buckets = {(p, b) for p, b in self._dirty_buckets if p not in parts}
        for p in parts:
            self._stale_keys.pop(p, None)
            self._offsets.pop(p, None)
            self._position.pop(p, None)
            self._committed.pop(p, None)
        self._ready -= parts
        self._fresh |= parts
        self.metrics.set_active_devices(len(self.detector.store))

    def _restore_pending(self) -> None:
        """Committed offsets, then the changelog up to them, then seek; only then are the partitions' records used."""
        assert self.consumer is not None
        cfg = self.config
        parts = sorted(self._to_restore)
        tps = {p: TopicPartition(cfg.input_topic, p) for p in parts}
        owned = set(self.consumer.assignment())
        self.metrics.set_restoring_partitions(len(parts))
        # read_committed: blocks while a transaction's offset commit is pending (KIP-447 require_stable),
        # so the offsets fetched here are final before the changelog is read
        committed = {p: self.consumer.committed(tp, timeout_ms=COMMITTED_TIMEOUT_MS) for p, tp in tps.items()}
        keep = {p for p in parts if p in self._kept and committed[p] == self._committed.get(p)}
        stale = (self._kept & set(parts)) - keep
        if stale:
            self._drop_partitions(stale)
        load = [p for p in parts if p not in keep]
        report = None
        if load:
            try:
                report = restore_partitions(
                    self._restore_consumer(), cfg.changelog_topic, load, self.detector.store,
                    buckets=cfg.changelog_buckets,
                    min_next_offsets={p: committed[p] for p in load} if cfg.exactly_once else None,
                    timeout_s=RESTORE_TIMEOUT_S, marker_wait_s=MARKER_WAIT_S, on_progress=self.metrics.mark_progress)
            except BaseException:
                self._close_restore_client()
                raise
            for p, devices in report.devices.items():
                self._place((d, p) for d in devices)
            for p, keys in report.stale_keys.items():
                self._stale_keys.setdefault(p, []).extend(keys)
        missing = [tps[p] for p in parts if committed[p] is None]
        beginnings = self.consumer.beginning_offsets(missing) if missing else {}
        for p in parts:
            tp = tps[p]
            position = committed[p] if committed[p] is not None else beginnings[tp]
            if tp in owned:
                # an explicit offset, not seek_to_beginning(): a pending reset racing with the automatic one of
                # the assignment was seen to move the position back to 0 after records had been processed
                self.consumer.seek(tp, position)
            self._position[p] = position
            self._committed[p] = committed[p]
            logger.info("%s[%d]: %s, resuming at offset %d", cfg.input_topic, p,
                        "in-memory state kept" if p in keep else
                        f"{len(report.devices.get(p, [])) if report else 0} devices restored", position)
        self._ready |= set(parts)
        self._fresh |= set(parts)
        self._kept -= set(parts)
        self._to_restore.clear()
        self.metrics.set_restoring_partitions(0)
        self.stats.kept_partitions += len(keep)
        if report is not None:
            self.stats.restores += 1
            self.stats.restored_devices += report.restored
            self.stats.discarded_snapshots.update(report.discarded)
            discarded = Counter({"model_version": report.discarded.get("model_version", 0),
                                 "corrupt": report.discarded.get("corrupt", 0) + report.discarded.get("format", 0)})
            self.metrics.observe_restore(report.seconds, report.restored, +discarded)
        self._update_ready()

    def _restore_consumer(self) -> KafkaConsumer:
        """One group-less consumer for every restore (creating one costs a bootstrap round trip)."""
        if self._restore_client is None:
            self._restore_client = KafkaConsumer(
                enable_auto_commit=False, group_id=None, auto_offset_reset="earliest",
                isolation_level="read_committed" if self.config.exactly_once else "read_uncommitted",
                max_partition_fetch_bytes=16 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024,
                **self._client_config())
        return self._restore_client

    def _close_restore_client(self) -> None:
        client, self._restore_client = self._restore_client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

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
        if self.shadow is not None and gone:
            self.shadow.drop_devices(gone)
        self._forget(gone, rewrite=True)
        if gone:
            self.metrics.add_evictions(len(gone))

    def close(self) -> None:
        """Leave the group and close the clients (idempotent); an open transaction is aborted."""
        if self._in_transaction and self.producer is not None and self._producer_ok:
            try:
                self._transactional("abort")
            except KafkaError as exc:  # the broker aborts it when this id comes back, or on its timeout
                logger.warning("aborting the open transaction on close failed: %s", exc)
                self._producer_ok = False
        self._in_transaction = False
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False)
            except KafkaError as exc:
                logger.warning("closing the consumer failed: %s", exc)
            self.consumer = None
        self._close_restore_client()
        if self.producer is not None:
            if self._producer_ok:
                try:
                    self.producer.close(timeout=10)
                except KafkaError as exc:
                    logger.warning("closing the producer failed: %s", exc)
            else:
                _close_quietly(self.producer)
            self.producer = None
            self._producer_ok = False
        self.metrics.set_ready(False, "stopped")


def _warn_if_slow_crc() -> None:
    """kafka-python checksums every record batch it sends or fetches with CRC-32C; without the ``crc32c``
    package it does so in pure Python (measured here: 3x fewer sends per second, changelog restores 3.5x slower)."""
    try:
        from kafka.record import util
    except ImportError:  # pragma: no cover - another kafka-python layout
        return
    if getattr(util, "crc32c_c", True) is None:
        logger.warning("kafka-python uses its pure-Python CRC-32C: install the crc32c package (pip install crc32c) "
                       "for about 3x the produce rate and 3.5x faster state restores")


def _close_quietly(producer: KafkaProducer) -> None:
    """Close a producer that may be broken without waiting for its buffered records.

    kafka-python 3.0's ``close(timeout=0)`` raises from its flush before stopping the sender
    thread, so the sender is force-closed directly when that happens (a private attribute).
    """
    try:
        producer.close(timeout=0)
    except Exception as exc:  # a broken producer: its records are abandoned on purpose
        logger.debug("closing a dropped producer: %r", exc)
        sender = getattr(producer, "_sender", None)
        if sender is not None:
            with contextlib.suppress(Exception):
                sender.force_close()


def _offset(offset: int) -> OffsetAndMetadata:
    """kafka-python's OffsetAndMetadata for a commit (no metadata, no leader epoch)."""
    return OffsetAndMetadata(offset, "", -1)


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
