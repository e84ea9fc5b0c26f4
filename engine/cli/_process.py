"""What the long-running commands (``serve``, ``project``, ``notify``) share: logging,
stopping on signals, OpenTelemetry as ``--otel`` asks, and the health and metrics
endpoints as ``--health-port`` asks."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from engine.cli._shared import CliError
from engine.observability.health import HealthServer, Readiness, new_registry, start_health
from engine.observability.setup import Telemetry, TelemetryError, configure


def otel_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--otel",
        choices=("none", "console", "otlp"),
        default="none",
        help="OpenTelemetry traces and metrics: none (default), console (stdout) "
        "or otlp (OTEL_EXPORTER_OTLP_* settings; needs the otlp extra)",
    )


def health_option(p: argparse.ArgumentParser) -> None:
    env_port = os.environ.get("TERRANOHA_HEALTH_PORT")
    p.add_argument(
        "--health-port",
        "--metrics-port",
        dest="health_port",
        type=int,
        default=int(env_port) if env_port else None,
        metavar="PORT",
        help="serve /healthz (alive), /readyz (partitions restored and caught "
        "up) and /metrics (Prometheus) on this port (default "
        "$TERRANOHA_HEALTH_PORT; none without it)",
    )
    p.add_argument(
        "--health-host",
        default=os.environ.get("TERRANOHA_HEALTH_HOST", "127.0.0.1"),
        metavar="HOST",
        help="the address of those endpoints (default $TERRANOHA_HEALTH_HOST or "
        "127.0.0.1; 0.0.0.0 in a container)",
    )


@dataclass(slots=True)
class Health:
    """The endpoints of one process: its readiness checks and its metrics registry."""

    host: str
    port: int
    readiness: Readiness = field(default_factory=Readiness)
    registry: CollectorRegistry = field(default_factory=new_registry)
    server: HealthServer | None = None

    def start(self) -> None:
        """Serve, on the running loop's components (call from inside the loop)."""
        try:
            self.server = start_health(self.readiness, self.registry, self.host, self.port)
        except OSError as exc:
            raise CliError(
                f"cannot serve the health endpoints on {self.host}:{self.port} "
                f"({exc.strerror}): pick a free port with --health-port"
            ) from exc

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def health_of(args: argparse.Namespace) -> Health | None:
    """The endpoints ``--health-port`` asks for (None without it)."""
    port = getattr(args, "health_port", None)
    if port is None:
        return None
    if not 0 <= port <= 65535:
        raise CliError(f"--health-port {port} is not a port: give 1-65535 (0: any free one)")
    return Health(args.health_host, port)


def configure_telemetry(args: argparse.Namespace, health: Health | None = None) -> Telemetry | None:
    """OpenTelemetry as ``--otel`` asks (None for ``none`` without ``health``); with
    ``health`` the metrics are also served at its ``/metrics``."""
    try:
        return configure(
            getattr(args, "otel", "none") or "none",
            prometheus=health.registry if health is not None else None,
        )
    except TelemetryError as exc:
        raise CliError(str(exc)) from exc


def configure_logging(level: str) -> None:
    """Timestamped lines on stderr at ``level``. aiokafka's own lines start at warning:
    at info it narrates every group join and coordinator lookup. httpx's too: its info
    line for each request shows the full URL, and a webhook's URL can hold a token."""
    numeric = getattr(logging, level.upper())
    root = logging.getLogger()
    if not root.handlers:  # a host program (or a test) may have configured logging
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(numeric)
    for chatty in ("aiokafka", "httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(numeric, logging.WARNING))


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, on the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
