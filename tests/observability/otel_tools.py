"""Tools for ``serve --workers tests.observability.otel_tools`` in the telemetry tests."""

from __future__ import annotations

from typing import Any

from engine.worker import TaskContext, TransientError, tool


@tool("otel.fetch")
def fetch(ctx: TaskContext) -> dict[str, Any]:
    if ctx.attempt == 1:
        raise TransientError("HTTP_503", "try again")
    return {"n": ctx.input["n"], "session_token": "tok-secret-123456789"}
