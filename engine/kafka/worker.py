"""Workers over Kafka: task commands in, result commands out, at least once.

A ``KafkaWorker`` consumes the task topics of its registry's queues (consumer group
``<deployment>-workers``, see ``Topics.deployment``; read_committed, manual commits).
For each task it asks the PostgreSQL ledger whether the task's idempotency key already
completed, runs the tool if not (``engine.worker.sdk.execute``), records a new result in
the ledger, sends the result command to the run inputs topic and waits for the broker to
acknowledge it, and only then lets the task's offset be committed.

A crash anywhere in that sequence redelivers the task. If the result was recorded, the
redelivery is answered from the ledger without calling the tool; the orchestrator
ignores a result it already has. Tasks run concurrently, so offsets are committed per
partition up to the first task still running.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError

from engine.codec import DecodeError, decode
from engine.core.commands import Command
from engine.core.outbox import TaskCommand
from engine.kafka._util import group_consumer, stop_quietly, trace_headers
from engine.kafka.ledger import PostgresLedger
from engine.kafka.topics import Topics, ensure_topics
from engine.runtime.clock import Clock, SystemClock
from engine.worker.sdk import MemoryLedger, ToolRegistry, execute
from engine.worker.spans import run_tool_in_span

log = logging.getLogger("terranoha.kafka.worker")

T = TypeVar("T")


@dataclass(slots=True)
class _Track:
    """Offsets of one assigned partition that are fetched but not yet committable.

    A fresh track is made on every assignment; tasks of an earlier assignment finish
    into their old track, which nobody commits any more.
    """

    tp: TopicPartition
    pending: collections.OrderedDict[int, bool] = field(default_factory=collections.OrderedDict)
    committable: int | None = None
    committed: int | None = None
    running: set[asyncio.Task[None]] = field(default_factory=set)

    def done(self, offset: int) -> None:
        self.pending[offset] = True
        while self.pending:
            first, finished = next(iter(self.pending.items()))
            if not finished:
                break
            self.pending.popitem(last=False)
            self.committable = first + 1


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: KafkaWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        await self.worker._revoke(revoked)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        for tp in assigned:
            self.worker._tracks.setdefault(tp, _Track(tp))


class KafkaWorker:
    """Runs the tools of ``registry`` for the task partitions the group assigns it."""

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        registry: ToolRegistry,
        ledger: PostgresLedger,
        app: str = "terranoha",
        concurrency: int = 8,
        clock: Clock | None = None,
        *,
        poll_ms: int = 50,
        drain_s: float = 10.0,
        max_backoff_s: float = 5.0,
        instance_id: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.bootstrap = bootstrap
        self.topics = topics
        self.registry = registry
        self.ledger = ledger
        self.app = app
        self.group_id = f"{topics.deployment(app)}-workers"
        self.concurrency = concurrency
        self.clock = clock or SystemClock()
        self.poll_ms = poll_ms
        self.drain_s = drain_s
        self.max_backoff_s = max_backoff_s
        self.instance_id = instance_id
        """Static group membership, as for the engine: a worker restarted under the same
        id gets its task partitions back at once, instead of after the session timeout
        (during which nobody works their tasks, and task timeouts fire)."""
        self.calls = 0
        """Tasks whose tool was called."""
        self.answered_from_ledger = 0
        """Tasks answered from the ledger without calling the tool."""
        self.results = 0
        """Result commands acknowledged by the broker."""
        self.expired = 0
        """Tasks dropped unrun because their deadline had passed."""
        self.undecodable = 0
        """Records on a task topic that are not task commands (skipped)."""
        self._tracks: dict[TopicPartition, _Track] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None

    @property
    def started(self) -> bool:
        """The worker has joined its consumer group and is fetching tasks."""
        return self._consumer is not None

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set; then finish the tasks in hand, commit, leave."""
        queues = self.registry.queues
        if not queues:
            raise ValueError("the tool registry has no tools; register some with @tool")
        await ensure_topics(self.bootstrap, self.topics.task_topics(queues))
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, enable_idempotence=True, acks="all", linger_ms=2
        )
        consumer = group_consumer(
            self.bootstrap,
            self.group_id,
            f"{self.instance_id}-worker" if self.instance_id else None,
        )
        try:
            await producer.start()
            await consumer.start()
            self._producer, self._consumer = producer, consumer
            consumer.subscribe([self.topics.tasks(q) for q in queues], listener=_Rebalance(self))
            await self._loop(stop, consumer)
            if self._running:
                await asyncio.wait(self._running, timeout=self.drain_s)
            await self._commit()
        finally:
            for task in list(self._running):
                task.cancel()
            if self._running:
                await asyncio.wait(self._running)
            await stop_quietly(consumer)
            await stop_quietly(producer)
            self._consumer = self._producer = None

    async def _loop(self, stop: asyncio.Event, consumer: AIOKafkaConsumer) -> None:
        while not stop.is_set():
            room = self.concurrency - len(self._running)
            if room <= 0:
                await asyncio.wait(
                    self._running, timeout=self.poll_ms / 1000, return_when=asyncio.FIRST_COMPLETED
                )
            else:
                fetched = await consumer.getmany(timeout_ms=self.poll_ms, max_records=room)
                for tp, messages in fetched.items():
                    # getmany returns records of the current assignment only, possibly
                    # before on_partitions_assigned has run.
                    track = self._tracks.setdefault(tp, _Track(tp))
                    for message in messages:
                        self._spawn(track, message.offset, message.value or b"", message.headers)
            await self._commit()

    def _spawn(
        self, track: _Track, offset: int, payload: bytes, headers: Sequence[tuple[str, bytes]] = ()
    ) -> None:
        track.pending[offset] = False
        task = asyncio.get_running_loop().create_task(self._handle(payload, headers))
        self._running.add(task)
        track.running.add(task)

        def finished(done: asyncio.Task[None]) -> None:
            self._running.discard(done)
            track.running.discard(done)
            if done.cancelled():
                return
            error = done.exception()
            if error is not None:
                # Holding the offset back would stall the partition behind a task that
                # fails every time; the step's timeout in the engine retries it instead.
                log.error(
                    "task at %s/%d/%d failed, left to the step's timeout: %r",
                    track.tp.topic,
                    track.tp.partition,
                    offset,
                    error,
                )
            track.done(offset)

        task.add_done_callback(finished)

    async def _handle(self, payload: bytes, headers: Sequence[tuple[str, bytes]] = ()) -> None:
        try:
            task = decode(payload)
        except DecodeError as exc:
            self.undecodable += 1
            log.warning("skipping a task record that does not decode (%s): %s", exc.reason, exc)
            return
        if not isinstance(task, TaskCommand):
            self.undecodable += 1
            log.warning("skipping a %s on a task topic", type(task).__name__)
            return
        if task.deadline <= self.clock.now_ms():
            self.expired += 1  # the engine's timeout has already decided what happens next
            return
        known = await self._retrying(
            "ledger lookup", lambda: self.ledger.lookup(task.idempotency_key)
        )
        preloaded = MemoryLedger()
        if known is not None:
            preloaded.record(known)
        # The tool's span is a child of the task record's traceparent: it joins the run's trace.
        outcome = await run_tool_in_span(
            task, headers, lambda: execute(task, self.registry, preloaded, self.clock.now_ms)
        )
        if outcome.called:
            self.calls += 1
        elif known is not None:
            self.answered_from_ledger += 1
        # execute() encoded the report: a result that cannot travel was never remembered.
        command, value, entry = outcome.command, outcome.payload, outcome.entry
        if entry is not None:
            await self._retrying("ledger record", lambda: self.ledger.record(entry, task.queue))
        await self._retrying("result delivery", lambda: self._send(command, value))
        self.results += 1

    async def _send(self, command: Command, value: bytes) -> None:
        assert self._producer is not None
        delivery = await self._producer.send(
            self.topics.inputs,
            value,
            key=command.run_id.encode(),
            partition=self.topics.partition_of(command.run_id),
            headers=trace_headers(
                command.correlation_id or command.run_id, command.command_id, command.tenant
            ),
        )
        await delivery

    async def _retrying(self, what: str, step: Callable[[], Awaitable[T]]) -> T:
        """Run ``step`` until it succeeds or fails for good: PostgreSQL restarting or a
        broker hiccup must not lose a result, and retrying only the failed step never
        calls the tool twice. A repeated result delivery is harmless: the orchestrator
        ignores results it already has."""
        backoff = 0.1
        while True:
            try:
                return await step()
            except (KafkaError, psycopg.OperationalError, OSError, TimeoutError) as exc:
                if isinstance(exc, KafkaError) and not (
                    exc.retriable or isinstance(exc, KafkaTimeoutError)
                ):
                    raise
                log.warning("%s failed (%r); retrying in %.1fs", what, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    async def _commit(self, tps: Sequence[TopicPartition] | None = None) -> None:
        """Commit every partition's offset up to its first unfinished task."""
        offsets: dict[TopicPartition, int] = {}
        for tp in tps if tps is not None else list(self._tracks):
            track = self._tracks.get(tp)
            if (
                track is not None
                and track.committable is not None
                and track.committable != track.committed
            ):
                offsets[tp] = track.committable
        if not offsets or self._consumer is None:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:
            # The tasks are redelivered to whoever owns the partition next.
            log.warning("committing task offsets failed (%r); they will be delivered again", exc)
            return
        for tp, offset in offsets.items():
            track = self._tracks.get(tp)
            if track is not None:
                track.committed = offset

    async def _revoke(self, revoked: Sequence[TopicPartition]) -> None:
        """Give the revoked partitions' running tasks a little time, commit what finished,
        and forget them; whatever is still running is delivered again to the next owner."""
        running: set[asyncio.Task[Any]] = set()
        for tp in revoked:
            track = self._tracks.get(tp)
            if track is not None:
                running |= track.running
        if running:
            await asyncio.wait(running, timeout=self.drain_s)
        await self._commit(list(revoked))
        for tp in revoked:
            self._tracks.pop(tp, None)
