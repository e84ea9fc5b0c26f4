"""Tools for the durability tests. The "external system" is a table in a separate SQLite
file that records every call and applies each idempotency key once."""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

from engine.core.spec import load_spec
from engine.worker import TaskContext, TaskResult, TransientError, tool

EFFECTS_DB = os.environ.get("TERRANOHA_TEST_EFFECTS", "effects.db")

DURABLE = load_spec(
    {
        "workflow": "durable",
        "version": 1,
        "input": {"n": "integer"},
        "steps": [
            {
                "id": "fetch",
                "task": "test.fetch",
                "input": {"n": "input.n"},
                "retry": {"max_attempts": 6, "initial": "50ms", "max": "300ms"},
            },
            {"id": "pause", "sleep": "100ms"},
            {
                "id": "pay",
                "prepare_commit": {"prepare": "test.prepare", "commit": "test.commit"},
                "input": {"n": "input.n"},
            },
            {"id": "notify", "task": "test.notify"},
        ],
    }
)
"""The workflow these tools serve: a flaky read, a timer, a two-step write, a notice."""


def _db() -> sqlite3.Connection:
    db = sqlite3.connect(EFFECTS_DB, timeout=30.0, isolation_level=None)
    db.execute("CREATE TABLE IF NOT EXISTS calls (idempotency_key TEXT, step TEXT, ts REAL)")
    db.execute(
        "CREATE TABLE IF NOT EXISTS effects (idempotency_key TEXT PRIMARY KEY, "
        "step TEXT, run_id TEXT)"
    )
    return db


def apply_effect(ctx: TaskContext) -> None:
    db = _db()
    try:
        db.execute(
            "INSERT INTO calls VALUES (?, ?, ?)", (ctx.idempotency_key, ctx.step, time.time())
        )
        db.execute(
            "INSERT OR IGNORE INTO effects VALUES (?, ?, ?)",
            (ctx.idempotency_key, ctx.step, ctx.run_id),
        )
    finally:
        db.close()


@tool("test.fetch")
def fetch(ctx: TaskContext) -> dict[str, Any]:
    if ctx.attempt == 1 and hash(ctx.run_id) % 3 == 0:
        raise TransientError("FLAKY", "first attempt fails for a third of the runs")
    time.sleep(0.005)
    return {"n": ctx.input.get("n", 0)}


@tool("test.prepare")
def prepare(ctx: TaskContext) -> dict[str, Any]:
    return {"amount": 10 * int(ctx.input.get("n", 0))}


@tool("test.commit")
def commit(ctx: TaskContext) -> TaskResult:
    time.sleep(0.01)
    apply_effect(ctx)
    return TaskResult({"committed": ctx.input["change_set"]["amount"]}, cost=0.01)


@tool("test.notify")
def notify(ctx: TaskContext) -> dict[str, Any]:
    apply_effect(ctx)
    return {"sent": True}
