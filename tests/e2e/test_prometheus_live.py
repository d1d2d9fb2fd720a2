"""A real Prometheus scraping the running service: every metric has samples, every dashboard and alert query data.

Why this test exists: the metrics are a product surface (issue 5). A dashboard panel whose query names a
metric that is never exposed, or a label value that never appears, shows "No data" forever and no
unit test notices. Here the shipped files meet the real thing:

1. Prometheus (Debian's ``prometheus`` binary) starts on a free port with the shipped
   ``deploy/prometheus/prometheus.yml`` (rendered to point at the local service, scrape and rule
   evaluation every second) and the shipped ``alerts.yml``.
2. The service (``python -m streams.cli serve``, a subprocess as in production) runs on the session's
   broker with the small fleet model of ``tests/integration/helpers.py``. Phase A: the simulated fleet
   with injected anomalies, then duplicates, an out-of-order reading and poison messages.
3. Phase B: a second instance (the helper, not scraped) joins the group and takes one of the two
   partitions; more of the fleet and more poison messages are split between the two. The helper
   leaves; the service gets the partition back and restores its devices from the changelog while
   Prometheus watches (a restore at start-up can happen before the first scrape, and a counter that
   is already 1 when first scraped shows no increase). Phase C: more of the fleet.
4. Every check then queries Prometheus's HTTP API at one instant, after every rule has been
   evaluated on the final data:

   * every metric :class:`ServiceMetrics` registers has samples, and the issue's metrics carry the
     numbers the scenario implies (readings by outcome, dead letters by reason, restored devices, ...);
   * EVERY panel query of ``deploy/grafana/dashboard.json`` (template variables expanded as Grafana
     would with "All" selected) parses and returns at least one series, with finite values;
   * EVERY alert expression of ``alerts.yml`` parses and evaluates; and because an alert expression
     is a condition that is *meant* to be empty while all is well, its operands are checked for data
     by evaluating it with ``bool`` after every comparison (``x > 5`` becomes ``x > bool 5``: 0 or 1
     per series instead of a filter) and ``absent(x)`` replaced by ``x``;
   * Prometheus itself evaluated every rule without error, and the alerts about health are quiet.

Run alone: ``.venv/bin/python -m pytest tests/e2e/test_prometheus_live.py``. Needs the ``prometheus``
binary (skipped without it, FAILED under ``CI=true``) and a broker (``tests/kafka_broker.py``).
"""

from __future__ import annotations

import math
import re
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2
from prometheus_client.parser import text_string_to_metric_families

from anomaly.bundle import ModelBundle
from anomaly.synthetic import InjectedAnomaly
from streams.kafka.admin import admin_client
from streams.metrics import ServiceMetrics
from tests.e2e.test_prometheus_config import (
    JOB,
    alert_rules,
    dashboard_queries,
    load_dashboard,
    render_prometheus_config,
)
from tests.integration.helpers import FLEET, TRAIN_STEPS, fleet_messages, produce

if TYPE_CHECKING:
    from tests.e2e.conftest import PrometheusServer, ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]

SCRAPE_INTERVAL = "1s"
PARTITIONS = 2
PHASE_STEPS = 100
"""Readings per device per phase: 8 devices x 100 = 800 messages, enough for warm-up (10 readings),
anomalies and a few commits, small enough to keep the test near a minute on two cores."""
WAIT_S = 60.0
RATE_INTERVAL = "1m"
"""What ``$__rate_interval`` expands to: Grafana uses max(4 x scrape interval, step + scrape interval)."""

