"""Projection topics: every run's current timeline, and SLA figures, on compacted topics.

- ``<prefix>.run-timelines``: key run id, value a ``RunTimeline`` (Avro, redacted), same
  partitioning as the run events topic.
- ``<prefix>.sla-metrics``: key ``workflow|tenant|window|bucket_start``, value an
  ``SlaMetrics`` per window (1 minute and 1 hour by default) and bucket touched.

``TopicProjector`` reads every partition of the run events topic and writes both topics
with one transactional producer (``transactional.id = <app>-timelines``); the input
offsets go into the same transaction (``send_offsets_to_transaction``, group
``<app>-timelines``). On start it rebuilds its state from the timelines topic (its own
changelog: everything up to the committed offsets, nothing after), so a crash at any
point neither loses nor doubles anything. SLA figures span all partitions, so there is
one active instance; starting another fences the first, which then stops with an error.

It keeps every run's timeline in memory (the topic compacted to one record per run):
fine for millions of small runs, not unbounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import ProducerFenced

from engine.codec import DecodeError, decode, encode
from engine.core.events import Event
from engine.kafka.specs import SpecFollower
from engine.kafka.topics import COMPACTED, Topics, ensure_topics
from engine.runtime.specs import SpecRegistry
from projections._kafka import topic_partitions
from projections.project import (
    Located,
    ProjectedBatch,
    ProjectionError,
    ProjectorStats,
    project_batch,
)
from projections.records import RunTimeline, timeline_of, timeline_record
from projections.redaction import PolicyBook
from projections.sla import DEFAULT_WINDOWS, bucket_of, sla_aggregates, sla_row, window_ms
from projections.timeline import Timeline

log = logging.getLogger("terranoha.projections.topics")

MAX_RECORD = 4 << 20
"""Bigger timeline records are sent without their payloads (see ``_fit``)."""
TOO_LARGE = "[too large for the timeline topic]"

Bucket = tuple[str, int, str, str, int]
"""(window, window_ms, workflow, tenant, bucket_start)."""


def timelines_topic(topics: Topics) -> str:
    return f"{topics.prefix}.run-timelines"


def sla_topic(topics: Topics) -> str:
    return f"{topics.prefix}.sla-metrics"


def projection_topics(topics: Topics, partitions: int | None = None) -> list[NewTopic]:
    """Both topics, compacted; ``partitions`` defaults to the run-keyed count."""
    n = partitions or topics.partitions
    big = {**COMPACTED, "max.message.bytes": str(MAX_RECORD + (64 << 10))}
    return [NewTopic(timelines_topic(topics), n, topics.replication, topic_configs=big),
            NewTopic(sla_topic(topics), n, topics.replication, topic_configs=dict(COMPACTED))]


def _fit(record: RunTimeline) -> bytes:
    """The record's bytes; if too big, the same without payloads (a note says so)."""
    value = encode(record)
    if len(value) <= MAX_RECORD:
        return value
    steps = [dataclasses.replace(s, input=None, payload=None, signal=None, result=None)
             for s in record.steps]
    slim = dataclasses.replace(record, input=TOO_LARGE, output=None, steps=steps)
    return encode(slim)


