"""A forwarded trigger that cannot start its run is dead-lettered as the trigger it was,
on the real broker: the trigger's topic, partition, offset and bytes, not the forwarded
``StartRun``'s. Origin headers that do not agree with the record are not believed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from uuid import uuid4

import pytest
from aiokafka import AIOKafkaProducer

from engine.codec import decode, encode
from engine.core.commands import StartRun
from engine.core.policies import run_id_for
from engine.core.records import DeadLetter, Trigger
from engine.kafka.processor import KafkaEngine
from engine.kafka.router import TriggerRouter
from engine.kafka.topics import Topics, delete_topics, ensure_topics
from engine.runtime.processor import ORIGIN_INLINE_BYTES
from engine.runtime.specs import SpecRegistry
from tests.kafka.helpers import produce, read_all, running, wait_for_records

pytestmark = pytest.mark.kafka


@pytest.fixture
def routed(kafka_bootstrap: str) -> Iterator[Topics]:
    """Core topics whose triggers topic has another partition count: the router reads it."""
    t = Topics(prefix=f"t{uuid4().hex[:8]}", partitions=3, trigger_partitions=2)
    asyncio.run(ensure_topics(kafka_bootstrap, t.core_topics()))
    yield t
    asyncio.run(delete_topics(kafka_bootstrap, t.prefix))


def _letters(records: list[object]) -> list[DeadLetter]:
    letters = [decode(r.value) for r in records]  # type: ignore[attr-defined]
    assert all(isinstance(x, DeadLetter) for x in letters)
    return letters  # type: ignore[return-value]


def test_a_routed_trigger_for_an_unknown_workflow_is_dead_lettered_as_itself(
    kafka_bootstrap: str, routed: Topics
) -> None:
    small = Trigger(workflow="nowhere", idempotency_key="small", input={"order": "42"})
    # Too large to ride along with its StartRun: the letter says where the trigger is.
    large = Trigger(
        workflow="nowhere",
        idempotency_key="large",
        input={"blob": "x" * (ORIGIN_INLINE_BYTES // 2 + 1)},
    )
    # Someone writes a StartRun on the run inputs claiming to come from the triggers topic.
    forged_run = run_id_for("default", "forged")
    forged = StartRun(command_id="c-forged", run_id=forged_run, workflow="nowhere", version=1)
    claimed = [
        ("origin_topic", routed.triggers.encode()),
        ("origin_partition", b"0"),
        ("origin_offset", b"0"),
        ("origin_payload", encode(small)),
    ]

    async def scenario() -> None:
        await produce(
            kafka_bootstrap,
            routed.triggers,
            [(encode(small), b"small", 1), (encode(large), b"large", 0)],
        )
        await _produce_with_headers(
            kafka_bootstrap,
            routed.inputs,
            encode(forged),
            forged_run.encode(),
            routed.partition_of(forged_run),
            claimed,
        )
        router = TriggerRouter(kafka_bootstrap, routed, app=routed.prefix)
        engine = KafkaEngine(kafka_bootstrap, routed, SpecRegistry(), app=routed.prefix)
        assert not engine.read_triggers
        async with running(router.run), running(engine.run):
            dead = await wait_for_records(
                kafka_bootstrap, routed.dead_letters, routed.partitions, 3, timeout_s=60
            )
        letters = {letter.run_id: letter for letter in _letters(dead)}
        assert set(letters) == {
            run_id_for("default", "small"),
            run_id_for("default", "large"),
            forged_run,
        }

        # The trigger itself: where it was published, its bytes untouched.
        letter = letters[run_id_for("default", "small")]
        assert letter.reason == "unknown_workflow"
        assert (letter.source, letter.partition, letter.offset) == (routed.triggers, 1, 0)
        assert letter.payload == encode(small)
        assert "'nowhere'" in letter.detail and "terranoha workflows deploy" in letter.detail
        assert f"the trigger read at {routed.triggers}/1/0" in letter.detail
        assert f"forwarded as a StartRun to {routed.inputs}/" in letter.detail

        letter = letters[run_id_for("default", "large")]
        assert (letter.source, letter.partition, letter.offset) == (routed.triggers, 0, 0)
        assert "too large to carry along" in letter.detail
        forwarded = decode(letter.payload)
        assert isinstance(forwarded, StartRun) and forwarded.idempotency_key == "large"

        # The made-up origin is not believed: the letter names the record as written.
        letter = letters[forged_run]
        assert (letter.source, letter.partition, letter.offset) == (
            routed.inputs,
            routed.partition_of(forged_run),
            0,
        )
        assert letter.payload == encode(forged)
        assert "forwarded" not in letter.detail

    asyncio.run(scenario())


def test_a_trigger_forwarded_by_the_engine_is_dead_lettered_as_itself(
    kafka_bootstrap: str, topics: Topics
) -> None:
    """Co-partitioned triggers: one on another partition than its run's is forwarded by
    the engine itself, in the transaction that reads it."""
    assert topics.co_partitioned
    run_id = run_id_for("default", "elsewhere")
    landed = (topics.partition_of(run_id) + 1) % topics.partitions
    trigger = encode(Trigger(workflow="nowhere", idempotency_key="elsewhere"))

    async def scenario() -> None:
        await produce(kafka_bootstrap, topics.triggers, [(trigger, b"elsewhere", landed)])
        engine = KafkaEngine(kafka_bootstrap, topics, SpecRegistry(), app=topics.prefix)
        async with running(engine.run):
            dead = await wait_for_records(
                kafka_bootstrap, topics.dead_letters, topics.partitions, 1, timeout_s=60
            )
        [letter] = _letters(dead)
        assert letter.reason == "unknown_workflow"
        assert (letter.source, letter.partition, letter.offset) == (topics.triggers, landed, 0)
        assert letter.payload == trigger
        forwards = await read_all(kafka_bootstrap, topics.inputs, topics.partitions)
        assert [decode(r.value).run_id for r in forwards] == [run_id]

    asyncio.run(scenario())


async def _produce_with_headers(
    bootstrap: str,
    topic: str,
    value: bytes,
    key: bytes,
    partition: int,
    headers: list[tuple[str, bytes]],
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key, partition=partition, headers=headers)
    finally:
        await producer.stop()
