"""Run telemetry from the run events topic, for ``terranoha project --otel``: the same spans
and metrics the orchestrator's ``serve --otel`` exports, built by a reader of the log
instead (consumer group ``<app>-otel``, read_committed). Turn it on in one of the two.

Offsets are committed as it goes, so a restart resumes where it was; the spans of runs
that were open then begin at the first event read after the restart.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer

from engine.codec import DecodeError, decode
from engine.core.events import Event
from engine.kafka.specs import SpecFollower
from engine.kafka.topics import Topics
from engine.observability.setup import Telemetry

log = logging.getLogger("terranoha.observability")


async def follow_events(
    bootstrap: str,
    topics: Topics,
    telemetry: Telemetry,
    stop: asyncio.Event,
    *,
    app: str = "terranoha",
    poll_ms: int = 200,
) -> int:
    """Hand every committed run event to ``telemetry`` until ``stop`` is set; returns how
    many events it handed over."""
    follower = SpecFollower(bootstrap, topics)
    await follower.start()
    telemetry.bind(follower.registry)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=f"{app}-otel",
        isolation_level="read_committed",
        enable_auto_commit=True,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    seen = 0
    try:
        consumer.subscribe([topics.events])
        while not stop.is_set():
            fetched = await consumer.getmany(timeout_ms=poll_ms, max_records=2000)
            events: list[Event] = []
            for messages in fetched.values():
                for message in messages:
                    try:
                        record = decode(message.value or b"")
                    except DecodeError:
                        continue
                    if isinstance(record, Event):
                        events.append(record)
            if events:
                if telemetry.book.missing(events):
                    await follower.catch_up()
                telemetry.observe(events)
                seen += len(events)
    finally:
        await consumer.stop()
        await follower.stop()
    return seen
