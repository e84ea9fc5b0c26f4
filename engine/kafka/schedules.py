"""Schedules on Kafka: the schedule core as a keyed processor, and a client for it.

Topics (keyed by schedule id, with the run-keyed partition count, so the processor's
outputs land on the run inputs partition that Kafka's default partitioner gives them):

| topic                        | holds                                              |
|------------------------------|----------------------------------------------------|
| ``<prefix>.schedule-inputs`` | schedule commands, ticks, run-ended reports        |
| ``<prefix>.schedule-events`` | each schedule's log (retained forever)             |
| ``<prefix>.schedule-state``  | the compacted changelog of schedule states         |

``ScheduleProcessor`` is ``engine.kafka.keyed`` over these: one transaction per batch
carries the schedule events, the states, the ``StartRun``/``CancelRun`` commands they
cause on the run inputs topic, dead letters (the run dead-letters topic) and the input
offsets. A schedule's next tick is a timer of the keyed processor, re-armed from the
state on restore; a tick that comes late (the processor was down) is decided like any
other, and the core catches up per the schedule's window.

The run engine learns nothing about schedules except their runs' idempotency keys: when
a run whose key says a schedule started it ends, the engine writes a ``ReportRunEnded``
to the schedule inputs in the transaction of that run's last event.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from engine.codec import decode, encode
from engine.core.errors import TerranohaError
from engine.core.schedule_records import (
    ScheduleCommand,
    ScheduleEvent,
    ScheduleState,
)
from engine.core.schedules import alerts, decide, due_at, evolve, outputs, timers
from engine.kafka._util import stop_quietly
from engine.kafka.keyed import KeyedLogic, KeyedProcessor, KeyedTopics
from engine.kafka.topics import (
    COMPACTED,
    RETAIN_FOREVER,
    Topics,
    deployed_topics,
    ensure_topics,
    key_partition,
)
from engine.runtime.clock import Clock
from engine.runtime.schedule_service import ScheduleService, ScheduleView
from engine.runtime.schedule_spec import CronCalendar

T = TypeVar("T")


def schedule_topics(topics: Topics) -> KeyedTopics:
    return KeyedTopics(
        inputs=f"{topics.prefix}.schedule-inputs",
        events=f"{topics.prefix}.schedule-events",
        changelog=f"{topics.prefix}.schedule-state",
        dead_letters=topics.dead_letters,
        partitions=topics.partitions,
    )


def schedule_new_topics(topics: Topics) -> list[NewTopic]:
    keyed = schedule_topics(topics)
    n, r = topics.partitions, topics.replication
    return [
        NewTopic(keyed.inputs, n, r),
        NewTopic(keyed.events, n, r, topic_configs=dict(RETAIN_FOREVER)),
        NewTopic(keyed.changelog, n, r, topic_configs=dict(COMPACTED)),
    ]


class SchedulePartitionsError(TerranohaError):
    """The schedule topics and the run-keyed topics have different partition counts."""


async def check_partitions(bootstrap: str, topics: Topics) -> None:
    """Refuse schedule topics whose partition count is not the run-keyed one: the
    processor routes its ``StartRun`` records by that count."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        keyed = schedule_topics(topics)
        described = await admin.describe_topics([keyed.inputs, keyed.events, keyed.changelog])
    finally:
        await admin.close()
    for d in described:
        count = len(d.get("partitions") or [])
        if d.get("error_code", 0) == 0 and count and count != topics.partitions:
            raise SchedulePartitionsError(
                f"topic {d['topic']} has {count} partitions and {topics.inputs} "
                f"{topics.partitions}: schedule topics need the run-keyed count; delete "
                f"the {topics.prefix}.schedule-* topics (or recreate them with "
                f"{topics.partitions} partitions)"
            )


def _command(data: bytes) -> ScheduleCommand:
    record = decode(data)
    if not isinstance(record, ScheduleCommand):
        raise ValueError(f"{type(record).__name__} is not a schedule command")
    return record


