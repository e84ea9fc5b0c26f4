"""Reading and writing the Kafka backend's topics from outside the engine (the CLI's
``--kafka`` path).

Reads use a consumer without a group: it assigns the partitions it needs, reads them
read_committed from the beginning up to their end offsets at the time of the call, and
so sees exactly the committed records. Every record of a run sits on partition
``partition_of(run_id)`` of each run-keyed topic, so reading one run touches one
partition of one topic. Writes are single records from an idempotent producer.

The partition count of the run-keyed topics is read from the broker (the inputs topic),
not taken from the caller: a client that assumed another count would address the
wrong partition.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError, KafkaError

from engine.codec import DecodeError, decode, encode
from engine.core.commands import Command
from engine.core.correlation import CORRELATION_EVENTS, CorrelationEvent, PublishMessage
from engine.core.errors import SpecError, TerranohaError
from engine.core.events import Event
from engine.core.policies import run_id_for
from engine.core.records import DeadLetter, RecordedCommand, Trigger
from engine.core.spec import WorkflowSpec, load_deployed_spec
from engine.core.state import RunState
from engine.kafka._util import stop_quietly, trace_headers
from engine.kafka.correlation import message_record
from engine.kafka.specs import publish_spec, spec_key
from engine.kafka.topics import Topics, ensure_topics

log = logging.getLogger("terranoha.kafka.client")

START_HINT = "start the local broker with `bash deploy/local/infra.sh up`"

__all__ = [
    "BrokerUnavailableError",
    "KafkaClient",
    "KafkaClientError",
    "MissingTopicError",
    "RunLog",
]


class KafkaClientError(TerranohaError):
    """Kafka could not do what was asked; the message says why."""


class BrokerUnavailableError(KafkaClientError):
    """No broker answers at the bootstrap address."""

    retriable = True


class MissingTopicError(KafkaClientError):
    """A topic the operation needs does not exist (the broker does not create topics)."""


INDEXED_READ_RECORDS = 50
"""Records taken per step of a read at indexed offsets: small, since the read stops as
soon as the run's commands are recorded."""


@dataclass(frozen=True, slots=True)
class RunLog:
    """A run's events in sequence order and the commands recorded beside them."""

    run_id: str
    events: list[Event]
    recorded: list[RecordedCommand]


@dataclass(frozen=True, slots=True)
class TopicStatus:
    name: str
    created: bool
    partitions: int


