"""Secrets in tool inputs and results never reach what people see: CLI output (text and
JSON, status, timeline, replay) and log lines. The run log itself keeps them, since
replay needs them; the test checks that too, so it cannot pass by seeing nothing."""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path
from typing import Any

import pytest

from engine.cli import main
from engine.core.policies import run_id_for
from engine.core.records import Trigger
from engine.core.spec import load_spec
from engine.embedded import EmbeddedEngine, EmbeddedWorker
from engine.runtime.clock import ManualClock
from engine.worker import TaskContext, ToolRegistry

CARD = "4111111111111111"
TOKEN = "tok_live_S3cr3tValue9x"
SPEC = load_spec(
    {
        "workflow": "payer",
        "version": 1,
        "input": {"customer": "string", "card_number": "string"},
        "redact": ["$.input.card_number", "*token*"],
        "steps": [
            {
                "id": "charge",
                "task": "psp.charge",
                "input": {"card": "input.card_number", "who": "input.customer"},
            },
            {"id": "receipt", "task": "psp.receipt", "input": {"charge": "steps.charge.result"}},
        ],
    }
)


def _registry() -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool("psp.charge")
    def charge(ctx: TaskContext) -> dict[str, Any]:
        return {"charged": True, "api_token": TOKEN, "card_seen": ctx.input["card"]}

    @registry.tool("psp.receipt")
    def receipt(ctx: TaskContext) -> dict[str, Any]:
        return {"receipt": "r-1", "echo": ctx.input["charge"]}

    return registry


def test_secrets_never_reach_cli_output_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    db = tmp_path / "secrets.db"
    clock = ManualClock()
    engine = EmbeddedEngine(db, clock=clock)
    engine.store.deploy(SPEC, clock.now_ms())
    engine.specs.add(SPEC)
    worker = EmbeddedWorker(db, _registry(), clock=clock)
    engine.submit(
        Trigger(
            workflow="payer",
            idempotency_key="k",
            requested_by="ann",
            input={"customer": "ann", "card_number": CARD},
        )
    )
    for _ in range(3):
        engine.drain()
        asyncio.run(worker.work_once())
    engine.drain()
    run_id = run_id_for("default", "k")
    state = engine.cache.get(run_id)
    assert state is not None and state.status.value == "Completed"
    raw = repr(engine.store.events(run_id))
    assert CARD in raw and TOKEN in raw, "the run log keeps what replay needs"
    engine.close()
    worker.close()

    shown = []
    for argv in (
        ["status", run_id, "--json"],
        ["status", run_id],
        ["timeline", run_id],
        ["timeline", run_id, "--json"],
        ["replay", run_id],
        ["replay", run_id, "--json", "--verify"],
        ["replay", run_id, "--at", "8", "--json"],
    ):
        out = io.StringIO()
        assert main([*argv, "--db", str(db)], out=out) == 0, argv
        shown.append(out.getvalue())
    text = "\n".join(shown) + "\n".join(r.getMessage() for r in caplog.records)
    assert "charge" in text and "receipt" in text  # the outputs are not empty
    assert CARD not in text, "the card number reached CLI output or a log line"
    assert TOKEN not in text, "the token reached CLI output or a log line"
