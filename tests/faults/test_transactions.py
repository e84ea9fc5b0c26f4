"""The transaction helper itself, against the fault broker: a record the broker refuses
must not leave a committed transaction without it."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic

from engine.kafka._util import Outcome, Record, run_transaction
from engine.kafka.topics import ensure_topics
from tests.faults.infra import FaultInfra

pytestmark = [pytest.mark.faults, pytest.mark.kafka]


@pytest.mark.timeout(120)
def test_refused_record_does_not_commit(fault_infra: FaultInfra) -> None:
    """Three records in one transaction, the middle one larger than the topic accepts
    (``max.message.bytes`` is about 1 MiB by default). Either the transaction is not
    reported committed, or all three are visible to a read_committed consumer.

    Fails today: ``send_batched`` does not await the futures ``send_batch`` returns, so the
    MessageSizeTooLargeError of the middle batch is never seen and ``run_transaction``
    returns COMMITTED with only the first record in the log."""
    topic = f"f{uuid.uuid4().hex[:10]}.txn"
    bootstrap = fault_infra.bootstrap

    async def go() -> tuple[Outcome, list[int]]:
        await ensure_topics(bootstrap, [NewTopic(topic, 1, 1)])
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            transactional_id=topic,
            enable_idempotence=True,
            acks="all",
            max_request_size=8 << 20,
        )
        await producer.start()
        try:
            # send_batched makes three record batches of these: the big one fits no other.
            records: list[Record] = [
                (topic, 0, b"k", b"small-1", []),
                (topic, 0, b"k", bytes(2 << 20), []),
                (topic, 0, b"k", b"small-2", []),
            ]
            outcome = await run_transaction(producer, records, None, "g", 10.0)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            isolation_level="read_committed",
            enable_auto_commit=False,
            max_partition_fetch_bytes=8 << 20,
        )
        await consumer.start()
        sizes: list[int] = []
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            while await consumer.position(tp) < end:
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    sizes += [len(m.value or b"") for m in messages]
        finally:
            await consumer.stop()
        print(
            f"three records, the middle one 2 MiB: run_transaction returned {outcome.value}; "
            f"committed record sizes {sizes}"
        )
        return outcome, sizes

    outcome, sizes = asyncio.run(go())
    assert outcome is not Outcome.COMMITTED or (2 << 20) in sizes, (
        f"run_transaction reported COMMITTED but the log holds only records of sizes "
        f"{sizes}: a torn transaction"
    )
