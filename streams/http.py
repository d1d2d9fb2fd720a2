"""The HTTP server for ``/metrics``, ``/healthz`` and ``/readyz``.

Why a module of its own: the metric definitions (:mod:`streams.metrics`) are what the dashboards and
alerts check names against; serving them is a separate job with its own threads and sockets.
What it must not do: write to :class:`~streams.metrics.ServiceMetrics` or block the processing loop
(it runs in daemon threads and only reads).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from streams.metrics import DEFAULT_METRICS_PORT, ServiceMetrics

__all__ = ["MetricsServer"]

logger = logging.getLogger(__name__)


class _QuietHandler(WSGIRequestHandler):
    """Request handler that logs at DEBUG through this module's logger instead of printing to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("metrics http %s: " + format, self.client_address[0], *args)


class MetricsServer:
    """HTTP server for ``/metrics`` (Prometheus text or OpenMetrics), ``/healthz`` and ``/readyz``.

    Runs in daemon threads (one per request, as prometheus-client's own server does) and only reads
    from :class:`ServiceMetrics`. ``/healthz`` is liveness (200 while the loop makes progress),
    ``/readyz`` is readiness (200 once assigned and restored); both answer 503 with a one-line reason
    otherwise. ``port=0`` binds a free port; :attr:`port` is the bound one.

    Examples
    --------
    >>> import urllib.request
    >>> with MetricsServer(ServiceMetrics(), host="127.0.0.1", port=0) as server:
    ...     urllib.request.urlopen(server.url + "/healthz").status
    200
    """

    def __init__(self, metrics: ServiceMetrics, *, host: str = "0.0.0.0", port: int = DEFAULT_METRICS_PORT):
        if not 0 <= port <= 65535:
            raise ValueError(f"metrics port must be in 0..65535, got {port}")
        self.metrics = metrics
        self.host = host
        self._requested_port = port
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._metrics_app = make_wsgi_app(metrics.registry)

    @property
    def port(self) -> int:
        """The bound port (differs from the requested one when that was 0)."""
        if self._server is None:
            raise RuntimeError("MetricsServer is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return self._plain(start_response, "405 Method Not Allowed", "only GET and HEAD\n", method)
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path == "/healthz":
            ok, detail = self.metrics.liveness()
            return self._plain(start_response, "200 OK" if ok else "503 Service Unavailable", detail + "\n", method)
        if path == "/readyz":
            ok, detail = self.metrics.readiness()
            return self._plain(start_response, "200 OK" if ok else "503 Service Unavailable", detail + "\n", method)
        if path == "/":
            body = "sensor-anomaly: /metrics /healthz /readyz\n"
            return self._plain(start_response, "200 OK", body, method)
        return self._plain(start_response, "404 Not Found", f"no such path {path!r}\n", method)

    @staticmethod
    def _plain(start_response: Callable[..., Any], status: str, body: str, method: str) -> Iterator[bytes]:
        data = body.encode()
        start_response(
            status,
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(data))),
                ("Cache-Control", "no-store"),
            ],
        )
        return iter([] if method == "HEAD" else [data])

    def start(self) -> MetricsServer:
        """Bind and serve in a daemon thread; returns self. Raises OSError naming host and port on failure."""
        if self._server is not None:
            raise RuntimeError("MetricsServer already started")

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        class _Server(ThreadingWSGIServer):
            address_family = family

        try:
            server = make_server(
                self.host, self._requested_port, self._app, server_class=_Server, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot bind metrics HTTP server to {self.host}:{self._requested_port} "
                f"(metrics host/port settings): {exc.strerror}",
            ) from exc
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="metrics-http", daemon=True
        )
        self._thread.start()
        logger.info("metrics HTTP server on %s (/metrics /healthz /readyz)", self.url)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving and close the socket; idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout_s)
        self._server = None
        self._thread = None
        logger.info("metrics HTTP server stopped")

    def __enter__(self) -> MetricsServer:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
