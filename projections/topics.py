"""Projection topics: every run's current timeline, and SLA figures, on compacted topics.

- ``<prefix>.run-timelines``: key run id, value a ``RunTimeline`` (Avro, redacted), same
  partitioning as the run events topic.
- ``<prefix>.sla-metrics``: key ``workflow|tenant|window|bucket_start``, value an
  ``SlaMetrics`` per window (1 minute and 1 hour by default) and bucket touched.

``TopicProjector`` is one task of the exactly-once stream processor
(``engine.kafka.stream``, not grouped): it reads every partition of the run events topic
and writes both topics with one transactional producer (``transactional.id =
<deployment>-timelines``, see ``Topics.deployment``); the input offsets go into the
same transaction (group ``<deployment>-timelines``), and every record is acknowledged
before the commit. On start it
rebuilds its state from the timelines topic (its own changelog: everything up to the
committed offsets, nothing after), so a crash at any point neither loses nor doubles
anything. SLA figures span all partitions, so there is one active instance; starting
another fences the first, which then stops with an error.

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

from aiokafka import TopicPartition
from aiokafka.admin import NewTopic

from engine.codec import DecodeError, decode, encode
from engine.core.events import Event
from engine.kafka._util import Record
from engine.kafka.specs import SpecFollower
from engine.kafka.stream import Step, StreamProcessor, Task, TaskFencedError
from engine.kafka.topics import COMPACTED, Topics, ensure_topics, key_partition
from engine.runtime.processor import Input
from engine.runtime.redaction import PolicyBook
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
    return [
        NewTopic(timelines_topic(topics), n, topics.replication, topic_configs=big),
        NewTopic(sla_topic(topics), n, topics.replication, topic_configs=dict(COMPACTED)),
    ]


def _fit(record: RunTimeline) -> bytes:
    """The record's bytes; if too big, the same without payloads (a note says so)."""
    value = encode(record)
    if len(value) <= MAX_RECORD:
        return value
    steps = [
        dataclasses.replace(s, input=None, payload=None, signal=None, result=None)
        for s in record.steps
    ]
    slim = dataclasses.replace(record, input=TOO_LARGE, output=None, steps=steps)
    return encode(slim)


class TimelinesTask(Task):
    """Every run's timeline and the SLA buckets it counts in: the projector's one task.
    Restored from the timelines topic, its own changelog."""

    def __init__(self, projector: TopicProjector) -> None:
        self.projector = projector
        self.timelines: dict[str, Timeline] = {}
        self.buckets: dict[Bucket, set[str]] = defaultdict(set)

    async def restore(self, latest: Mapping[bytes, bytes]) -> int:
        for value in latest.values():
            record = decode(value)
            if isinstance(record, RunTimeline):
                timeline = timeline_of(record)
                self.timelines[timeline.run_id] = timeline
                self._index(timeline)
        log.info(
            "restored %d run timelines from %s",
            len(self.timelines),
            timelines_topic(self.projector.topics),
        )
        return len(self.timelines)

    def _index(self, t: Timeline) -> None:
        if t.workflow:
            for bucket in self.projector.buckets_of(t):
                self.buckets[bucket].add(t.run_id)

    async def process(self, inputs: Sequence[Input], now: int) -> Step:
        p = self.projector
        items: list[Located] = [
            (p.decode(item.payload), item.partition, item.offset) for item in inputs
        ]
        events = [e for e, _, _ in items if e is not None]
        if p.follower is not None and p.book.missing(events):
            await p.follower.catch_up()
        batch = project_batch(self.timelines, items, p.book)
        return Step(
            self._records(batch),
            commit=lambda: self._committed(batch, len(items)),
            events=len(batch.events),
        )

    def isolated(self, item: Input, now: int, why: str) -> Step:
        # An event whose timeline cannot be written is left out of the projection.
        log.warning(
            "event %s/%d/%d left out of the timelines: %s",
            item.source,
            item.partition,
            item.offset,
            why,
        )
        self.projector.stats.undecodable += 1
        return Step()

    def _committed(self, batch: ProjectedBatch, records: int) -> None:
        for run_id, timeline in batch.touched.items():
            self.timelines[run_id] = timeline
            self._index(timeline)
        stats = self.projector.stats
        stats.batches += 1
        stats.records += records
        stats.events += len(batch.events)
        stats.skipped += batch.skipped
        stats.runs_written += len(batch.touched)

    def _records(self, batch: ProjectedBatch) -> list[Record]:
        p = self.projector
        count = p.output_partitions
        timelines = timelines_topic(p.topics)
        out: list[Record] = []
        for run_id, t in batch.touched.items():
            key = run_id.encode()
            out.append((timelines, key_partition(key, count), key, _fit(timeline_record(t)), []))
        touched: dict[Bucket, set[str]] = defaultdict(set)
        for run_id, t in batch.touched.items():
            if t.workflow:
                for bucket in p.buckets_of(t):
                    touched[bucket].add(run_id)
        now = p.now()
        sla = sla_topic(p.topics)
        for bucket, new in touched.items():
            name = bucket[0]
            members = self.buckets.get(bucket, set()) | new
            rows = [sla_row(batch.touched.get(r) or self.timelines[r]) for r in members]
            for metrics in sla_aggregates(rows, name, now_ms=now):
                key = metrics.key.encode()
                out.append((sla, key_partition(key, count), key, encode(metrics), []))
        return out


