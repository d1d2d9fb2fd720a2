"""Shared fixtures of the end-to-end tests: the Kafka broker, Prometheus, the service as a process, a model.

Why a conftest: the e2e tests run the service the way production does (``python -m streams.cli serve``
in its own process) against a real broker and a real Prometheus, and several tests need the same
pieces. Fixtures here:

* the broker fixtures of ``tests/kafka_broker.py`` (``pytest_plugins`` only works in the rootdir
  conftest, so they are imported by name, as ``tests/integration/conftest.py`` does);
* ``promtool`` and ``prometheus_binary``: paths of Debian's ``prometheus`` package binaries
  (``scripts/install-prometheus.sh``). Missing: skipped locally, FAILED under ``CI=true``, because
  a CI run must not pass by skipping its Prometheus checks;
* ``prometheus_server``: a factory that starts a real Prometheus server on a free local port with a
  given config and stops it after the test (:class:`PrometheusServer` wraps its HTTP API);
* ``service_process``: a factory that starts ``sensor-anomaly serve`` subprocesses and stops them
  with SIGTERM after the test (:class:`ServiceProcess`);
* ``e2e_model``: the small model of ``tests/integration/helpers.py``, trained once per session;
* ``free_port``: a currently free TCP port on 127.0.0.1.

What it must not do: mock Kafka or Prometheus, or leave a process running after its test.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from anomaly.bundle import ModelBundle
from tests.integration.helpers import train_bundle
from tests.kafka_broker import kafka_bootstrap, kafka_broker, kafka_topic, local_kafka

__all__ = [
    "PrometheusServer",
    "ServiceProcess",
    "e2e_model",
    "free_port",
    "kafka_bootstrap",
    "kafka_broker",
    "kafka_topic",
    "local_kafka",
    "prometheus_binary",
    "prometheus_server",
    "promtool",
    "service_process",
]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_START_TIMEOUT_S = 30.0
SERVICE_STOP_TIMEOUT_S = 30.0
"""SIGTERM lets the service finish its batch, commit and leave the group; past this it is killed."""


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found; install it with scripts/install-prometheus.sh"
        if _in_ci():
            pytest.fail(message + " (CI=true: this check must run, not skip)", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of ``promtool``; skipped without it, failed under ``CI=true``."""
    return _require_binary("promtool")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """Path of the ``prometheus`` server binary; skipped without it, failed under ``CI=true``."""
    return _require_binary("prometheus")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """``free_port() -> int``: a TCP port free on 127.0.0.1 now (bound to 0 and released)."""
    return _free_port


@pytest.fixture(scope="session")
def e2e_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelBundle]:
    """(directory, bundle): the integration tests' small fleet model, trained once per session."""
    directory = tmp_path_factory.mktemp("e2e-model")
    return directory, train_bundle(directory)


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class PromQLError(AssertionError):
    """Prometheus answered a query with an error (a parse error is ``bad_data``)."""


