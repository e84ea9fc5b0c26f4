"""The projections in the embedded store's SQLite file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from engine.core import events as ev
from engine.core.policies import run_id_for
from engine.core.records import Trigger
from engine.embedded import EmbeddedEngine, EmbeddedWorker, Store
from engine.runtime.clock import ManualClock
from engine.runtime.processor import Batch
from engine.worker import TaskContext, ToolRegistry
from projections import query
from projections.project import project_run, run_row, step_rows
from projections.sla import sla_aggregates
from projections.sqlite import (
    StoreProjector,
    checksum_store,
    follow_store,
    project_store,
    rebuild_store,
    run_rows,
    sla_from_store,
    timeline_from_store,
)
from tests.projections.scenarios import (
    BASE,
    BOOK,
    CLAIMS,
    SECRETS,
    many_runs,
    scripted_runs,
)
from tests.projections.test_sla import NOW
from tests.projections.test_sla import rows as pure_rows


def _store(path: Path, runs: dict[str, list[ev.Event]], deploy: bool = True) -> None:
    store = Store(path)
    if deploy:
        store.deploy(CLAIMS, BASE)
    store.write_batch(Batch(events=[e for events in runs.values() for e in events]))
    store.close()


def _stored(path: Path, table: str) -> list[dict[str, Any]]:
    store = Store(path)
    cursor = store.db.execute(f"SELECT * FROM {table}")
    names = [d[0] for d in cursor.description]
    out = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    store.close()
    return out


def test_the_store_projection_equals_the_pure_fold(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    runs = scripted_runs()
    _store(path, runs)
    assert project_store(path) == sum(len(e) for e in runs.values())
    stored = {r["run_id"]: r for r in _stored(path, "runs")}
    for run_id, events in runs.items():
        expected = run_row(project_run(events, BOOK))
        row = stored[run_id]
        assert json.loads(row.pop("state")) == json.loads(json.dumps(expected.pop("state")))
        for name in ("error", "input", "output"):
            row[name] = json.loads(row[name]) if row[name] is not None else None
        row["sla_breached"] = bool(row["sla_breached"])
        assert row == expected
    steps = _stored(path, "steps")
    assert len(steps) == sum(len(step_rows(project_run(e, BOOK))) for e in runs.values())
    events = _stored(path, "run_events")
    assert sorted((e["run_id"], e["seq"]) for e in events) == sorted(
        (e.run_id, e.seq) for es in runs.values() for e in es
    )
    assert {e["partition"] for e in events} == {0}
    blob = json.dumps([stored, steps])
    assert not [s for s in SECRETS if s in blob]


def test_sla_from_the_store_matches_the_hand_figures(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    _store(path, scripted_runs())
    project_store(path)
    expected = sla_aggregates(pure_rows(), "1h", now_ms=NOW)
    assert sla_from_store(path, window="1h", now_ms=NOW) == expected
    assert query.sla(str(path), tenant="beta", window="1h", now_ms=NOW) == [expected[1]]
    assert expected[0].started == 9 and expected[0].approvals_overdue == 1


def test_catching_up_in_steps_equals_a_rebuild(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    runs = many_runs(60)
    items = list(runs.items())
    _store(path, dict(items[:20]))
    projector = StoreProjector(path, batch=37)
    projector.catch_up()
    # the rest of those runs' events are not there yet: write later runs, then finish
    _store(path, dict(items[20:]), deploy=False)
    progress: list[tuple[int, int]] = []
    projector.catch_up(lambda done, total: progress.append((done, total)))
    projector.close()
    assert progress[-1][0] == progress[-1][1] > 0
    assert project_store(path) == 0, "nothing left"
    live = checksum_store(path)
    assert rebuild_store(path) == sum(len(e) for e in runs.values())
    assert checksum_store(path) == live


def test_timeline_from_the_store(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    _store(path, scripted_runs())
    project_store(path)
    timeline = timeline_from_store(path, "r9")
    assert timeline is not None and timeline.sla_breached and len(timeline.steps) == 4
    assert query.timeline(path, "r1") is not None
    assert timeline_from_store(path, "nope") is None
    assert len(run_rows(path)) == len(scripted_runs())


def test_a_real_embedded_run_is_projected(tmp_path: Path) -> None:
    """The embedded engine writes, ``follow_store`` keeps the projection up to date."""
    path = tmp_path / "e.db"
    clock = ManualClock()
    engine = EmbeddedEngine(path, clock=clock)
    engine.store.deploy(CLAIMS, clock.now_ms())
    engine.specs.add(CLAIMS)
    registry = ToolRegistry()

    @registry.tool("crm.fetch")
    def fetch(ctx: TaskContext) -> dict[str, Any]:
        return {"session_token": "live-secret-token-123", "ok": True}

    @registry.tool("pay.send")
    def pay(ctx: TaskContext) -> dict[str, Any]:
        return {"paid": ctx.input["claim"]}

    worker = EmbeddedWorker(path, registry, clock=clock)
    engine.submit(
        Trigger(
            workflow="claims",
            idempotency_key="k1",
            tenant="acme",
            requested_by="alice",
            input={"claim": "c-9", "card_number": "4111111111111111"},
        )
    )

    async def go() -> None:
        engine.drain()
        await worker.work_once()
        engine.drain()
        stop = asyncio.Event()
        follower = asyncio.create_task(follow_store(path, stop, poll_ms=10))
        await asyncio.sleep(0.2)
        stop.set()
        await follower

    asyncio.run(go())
    run_id = run_id_for("acme", "k1")
    timeline = timeline_from_store(path, run_id)
    assert timeline is not None
    assert (timeline.status, [s.step for s in timeline.steps]) == ("Waiting", ["fetch", "review"])
    assert timeline.steps[0].result == {"session_token": "[redacted]", "ok": True}
    assert timeline.input["card_number"] == "[redacted]"
    engine.close()
    worker.close()


def test_two_projectors_on_one_file_do_not_double_anything(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    runs = many_runs(30)
    _store(path, runs)
    a, b = StoreProjector(path, batch=50), StoreProjector(path, batch=50)
    for _ in range(40):
        a._step()
        b._step()
    a.close()
    b.close()
    live = checksum_store(path)
    rebuild_store(path)
    assert checksum_store(path) == live
    assert len(_stored(path, "run_events")) == sum(len(e) for e in runs.values())
