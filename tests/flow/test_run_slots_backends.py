"""Flow control end to end: runs whose task is on a tool limited to one slot, a worker
that would run four at once, and a tool that records how many calls are in flight. On
the embedded store (the admission core in the engine's SQLite transaction) and on Kafka
(``terranoha serve`` runs the admission processor beside the orchestrator): never more
than the limit at once, every run completes, and no slot stays held."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from engine.core.limits import load_limits_yaml
from engine.core.policies import run_id_for
from engine.core.records import Trigger
from engine.core.spec import load_spec
from engine.core.state import RunStatus
from engine.embedded import EmbeddedEngine, EmbeddedWorker
from engine.embedded.admission import AdmissionStore
from engine.embedded.limits import LimitsStore
from engine.embedded.store import Store
from engine.worker import ToolRegistry

RUNS = 6
SPEC = load_spec({"workflow": "limited", "version": 1, "steps": [
    {"id": "call", "task": "test.limited", "timeout": "30s"}]})
LIMITS = load_limits_yaml("limits: v1\nrules:\n  - key: tool:test.limited\n"
                          "    concurrency: 1\n")


class InFlight:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.calls = 0

    async def __call__(self, ctx: Any) -> dict[str, int]:
        with self.lock:
            self.now += 1
            self.calls += 1
            self.peak = max(self.peak, self.now)
        await asyncio.sleep(0.05)
        with self.lock:
            self.now -= 1
        return {"ok": 1}


def test_on_the_embedded_store_a_limited_tool_runs_one_task_at_a_time(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = Store(db)
    store.deploy(SPEC, 0)
    LimitsStore(store).deploy(LIMITS, 0)
    store.close()
    probe = InFlight()
    registry = ToolRegistry()
    registry.register("test.limited", probe)
    engine, worker = EmbeddedEngine(db), EmbeddedWorker(db, registry, concurrency=4)
    run_ids = [run_id_for("default", f"k{i}") for i in range(RUNS)]
    engine.submit(*[Trigger(workflow="limited", version=1, input={}, idempotency_key=f"k{i}")
                    for i in range(RUNS)])

    async def main() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(engine.run(stop)), asyncio.create_task(worker.run(stop))]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = [engine.cache.get(r) for r in run_ids]
            if all(s is not None and s.status is RunStatus.COMPLETED for s in states):
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    states = [engine.cache.get(r) for r in run_ids]
    assert all(s is not None and s.status is RunStatus.COMPLETED for s in states), states
    assert probe.peak == 1, f"{probe.peak} calls in flight, limit 1"
    assert probe.calls == RUNS
    key = AdmissionStore(engine.store).state("tool:test.limited")
    assert key is not None and key.executing == 0 and not key.queue
    engine.close()
    worker.close()