def _state(data: bytes) -> ScheduleState:
    record = decode(data)
    if not isinstance(record, ScheduleState):
        raise ValueError(f"{type(record).__name__} is not a schedule state")
    return record


def schedule_logic(topics: Topics) -> KeyedLogic[ScheduleCommand, ScheduleState, ScheduleEvent]:
    """The schedule core as a keyed processor's logic."""
    calendar = CronCalendar()

    def caused(event: ScheduleEvent) -> list[tuple[str, bytes, bytes]]:
        records = [(topics.inputs, c.run_id.encode(), encode(c)) for c in outputs(event)]
        records += [
            (topics.notifications, event.schedule_id.encode(), encode(n)) for n in alerts(event)
        ]
        return records

    def ticks(key: str, state: ScheduleState) -> list[tuple[int, ScheduleCommand]]:
        due = due_at(state)
        return [(due, tick) for tick in timers(state)] if due is not None else []

    return KeyedLogic(
        decode=_command,
        key=lambda c: c.schedule_id,
        decide=lambda state, command, now: decide(state, command, now, calendar),
        evolve=evolve,
        encode_event=encode,
        encode_state=encode,
        decode_state=_state,
        encode_command=encode,
        outputs=caused,
        timers=ticks,
    )


class ScheduleProcessor(KeyedProcessor[ScheduleCommand, ScheduleState, ScheduleEvent]):
    """The schedules of the partitions the group assigns (group ``<deployment>-schedules``)."""

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        *,
        app: str = "terranoha",
        clock: Clock | None = None,
        instance_id: str | None = None,
        commit_timeout_s: float = 15.0,
    ) -> None:
        super().__init__(
            bootstrap,
            "schedules",
            schedule_logic(topics),
            schedule_topics(topics),
            app=topics.deployment(app),
            clock=clock,
            instance_id=instance_id,
            commit_timeout_s=commit_timeout_s,
        )


def run_ended_record(
    topics: Topics, report: ScheduleCommand
) -> tuple[str, int, bytes, bytes, list[tuple[str, bytes]]]:
    """The record the run engine writes when a scheduled run ends (its transaction)."""
    keyed = schedule_topics(topics)
    key = report.schedule_id.encode()
    return (keyed.inputs, key_partition(key, keyed.partitions), key, encode(report), [])


