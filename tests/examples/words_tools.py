"""The Python half of the Go worker's workflow: it reads what the Go tool returned."""

from __future__ import annotations

from engine.worker import TaskContext, tool


@tool("py.summarize")
def summarize(ctx: TaskContext) -> str:
    counted = ctx.input
    return f"{counted['words']} words: {counted['upper']}"
