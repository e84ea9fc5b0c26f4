"""Two deployments side by side on one broker and one PostgreSQL database: other topic
prefixes, the same (default) app and the same ``--instance-id``. Each runs its own runs
and calls its own tools: no consumer group, transactional id or ledger entry is shared."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import pytest

from engine.codec import encode
from engine.core.policies import run_id_for
from engine.core.records import Trigger
from engine.core.spec import load_spec
from engine.core.state import RunStatus
from engine.kafka.serve import Running, ServeOptions, serve
from engine.kafka.specs import publish_spec
from engine.kafka.topics import Topics, delete_topics
from engine.worker.sdk import TaskContext, TaskResult, ToolRegistry
from tests.kafka.helpers import eventually, produce

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def test_two_deployments_on_one_broker_and_database_never_meet(
    kafka_bootstrap: str, postgres_dsn: str
) -> None:
    queue = f"q{uuid4().hex[:6]}.call"
    calls: list[str] = []

    def call(ctx: TaskContext) -> TaskResult:
        calls.append(ctx.run_id)
        return TaskResult({"ok": True})

    registry = ToolRegistry()
    registry.register(queue, call)
    spec = load_spec({"workflow": "side", "version": 1, "steps": [{"id": "call", "task": queue}]})
    deployments = [Topics(prefix=f"d{uuid4().hex[:8]}", partitions=2) for _ in range(2)]
    run_id = run_id_for("acme", "order-1")  # the same tenant and key in both

    async def main() -> None:
        stops = [asyncio.Event() for _ in deployments]
        started: list[Running] = []

        async def ready(running: Running) -> None:
            started.append(running)

        tasks = [
            asyncio.create_task(
                serve(
                    ServeOptions(
                        bootstrap=kafka_bootstrap,
                        topics=topics,
                        postgres=postgres_dsn,
                        registry=registry,
                        instance_id="same-host",
                    ),
                    stop,
                    ready=ready,
                )
            )
            for topics, stop in zip(deployments, stops, strict=True)
        ]
        try:
            assert await eventually(lambda: len(started) == 2, timeout_s=60)
            for topics in deployments:
                await publish_spec(kafka_bootstrap, topics, spec)
            engines = [r.engine for r in started]
            assert await eventually(
                lambda: all(e is not None and len(e.parts) == 2 for e in engines), timeout_s=60
            ), "a deployment never got its partitions"
            for topics in deployments:
                trigger = Trigger(workflow="side", tenant="acme", idempotency_key="order-1")
                await produce(
                    kafka_bootstrap,
                    topics.triggers,
                    [(encode(trigger), run_id.encode(), topics.partition_of(run_id))],
                )
            assert await eventually(
                lambda: all(
                    e is not None
                    and (s := e.state(run_id)) is not None
                    and s.status is RunStatus.COMPLETED
                    for e in engines
                ),
                timeout_s=60,
            ), "a run did not complete in both deployments"
            assert calls == [run_id, run_id], "each deployment calls its own tool once"
            names = {t.deployment("terranoha") for t in deployments}
            assert len(names) == 2
        finally:
            for stop in stops:
                stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            for topics in deployments:
                await delete_topics(kafka_bootstrap, topics.prefix)

    asyncio.run(main())


def test_the_default_deployment_keeps_its_names() -> None:
    assert Topics().deployment("terranoha") == "terranoha"
    assert Topics(prefix="shop").deployment("shop") == "shop"
    assert Topics(prefix="shop").deployment("terranoha") == "terranoha.shop"
