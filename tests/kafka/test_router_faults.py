"""The router's failure paths against the real broker: a fenced producer, and commits
whose outcome is unknown. Either way every trigger ends up as exactly one StartRun."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError

from engine.codec import decode, encode
from engine.core.commands import StartRun
from engine.core.records import Trigger
from engine.kafka.router import TriggerRouter
from engine.kafka.topics import Topics
from tests.kafka.helpers import eventually, produce, read_all, running, wait_for_records

pytestmark = pytest.mark.kafka


def _command_ids(records: list[object]) -> Counter[str]:
    out: Counter[str] = Counter()
    for record in records:
        command = decode(record.value)  # type: ignore[attr-defined]
        assert isinstance(command, StartRun)
        out[command.command_id] += 1
    return out


def test_fenced_partition_stops_and_the_next_owner_routes_its_triggers(
    kafka_bootstrap: str, topics: Topics
) -> None:
    app = f"app-{topics.prefix}"

    async def scenario() -> None:
        router = TriggerRouter(kafka_bootstrap, topics, app=app)
        async with running(router.run):
            assert await eventually(lambda: router.owned == [0, 1, 2])
            # A newer producer with partition 0's transactional id fences the router's.
            intruder = AIOKafkaProducer(
                bootstrap_servers=kafka_bootstrap, transactional_id=f"{app}-{topics.triggers}-0"
            )
            await intruder.start()
            try:
                await produce(
                    kafka_bootstrap,
                    topics.triggers,
                    [
                        (encode(Trigger(workflow="w", idempotency_key="fenced")), None, 0),
                        (encode(Trigger(workflow="w", idempotency_key="fine")), None, 1),
                    ],
                )
                assert await eventually(lambda: router.stats.fenced == 1)
                inputs = await wait_for_records(
                    kafka_bootstrap, topics.inputs, topics.partitions, 1
                )
            finally:
                await intruder.stop()
            await asyncio.sleep(0.5)  # the fenced partition stays stopped
            assert _command_ids(
                await read_all(kafka_bootstrap, topics.inputs, topics.partitions)
            ) == _command_ids(inputs)
        assert _command_ids(inputs) == {f"trigger:{topics.triggers}/1/0": 1}

        again = TriggerRouter(kafka_bootstrap, topics, app=app)
        async with running(again.run):
            inputs = await wait_for_records(kafka_bootstrap, topics.inputs, topics.partitions, 2)
        assert _command_ids(inputs) == {
            f"trigger:{topics.triggers}/0/0": 1,
            f"trigger:{topics.triggers}/1/0": 1,
        }

    asyncio.run(scenario())


class LosingCommits(TriggerRouter):
    """A router whose first ``failures`` commits lose their answer. With ``reach_broker``
    the commit request reaches the broker first (the transaction commits, the router never
    hears so); without, it never leaves (the next producer's initialisation aborts it)."""

    def __init__(self, *args: Any, failures: int, reach_broker: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures = failures
        self.reach_broker = reach_broker

    async def _new_producer(self, number: int) -> AIOKafkaProducer:
        producer = await super()._new_producer(number)
        real_commit = producer.commit_transaction

        async def commit() -> None:
            if self.failures <= 0:
                await real_commit()
                return
            self.failures -= 1
            if not self.reach_broker:
                raise KafkaTimeoutError("injected: the commit request never left")
            await real_commit()
            await asyncio.sleep(3600)  # the answer is lost: the router times out

        producer.commit_transaction = commit
        return producer


@pytest.mark.parametrize("reach_broker", [False, True], ids=["never-sent", "answer-lost"])
def test_commit_with_unknown_outcome_is_never_aborted_nor_duplicated(
    kafka_bootstrap: str, topics: Topics, reach_broker: bool
) -> None:
    triggers = [Trigger(workflow="w", idempotency_key=f"k{i}") for i in range(30)]

    async def scenario() -> None:
        await produce(
            kafka_bootstrap,
            topics.triggers,
            [(encode(t), None, i % 3) for i, t in enumerate(triggers)],
        )
        router = LosingCommits(
            kafka_bootstrap,
            topics,
            app=f"app-{topics.prefix}",
            max_batch=4,
            commit_timeout_s=0.5,
            failures=4,
            reach_broker=reach_broker,
        )
        async with running(router.run):
            await wait_for_records(kafka_bootstrap, topics.inputs, topics.partitions, len(triggers))
            await asyncio.sleep(0.5)
        inputs = await read_all(kafka_bootstrap, topics.inputs, topics.partitions)
        assert router.stats.unknown_outcomes == 4
        expected = {f"trigger:{topics.triggers}/{i % 3}/{i // 3}": 1 for i in range(len(triggers))}
        assert _command_ids(inputs) == expected

    asyncio.run(scenario())


def test_partitions_move_between_routers_without_loss_or_duplicates(
    kafka_bootstrap: str, topics: Topics
) -> None:
    app = f"app-{topics.prefix}"
    sent = 0

    async def send(count: int) -> None:
        nonlocal sent
        await produce(
            kafka_bootstrap,
            topics.triggers,
            [
                (encode(Trigger(workflow="w", idempotency_key=f"k{sent + i}")), None, i % 3)
                for i in range(count)
            ],
        )
        sent += count

    async def scenario() -> None:
        first = TriggerRouter(kafka_bootstrap, topics, app=app, max_batch=5)
        second = TriggerRouter(kafka_bootstrap, topics, app=app, max_batch=5)
        async with running(first.run):
            assert await eventually(lambda: first.owned == [0, 1, 2])
            await send(30)
            async with running(second.run):
                # The group splits the partitions between the two routers.
                assert await eventually(
                    lambda: sorted(first.owned + second.owned) == [0, 1, 2] and bool(second.owned)
                )
                await send(30)
                await wait_for_records(kafka_bootstrap, topics.inputs, topics.partitions, 60)
            # The second router left: the first takes every partition back.
            assert await eventually(lambda: first.owned == [0, 1, 2])
            await send(30)
            await wait_for_records(kafka_bootstrap, topics.inputs, topics.partitions, 90)
            await asyncio.sleep(0.5)
        inputs = await read_all(kafka_bootstrap, topics.inputs, topics.partitions)
        ids = _command_ids(inputs)
        assert len(ids) == 90 and set(ids.values()) == {1}
        assert first.stats.forwards + second.stats.forwards == 90

    asyncio.run(scenario())
