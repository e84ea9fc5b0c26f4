"""Flow control end to end: runs whose task is on a tool limited to one slot, a worker
that would run four at once, and a tool that records how many calls are in flight. On
the embedded store (the admission core in the engine's SQLite transaction) and on Kafka
(``terranoha serve`` runs the admission processor beside the orchestrator): never more
than the limit at once, every run completes, and no slot stays held."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from engine.core.limits import load_limits_yaml
from engine.core.policies import run_id_for
from engine.core.records import Trigger
from engine.core.spec import load_spec
from engine.core.state import RunState, RunStatus
from engine.embedded import EmbeddedEngine, EmbeddedWorker
from engine.embedded.admission import AdmissionStore
from engine.embedded.limits import LimitsStore
from engine.embedded.store import Store
from engine.kafka.admission import read_admission_states
from engine.kafka.client import KafkaClient
from engine.kafka.limits import publish_limits
from engine.kafka.specs import publish_spec
from engine.kafka.topics import Topics, delete_topics, ensure_topics
from engine.worker import ToolRegistry
from tests.flow.test_admission_sigkill import ROOT, EffectServer
from tests.infra import kafka_bootstrap, postgres_dsn

RUNS = 6
SPEC = load_spec(
    {
        "workflow": "limited",
        "version": 1,
        "steps": [{"id": "call", "task": "test.limited", "timeout": "30s"}],
    }
)
LIMITS = load_limits_yaml("limits: v1\nrules:\n  - key: tool:test.limited\n    concurrency: 1\n")


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
    engine.submit(
        *[
            Trigger(workflow="limited", version=1, input={}, idempotency_key=f"k{i}")
            for i in range(RUNS)
        ]
    )

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


def test_on_kafka_a_limited_tool_runs_one_task_at_a_time_across_the_deployment() -> None:
    bootstrap = kafka_bootstrap()
    topics = Topics(prefix=f"r{uuid.uuid4().hex[:8]}", partitions=3)

    async def setup() -> None:
        await ensure_topics(bootstrap, topics.core_topics())
        await publish_spec(bootstrap, topics, SPEC)
        await publish_limits(bootstrap, topics, LIMITS, app=topics.prefix)

    asyncio.run(setup())
    with EffectServer() as server:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TERRANOHA_TEST_EFFECT_URL": server.url}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine.cli",
                "serve",
                "--kafka",
                bootstrap,
                "--topic-prefix",
                topics.prefix,
                "--app",
                topics.prefix,
                "--partitions",
                "3",
                "--workers",
                "tests.flow.limited_tools",
                "--concurrency",
                "4",
                "--postgres",
                postgres_dsn(),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith(b"serving")

            async def drive() -> list[RunState]:
                client = KafkaClient(bootstrap, topics, app=topics.prefix)
                await client.start()
                try:
                    for i in range(RUNS):
                        await client.trigger(
                            Trigger(
                                workflow="limited", version=1, input={}, idempotency_key=f"k{i}"
                            )
                        )
                    deadline = time.monotonic() + 120
                    while time.monotonic() < deadline:
                        states = await client.states()
                        if len(states) == RUNS and all(
                            s.status is RunStatus.COMPLETED for s in states
                        ):
                            return states
                        await asyncio.sleep(0.5)
                    return await client.states()
                finally:
                    await client.close()

            states = asyncio.run(drive())
            assert [s.status for s in states] == [RunStatus.COMPLETED] * RUNS, states
            assert server.peak == 1, f"{server.peak} calls in flight, limit 1"
            assert len(server.calls) == RUNS and all(n == 1 for n in server.calls.values())
            key = asyncio.run(read_admission_states(bootstrap, topics)).get("tool:test.limited")
            assert key is not None and key.executing == 0 and not key.queue
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
            asyncio.run(delete_topics(bootstrap, topics.prefix))
