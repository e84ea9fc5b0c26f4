"""A command written to another partition than its run's, on the real broker: it is a
dead letter that says so and names the partition the run lives on, not "no such run";
the same command on the right partition is decided."""

from __future__ import annotations

import asyncio

import pytest

from engine.codec import decode, encode
from engine.core.commands import CompleteTask, StartRun
from engine.core.events import RunStarted
from engine.core.records import DeadLetter
from engine.core.spec import load_spec
from engine.core.state import RunStatus, Waiting
from engine.kafka.processor import KafkaEngine
from engine.kafka.topics import Topics, ensure_topics
from engine.runtime.specs import SpecRegistry
from tests.kafka.helpers import eventually, produce, read_all, running, wait_for_records

pytestmark = pytest.mark.kafka

SPEC = load_spec(
    {
        "workflow": "one-task",
        "version": 1,
        "steps": [{"id": "call", "task": "crm.lookup", "timeout": "1h"}],
    }
)


def test_a_result_on_the_wrong_partition_names_the_partition_its_run_lives_on(
    kafka_bootstrap: str, topics: Topics
) -> None:
    run_id = "run-misrouted"
    home = topics.partition_of(run_id)
    wrong = (home + 1) % topics.partitions
    start = StartRun(command_id="start", run_id=run_id, workflow="one-task", version=1)
    # A second start of the same run, written by hand to another partition: deciding it
    # there would start the run twice.
    twice = StartRun(command_id="start-again", run_id=run_id, workflow="one-task", version=1)

    async def main() -> None:
        specs = SpecRegistry()
        specs.add(SPEC)
        await ensure_topics(kafka_bootstrap, topics.task_topics(["crm.lookup"]))
        engine = KafkaEngine(kafka_bootstrap, topics, specs, app=topics.prefix)
        await produce(kafka_bootstrap, topics.inputs, [(encode(start), run_id.encode(), home)])
        async with running(engine.run):
            assert await eventually(
                lambda: (
                    (s := engine.state(run_id)) is not None
                    and s.current is not None
                    and s.current.waiting is Waiting.TASK
                ),
                timeout_s=60,
            )
            state = engine.state(run_id)
            assert state is not None and state.current is not None
            result = CompleteTask(
                command_id="result",
                run_id=run_id,
                step="call",
                task_id=state.current.task_id,
                result={"ok": True},
            )
            await produce(
                kafka_bootstrap,
                topics.inputs,
                [
                    (encode(result), b"not-the-run-id", wrong),
                    (encode(twice), run_id.encode(), wrong),
                ],
            )
            dead = await wait_for_records(
                kafka_bootstrap, topics.dead_letters, topics.partitions, 2, timeout_s=60
            )
            assert (engine.state(run_id) or state).status is RunStatus.RUNNING
            # The same result on its run's partition completes the run.
            await produce(kafka_bootstrap, topics.inputs, [(encode(result), run_id.encode(), None)])
            assert await eventually(
                lambda: (s := engine.state(run_id)) is not None and s.status is RunStatus.COMPLETED,
                timeout_s=60,
            )
        letters = [decode(r.value) for r in dead]
        assert all(isinstance(x, DeadLetter) for x in letters)
        by_type = {decode(x.payload).TYPE: x for x in letters}
        assert set(by_type) == {"CompleteTask", "StartRun"}
        for letter in by_type.values():
            assert letter.reason == "wrong_partition"
            assert (letter.source, letter.partition) == (topics.inputs, wrong)
            assert letter.run_id == run_id
            assert f"reached partition {wrong} of {topics.inputs}" in letter.detail
            assert f"lives on partition {home}" in letter.detail
            assert f"key {run_id!r}" in letter.detail and "murmur2" in letter.detail
            assert "no run" not in letter.detail
        events = [
            decode(r.value)
            for r in await read_all(kafka_bootstrap, topics.events, topics.partitions)
        ]
        assert sum(isinstance(e, RunStarted) for e in events) == 1

    asyncio.run(main())
