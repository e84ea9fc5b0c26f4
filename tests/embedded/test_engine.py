"""The embedded backend in-process, with a manual clock."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

from engine.cli import main
from engine.codec import encode
from engine.core.commands import CompleteTask
from engine.core.policies import run_id_for
from engine.core.records import Trigger
from engine.core.spec import load_spec
from engine.embedded import EmbeddedEngine, EmbeddedWorker
from engine.runtime.clock import ManualClock
from engine.worker import TaskContext, ToolRegistry

SPEC = load_spec(
    {
        "workflow": "w",
        "version": 1,
        "input": {"x": "integer"},
        "steps": [
            {
                "id": "a",
                "task": "t.a",
                "timeout": "1m",
                "retry": {"max_attempts": 3, "initial": "10s", "jitter": "none"},
            },
            {"id": "nap", "sleep": "1h"},
            {"id": "b", "task": "t.b"},
        ],
    }
)


def _setup(tmp_path: Path, clock: ManualClock) -> EmbeddedEngine:
    engine = EmbeddedEngine(tmp_path / "e.db", clock=clock)
    engine.store.deploy(SPEC, clock.now_ms())
    engine.specs.add(SPEC)
    return engine


def _registry(calls: list[str], fail_first: bool = False) -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool("t.a")
    def a(ctx: TaskContext) -> dict[str, Any]:
        calls.append(f"a{ctx.attempt}")
        if fail_first and ctx.attempt == 1:
            raise RuntimeError("connection reset")
        return {"y": ctx.input["x"] * 2}

    @registry.tool("t.b")
    def b(ctx: TaskContext) -> dict[str, Any]:
        calls.append("b")
        return {"done": True}

    return registry


def test_timers_survive_a_restart(tmp_path: Path) -> None:
    clock = ManualClock()
    engine = _setup(tmp_path, clock)
    calls: list[str] = []
    worker = EmbeddedWorker(tmp_path / "e.db", _registry(calls, fail_first=True), clock=clock)
    engine.submit(Trigger(workflow="w", idempotency_key="k", input={"x": 21}))
    run_id = run_id_for("default", "k")
    engine.drain()
    asyncio.run(worker.work_once())  # attempt 1 fails: unexpected error counts as transient
    engine.drain()
    state = engine.cache.get(run_id)
    assert state is not None and state.status.value == "Retry"
    engine.close()

    clock.advance(10_000)  # the backoff is due while the engine is down
    engine = EmbeddedEngine(tmp_path / "e.db", clock=clock)
    engine.drain()
    asyncio.run(worker.work_once())
    engine.drain()
    state = engine.cache.get(run_id)
    assert state is not None and state.current is not None and state.current.step == "nap"
    engine.close()

    clock.advance(3_600_000)
    engine = EmbeddedEngine(tmp_path / "e.db", clock=clock)
    engine.drain()
    asyncio.run(worker.work_once())
    engine.drain()
    state = engine.cache.get(run_id)
    assert state is not None and state.status.value == "Completed"
    assert state.results["a"] == {"y": 42}
    assert calls == ["a1", "a2", "b"]


def test_poison_inputs_go_to_dead_letters_and_others_keep_going(tmp_path: Path) -> None:
    clock = ManualClock()
    engine = _setup(tmp_path, clock)
    good = Trigger(workflow="w", idempotency_key="ok", input={"x": 1})
    unknown = Trigger(workflow="nope", idempotency_key="u")
    valid = encode(good)
    engine.store.append_raw_inputs(
        [
            ("", b"\x07garbage", 0),
            ("", valid[:-3], 0),
            ("", b"\x00\x00\x00\xff\xff" + valid[5:], 0),
            ("", encode(unknown), 0),
            ("", b"x" * (2 << 20), 0),
            ("", valid, 0),
        ]
    )
    engine.drain()
    reasons = [d.reason for d in engine.store.dead_letters()]
    assert reasons[:3] == ["bad_magic", "truncated", "unknown_schema"]
    assert "unknown_workflow" in reasons
    assert "oversize" in reasons
    assert len(reasons) == 5
    state = engine.cache.get(run_id_for("default", "ok"))
    assert state is not None and state.status.value == "Running"
    dead = engine.store.dead_letters()[3]
    assert dead.payload == encode(unknown) and "not deployed" in dead.detail


def test_duplicate_triggers_and_results_make_one_run_and_one_effect(tmp_path: Path) -> None:
    clock = ManualClock()
    engine = _setup(tmp_path, clock)
    trigger = Trigger(workflow="w", idempotency_key="same", input={"x": 2})
    engine.submit(trigger, trigger, trigger)
    engine.drain()
    run_id = run_id_for("default", "same")
    events = engine.store.events(run_id)
    assert [e.TYPE for e in events].count("RunStarted") == 1
    assert [getattr(e, "reason", "") for e in events].count("duplicate start") == 2
    task = next(e for e in events if e.TYPE == "TaskDispatched")
    result = CompleteTask(
        command_id="r1", run_id=run_id, step="a", task_id=task.task_id, result={"y": 4}
    )  # type: ignore[attr-defined]
    engine.submit(result, result)
    engine.drain()
    events = engine.store.events(run_id)
    assert [e.TYPE for e in events].count("TaskCompleted") == 1
    assert [getattr(e, "reason", "") for e in events].count("stale result") == 1


def test_ledger_answers_a_redelivered_task_without_calling_the_tool(tmp_path: Path) -> None:
    clock = ManualClock()
    engine = _setup(tmp_path, clock)
    calls: list[str] = []
    worker = EmbeddedWorker(tmp_path / "e.db", _registry(calls), clock=clock, lease_ms=1000)
    engine.submit(Trigger(workflow="w", idempotency_key="k", input={"x": 1}))
    engine.drain()
    asyncio.run(worker.work_once())
    assert calls == ["a1"]
    # The same task delivered again (as after a lease ran out before it was marked done).
    worker.store.db.execute("UPDATE tasks SET done = 0, lease_until = 0")
    asyncio.run(worker.work_once())
    assert calls == ["a1"], "the ledger answered; the tool was not called again"


def test_demo_completes_and_replays(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    out = io.StringIO()
    assert main(["demo", "--db", str(db)], out=out) == 0, out.getvalue()
    text = out.getvalue()
    assert "self-approval" in text
    assert "refunds applied by the payment provider: 1" in text
    run_id = next(line.split()[1] for line in text.splitlines() if line.startswith("run "))
    replay = io.StringIO()
    assert main(["replay", run_id, "--db", str(db), "--verify"], out=replay) == 0
    assert "verify: OK" in replay.getvalue()
    timeline = io.StringIO()
    assert main(["timeline", run_id, "--db", str(db)], out=timeline) == 0
    assert timeline.getvalue() in text, "the demo shows the timeline the CLI shows (redacted)"
    assert "DecideApproval by alice at step refund: self-approval: alice requested" in text


def test_each_recorded_command_keeps_the_position_of_the_input_it_came_from(tmp_path: Path) -> None:
    engine = _setup(tmp_path, ManualClock())
    positions = engine.store.append_inputs(
        [Trigger(workflow="w", idempotency_key=f"k{i}", input={"x": i}) for i in range(3)], 0
    )
    assert engine.step() == 3  # one batch
    rows = engine.store.db.execute(
        "SELECT input_pos, run_id FROM commands ORDER BY input_pos"
    ).fetchall()
    assert [pos for pos, _ in rows] == positions
    assert [run_id for _, run_id in rows] == [run_id_for("default", f"k{i}") for i in range(3)]
    engine.close()
