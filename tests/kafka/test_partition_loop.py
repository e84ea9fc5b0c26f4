"""Each partition's work runs on its own: a transaction that takes long on one partition
holds back that partition's next batch, never the others' (on the real broker)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from aiokafka import TopicPartition

from engine.codec import encode
from engine.core.policies import run_id_for
from engine.core.records import Trigger
from engine.core.spec import load_spec
from engine.core.state import RunStatus
from engine.kafka._util import Record
from engine.kafka.processor import KafkaEngine, _Partition
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
SLOW_S = 6.0


class _SlowPartition(KafkaEngine):
    """Partition ``slow``'s first transaction with inputs takes ``SLOW_S`` longer."""

    slow = 0
    stalling = False
    stalled_once = False

    async def _transact(
        self,
        part: _Partition,
        records: list[Record],
        offsets: Mapping[TopicPartition, int] | None,
        positions: dict[TopicPartition, int] | None = None,
    ) -> bool:
        if part.number == self.slow and offsets and not self.stalled_once:
            self.stalled_once = self.stalling = True
            await asyncio.sleep(SLOW_S)
            self.stalling = False
        return await super()._transact(part, records, offsets, positions)


def _keys_on(topics: Topics, partition: int, count: int) -> list[str]:
    keys = (f"k{i}" for i in range(10_000))
    return [k for k in keys if topics.partition_of(run_id_for("default", k)) == partition][:count]


def test_a_slow_transaction_holds_back_only_its_own_partition(
    kafka_bootstrap: str, topics: Topics
) -> None:
    specs = SpecRegistry()
    specs.add(SPEC)
    slow_key = _keys_on(topics, 0, 1)[0]
    others = [k for p in range(1, topics.partitions) for k in _keys_on(topics, p, 3)]

    def trigger(key: str) -> tuple[bytes, bytes, int]:
        run_id = run_id_for("default", key)
        return (
            encode(Trigger(workflow="hold", idempotency_key=key)),
            run_id.encode(),
            topics.partition_of(run_id),
        )

    async def main() -> None:
        engine = _SlowPartition(kafka_bootstrap, topics, specs, app=topics.prefix)
        async with running(engine.run):
            assert await eventually(lambda: len(engine.parts) == topics.partitions, timeout_s=60), (
                "the engine never got its partitions"
            )
            await produce(kafka_bootstrap, topics.triggers, [trigger(slow_key)])
            assert await eventually(lambda: engine.stalling, timeout_s=30)
            # Partition 0's transaction is in flight (and slow): the others' triggers,
            # published now, are decided and committed while it lasts.
            await produce(kafka_bootstrap, topics.triggers, [trigger(k) for k in others])

            def others_started() -> bool:
                return all(
                    (s := engine.state(run_id_for("default", k))) is not None
                    and s.status is RunStatus.WAITING
                    for k in others
                )

            assert await eventually(others_started, timeout_s=SLOW_S * 2)
            assert engine.stalling, "the other partitions waited for the slow one"
            assert engine.state(run_id_for("default", slow_key)) is None
            assert await eventually(
                lambda: engine.state(run_id_for("default", slow_key)) is not None, timeout_s=30
            )

    asyncio.run(main())
