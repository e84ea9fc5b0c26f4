"""Taking partitions over on the real broker: a changelog restore that outlasts the
consumer group's session timeout (10 s) must not get the engine evicted from its group.

aiokafka sends no heartbeats while a rebalance callback runs; the engine therefore
restores in the background with the partition paused. Were it to restore inside the
callback, the member would be evicted, rejoin, and restore again, over and over (seen
with 300k runs in the changelog)."""

from __future__ import annotations

import asyncio

from engine.codec import encode
from engine.core.commands import StartRun
from engine.core.spec import load_spec
from engine.core.state import RunStatus
from engine.kafka.processor import KafkaEngine
from engine.kafka.stream import Task
from engine.kafka.topics import Topics
from engine.runtime.specs import SpecRegistry
from tests.kafka.helpers import eventually, produce, running

SPEC = load_spec(
    {
        "workflow": "hold",
        "version": 1,
        "steps": [{"id": "wait", "wait_event": {"name": "go", "timeout": "1h"}}],
    }
)
SLOW_RESTORE_S = 13.0


class _SlowRestore(KafkaEngine):
    """An engine whose changelog restore takes longer than the session timeout, and
    which counts the partitions it gives up (an evicted member gives up all of them)."""

    released = 0

    async def _restore(self, number: int, task: Task) -> int:
        await asyncio.sleep(SLOW_RESTORE_S)
        return await super()._restore(number, task)

    async def _release(self, number: int) -> None:
        self.released += number in self.parts
        await super()._release(number)


def test_a_restore_longer_than_the_session_timeout_is_done_once(
    kafka_bootstrap: str, topics: Topics
) -> None:
    specs = SpecRegistry()
    specs.add(SPEC)
    run_ids = [f"run-{i}" for i in range(6)]

    async def main() -> None:
        engine = _SlowRestore(kafka_bootstrap, topics, specs, app=topics.prefix)
        await produce(
            kafka_bootstrap,
            topics.inputs,
            [
                (
                    encode(StartRun(command_id=f"start-{r}", run_id=r, workflow="hold", version=1)),
                    r.encode(),
                    topics.partition_of(r),
                )
                for r in run_ids
            ],
        )
        async with running(engine.run):
            assert await eventually(
                lambda: all(
                    (s := engine.state(r)) is not None and s.status is RunStatus.WAITING
                    for r in run_ids
                ),
                timeout_s=90,
            ), "the runs were not started"
            # An evicted member finds out at its next heartbeat (every 3 s) after the
            # takeover, then gives its partitions up and rejoins: give that time to happen.
            await asyncio.sleep(8)
            assert engine.released == 0, "the member was evicted during the restore"
            assert engine.stats.restores == topics.partitions, engine.stats

    asyncio.run(main())
