"""A no-op tool for the benchmarks: the cost measured is the engine's, not the tool's."""

from __future__ import annotations

from typing import Any

from engine.worker import TaskContext, tool


@tool("bench.step")
def step(ctx: TaskContext) -> dict[str, Any]:
    return {"step": ctx.step}