class KafkaClient:
    """A short-lived client: ``async with KafkaClient(...) as client: ...``."""

    def __init__(
        self, bootstrap: str, topics: Topics, *, app: str = "terranoha", timeout_s: float = 30.0
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.app = app
        self.timeout_s = timeout_s
        self._partitions: dict[str, int] = {}
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self.records_read = 0
        """Records fetched by the reads so far (what a read costs, whatever it found)."""
        self._producer: AIOKafkaProducer | None = None

    async def __aenter__(self) -> KafkaClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ connection

    async def start(self) -> None:
        """Connect and learn which topics exist and their partition counts."""
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap, request_timeout_ms=int(self.timeout_s * 1000)
        )
        self._admin = admin
        try:
            await admin.start()
        except KafkaConnectionError as exc:
            raise BrokerUnavailableError(
                f"cannot reach Kafka at {self.bootstrap} ({exc}); check --kafka HOST:PORT, "
                f"or {START_HINT}"
            ) from None
        await self._describe()

    async def close(self) -> None:
        for client in (self._producer, self._consumer):
            if client is not None:
                await stop_quietly(client)
        if self._admin is not None:
            admin, self._admin = self._admin, None
            try:
                await asyncio.wait_for(admin.close(), self.timeout_s)
            except (KafkaError, OSError, TimeoutError):
                log.debug("closing the admin client failed", exc_info=True)
        self._producer = self._consumer = None

    async def _describe(self) -> None:
        assert self._admin is not None
        names = [t.name for t in self.topics.core_topics()]
        self._partitions = {
            d["topic"]: len(d["partitions"])
            for d in await self._admin.describe_topics(names)
            if d.get("error_code", 0) == 0 and d.get("partitions")
        }
        runs = self._partitions.get(self.topics.inputs)
        if runs is not None and runs != self.topics.partitions:
            self.topics = dataclasses.replace(self.topics, partitions=runs)

    def _need(self, topic: str) -> int:
        """The partition count of ``topic``; raises if it does not exist."""
        count = self._partitions.get(topic)
        if count is None:
            raise MissingTopicError(
                f"topic {topic} does not exist on {self.bootstrap}; create the topics with "
                f"`terranoha topics create --kafka {self.bootstrap} "
                f"--topic-prefix {self.topics.prefix}` (or check --topic-prefix)"
            )
        return count

    async def _consumer_started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                enable_auto_commit=False,
                isolation_level="read_committed",
                max_partition_fetch_bytes=8 << 20,
            )
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def _producer_started(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                enable_idempotence=True,
                acks="all",
                request_timeout_ms=int(self.timeout_s * 1000),
            )
            await producer.start()
            self._producer = producer
        return self._producer

    # ------------------------------------------------------------------ topics and specs

    async def create_topics(self, topics: Topics | None = None) -> list[TopicStatus]:
        """Create the core topics that are missing (idempotent); report every one."""
        wanted = topics or self.topics
        created = set(await ensure_topics(self.bootstrap, wanted.core_topics()))
        self.topics = wanted
        await self._describe()
        return [
            TopicStatus(t.name, t.name in created, self._partitions.get(t.name, 0))
            for t in wanted.core_topics()
        ]

    async def deploy(self, spec: WorkflowSpec) -> bool:
        """Publish ``spec`` on the specs topic: True if new, False if already deployed."""
        new = await publish_spec(self.bootstrap, self.topics, spec, app=self.app)
        await self._describe()
        return new

    async def specs(self) -> list[WorkflowSpec]:
        """Every deployed spec, by (workflow, version). Records that do not validate are
        skipped, as the engine's spec follower skips them."""
        self._need(self.topics.specs)
        bodies: dict[bytes, bytes] = {}
        async for message in self._read([TopicPartition(self.topics.specs, 0)]):
            if message.key is not None and message.value is not None:
                bodies.setdefault(message.key, message.value)
        specs: list[WorkflowSpec] = []
        for key, body in bodies.items():
            try:
                spec = load_deployed_spec(json.loads(body))
            except (ValueError, SpecError) as exc:
                log.warning(
                    "spec record %s is not a valid spec, skipped: %s",
                    key.decode(errors="replace"),
                    exc,
                )
                continue
            if spec_key(*spec.key) == key:
                specs.append(spec)
        return sorted(specs, key=lambda s: s.key)

    # ------------------------------------------------------------------ writing

    async def trigger(self, trigger: Trigger) -> str:
        """Publish ``trigger`` on the triggers topic, keyed by the run id it addresses, and
        return that run id. The key puts it on its run's partition: with a co-partitioned
        triggers topic the orchestrator starts the run in the transaction that reads it.
        A trigger without an idempotency key gets its identity from where it lands, so its
        run id is only known once it has been read: give a key."""
        if not trigger.idempotency_key:
            raise KafkaClientError("a trigger sent from here needs an idempotency key")
        self._need(self.topics.triggers)
        run_id = run_id_for(trigger.tenant, trigger.idempotency_key)
        producer = await self._producer_started()
        headers = trace_headers(
            trigger.correlation_id or run_id, trigger.idempotency_key, trigger.tenant
        )
        await producer.send_and_wait(
            self.topics.triggers, encode(trigger), key=run_id.encode(), headers=headers
        )
        return run_id

    async def publish(self, message: PublishMessage) -> None:
        """Publish ``message`` on the messages topic, keyed by its correlation key (what
        message correlation partitions on); acknowledged by every in-sync replica."""
        self._need(self.topics.messages)
        topic, key, value = message_record(self.topics, message)
        producer = await self._producer_started()
        await producer.send_and_wait(
            topic,
            value,
            key=key,
            headers=trace_headers(message.message_id, message.message_id, message.tenant),
        )

    async def message_events(self) -> list[CorrelationEvent]:
        """Every message-correlation event, each partition in log order."""
        count = self._need(self.topics.message_events)
        tps = [TopicPartition(self.topics.message_events, p) for p in range(count)]
        out: list[CorrelationEvent] = []
        async for m in self._read(tps):
            if m.value is None:
                continue
            record = decode(m.value)
            if isinstance(record, CORRELATION_EVENTS):
                out.append(record)  # type: ignore[arg-type]
        return out

    async def send_command(self, command: Command, wait_s: float = 10.0) -> list[Event] | None:
        """Publish ``command`` to the run inputs topic and return the events it caused,
        once the orchestrator has committed them; None if that did not happen within
        ``wait_s`` seconds (the command stays queued)."""
        self._need(self.topics.events)
        events_tp = TopicPartition(self.topics.events, self.topics.partition_of(command.run_id))
        consumer = await self._consumer_started()
        start = (await consumer.end_offsets([events_tp]))[events_tp]
        await self.publish_command(command)
        return await self._caused_by(events_tp, start, command, wait_s)

    async def publish_command(self, command: Command) -> None:
        """Publish ``command`` to its run's partition of the run inputs topic; returns once
        the broker has it (``acks=all``)."""
        self._need(self.topics.inputs)
        producer = await self._producer_started()
        headers = trace_headers(
            command.correlation_id or command.run_id, command.command_id, command.tenant
        )
        await producer.send_and_wait(
            self.topics.inputs,
            encode(command),
            key=command.run_id.encode(),
            partition=self.topics.partition_of(command.run_id),
            headers=headers,
        )

    async def _caused_by(
        self, tp: TopicPartition, start: int, command: Command, wait_s: float
    ) -> list[Event] | None:
        """The events caused by ``command``. The orchestrator writes them and then the
        recorded command in one transaction, so the recorded command marks the end."""
        consumer = await self._consumer_started()
        consumer.assign([tp])
        consumer.seek(tp, start)
        key = command.run_id.encode()
        caused: list[Event] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while loop.time() < deadline:
            fetched = await consumer.getmany(tp, timeout_ms=200)
            for message in fetched.get(tp, []):
                if message.key != key or message.value is None:
                    continue
                record = decode(message.value)
                if isinstance(record, Event) and record.causation_id == command.command_id:
                    caused.append(record)
                elif (
                    isinstance(record, RecordedCommand)
                    and record.command.command_id == command.command_id
                ):
                    return sorted(caused, key=lambda e: e.seq)
        return None

    # ------------------------------------------------------------------ reading

    async def state(self, run_id: str) -> RunState | None:
        """The latest committed snapshot of the run on the state changelog."""
        self._need(self.topics.state)
        tp = TopicPartition(self.topics.state, self.topics.partition_of(run_id))
        payload: bytes | None = None
        async for message in self._read([tp], key=run_id.encode()):
            payload = message.value
        return self._decode(payload, RunState) if payload is not None else None

    async def states(self) -> list[RunState]:
        """The latest snapshot of every run: reads the whole state changelog."""
        count = self._need(self.topics.state)
        latest: dict[bytes, bytes | None] = {}
        tps = [TopicPartition(self.topics.state, p) for p in range(count)]
        async for message in self._read(tps):
            if message.key is not None:
                latest[message.key] = message.value
        return [self._decode(v, RunState) for v in latest.values() if v is not None]

    async def run_log(self, run_id: str) -> RunLog:
        """The run's events and recorded commands, from its events partition."""
        self._need(self.topics.events)
        tp = TopicPartition(self.topics.events, self.topics.partition_of(run_id))
        events: dict[int, Event] = {}
        recorded: list[RecordedCommand] = []
        async for message in self._read([tp], key=run_id.encode()):
            if message.value is None:
                continue
            record = decode(message.value)
            if isinstance(record, Event):
                events[record.seq] = record
            elif isinstance(record, RecordedCommand):
                recorded.append(record)
        return RunLog(
            run_id, [events[s] for s in sorted(events)], sorted(recorded, key=lambda r: r.first_seq)
        )

    async def run_log_at(self, run_id: str, offsets: Sequence[int], indexed_to: int) -> RunLog:
        """The run's events and recorded commands, read at the offsets an index gives
        for its events instead of from the partition's beginning.

        ``offsets``: where the index has the run's events on their partition;
        ``indexed_to``: the first offset the index has not read yet. From each event the
        read goes on only until the command that caused it is recorded (the orchestrator
        writes the recorded command after the events, in the same transaction); then
        the records from ``indexed_to`` on, which the index may not hold yet."""
        self._need(self.topics.events)
        tp = TopicPartition(self.topics.events, self.topics.partition_of(run_id))
        consumer = await self._consumer_started()
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        key = run_id.encode()
        events: dict[int, Event] = {}
        recorded: dict[str, RecordedCommand] = {}
        waiting: set[str] = set()
        """Commands whose events were read but whose recorded command was not yet."""
        position = 0

        def take(message: Any) -> None:
            if message.key != key or message.value is None:
                return
            record = decode(message.value)
            if isinstance(record, Event):
                events[record.seq] = record
                if record.causation_id not in recorded:
                    waiting.add(record.causation_id)
            elif isinstance(record, RecordedCommand):
                recorded[record.command.command_id] = record
                waiting.discard(record.command.command_id)

        async def read(start: int, until: int | None) -> None:
            """From ``start`` past ``until`` and on until no read event's command is
            unrecorded; to the end if ``until`` is None."""
            nonlocal position
            consumer.seek(tp, start)
            position = start
            while position < end and (until is None or position <= until or waiting):
                fetched = await consumer.getmany(
                    tp, timeout_ms=500, max_records=INDEXED_READ_RECORDS
                )
                messages = fetched.get(tp, [])
                self.records_read += len(messages)
                for message in messages:
                    take(message)
                position = await consumer.position(tp)

        for offset in sorted(set(offsets)):
            if offset >= position:  # not read already with an earlier event
                await read(offset, offset)
        await read(max(position, indexed_to), None)
        return RunLog(
            run_id,
            [events[s] for s in sorted(events)],
            sorted(recorded.values(), key=lambda r: r.first_seq),
        )

    async def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        count = self._need(self.topics.dead_letters)
        tps = [TopicPartition(self.topics.dead_letters, p) for p in range(count)]
        out = [
            self._decode(m.value, DeadLetter) async for m in self._read(tps) if m.value is not None
        ]
        return sorted(out, key=lambda d: (d.ts, d.source, d.partition, d.offset))

    async def _read(
        self,
        tps: list[TopicPartition],
        key: bytes | None = None,
    ) -> AsyncIterator[Any]:
        """The committed records of ``tps`` (with ``key``, if given), from the beginning
        to the end offsets as they are now."""
        consumer = await self._consumer_started()
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        pending = [tp for tp in tps if end[tp] > 0]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while pending:
            if loop.time() > deadline:
                raise KafkaClientError(
                    f"reading {', '.join(sorted({tp.topic for tp in tps}))} from "
                    f"{self.bootstrap} did not finish within {self.timeout_s:.0f}s"
                )
            fetched = await consumer.getmany(*pending, timeout_ms=500, max_records=10_000)
            for messages in fetched.values():
                self.records_read += len(messages)
                for message in messages:
                    if key is None or message.key == key:
                        yield message
            pending = [tp for tp in pending if await consumer.position(tp) < end[tp]]

    @staticmethod
    def _decode(payload: bytes, expected: type[Any]) -> Any:
        try:
            record = decode(payload)
        except DecodeError as exc:
            raise KafkaClientError(f"a {expected.__name__} record does not decode: {exc}") from None
        if not isinstance(record, expected):
            raise KafkaClientError(
                f"expected a {expected.__name__} record, found {type(record).__name__}"
            )
        return record
