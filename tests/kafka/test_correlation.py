"""The message-correlation processor alone on the real broker: deliveries on the run
inputs (keyed and partitioned by run id), buffered messages and their TTL timers across a
restart, and dead letters for what does not belong on the messages topic."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from engine.codec import decode, encode
from engine.core.commands import CorrelateMessage
from engine.core.correlation import (
    CloseSubscription,
    MessageExpired,
    OpenSubscription,
    PublishMessage,
    key_of,
)
from engine.core.records import DeadLetter
from engine.kafka.correlation import CorrelationProcessor, message_record
from engine.kafka.topics import Topics, key_partition
from engine.runtime.clock import ManualClock
from tests.kafka.helpers import eventually, produce, read_all, running

pytestmark = pytest.mark.kafka


async def _send(bootstrap: str, topics: Topics, *records: Any) -> None:
    """Records onto the messages topic, keyed by correlation key, partitioned as Kafka's
    default partitioner does (what any outside producer does)."""
    items = []
    for record in records:
        _topic, key, value = (
            message_record(topics, record)
            if isinstance(record, PublishMessage)
            else (topics.messages, key_of(record).encode(), encode(record))
        )
        items.append((value, key, key_partition(key, topics.partitions)))
    await produce(bootstrap, topics.messages, items)


async def _deliveries(bootstrap: str, topics: Topics) -> list[tuple[int, bytes, Any]]:
    records = await read_all(bootstrap, topics.inputs, topics.partitions)
    return [(r.partition, r.key, decode(r.value)) for r in records]


def _wait(run: str, key: str) -> OpenSubscription:
    return OpenSubscription(run_id=run, wait="pay#1", name="payment", key=key)


def test_deliveries_go_to_the_runs_partitions_once_and_buffers_survive_a_restart(
    kafka_bootstrap: str, topics: Topics
) -> None:
    clock = ManualClock(int(time.time() * 1000))

    async def main() -> None:
        processor = CorrelationProcessor(kafka_bootstrap, topics, app=topics.prefix, clock=clock)
        async with running(processor.run):
            assert await eventually(lambda: len(processor.parts) == topics.partitions, 60)
            await _send(
                kafka_bootstrap,
                topics,
                _wait("run-a", "o1"),
                _wait("run-b", "o1"),
                _wait("run-c", "o2"),
            )
            await _send(
                kafka_bootstrap,
                topics,
                PublishMessage(message_id="m1", name="payment", key="o1", data={"paid": 1}),
            )
            await _send(
                kafka_bootstrap,
                topics,
                PublishMessage(message_id="m1", name="payment", key="o1", data={"paid": 1}),
            )  # duplicate
            await _send(
                kafka_bootstrap,
                topics,
                PublishMessage(
                    message_id="early", name="payment", key="o3", data="early", ttl_ms=60_000
                ),
            )
            assert await eventually(
                lambda: (
                    (s := processor.state("default/payment/o3")) is not None
                    and len(s.messages) == 1
                ),
                60,
            )
        delivered = await _deliveries(kafka_bootstrap, topics)
        assert sorted((p, k, d.run_id, d.message_id) for p, k, d in delivered) == sorted(
            (key_partition(run.encode(), topics.partitions), run.encode(), run, "m1")
            for run in ("run-a", "run-b")
        )
        assert all(
            isinstance(d, CorrelateMessage) and d.wait == "pay#1" and d.data == {"paid": 1}
            for _, _, d in delivered
        )

        # A new process restores the buffered message and its TTL timer.
        again = CorrelationProcessor(kafka_bootstrap, topics, app=topics.prefix, clock=clock)
        async with running(again.run):
            assert await eventually(lambda: len(again.parts) == topics.partitions, 60)
            assert again.stats.restored_states >= 2
            await _send(kafka_bootstrap, topics, _wait("run-d", "o3"))
            assert await eventually(
                lambda: (
                    (s := again.state("default/payment/o3")) is not None
                    and s.messages[0].runs == ("run-d",)
                ),
                60,
            )
            clock.advance(60_000)  # the TTL runs out: the restored timer fires
            assert await eventually(
                lambda: (s := again.state("default/payment/o3")) is not None and not s.messages, 60
            ), "never expired"
        delivered = await _deliveries(kafka_bootstrap, topics)
        assert [
            (d.run_id, d.message_id, d.data) for _, _, d in delivered if d.run_id == "run-d"
        ] == [("run-d", "early", "early")]
        events = [
            decode(r.value)
            for r in await read_all(kafka_bootstrap, topics.message_events, topics.partitions)
        ]
        expired = {e.message_id: e.runs for e in events if isinstance(e, MessageExpired)}
        assert expired == {"m1": ("run-a", "run-b"), "early": ("run-d",)}

    asyncio.run(main())


def test_records_that_do_not_belong_become_dead_letters_that_say_why(
    kafka_bootstrap: str, topics: Topics
) -> None:
    message = PublishMessage(message_id="m", name="payment", key="o1")
    home = key_partition(key_of(message).encode(), topics.partitions)
    wrong = (home + 1) % topics.partitions

    async def main() -> None:
        processor = CorrelationProcessor(kafka_bootstrap, topics, app=topics.prefix)
        async with running(processor.run):
            assert await eventually(lambda: len(processor.parts) == topics.partitions, 60)
            await produce(
                kafka_bootstrap,
                topics.messages,
                [
                    (encode(message), key_of(message).encode(), wrong),
                    (b"not avro at all", b"x", home),
                    (
                        encode(
                            CorrelateMessage(
                                command_id="c",
                                run_id="r",
                                name="n",
                                key="k",
                                message_id="m",
                                wait="w",
                            )
                        ),
                        b"r",
                        home,
                    ),
                ],
            )
            assert await eventually(lambda: processor.stats.dead_letters == 3, 60)
        dead = [
            decode(r.value)
            for r in await read_all(kafka_bootstrap, topics.dead_letters, topics.partitions)
        ]
        reasons = sorted(d.reason for d in dead if isinstance(d, DeadLetter))
        assert reasons == ["undecodable", "undecodable", "wrong_partition"]
        detail = next(d.detail for d in dead if d.reason == "wrong_partition")
        assert "murmur2" in detail and f"partition {home}" in detail
        assert not await read_all(kafka_bootstrap, topics.inputs, topics.partitions)

    asyncio.run(main())


def test_a_key_with_nothing_left_leaves_memory_and_its_changelog(
    kafka_bootstrap: str, topics: Topics
) -> None:
    """A wait that opened and closed leaves nothing to keep: the key's changelog entry is a
    tombstone and the processor forgets it (state follows live keys, not history)."""

    async def main() -> None:
        processor = CorrelationProcessor(kafka_bootstrap, topics, app=topics.prefix)
        async with running(processor.run):
            assert await eventually(lambda: len(processor.parts) == topics.partitions, 60)
            await _send(kafka_bootstrap, topics, _wait("run-a", "gone"), _wait("run-b", "kept"))
            assert await eventually(lambda: processor.state("default/payment/kept") is not None, 60)
            await _send(
                kafka_bootstrap,
                topics,
                CloseSubscription(run_id="run-a", wait="pay#1", name="payment", key="gone"),
            )
            assert await eventually(lambda: processor.stats.events >= 3, 60)
            assert processor.state("default/payment/gone") is None
        changelog = await read_all(kafka_bootstrap, topics.message_state, topics.partitions)
        latest = {r.key: r.value for r in changelog}
        assert latest[b"default/payment/gone"] is None
        assert latest[b"default/payment/kept"] is not None

    asyncio.run(main())
