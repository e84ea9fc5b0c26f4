"""Reading and writing topics directly, and running a service for the span of a test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

Item = tuple[bytes, bytes | None, int]
"""(value, key, partition) to produce."""


async def produce(bootstrap: str, topic: str, items: list[Item]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for value, key, partition in items:
            await producer.send_and_wait(topic, value, key=key, partition=partition)
    finally:
        await producer.stop()


async def read_all(bootstrap: str, topic: str, partitions: int) -> list[Any]:
    """Every committed record of ``topic`` up to its last stable offset, by partition."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list[Any] = []
        for tp in tps:
            while await consumer.position(tp) < end[tp]:
                fetched = await consumer.getmany(tp, timeout_ms=500)
                out.extend(fetched.get(tp, []))
        return out
    finally:
        await consumer.stop()


async def wait_for_records(
    bootstrap: str, topic: str, partitions: int, count: int, timeout_s: float = 30.0
) -> list[Any]:
    """Read ``topic`` until it holds at least ``count`` committed records."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        records = await read_all(bootstrap, topic, partitions)
        if len(records) >= count or loop.time() > deadline:
            return records
        await asyncio.sleep(0.2)


async def eventually(condition: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@contextlib.asynccontextmanager
async def running(
    service: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``service(stop)`` in the background; on exit set ``stop`` and wait for it."""
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(service(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
