"""A tool for the flow-control tests: each call is a POST to the side-effect server at
``$TERRANOHA_TEST_EFFECT_URL``, which counts the calls in flight at once."""

from __future__ import annotations

import os

import httpx

from engine.worker import TaskContext, tool


@tool("test.limited")
async def limited(ctx: TaskContext) -> dict[str, int]:
    async with httpx.AsyncClient(timeout=30) as http:
        await http.post(f"{os.environ['TERRANOHA_TEST_EFFECT_URL']}/{ctx.idempotency_key}")
    return {"ok": 1}
