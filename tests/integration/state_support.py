"""Shared pieces of the state / exactly-once integration tests (test_state.py, test_eos_*.py).

Why a module: every crash, rebalance, fencing and broker-restart test compares its run with ONE
uninterrupted run of the same input (the baseline), and starts real service processes
(``python -m streams.cli serve``) so that SIGKILL is a real kill. The model and the baseline are
computed once per test session and cached here.

Comparison rules (issue 4): every reading is identified by its input (partition, offset). In
exactly-once mode the score stream and the events topic, read with ``read_committed``, must hold
each reading exactly once, with the baseline's status and a score within :data:`SCORE_TOLERANCE`;
at-least-once may repeat readings, but only those at or after the offsets committed when the
instance died, and never miss one.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from anomaly.bundle import ModelBundle
from anomaly.synthetic import InjectedAnomaly
from streams.codec import decode_event
from streams.config import ServiceConfig
from streams.kafka.admin import TopicSpec, admin_client, ensure_topics
from tests.integration.helpers import TRAIN_STEPS, ProcessorThread, consume_all, fleet_messages, produce, scores_of

__all__ = [
    "PARTITIONS",
    "SCORE_TOLERANCE",
    "Baseline",
    "Instance",
    "RunOutput",
    "baseline_for",
    "committed_offsets",
    "compare_exactly_once",
    "end_offsets",
    "input_messages",
    "model_dir",
    "read_output",
    "trickle",
    "wait_group_settled",
    "wait_until_committed",
]

PARTITIONS = 4
SCORE_TOLERANCE = 1e-5
STEPS = 300
"""Readings per device (8 devices → 2,400 messages): long enough for warm-up, episodes and a crash."""
ANOMALIES = (
    InjectedAnomaly("dev-00001", "level_shift", start_step=TRAIN_STEPS + 60, duration=80, features="current",
                    magnitude=30.0),
    InjectedAnomaly("dev-00002", "spike", start_step=TRAIN_STEPS + 120, duration=3, features="vibration",
                    magnitude=20.0),
    InjectedAnomaly("dev-00005", "noise", start_step=TRAIN_STEPS + 180, duration=70, features="pressure",
                    magnitude=10.0),
)

_cache: dict[str, Any] = {}


def model_dir() -> Path:
    """A small trained model, trained once per session (tests.integration.helpers.train_bundle)."""
    if "model" not in _cache:
        from tests.integration.helpers import train_bundle

        directory = Path(tempfile.mkdtemp(prefix="state-model-"))
        train_bundle(directory)
        _cache["model"] = directory
    return _cache["model"]


def input_messages() -> list[tuple[bytes, bytes]]:
    """The fleet's readings with three injected anomalies, time-ordered (same list every call)."""
    if "messages" not in _cache:
        _cache["messages"], _ = fleet_messages(STEPS, anomalies=ANOMALIES)
    return _cache["messages"]


