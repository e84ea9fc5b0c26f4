"""Small helpers shared by the Kafka adapters: trace headers, quiet shutdown, waits."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition

Headers = list[tuple[str, bytes]]


class _Stoppable(Protocol):
    async def stop(self) -> Any: ...


def trace_headers(correlation_id: str, causation_id: str, tenant: str) -> Headers:
    """Correlation, causation and tenant, plus a W3C traceparent whose trace id is derived
    from the correlation id, so every record of a run joins one trace."""
    trace_id = hashlib.blake2b(correlation_id.encode(), digest_size=16).hexdigest()
    span_id = hashlib.blake2b(causation_id.encode(), digest_size=8).hexdigest()
    return [
        ("correlation_id", correlation_id.encode()),
        ("causation_id", causation_id.encode()),
        ("tenant", tenant.encode()),
        ("traceparent", f"00-{trace_id}-{span_id}-01".encode()),
    ]


async def stop_quietly(client: _Stoppable, timeout_s: float = 10.0) -> None:
    """Stop a producer or consumer, ignoring errors: it is being thrown away."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.stop(), timeout_s)


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def seek_committed(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int:
    """Move ``tp`` back to the group's committed offset (the beginning if none) and return
    the offset from which records are new (0 when nothing was committed).

    ``committed`` asks the group coordinator again rather than trusting the consumer's
    cache, so offsets committed by a transaction that was settled a moment ago count.
    """
    committed = await consumer.committed(tp)
    if committed is None or committed < 0:
        await consumer.seek_to_beginning(tp)
        return 0
    consumer.seek(tp, committed)
    return int(committed)