@dataclass
class _Reader:
    consumer: AIOKafkaConsumer
    timeout_s: float

    async def read(
        self,
        tps: list[TopicPartition],
        start: dict[TopicPartition, int] | None = None,
    ) -> AsyncIterator[Any]:
        """Committed records of ``tps`` from ``start`` (default the beginning) to the end
        offsets as they are now."""
        self.consumer.assign(tps)
        for tp in tps:
            if start is not None:
                self.consumer.seek(tp, start[tp])
        if start is None:
            await self.consumer.seek_to_beginning(*tps)
        end = await self.consumer.end_offsets(tps)
        pending = [tp for tp in tps if end[tp] > (start or {}).get(tp, 0)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while pending and loop.time() < deadline:
            fetched = await self.consumer.getmany(*pending, timeout_ms=300, max_records=10_000)
            for messages in fetched.values():
                for message in messages:
                    yield message
            pending = [tp for tp in pending if await self.consumer.position(tp) < end[tp]]


class AsyncKafkaSchedules:
    """Schedules on Kafka from outside the processor, for async front ends."""

    def __init__(
        self, bootstrap: str, topics: Topics, *, app: str = "terranoha", wait_s: float = 10.0
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.keyed = schedule_topics(topics)
        self.group = f"{topics.deployment(app)}-schedules"
        self.wait_s = wait_s
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._offsets: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        # The schedule topics take the run-keyed partition count the broker has.
        self.topics = await deployed_topics(self.bootstrap, self.topics)
        self.keyed = schedule_topics(self.topics)
        await ensure_topics(self.bootstrap, schedule_new_topics(self.topics))
        await check_partitions(self.bootstrap, self.topics)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, enable_idempotence=True, acks="all"
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await self._consumer.start()
        # Reads the processor group's committed offsets (never joins or commits).
        self._offsets = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group, enable_auto_commit=False
        )
        await self._offsets.start()

    async def close(self) -> None:
        for client in (self._producer, self._consumer, self._offsets):
            if client is not None:
                await stop_quietly(client)

    def _partition(self, schedule_id: str) -> int:
        return key_partition(schedule_id.encode(), self.keyed.partitions)

    async def send(self, command: ScheduleCommand) -> list[ScheduleEvent]:
        """Publish ``command`` (acks=all) and return the events it caused once the
        processor committed its offset; [] if it caused none or did not get to it."""
        assert self._producer is not None and self._consumer is not None
        number = self._partition(command.schedule_id)
        events_tp = TopicPartition(self.keyed.events, number)
        start = (await self._consumer.end_offsets([events_tp]))[events_tp]
        sent = await self._producer.send_and_wait(
            self.keyed.inputs, encode(command), key=command.schedule_id.encode(), partition=number
        )
        if not await self._decided(TopicPartition(self.keyed.inputs, number), sent.offset):
            return []
        reader = _Reader(self._consumer, self.wait_s)
        return [
            e
            async for e in self._events(reader, events_tp, start, command.schedule_id)
            if e.causation_id == command.command_id
        ]

    async def _decided(self, tp: TopicPartition, offset: int) -> bool:
        assert self._offsets is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while loop.time() < deadline:
            committed = await self._offsets.committed(tp)
            if committed is not None and committed > offset:
                return True
            await asyncio.sleep(0.1)
        return False

    @staticmethod
    async def _events(
        reader: _Reader, tp: TopicPartition, start: int, schedule_id: str
    ) -> AsyncIterator[ScheduleEvent]:
        key = schedule_id.encode()
        async for message in reader.read([tp], {tp: start}):
            if message.key == key and message.value is not None:
                event = decode(message.value)
                if isinstance(event, ScheduleEvent):
                    yield event

    async def get(self, schedule_id: str) -> ScheduleView | None:
        assert self._consumer is not None
        reader = _Reader(self._consumer, self.wait_s)
        number = self._partition(schedule_id)
        state: ScheduleState | None = None
        tp = TopicPartition(self.keyed.changelog, number)
        async for message in reader.read([tp]):
            if message.key == schedule_id.encode() and message.value is not None:
                state = _state(message.value)
        if state is None:
            return None
        events_tp = TopicPartition(self.keyed.events, number)
        events = [e async for e in self._events(reader, events_tp, 0, schedule_id)]
        return ScheduleView(state, events)

    async def list_schedules(self) -> list[ScheduleState]:
        assert self._consumer is not None
        reader = _Reader(self._consumer, self.wait_s)
        latest: dict[bytes, bytes] = {}
        tps = [TopicPartition(self.keyed.changelog, p) for p in range(self.keyed.partitions)]
        async for message in reader.read(tps):
            if message.key is not None and message.value is not None:
                latest[message.key] = message.value
        states = (_state(v) for v in latest.values())
        return sorted((s for s in states if not s.deleted), key=lambda s: s.schedule_id)


class KafkaScheduleService(ScheduleService):
    """``AsyncKafkaSchedules`` behind the synchronous contract, on a private event loop."""

    def __init__(
        self, bootstrap: str, topics: Topics, *, app: str = "terranoha", wait_s: float = 10.0
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.client = AsyncKafkaSchedules(bootstrap, topics, app=app, wait_s=wait_s)
        self._call(self.client.start())

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def send(self, command: ScheduleCommand) -> list[ScheduleEvent]:
        return self._call(self.client.send(command))

    def get(self, schedule_id: str) -> ScheduleView | None:
        return self._call(self.client.get(schedule_id))

    def list_schedules(self) -> list[ScheduleState]:
        return self._call(self.client.list_schedules())

    def close(self) -> None:
        try:
            self._call(self.client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()