ANOMALIES = [
    InjectedAnomaly("dev-00001", "level_shift", start_step=TRAIN_STEPS + 30, duration=30, features="current",
                    magnitude=30.0),
    InjectedAnomaly("dev-00002", "spike", start_step=TRAIN_STEPS + 50, duration=3, features="vibration",
                    magnitude=20.0),
    InjectedAnomaly("dev-00005", "level_shift", start_step=TRAIN_STEPS + PHASE_STEPS + 20, duration=30,
                    features="temp", magnitude=30.0),
]
POISON: list[tuple[bytes, bytes, str]] = [
    (b"dev-00000", b"not json", "invalid_json"),
    (b"dev-00001", b"[1, 2, 3]", "not_an_object"),
    (b"dev-00002", b'{"device_id": "dev-00002", "values": {"temp": 1.0}}', "missing_field"),
    (b"dev-00003", b'{"device_id": "dev-00003", "ts": 1700000000000, "values": {"temp": "hot"}}', "wrong_type"),
]
"""(key, value, dead-letter reason): sent once per phase, 8 of about 1600 messages (DLQ alert stays quiet)."""

HEALTHY_QUIET_ALERTS = {
    "SensorAnomalyDown", "SensorAnomalyTargetMissing", "SensorAnomalyStalled", "SensorAnomalyNoReadings",
    "SensorAnomalyDeadLetterRateHigh", "SensorAnomalyAnomalyRateHigh", "SensorAnomalyStateRestoreStuck",
    "SensorAnomalyStateRestoreSlow", "SensorAnomalyModelReloadFailing",
}  # fmt: skip
"""Alerts whose condition must be false for this healthy run. Left out: consumer lag (a burst of 800
messages can be in flight when the lag gauge updates) and end-to-end latency (wall-clock dependent)."""


# ---------------------------------------------------------------------------- PromQL rewriting

_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")


def with_bool_comparisons(expr: str) -> str:
    """``expr`` with ``bool`` after each comparison operator outside label matchers and strings.

    A comparison filters (``x > 5`` keeps the series above 5); with ``bool`` it returns 0 or 1 for
    every series of its operands, so a non-empty result shows the operands have data whatever the
    condition's truth.

    >>> with_bool_comparisons('sum(x{a!="b", c=~"d>"}) > 1000 and y != 0')
    'sum(x{a!="b", c=~"d>"}) > bool 1000 and y != bool 0'
    >>> with_bool_comparisons("x >= bool 1")
    'x >= bool 1'
    """
    out: list[str] = []
    i, depth, quote = 0, 0, ""
    while i < len(expr):
        ch = expr[i]
        if quote:
            out.append(ch)
            if ch == "\\" and i + 1 < len(expr):
                out.append(expr[i + 1])
                i += 1
            elif ch == quote:
                quote = ""
            i += 1
            continue
        if ch in "\"'`":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif depth == 0:
            op = next((o for o in _COMPARISONS if expr.startswith(o, i)), None)
            if op is not None:
                out.append(op)
                i += len(op)
                if not re.match(r"\s*bool\b", expr[i:]):
                    out.append(" bool")
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def without_absent(expr: str) -> str:
    """``absent(x)`` replaced by ``x`` (absent is empty exactly when its argument has data).

    >>> without_absent('absent(up{job="a"}) or absent(f(b))')
    'up{job="a"} or f(b)'
    """
    while (match := re.search(r"\babsent\s*\(", expr)) is not None:
        depth, j = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(expr[j], 0)
            j += 1
        expr = expr[: match.start()] + expr[match.end() : j - 1] + expr[j:]
    return expr


# ---------------------------------------------------------------------------- the scenario


@dataclass
class LiveRun:
    """What the scenario left running, and what it sent."""

    prometheus: PrometheusServer
    service: ServiceProcess
    topic: str
    at: float
    """The instant every check queries (after the final data was scraped and every rule evaluated)."""
    bundle: ModelBundle
    accepted_readings: int
    duplicates: int
    out_of_order: int
    dead_letters: Counter[str]
    helper_counts: dict[str, Counter[str]]
    """The helper instance's final ``readings_total`` by outcome and ``dead_letters_total`` by reason."""
    moved_devices: int
    """Devices of the partition that moved to the helper and back (their state was restored)."""

    def values(self, expr: str) -> list[float]:
        return self.prometheus.values(expr, at=self.at)

    def by_label(self, expr: str, label: str) -> dict[str, float]:
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in self.prometheus.query(expr, at=self.at)}

    def total(self, metric: str, matchers: str = "") -> float:
        (value,) = self.values(f'sum({metric}{{job="{JOB}"{matchers}}})')
        return value


