"""``terranoha serve --kafka ... --otel console``: the orchestrator's run spans and the
worker's tool spans reach the exporter as one trace, the tool span under its attempt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.observability import trace_id_of
from tests.cli.conftest import Cli
from tests.infra import postgres_dsn

ROOT = Path(__file__).resolve().parents[2]
SPEC = """\
workflow: otel-flow
version: 1
input: {n: integer, card: string}
redact: ["$.input.card", "*token*"]
steps:
  - id: fetch
    task: otel.fetch
    input: {n: input.n, card: input.card}
    retry: {max_attempts: 3, initial: 50ms, jitter: none}
"""
CARD = "4111111111111111"


def _objects(text: str) -> list[dict[str, Any]]:
    """The JSON objects the console exporters printed, in order."""
    decoder = json.JSONDecoder()
    out: list[dict[str, Any]] = []
    pos = text.find("{")
    while pos != -1:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            pos = text.find("{", pos + 1)
            continue
        if isinstance(value, dict):
            out.append(value)
        pos = text.find("{", end)
    return out


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
def test_serve_with_console_telemetry(cli: Cli, kafka: list[str], tmp_path: Path) -> None:
    prefix = kafka[kafka.index("--topic-prefix") + 1]
    assert cli("topics", "create", *kafka, "--partitions", "2").code == 0
    spec = tmp_path / "otel.yaml"
    spec.write_text(SPEC)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "serve",
            *kafka,
            "--app",
            prefix,
            "--partitions",
            "2",
            "--workers",
            "tests.observability.otel_tools",
            "--postgres",
            postgres_dsn(),
            "--otel",
            "console",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OTEL_METRIC_EXPORT_INTERVAL": "300"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    try:
        assert first.startswith(b"serving"), first
        result = cli(
            "run",
            str(spec),
            *kafka,
            "--input",
            json.dumps({"n": 3, "card": CARD}),
            "--key",
            "otel-1",
            "--correlation-id",
            "ticket-otel",
            "--wait",
            "60",
        )
        assert result.code == 0, result.err
        assert "Completed" in result.out
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode(errors="replace")
    text = out.decode()
    assert CARD not in text and "tok-secret-123456789" not in text
    spans = [o for o in _objects(text) if "context" in o and "name" in o]
    trace_id = f"0x{trace_id_of('ticket-otel'):032x}"
    mine = [s for s in spans if s["context"]["trace_id"] == trace_id]
    names = sorted(s["name"] for s in mine)
    assert names == [
        "run otel-flow",
        "step fetch",
        "task otel.fetch",
        "task otel.fetch",
        "tool otel.fetch",
        "tool otel.fetch",
    ], names
    attempts = {
        s["attributes"]["terranoha.task.attempt"]: s for s in mine if s["name"] == "task otel.fetch"
    }
    for tool_span in (s for s in mine if s["name"] == "tool otel.fetch"):
        attempt = attempts[tool_span["attributes"]["terranoha.task.attempt"]]
        assert tool_span["parent_id"] == attempt["context"]["span_id"]
    metrics = [o for o in _objects(text) if "resource_metrics" in o]
    assert metrics, "the metrics were not exported at shutdown"
    names_seen = {
        m["name"]
        for o in metrics
        for r in o["resource_metrics"]
        for s in r["scope_metrics"]
        for m in s["metrics"]
    }
    assert {
        "terranoha.runs.started",
        "terranoha.runs.completed",
        "terranoha.task.retries",
        "terranoha.step.duration",
        "terranoha.consumer.lag",
    } <= names_seen