class TopicProjector:
    """Writes the run timelines and SLA metrics topics (see the module doc)."""

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        *,
        app: str = "terranoha",
        batch: int = 2000,
        poll_ms: int = 20,
        windows: Sequence[str] = DEFAULT_WINDOWS,
        specs: SpecRegistry | None = None,
        clock: Callable[[], int] | None = None,
        commit_timeout_s: float = 15.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.windows = [(w, window_ms(w)) for w in windows]
        self.now = clock or (lambda: time.time_ns() // 1_000_000)
        self.stats = ProjectorStats()
        self._specs = specs
        self.follower: SpecFollower | None = None
        self.book = PolicyBook(specs)
        self.output_partitions = topics.partitions
        self._ready: Callable[[], Awaitable[None]] | None = None
        deployment = topics.deployment(app)
        self.processor = StreamProcessor(
            bootstrap,
            name="timelines projector",
            inputs=[topics.events],
            group_id=f"{deployment}-timelines",
            transactional_id=lambda number: f"{deployment}-timelines",
            make_task=lambda number: TimelinesTask(self),
            changelog=self._changelog,
            grouped=False,
            max_batch=batch,
            poll_ms=poll_ms,
            commit_timeout_s=commit_timeout_s,
            partitions_of=self._partitions_of,
            on_ready=self._on_ready,
        )

    @property
    def timelines(self) -> dict[str, Timeline]:
        part = self.processor.parts.get(0)
        return (
            part.task.timelines if part is not None and isinstance(part.task, TimelinesTask) else {}
        )

    async def run(
        self, stop: asyncio.Event, ready: Callable[[], Awaitable[None]] | None = None
    ) -> ProjectorStats:
        started = time.monotonic()
        self._ready = ready
        if self._specs is None:
            self.follower = SpecFollower(self.bootstrap, self.topics)
            await self.follower.start()
            self.book = PolicyBook(self.follower.registry)
        try:
            await self.processor.run(stop)
        except TaskFencedError as exc:
            raise ProjectionError(str(exc)) from None
        finally:
            if self.follower is not None:
                with contextlib.suppress(Exception):
                    await self.follower.stop()
            self.stats.seconds = time.monotonic() - started
        return self.stats

    async def _on_ready(self) -> None:
        if self._ready is not None:
            await self._ready()

    async def _partitions_of(self, topic: str) -> list[int]:
        numbers = await topic_partitions(self.bootstrap, topic)
        if not numbers:
            raise ProjectionError(
                f"topic {topic} does not exist: check the topic prefix, or start the engine first"
            )
        self.output_partitions = len(numbers)
        await ensure_topics(self.bootstrap, projection_topics(self.topics, len(numbers)))
        return numbers

    async def _changelog(self, number: int) -> list[TopicPartition]:
        topic = timelines_topic(self.topics)
        return [TopicPartition(topic, p) for p in await topic_partitions(self.bootstrap, topic)]

    def buckets_of(self, t: Timeline) -> list[Bucket]:
        return [
            (name, width, t.workflow, t.tenant, bucket_of(t.started_at, width))
            for name, width in self.windows
        ]

    def decode(self, value: bytes) -> Event | None:
        try:
            record = decode(value)
        except DecodeError as exc:
            self.stats.undecodable += 1
            log.warning(
                "a record of %s does not decode (%s); not projected", self.topics.events, exc
            )
            return None
        return record if isinstance(record, Event) else None


async def run_topic_projector(
    bootstrap: str,
    topics: Topics,
    stop: asyncio.Event,
    *,
    app: str = "terranoha",
    batch: int = 2000,
    windows: Sequence[str] = DEFAULT_WINDOWS,
    specs: SpecRegistry | None = None,
    ready: Callable[[], Awaitable[None]] | None = None,
) -> ProjectorStats:
    """Write ``<prefix>.run-timelines`` and ``<prefix>.sla-metrics`` from the run events
    topic until ``stop`` is set, exactly once (see the module doc)."""
    projector = TopicProjector(
        bootstrap, topics, app=app, batch=batch, windows=windows, specs=specs
    )
    return await projector.run(stop, ready)