def wait_committed(bootstrap: str, group: str, topic: str, timeout_s: float) -> None:
    """Wait until ``group`` has committed every partition of ``topic`` up to its end offset.

    The consumer carries the group id only to read its committed offsets: it never subscribes, so it
    never joins the group.
    """
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        deadline = time.monotonic() + timeout_s
        while True:
            ends = consumer.end_offsets(tps)
            committed = {tp: consumer.committed(tp) for tp in tps}
            if all((committed[tp] or 0) >= ends[tp] for tp in tps):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"group {group} did not commit {topic} to its end: {committed} vs {ends}")
            time.sleep(0.25)
    finally:
        consumer.close(autocommit=False)


def scrape_counts(service: ServiceProcess) -> dict[str, Counter[str]]:
    """``readings_total`` by outcome and ``dead_letters_total`` by reason, read from a service's /metrics."""
    with urllib.request.urlopen(service.metrics_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, Counter[str]] = {"readings": Counter(), "dead_letters": Counter()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sensor_anomaly_readings_total":
                out["readings"][sample.labels["outcome"]] += int(sample.value)
            elif sample.name == "sensor_anomaly_dead_letters_total" and sample.value:
                out["dead_letters"][sample.labels["reason"]] += int(sample.value)
    return out


def partition_of(key: bytes) -> int:
    """The partition the producer's default partitioner (murmur2, as the Java client) picks for ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % PARTITIONS


def anomalies_before(step: int) -> list[InjectedAnomaly]:
    """The injected anomalies that start before ``step`` (the simulator warns about later ones)."""
    return [a for a in ANOMALIES if a.start_step < step]


def messages_by_device(messages: list[tuple[bytes, bytes]]) -> dict[bytes, list[tuple[bytes, bytes]]]:
    """Messages per device key, in send order."""
    per_device: dict[bytes, list[tuple[bytes, bytes]]] = {}
    for key, value in messages:
        per_device.setdefault(key, []).append((key, value))
    return per_device


def wait_rules_evaluated(prom: PrometheusServer, after: float) -> None:
    """Wait until Prometheus has evaluated every rule after the epoch time ``after``."""
    deadline = time.monotonic() + WAIT_S
    while True:
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        if rules and min(_timestamp(r.get("lastEvaluation", "")) for r in rules) > after:
            return
        assert time.monotonic() < deadline, f"rules not evaluated after {WAIT_S:.0f} s: {rules}"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def live(
    prometheus_binary: str,  # first: without it the test skips (fails under CI) before the broker starts
    kafka_bootstrap: str,
    e2e_model: tuple[Path, ModelBundle],
    prometheus_server: Callable[[Path], PrometheusServer],
    service_process: Callable[..., ServiceProcess],
    free_port: Callable[[], int],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveRun]:
    """The scenario. Prometheus scrapes one instance; a second one (the helper, not scraped) joins the group
    for phase B and leaves again, so the scraped instance gives a partition away and gets it back, restoring
    its devices from the changelog while Prometheus watches (a restore at start-up can beat the first scrape).
    """
    model_dir, bundle = e2e_model
    tag = uuid.uuid4().hex[:8]
    topic, group = f"e2e-prometheus-{tag}", f"e2e-prometheus-{tag}"
    port = free_port()
    target = f"127.0.0.1:{port}"
    config = render_prometheus_config(target, tmp_path_factory.mktemp("prometheus-config"),
                                      scrape_interval=SCRAPE_INTERVAL, evaluation_interval=SCRAPE_INTERVAL)
    prom = prometheus_server(config)
    serve_args = ("--bootstrap", kafka_bootstrap, "--model", str(model_dir), "--group", group,
                  "--input-topic", topic, "--events-topic", f"{topic}.events", "--dlq-topic", f"{topic}.dlq",
                  "--partitions", str(PARTITIONS), "--commit-interval", "0.5")
    total = f'sum(sensor_anomaly_readings_total{{job="{JOB}"}})'
    assigned = f'sum(sensor_anomaly_assigned_partitions{{job="{JOB}"}})'
    poison = [(key, value) for key, value, _ in POISON]
    services: list[ServiceProcess] = []
    try:
        # -- phase A: the fleet, then duplicates, an out-of-order reading and poison messages
        service = service_process(*serve_args, metrics_port=port)
        services.append(service)
        service.wait_ready(WAIT_S)
        prom.wait_until(f'up{{job="{JOB}"}}', lambda v: v == 1, WAIT_S, "Prometheus to scrape the service")
        messages_a, _ = fleet_messages(PHASE_STEPS, anomalies=anomalies_before(TRAIN_STEPS + PHASE_STEPS))
        produce(kafka_bootstrap, topic, messages_a)
        prom.wait_until(total, lambda v: v >= len(messages_a), WAIT_S, "phase A readings in Prometheus")
        per_device = messages_by_device(messages_a)
        replays = [per_device[b"dev-00000"][-1], per_device[b"dev-00001"][-1], per_device[b"dev-00002"][50]]
        produce(kafka_bootstrap, topic, replays + poison)
        seen = len(messages_a) + len(replays) + len(poison)
        prom.wait_until(total, lambda v: v >= seen, WAIT_S, "phase A replays and poison in Prometheus")
        wait_committed(kafka_bootstrap, group, topic, WAIT_S)

        # -- phase B: the helper joins and takes one partition; fleet and poison split between the two
        helper = service_process(*serve_args)
        services.append(helper)
        helper.wait_ready(WAIT_S)
        prom.wait_until(assigned, lambda v: v == PARTITIONS - 1, WAIT_S, "a partition to move to the helper")
        messages_b, _ = fleet_messages(PHASE_STEPS, first_step=TRAIN_STEPS + PHASE_STEPS,
                                       anomalies=anomalies_before(TRAIN_STEPS + 2 * PHASE_STEPS))
        produce(kafka_bootstrap, topic, messages_b + poison)
        wait_committed(kafka_bootstrap, group, topic, WAIT_S)
        helper_counts = scrape_counts(helper)
        assert helper.stop() == 0, f"helper exit code {helper.process.returncode}:\n{helper.log_tail()}"

        # -- phase C: the partition is back (restored from the changelog); more of the fleet
        prom.wait_until(assigned, lambda v: v == PARTITIONS, WAIT_S, "the partition back after the helper left")
        service.wait_ready(WAIT_S)
        messages_c, _ = fleet_messages(PHASE_STEPS // 4, first_step=TRAIN_STEPS + 2 * PHASE_STEPS,
                                       anomalies=anomalies_before(TRAIN_STEPS + 3 * PHASE_STEPS))
        produce(kafka_bootstrap, topic, messages_c)
        sent = seen + len(messages_b) + len(poison) + len(messages_c)
        by_helper = sum(helper_counts["readings"].values())
        prom.wait_until(total, lambda v: v >= sent - by_helper, WAIT_S, "phase C readings in Prometheus")

        # -- every rule evaluated on the final data (one more scrape, then an evaluation after it)
        wait_rules_evaluated(prom, after=time.time() + 1.0)
        assert service.process.poll() is None, f"the service exited:\n{service.log_tail()}"
        yield LiveRun(
            prometheus=prom, service=service, topic=topic, at=time.time(), bundle=bundle,
            accepted_readings=len(messages_a) + len(replays) + len(messages_b) + len(messages_c),
            duplicates=2, out_of_order=1, dead_letters=Counter(reason for _, _, reason in POISON * 2),
            helper_counts=helper_counts,
            moved_devices=len({key for key in per_device if partition_of(key) == PARTITIONS - 1}),
        )
    finally:
        for started in services:  # before the topics go, so that their final commits succeed
            started.stop()
        admin = admin_client(kafka_bootstrap, client_id="e2e-cleanup")
        try:
            names = [topic, f"{topic}.events", f"{topic}.dlq", f"{group}-state-changelog"]
            existing = set(admin.list_topics())
            admin.delete_topics([n for n in names if n in existing])
        except Exception:  # cleanup only: leftover uniquely named topics harm no other test
            pass
        finally:
            admin.close()


def _timestamp(rfc3339: str) -> float:
    """Seconds since the epoch of Prometheus's RFC 3339 timestamps (nanosecond fractions, ``Z``)."""
    from datetime import datetime

    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", rfc3339)
    if match is None:
        return 0.0
    zone = "+00:00" if match.group(3) == "Z" else match.group(3)
    whole = datetime.fromisoformat(match.group(1) + zone).timestamp()
    return whole + float(match.group(2) or 0.0)


# ---------------------------------------------------------------------------- metrics


def test_every_registered_metric_has_samples(live: LiveRun) -> None:
    names = ServiceMetrics(process_metrics=True, topics=[live.topic]).metric_names()
    assert {"sensor_anomaly_readings_total", "process_cpu_seconds_total"} <= names
    missing = [name for name in sorted(names) if not live.values(f'{{__name__="{name}", job="{JOB}"}}')]
    assert not missing, f"metrics registered by ServiceMetrics without samples in Prometheus: {missing}"


def test_readings_and_dead_letters_add_up_to_what_was_sent(live: LiveRun) -> None:
    outcome = Counter(live.by_label(f'sum by (outcome) (sensor_anomaly_readings_total{{job="{JOB}"}})',
                                    "outcome"))
    outcome.update(live.helper_counts["readings"])
    # devices that moved continue from restored state: no device warms up twice
    assert outcome["warmup"] == FLEET.n_devices * live.bundle.config.warmup_steps
    assert outcome["duplicate"] == live.duplicates
    assert outcome["out_of_order"] == live.out_of_order
    assert outcome["scored"] == live.accepted_readings - outcome["warmup"] - live.duplicates - live.out_of_order
    assert outcome["invalid"] == sum(live.dead_letters.values())
    reasons = Counter(live.by_label(f'sum by (reason) (sensor_anomaly_dead_letters_total{{job="{JOB}"}}) > 0',
                                    "reason"))
    assert reasons + live.helper_counts["dead_letters"] == live.dead_letters
    scored_here = outcome["scored"] - live.helper_counts["readings"]["scored"]
    assert live.total("sensor_anomaly_score_count") == scored_here
    accepted_here = live.accepted_readings - sum(n for o, n in live.helper_counts["readings"].items() if o != "invalid")
    assert live.total("sensor_anomaly_end_to_end_latency_seconds_count") == accepted_here


def test_issue_metrics_carry_the_scenarios_numbers(live: LiveRun) -> None:
    assert live.total("sensor_anomaly_anomaly_events_total", ', kind="start"') >= 1, "no anomaly episode started"
    assert live.total("sensor_anomaly_anomaly_events_total", ', kind="end"') >= 1, "no anomaly episode ended"
    assert live.values(f'sensor_anomaly_open_episodes{{job="{JOB}"}}'), "no open-episodes gauge"
    assert live.total("sensor_anomaly_batch_duration_seconds_count") >= 3  # one poll batch per phase at least
    assert live.total("sensor_anomaly_batch_size_readings_count") == live.total(
        "sensor_anomaly_batch_duration_seconds_count")
    lag = live.by_label(f'sensor_anomaly_consumer_lag_messages{{job="{JOB}"}}', "partition")
    assert sorted(lag) == [str(p) for p in range(PARTITIONS)]
    assert live.total("sensor_anomaly_assigned_partitions") == PARTITIONS
    assert live.total("sensor_anomaly_active_devices") == FLEET.n_devices
    assert live.total("sensor_anomaly_evictions_total") == 0  # idle TTL is a week of event time
    assert live.total("sensor_anomaly_state_restore_duration_seconds_count") >= 2  # at start, partition back
    assert live.total("sensor_anomaly_restoring_partitions") == 0
    assert 0 < live.moved_devices <= live.total("sensor_anomaly_state_restored_devices_total")
    assert live.total("sensor_anomaly_changelog_written_bytes_total") > 0
    info = live.prometheus.query(f'sensor_anomaly_model_info{{job="{JOB}"}}', at=live.at)
    assert [(s["metric"]["name"], s["metric"]["version"], s["metric"]["features"]) for s in info] == [
        (live.bundle.name, live.bundle.version, str(len(live.bundle.features)))]
    assert live.total("sensor_anomaly_model_load_duration_seconds") > 0
    assert live.total("sensor_anomaly_ready") == 1 and live.total("sensor_anomaly_live") == 1


# ---------------------------------------------------------------------------- dashboard


def test_every_dashboard_query_returns_finite_data(live: LiveRun) -> None:
    queries = dashboard_queries(load_dashboard(), job=JOB, instance=".*", rate_interval=RATE_INTERVAL)
    assert len(queries) >= 20
    broken = []
    for title, expr in queries:
        values = live.values(expr)  # a parse error raises with Prometheus's message
        if not values or not all(math.isfinite(v) for v in values):
            broken.append(f"{title!r}: {expr} -> {values}")
    assert not broken, "panels without data for a running service:\n" + "\n".join(broken)


def test_dashboard_variables_list_the_job_and_the_instance(live: LiveRun) -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"] if v["type"] == "query"}
    expected = {"job": [JOB], "instance": [live.service.target]}
    assert set(variables) == set(expected)
    for name, variable in variables.items():
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
        assert match, f"variable {name}: unexpected definition {variable['definition']!r}"
        selector = match.group(1).replace("$job", JOB)
        values = live.prometheus.api(f"label/{match.group(2)}/values", [("match[]", selector)])
        assert values == expected[name], f"variable {name}: {selector} -> {values}"


# ---------------------------------------------------------------------------- alerts


def test_every_alert_expression_evaluates_and_its_operands_return_data(live: LiveRun) -> None:
    rules = alert_rules()
    no_data = []
    for rule in rules:
        live.values(rule["expr"])  # parses and evaluates (an error raises with Prometheus's message)
        operands = with_bool_comparisons(without_absent(rule["expr"]))
        values = live.values(operands)
        if not values or not all(math.isfinite(v) for v in values):
            no_data.append(f"{rule['alert']}: {operands.strip()} -> {values}")
    assert not no_data, "alert expressions whose operands have no data:\n" + "\n".join(no_data)


def test_prometheus_evaluates_every_rule_without_error(live: LiveRun) -> None:
    rules = [r for g in live.prometheus.api("rules")["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(r["alert"] for r in alert_rules())
    failing = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not failing, f"rules Prometheus could not evaluate: {failing}"


def test_health_alerts_are_quiet_for_a_healthy_service(live: LiveRun) -> None:
    rules = {r["alert"]: r["expr"] for r in alert_rules()}
    assert set(rules) >= HEALTHY_QUIET_ALERTS
    values = {name: live.values(rules[name]) for name in sorted(HEALTHY_QUIET_ALERTS)}
    true = {name: v for name, v in values.items() if v}
    assert not true, f"alert conditions true for a healthy service: {true}"