class TopicProjector:
    """Writes the run timelines and SLA metrics topics (see the module doc)."""

    def __init__(self, bootstrap: str, topics: Topics, *, app: str = "terranoha",
                 batch: int = 2000, poll_ms: int = 20,
                 windows: Sequence[str] = DEFAULT_WINDOWS, specs: SpecRegistry | None = None,
                 clock: Callable[[], int] | None = None, commit_timeout_s: float = 15.0) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.group_id = f"{app}-timelines"
        self.transactional_id = f"{app}-timelines"
        self.batch = batch
        self.poll_ms = poll_ms
        self.windows = [(w, window_ms(w)) for w in windows]
        self.clock = clock or (lambda: time.time_ns() // 1_000_000)
        self.commit_timeout_s = commit_timeout_s
        self.stats = ProjectorStats()
        self.timelines: dict[str, Timeline] = {}
        self._buckets: dict[Bucket, set[str]] = defaultdict(set)
        self._specs = specs
        self._follower: SpecFollower | None = None
        self.book = PolicyBook(specs)
        self._next: dict[int, int] = {}
        self._producer: AIOKafkaProducer | None = None

    async def run(self, stop: asyncio.Event,
                  ready: Callable[[], Awaitable[None]] | None = None) -> ProjectorStats:
        started = time.monotonic()
        if self._specs is None:
            self._follower = SpecFollower(self.bootstrap, self.topics)
            await self._follower.start()
            self.book = PolicyBook(self._follower.registry)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group_id,
            isolation_level="read_committed", enable_auto_commit=False,
            auto_offset_reset="earliest", max_partition_fetch_bytes=4 << 20)
        await consumer.start()
        try:
            parts = await self._partitions()
            await ensure_topics(self.bootstrap, projection_topics(self.topics, len(parts)))
            consumer.assign(parts)
            await self._take_over(consumer, parts)
            if ready is not None:
                await ready()
            while not stop.is_set():
                fetched = await consumer.getmany(timeout_ms=self.poll_ms,
                                                 max_records=self.batch)
                if fetched and not await self._project(fetched):
                    await self._take_over(consumer, parts)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()
            if self._producer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._producer.stop(), 10)
            if self._follower is not None:
                with contextlib.suppress(Exception):
                    await self._follower.stop()
            self.stats.seconds = time.monotonic() - started
        return self.stats

    # ------------------------------------------------------------------ state

    async def _partitions(self) -> list[TopicPartition]:
        numbers = await topic_partitions(self.bootstrap, self.topics.events)
        if not numbers:
            raise ProjectionError(f"topic {self.topics.events} does not exist: check the "
                                  "topic prefix, or start the engine first")
        return [TopicPartition(self.topics.events, p) for p in numbers]

    async def _take_over(self, consumer: AIOKafkaConsumer, parts: list[TopicPartition]) -> None:
        """(Re)create the producer, which fences any other instance and settles its open
        transaction; then restore the state from the timelines topic and seek the events
        to the committed offsets. After this, state and offsets agree."""
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), 10)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, transactional_id=self.transactional_id,
            enable_idempotence=True, acks="all", linger_ms=2, max_batch_size=512 * 1024,
            max_request_size=MAX_RECORD + (64 << 10), transaction_timeout_ms=60_000)
        await self._producer.start()
        await self._restore()
        for tp in parts:
            committed = await consumer.committed(tp)
            if committed is None or committed < 0:
                await consumer.seek_to_beginning(tp)
                self._next[tp.partition] = 0
            else:
                consumer.seek(tp, committed)
                self._next[tp.partition] = committed

    async def _restore(self) -> None:
        topic = timelines_topic(self.topics)
        reader = AIOKafkaConsumer(bootstrap_servers=self.bootstrap,
                                  isolation_level="read_committed", enable_auto_commit=False,
                                  max_partition_fetch_bytes=8 << 20)
        await reader.start()
        latest: dict[bytes, bytes | None] = {}
        try:
            parts = [TopicPartition(topic, p)
                     for p in await topic_partitions(self.bootstrap, topic)]
            if parts:
                reader.assign(parts)
                await reader.seek_to_beginning(*parts)
                end = await reader.end_offsets(parts)
                while [tp for tp in parts if await reader.position(tp) < end[tp]]:
                    fetched = await reader.getmany(timeout_ms=500, max_records=10_000)
                    for messages in fetched.values():
                        for message in messages:
                            if message.key is not None:
                                latest[message.key] = message.value
        finally:
            await reader.stop()
        self.timelines.clear()
        self._buckets.clear()
        for value in latest.values():
            if value is None:
                continue
            record = decode(value)
            if isinstance(record, RunTimeline):
                timeline = timeline_of(record)
                self.timelines[timeline.run_id] = timeline
                self._index(timeline)
        log.info("restored %d run timelines from %s", len(self.timelines), topic)

    def _index(self, t: Timeline) -> None:
        if t.workflow:
            for bucket in self._buckets_of(t):
                self._buckets[bucket].add(t.run_id)

    def _buckets_of(self, t: Timeline) -> list[Bucket]:
        return [(name, width, t.workflow, t.tenant, bucket_of(t.started_at, width))
                for name, width in self.windows]

    # ------------------------------------------------------------------ batches

    def _decode(self, value: bytes | None) -> Event | None:
        if value is None:
            return None
        try:
            record = decode(value)
        except DecodeError as exc:
            self.stats.undecodable += 1
            log.warning("a record of %s does not decode (%s); not projected",
                        self.topics.events, exc)
            return None
        return record if isinstance(record, Event) else None

    async def _project(self, fetched: Mapping[TopicPartition, Sequence[Any]]) -> bool:
        """Project one poll in one transaction; False if it did not commit."""
        items: list[Located] = []
        for tp, messages in fetched.items():
            floor = self._next.get(tp.partition, 0)
            items += [(self._decode(m.value), tp.partition, m.offset)
                      for m in messages if m.offset >= floor]
        if not items:
            return True
        events = [e for e, _, _ in items if e is not None]
        if self._follower is not None and self.book.missing(events):
            await self._follower.catch_up()
        batch = project_batch(self.timelines, items, self.book)
        records = self._records(batch)
        offsets = {TopicPartition(self.topics.events, p): o + 1
                   for p, o in batch.offsets.items()}
        if not await self._transact(records, offsets):
            return False
        for partition, offset in batch.offsets.items():
            self._next[partition] = offset + 1
        for run_id, timeline in batch.touched.items():
            self.timelines[run_id] = timeline
            self._index(timeline)
        self.stats.batches += 1
        self.stats.records += len(items)
        self.stats.events += len(batch.events)
        self.stats.skipped += batch.skipped
        self.stats.runs_written += len(batch.touched)
        return True

    def _records(self, batch: ProjectedBatch) -> list[tuple[str, bytes, bytes]]:
        out = [(timelines_topic(self.topics), run_id.encode(), _fit(timeline_record(t)))
               for run_id, t in batch.touched.items()]
        touched: dict[Bucket, set[str]] = defaultdict(set)
        for run_id, t in batch.touched.items():
            if t.workflow:
                for bucket in self._buckets_of(t):
                    touched[bucket].add(run_id)
        now = self.clock()
        for bucket, new in touched.items():
            name = bucket[0]
            members = self._buckets.get(bucket, set()) | new
            rows = [sla_row(batch.touched.get(r) or self.timelines[r]) for r in members]
            for metrics in sla_aggregates(rows, name, now_ms=now):
                out.append((sla_topic(self.topics), metrics.key.encode(), encode(metrics)))
        return out

    async def _transact(self, records: list[tuple[str, bytes, bytes]],
                        offsets: dict[TopicPartition, int]) -> bool:
        producer = self._producer
        assert producer is not None
        try:
            await producer.begin_transaction()
            for topic, key, value in records:
                delivery = await producer.send(topic, value, key=key)
                delivery.add_done_callback(_retrieve)
            await producer.send_offsets_to_transaction(offsets, self.group_id)
        except ProducerFenced:
            raise ProjectionError("another timelines projector took over (its producer "
                                  f"fenced {self.transactional_id}); this one stops") from None
        except Exception as exc:
            log.warning("timelines transaction failed before commit (%r); aborting", exc)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.abort_transaction(), self.commit_timeout_s)
            return False
        try:
            await asyncio.wait_for(producer.commit_transaction(), self.commit_timeout_s)
        except ProducerFenced:
            raise ProjectionError("another timelines projector took over (its producer "
                                  f"fenced {self.transactional_id}); this one stops") from None
        except Exception as exc:
            # Never abort after a commit whose outcome is unknown: the next producer's
            # initialisation settles it, and the state is read back from the topics.
            log.warning("timelines commit outcome unknown (%r); restoring from the topics", exc)
            return False
        return True


def _retrieve(delivery: asyncio.Future[Any]) -> None:
    """Mark a delivery's error as seen: a failed transaction is handled as a whole."""
    if not delivery.cancelled():
        delivery.exception()


async def run_topic_projector(bootstrap: str, topics: Topics, stop: asyncio.Event, *,
                              app: str = "terranoha", batch: int = 2000,
                              windows: Sequence[str] = DEFAULT_WINDOWS,
                              specs: SpecRegistry | None = None,
                              ready: Callable[[], Awaitable[None]] | None = None,
                              ) -> ProjectorStats:
    """Write ``<prefix>.run-timelines`` and ``<prefix>.sla-metrics`` from the run events
    topic until ``stop`` is set, exactly once (see the module doc)."""
    projector = TopicProjector(bootstrap, topics, app=app, batch=batch, windows=windows,
                               specs=specs)
    return await projector.run(stop, ready)

