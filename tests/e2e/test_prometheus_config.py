"""Static checks of the shipped Prometheus and Grafana files against the metrics the service registers.

* ``promtool check config`` / ``check rules`` / ``test rules`` on ``deploy/prometheus/`` (Debian's
  ``prometheus`` package; ``scripts/install-prometheus.sh``). Without promtool these skip, except
  under ``CI=true``, where they fail: a CI run must not pass by skipping (the ``promtool`` fixture
  is in ``tests/e2e/conftest.py``).
* Every metric name in an alert or dashboard expression is one that :class:`ServiceMetrics` registers,
  and every metric it registers appears on the dashboard.
* Every dashboard expression parses as PromQL (promtool checks them as recording rules).

:func:`render_prometheus_config` and :func:`dashboard_queries` are meant for the live end-to-end test
as well (``tests/e2e/test_prometheus_live.py``: real Prometheus scraping running service processes): the
first points the shipped scrape config at given targets, the second expands the dashboard's template
variables.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.metrics import ServiceMetrics

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_YML = PROM_DIR / "prometheus.yml"
ALERTS_YML = PROM_DIR / "alerts.yml"
ALERTS_TEST_YML = PROM_DIR / "alerts_test.yml"
DASHBOARD_JSON = ROOT / "deploy" / "grafana" / "dashboard.json"
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
JOB = "sensor-anomaly"

# Metric names that come from Prometheus itself, not from the service.
PROMETHEUS_OWN = {"up"}
# PromQL words that look like identifiers; everything else an identifier can be is a metric name,
# a label name (inside {...} or by/without/on/ignoring (...)) or a function name (followed by "(").
PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "inf", "nan", "atan2", "start", "end",
}  # fmt: skip


# ---------------------------------------------------------------------------- helpers


def run_promtool(promtool: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def render_prometheus_config(
    target: str | Sequence[str],
    out_dir: Path,
    *,
    scrape_interval: str | None = None,
    evaluation_interval: str | None = None,
) -> Path:
    """Write the shipped prometheus.yml to ``out_dir``, scraping ``target`` (e.g. ``127.0.0.1:43117``).

    ``target`` may be several ``host:port`` strings (one per service instance). The alert rules are
    copied beside it (rule_files stays relative). Intervals can be shortened for a live test. Returns
    the path of the written config.
    """
    targets = [target] if isinstance(target, str) else list(target)
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    assert len(jobs) == 1, f"expected one scrape config with job_name {JOB!r}, got {len(jobs)}"
    jobs[0]["static_configs"] = [{"targets": targets}]
    if scrape_interval:
        config["global"]["scrape_interval"] = scrape_interval
        config["global"]["scrape_timeout"] = scrape_interval
    if evaluation_interval:
        config["global"]["evaluation_interval"] = evaluation_interval
    out_dir.mkdir(parents=True, exist_ok=True)
    for rules in config.get("rule_files", []):
        shutil.copy(PROM_DIR / rules, out_dir / rules)
    out = out_dir / "prometheus.yml"
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_JSON.read_text())


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))  # collapsed rows nest their panels


def dashboard_queries(
    dashboard: dict[str, Any], *, job: str = ".*", instance: str = ".*", rate_interval: str = "1m"
) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every panel target, with the template variables expanded."""
    out = []
    for panel in iter_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = (
                target["expr"]
                .replace("$__rate_interval", rate_interval)
                .replace("$__range", "1h")
                .replace("$job", job)
                .replace("$instance", instance)
            )
            out.append((panel["title"], expr))
    return out


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS_YML.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def metric_names_in(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (a small lexer, enough for our expressions)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # drop string literals
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # drop label matchers
    # drop grouping and matching clauses (their label lists), so `sum by (x) (` reads as a call of sum
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*(\([^)]*\))?", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)  # drop range/subquery durations
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = match.group()
        if word.lower() in PROMQL_KEYWORDS:
            continue
        if re.match(r"\s*\(", expr[match.end() :]):  # function call
            continue
        if match.start() > 0 and (expr[match.start() - 1].isdigit() or expr[match.start() - 1] == "."):
            continue  # the exponent or unit of a number, e.g. 1e-9
        names.add(word)
    return names


@pytest.fixture(scope="module")
def registered_names() -> set[str]:
    return ServiceMetrics(process_metrics=True, topics=["sensor.readings"]).metric_names() | PROMETHEUS_OWN


# ---------------------------------------------------------------------------- promtool


