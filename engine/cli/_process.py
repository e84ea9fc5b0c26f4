"""What the long-running commands (``serve``, ``project``, ``notify``) share: logging,
stopping on signals and OpenTelemetry as ``--otel`` asks."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from engine.cli._shared import CliError
from engine.observability.setup import Telemetry, TelemetryError, configure


def otel_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--otel", choices=("none", "console", "otlp"), default="none",
                   help="OpenTelemetry traces and metrics: none (default), console (stdout) "
                   "or otlp (OTEL_EXPORTER_OTLP_* settings; needs the otlp extra)")


def configure_telemetry(args: argparse.Namespace) -> Telemetry | None:
    """OpenTelemetry as ``--otel`` asks (None for ``none``)."""
    try:
        return configure(getattr(args, "otel", "none") or "none")
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
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
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