@dataclass
class PrometheusServer:
    """A real Prometheus server process and a small client for its HTTP API (``/api/v1/...``)."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def api(self, path: str, params: Sequence[tuple[str, str]] = ()) -> Any:
        """GET ``/api/v1/<path>``; returns ``data``. Raises :class:`PromQLError` with Prometheus's message."""
        query = urllib.parse.urlencode(list(params))
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = orjson.loads(resp.read())
        except urllib.error.HTTPError as err:  # 400 bad_data (parse error), 422 execution error
            body = orjson.loads(err.read() or b"{}")
            raise PromQLError(f"{path} {dict(params)}: HTTP {err.code} {body.get('errorType')}: "
                              f"{body.get('error')}") from None
        if body.get("status") != "success":
            raise PromQLError(f"{path} {dict(params)}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; returns the result as a list of {metric, value} (a scalar becomes one entry)."""
        params = [("query", expr)] + ([("time", f"{at:.3f}")] if at is not None else [])
        data = self.api("query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        if data["resultType"] == "matrix":
            return [{"metric": s["metric"], "value": s["values"][-1]} for s in data["result"]]
        return list(data["result"])

    def values(self, expr: str, at: float | None = None) -> list[float]:
        """The sample values of an instant query, as floats (NaN included)."""
        return [float(sample["value"][1]) for sample in self.query(expr, at)]

    def value(self, expr: str, default: float = math.nan) -> float:
        """The single value of an instant query (``default`` if the result is empty)."""
        values = self.values(expr)
        if not values:
            return default
        assert len(values) == 1, f"{expr!r} returned {len(values)} series, expected one"
        return values[0]

    def wait_until(self, expr: str, condition: Callable[[float], bool], timeout_s: float, what: str) -> float:
        """Poll ``expr`` (one value) until ``condition(value)``; a timeout fails the test with ``what``."""
        deadline = time.monotonic() + timeout_s
        value = math.nan
        while time.monotonic() < deadline:
            value = self.value(expr)
            if not math.isnan(value) and condition(value):
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}: {expr} = {value}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _start_prometheus(binary: str, config: Path, data_dir: Path) -> PrometheusServer:
    port = _free_port()
    log_path = data_dir / "prometheus.log"
    args = [binary, f"--config.file={config}", f"--storage.tsdb.path={data_dir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h", "--log.level=info"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=data_dir)
    server = PrometheusServer(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    deadline = time.monotonic() + PROMETHEUS_START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise AssertionError(f"prometheus exited with {process.returncode}:\n{_log_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"prometheus not ready after {PROMETHEUS_START_TIMEOUT_S:.0f} s:\n"
                                 f"{_log_tail(log_path)}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def prometheus_server(prometheus_binary: str, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[Callable[[Path], PrometheusServer]]:
    """Factory ``prometheus_server(config_path) -> PrometheusServer``: started and ready.

    Module-scoped, so a module fixture can run one scenario for several tests; every server started
    is stopped when the module's tests are done (:meth:`PrometheusServer.stop` stops one earlier).
    """
    started: list[PrometheusServer] = []

    def start(config: Path) -> PrometheusServer:
        server = _start_prometheus(prometheus_binary, config, tmp_path_factory.mktemp("prometheus"))
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@dataclass
class ServiceProcess:
    """One ``python -m streams.cli serve`` process, its metrics port and its log file."""

    process: subprocess.Popen[bytes]
    metrics_port: int
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def target(self) -> str:
        """``host:port`` for a Prometheus scrape config."""
        return f"127.0.0.1:{self.metrics_port}"

    def log_tail(self, lines: int = 40) -> str:
        return _log_tail(self.log_path, lines)

    def get(self, path: str) -> int:
        """HTTP status of ``GET <metrics server><path>`` (0 if nothing answers)."""
        try:
            with urllib.request.urlopen(self.metrics_url + path, timeout=2) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return int(err.code)
        except (urllib.error.URLError, OSError):
            return 0

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait until ``/readyz`` answers 200 (assigned and restored); fail with the log if it exits."""
        deadline = time.monotonic() + timeout_s
        while self.get("/readyz") != 200:
            if self.process.poll() is not None:
                raise AssertionError(f"service exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"service not ready after {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> int | None:
        """SIGTERM (finish the batch, commit, leave the group); kill past the timeout. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=SERVICE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("service pid %d ignored SIGTERM for %.0f s; killing it", self.process.pid,
                               SERVICE_STOP_TIMEOUT_S)
                self.process.kill()
                self.process.wait(timeout=5)
        return self.process.returncode


@pytest.fixture(scope="module")
def service_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServiceProcess]]:
    """Factory ``service_process(*serve_args, metrics_port=None) -> ServiceProcess``.

    Runs ``python -m streams.cli serve <serve_args> --metrics-host 127.0.0.1 --metrics-port <port>``
    from the repository root (a free port unless given); output goes to a log file in a temporary
    directory. Module-scoped like ``prometheus_server``: every process started is stopped with
    SIGTERM when the module's tests are done (:meth:`ServiceProcess.stop` stops one earlier).
    """
    started: list[ServiceProcess] = []
    tmp_path = tmp_path_factory.mktemp("service")

    def start(*serve_args: str, metrics_port: int | None = None) -> ServiceProcess:
        port = metrics_port if metrics_port is not None else _free_port()
        args = [sys.executable, "-m", "streams.cli", "serve", *serve_args,
                "--metrics-host", "127.0.0.1", "--metrics-port", str(port)]
        log_path = tmp_path / f"service-{len(started)}.log"
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        service = ServiceProcess(process=process, metrics_port=port, log_path=log_path, args=args)
        started.append(service)
        return service

    try:
        yield start
    finally:
        for service in started:
            service.stop()
