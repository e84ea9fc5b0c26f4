"""The orchestrator reading a co-partitioned triggers topic, on the real broker.

A trigger keyed by its run id lands on its run's partition and is decided in the
transaction that reads it; a trigger anywhere else is forwarded as a ``StartRun`` to its
run's input partition in that transaction; anything but a trigger is a dead letter. Two
engines in one group each get partition p of both topics."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition

from engine.codec import decode, encode
from engine.core.commands import StartRun
from engine.core.events import CommandRejected, RunStarted
from engine.core.policies import run_id_for
from engine.core.records import DeadLetter, RecordedCommand, Trigger
from engine.core.spec import load_spec
from engine.core.state import RunStatus
from engine.kafka.processor import KafkaEngine
from engine.kafka.topics import Topics, ensure_topics
from engine.runtime.specs import SpecRegistry
from tests.kafka.helpers import eventually, produce, read_all, running, wait_for_records

SPEC = load_spec(
    {
        "workflow": "hold",
        "version": 1,
        "steps": [{"id": "wait", "wait_event": {"name": "go", "timeout": "1h"}}],
    }
)


def _specs() -> SpecRegistry:
    specs = SpecRegistry()
    specs.add(SPEC)
    return specs


def _other_partition(topics: Topics, run_id: str) -> int:
    return (topics.partition_of(run_id) + 1) % topics.partitions


async def _committed(bootstrap: str, group: str, tps: list[TopicPartition]) -> dict[int, int]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        return {tp.partition: (await consumer.committed(tp)) or 0 for tp in tps}
    finally:
        await consumer.stop()


def test_triggers_are_started_where_they_land_forwarded_or_refused(
    kafka_bootstrap: str, topics: Topics
) -> None:
    assert topics.co_partitioned
    here = run_id_for("default", "here")
    there = run_id_for("default", "there")
    trigger_here = encode(Trigger(workflow="hold", idempotency_key="here"))
    trigger_there = encode(Trigger(workflow="hold", idempotency_key="there"))
    command = encode(StartRun(command_id="c-1", run_id=here, workflow="hold", version=1))

    async def main() -> None:
        engine = KafkaEngine(kafka_bootstrap, topics, _specs(), app=topics.prefix)
        assert engine.read_triggers
        await produce(
            kafka_bootstrap,
            topics.triggers,
            [
                (trigger_here, here.encode(), topics.partition_of(here)),
                (trigger_there, b"there", _other_partition(topics, there)),
                (command, here.encode(), topics.partition_of(here)),  # not a trigger
                (trigger_here, here.encode(), topics.partition_of(here)),  # published twice
            ],
        )
        async with running(engine.run):
            assert await eventually(
                lambda: all(
                    (s := engine.state(r)) is not None and s.status is RunStatus.WAITING
                    for r in (here, there)
                ),
                timeout_s=60,
            ), "the runs were not started"
            dead = await wait_for_records(
                kafka_bootstrap, topics.dead_letters, topics.partitions, 1
            )
            # Four triggers read, and the forwarded StartRun read again on the run inputs.
            assert await eventually(lambda: engine.stats.inputs == 5, timeout_s=30)
        events = [
            decode(m.value)
            for m in await read_all(kafka_bootstrap, topics.events, topics.partitions)
        ]
        started = sorted(e.run_id for e in events if isinstance(e, RunStarted))
        assert started == sorted([here, there])
        # The run started where its trigger landed was decided from the triggers topic:
        # no StartRun went to the run inputs for it. The other one was forwarded there.
        inputs = [
            (m.partition, decode(m.value))
            for m in await read_all(kafka_bootstrap, topics.inputs, topics.partitions)
        ]
        assert [(p, c.run_id) for p, c in inputs] == [(topics.partition_of(there), there)]
        forwarded = inputs[0][1]
        assert isinstance(forwarded, StartRun)
        assert forwarded.command_id == (
            f"trigger:{topics.triggers}/{_other_partition(topics, there)}/0"
        )
        home = f"trigger:{topics.triggers}/{topics.partition_of(here)}"
        recorded = [
            e.command.command_id
            for e in events
            if isinstance(e, RecordedCommand) and e.run_id == here
        ]
        assert recorded == [f"{home}/0", f"{home}/2"]  # the start, then its duplicate
        refused = [e for e in events if isinstance(e, CommandRejected)]
        assert [(e.run_id, e.reason) for e in refused] == [(here, "duplicate start")]
        assert len(dead) == 1
        unexpected = decode(dead[0].value)
        assert isinstance(unexpected, DeadLetter)
        assert unexpected.reason == "unexpected_record"
        assert unexpected.source == topics.triggers
        assert "commands go to the run inputs topic" in unexpected.detail
        # Every trigger read is committed, in the transactions that decided it.
        tps = [TopicPartition(topics.triggers, p) for p in range(topics.partitions)]
        ends = await _end_offsets(kafka_bootstrap, tps)
        assert await _committed(kafka_bootstrap, f"{topics.prefix}-engine", tps) == ends

    asyncio.run(main())


async def _end_offsets(bootstrap: str, tps: list[TopicPartition]) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return {tp.partition: offset for tp, offset in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


def test_two_engines_each_read_partition_p_of_both_topics(
    kafka_bootstrap: str, topics: Topics
) -> None:
    wide = Topics(prefix=f"{topics.prefix}w", partitions=4)
    keys = [f"k{i}" for i in range(40)]

    async def main() -> None:
        await ensure_topics(kafka_bootstrap, wide.core_topics())
        await produce(
            kafka_bootstrap,
            wide.triggers,
            [
                (
                    encode(Trigger(workflow="hold", idempotency_key=k)),
                    run_id_for("default", k).encode(),
                    None,
                )
                for k in keys
            ],
        )
        first = KafkaEngine(kafka_bootstrap, wide, _specs(), app=wide.prefix)
        second = KafkaEngine(kafka_bootstrap, wide, _specs(), app=wide.prefix)
        async with running(first.run), running(second.run):

            def settled() -> bool:
                owned = [set(e.parts) for e in (first, second)]
                return all(owned) and owned[0] | owned[1] == set(range(wide.partitions))

            assert await eventually(settled, timeout_s=60), "the partitions were not shared"
            for engine in (first, second):
                assert engine.consumer is not None
                assignment = engine.consumer.assignment()
                by_topic = {
                    t: {tp.partition for tp in assignment if tp.topic == t}
                    for t in (wide.inputs, wide.triggers)
                }
                assert by_topic[wide.inputs] == by_topic[wide.triggers] == set(engine.parts)
            run_ids = [run_id_for("default", k) for k in keys]
            assert await eventually(
                lambda: all((first.state(r) or second.state(r)) is not None for r in run_ids),
                timeout_s=60,
            ), "not every trigger started its run"
        # Keyed by run id, every trigger was on its run's partition: nothing forwarded.
        assert await read_all(kafka_bootstrap, wide.inputs, wide.partitions) == []

    try:
        asyncio.run(main())
    finally:
        from engine.kafka.topics import delete_topics

        asyncio.run(delete_topics(kafka_bootstrap, wide.prefix))
