"""Choosing the exporter: none, console, otlp (an optional extra)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from engine.cli import build_parser
from engine.observability.setup import Telemetry, TelemetryError, configure
from tests.cli.conftest import Cli

OTLP_MODULES = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
)


def test_none_is_the_default_and_turns_everything_off() -> None:
    for command in (["serve"], ["project"]):
        assert build_parser().parse_args(command).otel == "none"
    assert configure("none") is None


def test_console_builds_a_telemetry_sink() -> None:
    telemetry = configure("console", set_global=False)
    assert isinstance(telemetry, Telemetry)
    assert telemetry.span_processor is not None and telemetry.metrics is not None
    telemetry.shutdown()


def test_an_unknown_exporter_is_refused() -> None:
    with pytest.raises(TelemetryError, match="none, console, otlp"):
        configure("jaeger")


def test_otlp_without_the_extra_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, cli: Cli, tmp_path: Path
) -> None:
    for name in OTLP_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(TelemetryError, match=r"pip install 'terranoha\[otlp\]'"):
        configure("otlp", set_global=False)
    result = cli("serve", "--db", str(tmp_path / "x.db"), "--otel", "otlp")
    assert result.code == 2
    assert "terranoha[otlp]" in result.err
