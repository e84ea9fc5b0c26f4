"""Workers over the real broker with the PostgreSQL ledger: results reach the run inputs,
a redelivered task is answered from the ledger, business errors are reported as such."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import uuid4

import pytest

from engine.codec import decode, encode
from engine.core.commands import CompleteTask, FailTask
from engine.core.outbox import TaskCommand
from engine.kafka.ledger import PostgresLedger
from engine.kafka.topics import Topics, ensure_topics
from engine.kafka.worker import KafkaWorker
from engine.runtime.clock import SystemClock
from engine.worker.sdk import BusinessError, LedgerEntry, TaskContext, TaskResult, ToolRegistry
from tests.kafka.helpers import produce, read_all, running, wait_for_records

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def _task(
    topics: Topics,
    queue: str,
    key: str,
    *,
    task_id: str | None = None,
    deadline_in_ms: int = 60_000,
    payload: Any = None,
) -> TaskCommand:
    run_id = f"run-{uuid4().hex[:8]}"
    return TaskCommand(
        queue=queue,
        task_id=task_id or f"{run_id}/step/1/task/1",
        run_id=run_id,
        step="step",
        phase="task",
        attempt=1,
        idempotency_key=key,
        input=payload or {"n": 1},
        deadline=SystemClock().now_ms() + deadline_in_ms,
        tenant="acme",
        correlation_id=run_id,
        workflow="w",
    )


def _send(topics: Topics, task: TaskCommand) -> tuple[bytes, bytes, int]:
    return (encode(task), task.run_id.encode(), topics.partition_of(task.run_id))


def _results(records: list[Any]) -> dict[str, CompleteTask | FailTask]:
    out: dict[str, CompleteTask | FailTask] = {}
    for record in records:
        command = decode(record.value)
        assert isinstance(command, CompleteTask | FailTask)
        assert record.partition == 0 or record.key == command.run_id.encode()
        out[command.task_id] = command
    return out


class Tools:
    """A registry whose tools count their calls."""

    def __init__(self, prefix: str) -> None:
        self.add = f"{prefix}.add"
        self.refuse = f"{prefix}.refuse"
        self.nan = f"{prefix}.nan"
        self.calls: list[str] = []
        self.registry = ToolRegistry()
        self.registry.register(self.add, self._add)
        self.registry.register(self.refuse, self._refuse)
        self.registry.register(self.nan, self._nan)

    async def create_topics(self, bootstrap: str, topics: Topics) -> None:
        await ensure_topics(bootstrap, topics.task_topics(self.registry.queues))

    async def _add(self, ctx: TaskContext) -> TaskResult:
        self.calls.append(ctx.idempotency_key)
        return TaskResult({"sum": ctx.input["n"] + 1}, cost=0.25, confidence=0.9)

    async def _refuse(self, ctx: TaskContext) -> None:
        self.calls.append(ctx.idempotency_key)
        raise BusinessError("AMOUNT_OVER_LIMIT", "refunds above 500 need a manager")

    async def _nan(self, ctx: TaskContext) -> dict[str, float]:
        self.calls.append(ctx.idempotency_key)
        return {"score": float("nan")}  # valid to json.dumps, not to the engine


def test_results_reach_run_inputs_and_redeliveries_are_answered_from_the_ledger(
    kafka_bootstrap: str, postgres_dsn: str, topics: Topics
) -> None:
    tools = Tools(topics.prefix)
    key = f"idem-{uuid4().hex}"
    first = _task(topics, tools.add, key, payload={"n": 41})
    refused = _task(topics, tools.refuse, f"idem-{uuid4().hex}")
    unencodable = _task(topics, tools.nan, f"idem-{uuid4().hex}")
    expired = _task(topics, tools.add, f"idem-{uuid4().hex}", deadline_in_ms=-1)
    # The same step delivered again: same idempotency key, new task id.
    repeat = _task(topics, tools.add, key, payload={"n": 41})

    async def scenario() -> None:
        await tools.create_topics(kafka_bootstrap, topics)
        ledger = PostgresLedger(postgres_dsn)
        await ledger.open()
        worker = KafkaWorker(
            kafka_bootstrap,
            topics,
            tools.registry,
            ledger,
            app=f"app-{topics.prefix}",
            concurrency=4,
        )
        try:
            async with running(worker.run):
                await produce(
                    kafka_bootstrap,
                    topics.tasks(tools.add),
                    [_send(topics, first), _send(topics, expired), (b"not a task", None, 0)],
                )
                await produce(kafka_bootstrap, topics.tasks(tools.refuse), [_send(topics, refused)])
                await produce(
                    kafka_bootstrap, topics.tasks(tools.nan), [_send(topics, unencodable)]
                )
                results = _results(
                    await wait_for_records(kafka_bootstrap, topics.inputs, topics.partitions, 3)
                )
                assert set(results) == {first.task_id, refused.task_id, unencodable.task_id}

                await produce(kafka_bootstrap, topics.tasks(tools.add), [_send(topics, repeat)])
                results = _results(
                    await wait_for_records(kafka_bootstrap, topics.inputs, topics.partitions, 4)
                )
            assert await ledger.lookup(key) == LedgerEntry(key, {"sum": 42}, 0.25, 0.9)
            assert await ledger.lookup(unencodable.idempotency_key) is None
        finally:
            await ledger.close()

        done = results[first.task_id]
        assert isinstance(done, CompleteTask)
        assert (done.result, done.cost, done.confidence) == ({"sum": 42}, 0.25, 0.9)
        assert (done.run_id, done.step, done.tenant) == (first.run_id, "step", "acme")

        again = results[repeat.task_id]
        assert isinstance(again, CompleteTask)
        assert (again.run_id, again.result, again.cost) == (repeat.run_id, {"sum": 42}, 0.0)

        failed = results[refused.task_id]
        assert isinstance(failed, FailTask)
        assert (failed.error_class, failed.code) == ("business", "AMOUNT_OVER_LIMIT")

        bad = results[unencodable.task_id]
        assert isinstance(bad, FailTask)
        assert (bad.error_class, bad.code) == ("permanent", "RESULT_NOT_ENCODABLE")

        assert tools.calls.count(key) == 1
        assert expired.idempotency_key not in tools.calls
        assert (worker.calls, worker.answered_from_ledger) == (3, 1)
        assert (worker.expired, worker.undecodable, worker.results) == (1, 1, 4)

    asyncio.run(scenario())


def test_a_restarted_worker_resumes_after_committed_tasks(
    kafka_bootstrap: str, postgres_dsn: str, topics: Topics
) -> None:
    tools = Tools(topics.prefix)
    tasks = [_task(topics, tools.add, f"idem-{uuid4().hex}", payload={"n": i}) for i in range(20)]
    app = f"app-{topics.prefix}"

    async def scenario() -> None:
        await tools.create_topics(kafka_bootstrap, topics)
        ledger = PostgresLedger(postgres_dsn)
        await ledger.open()
        try:
            await produce(
                kafka_bootstrap, topics.tasks(tools.add), [_send(topics, t) for t in tasks]
            )
            worker = KafkaWorker(
                kafka_bootstrap, topics, tools.registry, ledger, app=app, concurrency=3
            )
            async with running(worker.run):
                await wait_for_records(
                    kafka_bootstrap, topics.inputs, topics.partitions, len(tasks)
                )
            again = KafkaWorker(kafka_bootstrap, topics, tools.registry, ledger, app=app)
            late = _task(topics, tools.add, f"idem-{uuid4().hex}")
            async with running(again.run):
                await produce(kafka_bootstrap, topics.tasks(tools.add), [_send(topics, late)])
                await wait_for_records(
                    kafka_bootstrap, topics.inputs, topics.partitions, len(tasks) + 1
                )
            assert (again.calls, again.answered_from_ledger) == (1, 0)
        finally:
            await ledger.close()
        results = _results(await read_all(kafka_bootstrap, topics.inputs, topics.partitions))
        assert set(results) == {t.task_id for t in [*tasks, late]}
        assert sorted(tools.calls) == sorted(t.idempotency_key for t in [*tasks, late])

    asyncio.run(scenario())
