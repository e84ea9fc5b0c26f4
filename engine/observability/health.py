"""Health and metrics endpoints of a long-running process: ``/healthz``, ``/readyz`` and
``/metrics``, on one port (loopback unless told otherwise).

* ``/healthz`` (liveness): 200 when the process's event loop answers within
  ``alive_timeout_s``. A loop that is stuck (a blocking call, a deadlock) answers 503,
  and an orchestrator restarts the process.
* ``/readyz`` (readiness): 200 when every named check passes, 503 otherwise; the body
  is JSON naming each check and, for those that fail, why (``{"engine": "task 2 is
  restoring"}``). Checks run on the event loop, so they read the components' state
  without locks.
* ``/metrics``: the Prometheus text format of ``registry``. ``prometheus_meter_provider``
  builds an OpenTelemetry meter provider whose readings land there (the OpenTelemetry
  Prometheus exporter), so every ``terranoha.*`` instrument appears as a Prometheus
  metric (``terranoha_runs_started_total``, ...), beside the process's own CPU and
  memory figures.

The server runs in a thread of its own, not on the event loop: a loop that no longer
answers must still be reported as such. Any HTTP front end can reuse the pieces:
``Readiness`` for the checks and ``metrics_payload`` for the metrics body.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector

log = logging.getLogger("terranoha.health")

Check = Callable[[], str | None]
"""A readiness check: None when ready, else a short sentence saying why not."""


def new_registry() -> CollectorRegistry:
    """A Prometheus registry of the process's own: its CPU, memory and file descriptors."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry


def prometheus_meter_provider(
    registry: CollectorRegistry,
    resource: Resource | None = None,
    readers: tuple[MetricReader, ...] = (),
) -> MeterProvider:
    """A meter provider whose instruments are read into ``registry`` at each scrape,
    beside any other ``readers`` (an OTLP exporter, say)."""
    prometheus = PrometheusMetricReader(registry=registry)
    return MeterProvider(
        resource=resource or Resource.create({"service.name": "terranoha"}),
        metric_readers=[prometheus, *readers],
    )


def metrics_payload(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The body and content type of a ``/metrics`` answer."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


class Readiness:
    """Named readiness checks, added as the components they look at start."""

    def __init__(self) -> None:
        self.checks: dict[str, Check] = {}
        self.started = False
        """Set once the process has started every component it runs."""

    def add(self, name: str, check: Check) -> None:
        self.checks[name] = check

    def report(self) -> tuple[bool, dict[str, str]]:
        """Whether the process is ready, and each check's verdict ("ready" or why not)."""
        verdicts: dict[str, str] = {}
        if not self.started:
            verdicts["process"] = "starting"
        for name, check in self.checks.items():
            try:
                problem = check()
            except Exception as exc:  # a check must not take the endpoint down
                problem = f"check failed: {exc!r}"
            verdicts[name] = "ready" if problem is None else problem
        return all(v == "ready" for v in verdicts.values()), verdicts


class HealthServer:
    """Serves the three endpoints for the components running on ``loop``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        readiness: Readiness,
        registry: CollectorRegistry,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        alive_timeout_s: float = 5.0,
    ) -> None:
        self.loop = loop
        self.readiness = readiness
        self.registry = registry
        self.alive_timeout_s = alive_timeout_s
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        """The address the endpoints listen on."""
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        """The bound port (the one chosen when asked for port 0)."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, daemon=True, name="health"
        )
        self._thread.start()
        log.info(
            "health and metrics on http://%s:%d (/healthz, /readyz, /metrics)",
            self._server.server_address[0],
            self.port,
        )

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def _on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the event loop and return its result; TimeoutError when the loop
        does not get to it in time."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def call() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(call)
        return future.result(self.alive_timeout_s)

    def _answer(self, path: str) -> tuple[int, bytes, str]:
        if path == "/metrics":
            body, content_type = metrics_payload(self.registry)
            return 200, body, content_type
        if path == "/healthz":
            try:
                self._on_loop(lambda: None)
            except (TimeoutError, RuntimeError):  # RuntimeError: the loop is closed
                return 503, b"event loop not answering\n", "text/plain"
            return 200, b"ok\n", "text/plain"
        if path == "/readyz":
            try:
                ready, verdicts = self._on_loop(self.readiness.report)
            except (TimeoutError, RuntimeError):
                ready, verdicts = False, {"process": "event loop not answering"}
            text = json.dumps({"ready": ready, "checks": verdicts}, sort_keys=True)
            return (200 if ready else 503), text.encode() + b"\n", "application/json"
        return 404, b"not found: try /healthz, /readyz or /metrics\n", "text/plain"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body, content_type = server._answer(self.path.split("?", 1)[0])
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s %s", self.address_string(), format % args)

        return Handler


def start_health(
    readiness: Readiness, registry: CollectorRegistry, host: str, port: int
) -> HealthServer:
    """Start the endpoints for the running loop's components."""
    server = HealthServer(asyncio.get_running_loop(), readiness, registry, host, port)
    server.start()
    return server
