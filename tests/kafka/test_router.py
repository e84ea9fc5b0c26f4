"""The trigger router against the real broker: every trigger becomes one StartRun,
garbage becomes a dead letter, and a restarted router produces nothing twice."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from engine.codec import decode, encode
from engine.core.commands import StartRun
from engine.core.policies import run_id_for
from engine.core.records import DeadLetter, Trigger
from engine.kafka.router import TriggerRouter
from engine.kafka.topics import Topics
from tests.kafka.helpers import produce, read_all, running, wait_for_records

pytestmark = pytest.mark.kafka

GARBAGE = b"this is not an avro record"


def _starts(records: list[object]) -> list[StartRun]:
    out = []
    for record in records:
        command = decode(record.value)  # type: ignore[attr-defined]
        assert isinstance(command, StartRun)
        assert record.key == command.run_id.encode()  # type: ignore[attr-defined]
        out.append(command)
    return out


def test_triggers_become_start_runs_exactly_once(kafka_bootstrap: str, topics: Topics) -> None:
    keyed = Trigger(
        workflow="refund", tenant="acme", idempotency_key="order-42", input={"order_id": "42"}
    )
    unkeyed = Trigger(workflow="refund", input={"order_id": "43"})
    app = f"app-{topics.prefix}"

    async def scenario() -> None:
        # The keyed trigger three times (one on each partition), the unkeyed one on
        # partition 1 after it, garbage on partition 2 after it.
        await produce(
            kafka_bootstrap,
            topics.triggers,
            [
                (encode(keyed), None, 0),
                (encode(keyed), None, 1),
                (encode(keyed), None, 2),
                (encode(unkeyed), None, 1),
                (GARBAGE, b"junk", 2),
            ],
        )
        router = TriggerRouter(kafka_bootstrap, topics, app=app)
        async with running(router.run):
            inputs = await wait_for_records(kafka_bootstrap, topics.inputs, topics.partitions, 4)
            dead = await wait_for_records(
                kafka_bootstrap, topics.dead_letters, topics.partitions, 1
            )
        assert router.stats.forwards == 4 and router.stats.dead_letters == 1

        starts = _starts(inputs)
        keyed_run = run_id_for("acme", "order-42")
        unkeyed_key = f"{topics.triggers}/1/1"
        assert Counter(s.run_id for s in starts) == {
            keyed_run: 3,
            run_id_for("default", unkeyed_key): 1,
        }
        for record, start in zip(inputs, starts, strict=True):
            assert record.partition == topics.partition_of(start.run_id)
        by_key = {s.idempotency_key for s in starts}
        assert by_key == {"order-42", unkeyed_key}
        assert {s.command_id for s in starts if s.run_id == keyed_run} == {
            f"trigger:{topics.triggers}/{p}/0" for p in range(3)
        }
        assert all(s.workflow == "refund" for s in starts)

        assert len(dead) == 1
        letter = decode(dead[0].value)
        assert isinstance(letter, DeadLetter)
        assert letter.reason == "bad_magic"
        assert letter.payload == GARBAGE
        assert (letter.source, letter.partition, letter.offset) == (topics.triggers, 2, 1)

        # A new router of the same app resumes after the committed offsets: it routes
        # one new trigger per partition and nothing it routed before.
        sentinels = [Trigger(workflow="refund", idempotency_key=f"sentinel-{p}") for p in range(3)]
        await produce(
            kafka_bootstrap,
            topics.triggers,
            [(encode(t), None, p) for p, t in enumerate(sentinels)],
        )
        again = TriggerRouter(kafka_bootstrap, topics, app=app)
        async with running(again.run):
            after = await wait_for_records(kafka_bootstrap, topics.inputs, topics.partitions, 7)
        assert again.stats.forwards == 3 and again.stats.dead_letters == 0
        new = Counter(s.idempotency_key for s in _starts(after)) - Counter(by_key)
        assert new == {"order-42": 2, "sentinel-0": 1, "sentinel-1": 1, "sentinel-2": 1}
        dead_after = await read_all(kafka_bootstrap, topics.dead_letters, topics.partitions)
        assert len(dead_after) == 1

    asyncio.run(scenario())


def test_records_that_are_not_triggers_are_dead_lettered(
    kafka_bootstrap: str, topics: Topics
) -> None:
    command = StartRun(command_id="c1", run_id="r1", workflow="refund", version=1)

    async def scenario() -> None:
        await produce(kafka_bootstrap, topics.triggers, [(encode(command), None, 0)])
        router = TriggerRouter(kafka_bootstrap, topics, app=f"app-{topics.prefix}")
        async with running(router.run):
            dead = await wait_for_records(
                kafka_bootstrap, topics.dead_letters, topics.partitions, 1
            )
        letter = decode(dead[0].value)
        assert isinstance(letter, DeadLetter)
        assert letter.reason == "unexpected_record"
        assert letter.payload == encode(command)
        assert await read_all(kafka_bootstrap, topics.inputs, topics.partitions) == []

    asyncio.run(scenario())