def test_promtool_check_config(promtool: str) -> None:
    proc = run_promtool(promtool, "check", "config", str(PROMETHEUS_YML))
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_rendered_config_points_at_the_given_target(promtool: str, tmp_path: Path) -> None:
    path = render_prometheus_config(
        "127.0.0.1:43117", tmp_path, scrape_interval="1s", evaluation_interval="1s"
    )
    run_promtool(promtool, "check", "config", str(path))
    config = yaml.safe_load(path.read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["127.0.0.1:43117"]}]
    assert (tmp_path / "alerts.yml").read_text() == ALERTS_YML.read_text()
    several = render_prometheus_config(["127.0.0.1:43117", "127.0.0.1:43118"], tmp_path / "two")
    run_promtool(promtool, "check", "config", str(several))
    (job,) = yaml.safe_load(several.read_text())["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["127.0.0.1:43117", "127.0.0.1:43118"]}]


def test_promtool_check_rules(promtool: str) -> None:
    proc = run_promtool(promtool, "check", "rules", str(ALERTS_YML))
    assert f"SUCCESS: {len(alert_rules())} rules found" in proc.stdout


def test_promtool_test_rules(promtool: str) -> None:
    proc = run_promtool(promtool, "test", "rules", str(ALERTS_TEST_YML))
    assert "SUCCESS" in proc.stdout


def test_dashboard_expressions_parse_as_promql(promtool: str, tmp_path: Path) -> None:
    queries = dashboard_queries(load_dashboard())
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:panel_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = run_promtool(promtool, "check", "rules", str(path))
    assert f"SUCCESS: {len(queries)} rules found" in proc.stdout


# ---------------------------------------------------------------------------- names


def test_metric_name_lexer() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (job, le) (rate(sensor_anomaly_x_bucket{le=~"1(\\\\.0)?"}[5m])))'
        " > 1e-3 * on (job) group_left (version) sensor_anomaly_model_info and absent(up{job='a'})"
    )
    assert metric_names_in(expr) == {"sensor_anomaly_x_bucket", "sensor_anomaly_model_info", "up"}


def test_alert_expressions_use_registered_metrics(registered_names: set[str]) -> None:
    rules = alert_rules()
    assert len(rules) >= 7
    for rule in rules:
        names = metric_names_in(rule["expr"])
        assert names, f"alert {rule['alert']}: no metric found in {rule['expr']!r}"
        unknown = names - registered_names
        assert not unknown, f"alert {rule['alert']} uses metrics ServiceMetrics does not register: {unknown}"


def test_dashboard_expressions_use_registered_metrics(registered_names: set[str]) -> None:
    queries = dashboard_queries(load_dashboard())
    assert len(queries) >= 20
    for title, expr in queries:
        names = metric_names_in(expr)
        assert names, f"panel {title!r}: no metric found in {expr!r}"
        unknown = names - registered_names
        assert not unknown, f"panel {title!r} uses metrics ServiceMetrics does not register: {unknown}"


def test_every_service_metric_is_on_the_dashboard() -> None:
    families = {f.name for f in ServiceMetrics().registry.collect()}
    used = set()
    for _, expr in dashboard_queries(load_dashboard()):
        used |= metric_names_in(expr)
    missing = {f for f in families if not any(name == f or name.startswith(f + "_") for name in used)}
    assert not missing, f"metrics registered but not on the dashboard: {sorted(missing)}"


# ---------------------------------------------------------------------------- structure


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    tests = yaml.safe_load(ALERTS_TEST_YML.read_text())["tests"]
    fires, quiet = set(), set()
    for group in tests:
        for case in group.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), f"alerts never tested firing: {names - fires}"
    assert names - quiet == set(), f"alerts never tested quiet: {names - quiet}"


def test_alerts_have_severity_and_annotations() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), rule["alert"]


def test_scrape_config_targets_the_service_and_loads_the_rules() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    assert target.endswith(":9400")  # streams.metrics.DEFAULT_METRICS_PORT
    assert config["rule_files"] == ["alerts.yml"]
    assert sum("# TARGET" in line for line in PROMETHEUS_YML.read_text().splitlines()) == 1


def test_dashboard_structure() -> None:
    dash = load_dashboard()
    assert dash["schemaVersion"] >= 38
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = list(iter_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in ("readings / s by outcome", "consumer lag", "batch duration", "end-to-end latency",
                  "anomaly events / min", "dead letters", "active devices", "open episodes", "model version",
                  "restore duration"):  # fmt: skip
        assert topic in titles, f"no panel about {topic!r}"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_grafana_provisioning_files() -> None:
    datasources = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"].startswith("http")
    providers = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "sensor-anomaly.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