def new_topic(bootstrap: str, prefix: str) -> str:
    """A fresh input topic with PARTITIONS partitions (same keys → same partitions and offsets as the baseline)."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    admin = admin_client(bootstrap)
    try:
        ensure_topics(admin, {name: TopicSpec(PARTITIONS)})
    finally:
        admin.close()
    return name


@dataclass
class RunOutput:
    """What a run left in Kafka: score rows by (partition, offset) and decoded events."""

    scores: dict[tuple[int, int], list[dict[str, Any]]]
    events: list[dict[str, Any]]

    def event_keys(self) -> Counter[tuple[Any, ...]]:
        return Counter(_event_key(e) for e in self.events)


def _event_key(event: dict[str, Any]) -> tuple[Any, ...]:
    source = event["source"]
    return event["device_id"], event["ts_ms"], event["kind"], source["partition"], source["offset"]


def read_output(bootstrap: str, topic: str, read_committed: bool) -> RunOutput:
    rows = scores_of(consume_all(bootstrap, f"{topic}.scores", read_committed=read_committed, idle_s=1.0))
    scores: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        scores[(row["partition"], row["offset"])].append(row)
    events = [decode_event(r.value) for r in consume_all(bootstrap, f"{topic}.events", read_committed=read_committed,
                                                         idle_s=1.0)]
    return RunOutput(dict(scores), events)


@dataclass
class Baseline:
    output: RunOutput
    sent: int


def config(bootstrap: str, topic: str, group: str, guarantee: str = "exactly_once", **extra: Any) -> ServiceConfig:
    settings: dict[str, Any] = {
        "bootstrap_servers": bootstrap, "model_dir": model_dir(), "input_topic": topic,
        "events_topic": f"{topic}.events", "dlq_topic": f"{topic}.dlq", "group_id": group,
        "processing_guarantee": guarantee, "commit_interval_s": 0.2, "poll_timeout_ms": 50,
        "max_poll_records": 200}
    hooks = {"scores_topic": f"{topic}.scores", **extra.pop("extra", {})}
    return ServiceConfig(**(settings | extra), extra=hooks)


def baseline_for(bootstrap: str) -> Baseline:
    """One uninterrupted exactly-once instance over the whole input (cached per broker address)."""
    key = f"baseline:{bootstrap}"
    if key not in _cache:
        topic = new_topic(bootstrap, "baseline")
        sent = produce(bootstrap, topic, input_messages())
        group = f"g-{uuid.uuid4().hex[:8]}"
        worker = ProcessorThread(config(bootstrap, topic, group), ModelBundle.load(model_dir()))
        wait_until_committed(bootstrap, topic, group, timeout_s=120, check=lambda: worker.error)
        worker.stop()
        output = read_output(bootstrap, topic, read_committed=True)
        assert len(output.scores) == sent, f"baseline scored {len(output.scores)} of {sent} readings"
        assert output.event_keys(), "the baseline raised no events: the comparison would prove little"
        _cache[key] = Baseline(output, sent)
    return _cache[key]


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return {tp.partition: o for tp, o in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, topic: str, group: str, stable: bool = True) -> dict[int, int]:
    """The group's committed offsets.

    ``stable`` (read_committed) waits for pending transactional offset commits. Without it, the offsets
    committed so far are returned at once: right after a SIGKILL the dead instance's open transaction
    keeps its offsets pending until the broker aborts it (the transaction timeout) or the restarted
    instance does, so a stable read would wait for the very restart that comes after it.
    """
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                             isolation_level="read_committed" if stable else "read_uncommitted")
    try:
        return {p: consumer.committed(TopicPartition(topic, p), timeout_ms=30_000) or 0 for p in range(PARTITIONS)}
    finally:
        consumer.close()


def wait_until_committed(bootstrap: str, topic: str, group: str, timeout_s: float = 90.0,
                         check: Callable[[], Any] | None = None, expected: dict[int, int] | None = None) -> None:
    """Until the group has committed every partition to its end (``check`` may raise or return an error)."""
    deadline = time.monotonic() + timeout_s
    want = expected or end_offsets(bootstrap, topic)
    while True:
        have = committed_offsets(bootstrap, topic, group)
        if all(have[p] >= want[p] for p in want):
            return
        problem = check() if check is not None else None
        if isinstance(problem, BaseException):
            raise problem
        if problem:
            raise AssertionError(problem)
        if time.monotonic() > deadline:
            faulthandler.dump_traceback(all_threads=True)  # where an in-process processor is stuck, if it is
            raise TimeoutError(f"group {group} committed {have}, wanted {want}")
        time.sleep(0.5)


def trickle(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], chunks: int = 12,
            pause_s: float = 0.4) -> threading.Thread:
    """Produce ``messages`` in order, in ``chunks`` with pauses, from a daemon thread (the stream keeps coming)."""
    size = -(-len(messages) // chunks)

    def run() -> None:
        for i in range(0, len(messages), size):
            produce(bootstrap, topic, messages[i:i + size])
            time.sleep(pause_s)

    thread = threading.Thread(target=run, daemon=True, name="trickle")
    thread.start()
    return thread


@dataclass
class Instance:
    """One ``sensor-anomaly serve`` process; output goes to a log file (a pipe could fill and block it)."""

    name: str
    bootstrap: str
    topic: str
    group: str
    guarantee: str
    log_dir: Path
    transactional_id: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    logs: list[Path] = field(default_factory=list)

    def start(self) -> Instance:
        self.starts += 1
        log = self.log_dir / f"{self.name}-{self.starts}.log"
        self.logs.append(log)
        cmd = [sys.executable, "-m", "streams.cli", "serve", "--bootstrap", self.bootstrap, "--model", str(model_dir()),
               "--input-topic", self.topic, "--events-topic", f"{self.topic}.events", "--dlq-topic",
               f"{self.topic}.dlq", "--group", self.group, "--guarantee", self.guarantee, "--metrics-port", "0",
               "--metrics-host", "127.0.0.1", "--commit-interval", "0.2", "--max-poll-records", "200",
               "--scores-topic", f"{self.topic}.scores"]
        if self.transactional_id:
            cmd += ["--transactional-id", self.transactional_id]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no commit, no LeaveGroup, an open transaction left hanging."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait: finishes the batch, commits, leaves the group; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise AssertionError(f"{self.name} did not stop on SIGTERM within {timeout_s} s\n{self.output()}") from None

    def output(self, lines: int = 60) -> str:
        text = []
        for log in self.logs:
            body = log.read_text(errors="replace").splitlines() if log.exists() else []
            text.append(f"--- {log.name} (last {lines} lines) ---\n" + "\n".join(body[-lines:]))
        return "\n".join(text)

    def log_text(self) -> str:
        return "\n".join(log.read_text(errors="replace") for log in self.logs if log.exists())

    def wait_for_log(self, needle: str, timeout_s: float = 60.0, current: bool = False) -> None:
        """Wait until the log (``current``: the log of the running process only, not of earlier ones) has ``needle``."""
        deadline = time.monotonic() + timeout_s
        while needle not in (self.logs[-1].read_text(errors="replace") if current and self.logs[-1].exists()
                             else "" if current else self.log_text()):
            if not self.alive():
                raise AssertionError(f"{self.name} exited before logging {needle!r}\n{self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not log {needle!r} within {timeout_s} s\n{self.output()}")
            time.sleep(0.2)



def wait_group_settled(instances: list[Instance], quiet_s: float = 4.0, timeout_s: float = 60.0) -> None:
    """Until every instance has partitions and no rebalance line has appeared in their logs for ``quiet_s``.

    A group of instances that just started can rebalance once more shortly after the first
    assignment (kafka-python's leader re-checks the subscription's metadata); a run whose readings
    are checked against "committed before the disruption" must start after that, or the extra
    rebalance's at-least-once replay looks like a repeat before the disruption.
    """
    def rebalance_lines() -> list[str]:
        return [line for inst in instances for line in inst.log_text().splitlines()
                if "streams.processor: partitions " in line]

    deadline = time.monotonic() + timeout_s
    seen, since = rebalance_lines(), time.monotonic()
    while True:
        for inst in instances:
            assert inst.alive(), f"{inst.name} died\n{inst.output()}"
        now = rebalance_lines()
        if now != seen:
            seen, since = now, time.monotonic()
        last = {inst.name: [line for line in inst.log_text().splitlines()
                            if "streams.processor: partitions " in line][-1:] for inst in instances}
        if (time.monotonic() - since >= quiet_s
                and all(lines and "partitions assigned: [" in lines[0] and "[]" not in lines[0]
                        for lines in last.values())):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the group did not settle within {timeout_s} s: {last}")
        time.sleep(0.2)


def compare_exactly_once(run: RunOutput, baseline: Baseline) -> None:
    """Every reading exactly once with the baseline's status and score; the very same events."""
    dups = {k: len(v) for k, v in run.scores.items() if len(v) > 1}
    assert not dups, f"{len(dups)} readings scored more than once in exactly-once mode, e.g. {list(dups.items())[:5]}"
    missing = set(baseline.output.scores) - set(run.scores)
    extra = set(run.scores) - set(baseline.output.scores)
    assert not missing and not extra, f"missing {sorted(missing)[:5]} ({len(missing)}), extra {sorted(extra)[:5]}"
    assert_scores_match(run, baseline)
    assert run.event_keys() == baseline.output.event_keys(), (
        f"events differ: only in the run {run.event_keys() - baseline.output.event_keys()}, "
        f"only in the baseline {baseline.output.event_keys() - run.event_keys()}")
    base_scores = {_event_key(e): e["score"] for e in baseline.output.events}
    for event in run.events:
        assert abs(event["score"] - base_scores[_event_key(event)]) <= SCORE_TOLERANCE, event


def assert_scores_match(run: RunOutput, baseline: Baseline, only_first_processing: bool = False) -> int:
    """Each (scored or warm-up) row matches the baseline's row of that reading; returns rows compared."""
    compared = 0
    worst = 0.0
    for key, rows in run.scores.items():
        (base,) = baseline.output.scores[key]
        for row in rows:
            if row["status"] in ("duplicate", "out_of_order") and base["status"] not in ("duplicate", "out_of_order"):
                continue  # at-least-once replay against state already ahead of it (checked by the caller)
            assert row["status"] == base["status"], f"reading {key}: status {row['status']} vs {base['status']}"
            if base["score"] is None:
                assert row["score"] is None, f"reading {key}: score {row['score']} vs none"
            else:
                diff = abs(row["score"] - base["score"])
                worst = max(worst, diff)
                assert diff <= SCORE_TOLERANCE, f"reading {key}: score {row['score']} vs {base['score']}"
            compared += 1
    return compared
