"""The /metrics, /healthz and /readyz server (streams.http) against a real socket on a free port."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streams.http import MetricsServer
from streams.metrics import ServiceMetrics
from tests.unit.streams.fakes import FakeClock


def get(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), dict(err.headers)


def test_a_bad_port_is_rejected() -> None:
    with pytest.raises(ValueError, match="metrics port"):
        MetricsServer(ServiceMetrics(), port=70000)


# ---------------------------------------------------------------------------- HTTP


@pytest.fixture
def server(metrics: ServiceMetrics):
    srv = MetricsServer(metrics, host="127.0.0.1", port=0).start()
    yield srv
    srv.stop()


def test_metrics_endpoint_serves_parseable_text(server: MetricsServer, metrics: ServiceMetrics) -> None:
    assert server.port > 0
    metrics.observe_batch(counts={"scored": 2}, duration_s=0.01, scores=np.array([0.2, 0.999]))
    status, body, headers = get(server.url + "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    readings = {s.labels["outcome"]: s.value for s in families["sensor_anomaly_readings"].samples
                if s.name == "sensor_anomaly_readings_total"}  # fmt: skip
    assert readings == {"scored": 2.0, "warmup": 0.0, "duplicate": 0.0, "out_of_order": 0.0, "empty": 0.0,
                        "context": 0.0, "invalid": 0.0}
    score = {
        s.labels.get("le"): s.value for s in families["sensor_anomaly_score"].samples if s.name.endswith("_bucket")
    }
    assert score["0.99"] == 1.0 and score["0.999"] == 2.0
    assert 'device_id="' not in body  # no label named device_id


def test_metrics_endpoint_negotiates_openmetrics(server: MetricsServer) -> None:
    status, body, headers = get(server.url + "/metrics", headers={"Accept": "application/openmetrics-text"})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")


def test_healthz_turns_503_when_the_loop_stalls(server: MetricsServer, clock: FakeClock, metrics) -> None:
    status, body, _ = get(server.url + "/healthz")
    assert (status, body.startswith("ok")) == (200, True)
    clock.now += 120
    status, body, _ = get(server.url + "/healthz")
    assert status == 503
    assert body.startswith("stalled: no progress for 120.0 s")
    metrics.mark_progress()
    assert get(server.url + "/healthz")[0] == 200


def test_readyz_follows_the_readiness_flag(server: MetricsServer, metrics: ServiceMetrics) -> None:
    metrics.set_ready(False, "restoring state")
    assert get(server.url + "/readyz")[:2] == (503, "not ready: restoring state\n")
    metrics.set_ready(True)
    assert get(server.url + "/readyz")[:2] == (200, "ready\n")


def test_other_paths_and_methods(server: MetricsServer) -> None:
    assert get(server.url + "/nope")[0] == 404
    assert get(server.url + "/healthz", method="POST")[0] == 405
    status, body, headers = get(server.url + "/healthz", method="HEAD")
    assert (status, body) == (200, "")
    assert int(headers["Content-Length"]) > 0


def test_port_in_use_names_host_and_port(server: MetricsServer, metrics: ServiceMetrics) -> None:
    with pytest.raises(OSError, match=rf"127\.0\.0\.1:{server.port}"):
        MetricsServer(metrics, host="127.0.0.1", port=server.port).start()


def test_stop_closes_the_socket_and_is_idempotent(metrics: ServiceMetrics) -> None:
    srv = MetricsServer(metrics, host="127.0.0.1", port=0).start()
    port = srv.port
    assert get(srv.url + "/healthz")[0] == 200
    srv.stop()
    srv.stop()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    with pytest.raises(RuntimeError, match="not started"):
        _ = srv.port


def test_context_manager_starts_and_stops(metrics: ServiceMetrics) -> None:
    with MetricsServer(metrics, host="127.0.0.1", port=0) as srv:
        url = srv.url
        assert get(url + "/")[0] == 200
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/", timeout=2)
