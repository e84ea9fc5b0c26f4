"""The orchestrator on Kafka, exactly once.

One consumer (group ``<app>-engine``, read_committed) reads the run inputs topic and,
when it is co-partitioned with them, the triggers topic: the range assignor gives one
member partition p of both. For each assigned partition p there is one transactional
producer, ``transactional.id = <app>-<inputs topic>-<p>`` (aiokafka has no KIP-447, so
fencing is per partition). A batch of partition p is decided by the shared ``Processor``
and written in ONE transaction: events and recorded commands (events topic, p), state
snapshots (state changelog, p), task commands (task topics, p), notifications, dead
letters, the ``StartRun`` of triggers read at p for runs of other partitions (run inputs,
their partition), and the offsets of both input partitions
(``send_offsets_to_transaction``). Only after the commit succeeds does the batch's state
enter the partition's cache.

A trigger keyed by its run id lands on its run's partition and is decided in the same
transaction that reads it: one transactional hop from the trigger to the first command,
where the trigger router (for a triggers topic with another partition count) takes two.

Failure rules (the path where Jepsen found lost writes and torn transactions):

* an error before the commit request: abort, seek back to the committed offset;
* a commit whose outcome is unknown (timeout, lost connection): never abort. Recreate the
  producer, whose initialisation fences the old one and settles its transaction, then
  restore the partition from the changelog and seek back to the committed offset;
* a fenced producer: another process owns the partition now. Stop processing it; if the
  group still assigns it to us, take it back the same way after a pause.

On assignment the partition is paused and taken over in the background (not inside the
rebalance callback, during which aiokafka sends no heartbeats: a long restore there
would get the member evicted, over and over): the producer is initialised first (fencing
zombies and settling their open transactions), then the state is restored from the
changelog up to its last stable offset and timers are re-armed; only then is the
partition resumed and its inputs processed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from engine.codec import decode, encode
from engine.core.events import Event
from engine.core.state import RunState
from engine.kafka._util import (
    Headers,
    Outcome,
    Record,
    run_transaction,
    seek_committed,
    start_run_record,
    stop_quietly,
    trace_headers,
    transactional_producer,
)
from engine.kafka.topics import Topics
from engine.runtime.clock import Clock, SystemClock
from engine.runtime.processor import Batch, Input, Processor, StateCache, dead_letter
from engine.runtime.specs import SpecRegistry
from engine.runtime.timers import TimerService

RESTORE_SLICE = 2000
"""Snapshots decoded between two yields to the event loop while restoring."""

MAX_ABORTS = 3
"""Aborted transactions in a row (each rewinds to the committed offsets, so each retried
the same inputs) before a partition's inputs are isolated one by one."""

log = logging.getLogger("terranoha.kafka.engine")

Fetched = Mapping[TopicPartition, Sequence[Any]]
"""Consumer records by partition, as ``getmany`` returns them."""


@dataclass(slots=True)
class PartitionStats:
    batches: int = 0
    inputs: int = 0
    events: int = 0
    aborted: int = 0
    unknown_outcomes: int = 0
    fenced: int = 0
    restores: int = 0
    restored_states: int = 0
    restore_ms: int = 0


@dataclass(slots=True)
class _Partition:
    number: int
    tps: tuple[TopicPartition, ...]
    """Every partition read for it: the run inputs', and the triggers' when co-partitioned."""
    producer: AIOKafkaProducer
    cache: StateCache
    timers: TimerService
    processor: Processor
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    """Records below these offsets are done: records fetched before a seek are dropped."""
    aborts: int = 0
    """Aborted transactions since the last commit."""
    stats: PartitionStats = field(default_factory=PartitionStats)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, engine: KafkaEngine) -> None:
        self.engine = engine

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        numbers = sorted({tp.partition for tp in revoked})
        await self.engine._cancel_takeovers(numbers)
        await self.engine._settle(numbers)  # the transactions in flight end first
        async with self.engine.lock:
            for number in numbers:
                await self.engine._release(number)
        self.engine._leaving.difference_update(numbers)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        # The takeover runs after this callback returns: aiokafka stops the group
        # heartbeat until it does, so a changelog restore longer than the session timeout
        # done here would get this member evicted, and the restore would start over.
        for number in sorted({tp.partition for tp in assigned}):
            self.engine._take_over(number)


class KafkaEngine:
    """Runs the orchestrator for the input partitions the consumer group assigns it."""

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        specs: SpecRegistry,
        *,
        app: str = "terranoha",
        clock: Clock | None = None,
        refresh_specs: Callable[[], Awaitable[int]] | None = None,
        max_batch: int = 1000,
        poll_ms: int = 20,
        commit_timeout_s: float = 15.0,
        refence_pause_s: float = 5.0,
        instance_id: str | None = None,
        read_triggers: bool | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.read_triggers = topics.co_partitioned if read_triggers is None else read_triggers
        """Read the triggers topic beside the run inputs (default: when co-partitioned)."""
        if self.read_triggers and not topics.co_partitioned:
            raise ValueError(f"the triggers topic has {topics.trigger_count} partitions and "
                             f"the run inputs {topics.partitions}: the orchestrator reads "
                             "triggers only when the counts are equal; run the trigger "
                             "router for this topic instead")
        self.instance_id = instance_id
        """Static group membership (``group.instance.id``): a process restarted under the
        same id gets its partitions back at once instead of after the session timeout."""
        self.topics = topics
        self.specs = specs
        self.app = app
        self.group_id = f"{app}-engine"
        self.clock = clock or SystemClock()
        self.refresh_specs = refresh_specs
        self.max_batch = max_batch
        self.poll_ms = poll_ms
        self.commit_timeout_s = commit_timeout_s
        self.refence_pause_s = refence_pause_s
        self.lock = asyncio.Lock()
        """Held while partitions are installed or released."""
        self.parts: dict[int, _Partition] = {}
        self._busy: dict[int, asyncio.Task[None]] = {}
        """Partitions with a batch (or timers) in hand, until its transaction ends."""
        self._leaving: set[int] = set()
        """Partitions being revoked: no new batch starts for them."""
        self._freed = asyncio.Event()
        """Set when a partition's work ends, so the loop hands it its next batch."""
        self.retired = PartitionStats()
        self.consumer: AIOKafkaConsumer | None = None
        self.started = asyncio.Event()
        self._takeovers: dict[int, asyncio.Task[None]] = {}
        """Partitions being taken over (paused until their state is restored)."""
        self.on_committed: Callable[[Sequence[Event]], None] | None = None
        """Called with the events of each committed batch (telemetry); must not raise."""

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Process until ``stop`` is set; then finish the batch in hand and leave the group."""
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 << 20,
            group_instance_id=f"{self.instance_id}-engine" if self.instance_id else None,
            # Partition p of the inputs and of the triggers go to the same member.
            partition_assignment_strategy=(RangePartitionAssignor,),
        )
        await self.consumer.start()
        subscribed = [self.topics.inputs]
        if self.read_triggers:
            subscribed.append(self.topics.triggers)
        self.consumer.subscribe(subscribed, listener=_Rebalance(self))
        self.started.set()
        try:
            while not stop.is_set():
                self._dispatch(await self._poll())
        finally:
            await self._cancel_takeovers()
            await self._settle()
            async with self.lock:
                for number in list(self.parts):
                    await self._release(number)
            await stop_quietly(self.consumer)

    @property
    def stats(self) -> PartitionStats:
        total = PartitionStats(**{f: getattr(self.retired, f) for f in PartitionStats.__slots__})
        for part in self.parts.values():
            for name in PartitionStats.__slots__:
                setattr(total, name, getattr(total, name) + getattr(part.stats, name))
        return total

    def state(self, run_id: str) -> RunState | None:
        """Committed state of a run owned by this process (None if not owned or unknown)."""
        part = self.parts.get(self.topics.partition_of(run_id))
        return part.cache.get(run_id) if part is not None else None

    # ------------------------------------------------------------------ ownership

    def _transactional_id(self, number: int) -> str:
        return f"{self.app}-{self.topics.inputs}-{number}"

    def _tps(self, number: int) -> tuple[TopicPartition, ...]:
        """The partitions read for partition ``number``: the run inputs' first."""
        inputs = TopicPartition(self.topics.inputs, number)
        if not self.read_triggers:
            return (inputs,)
        return inputs, TopicPartition(self.topics.triggers, number)

    def _assigned(self, number: int) -> list[TopicPartition]:
        assert self.consumer is not None
        assignment = self.consumer.assignment()
        return [tp for tp in self._tps(number) if tp in assignment]

    def _owns(self, number: int) -> Callable[[str], bool]:
        partition_of = self.topics.partition_of
        return lambda run_id: partition_of(run_id) == number

    async def _acquire(self, number: int, stats: PartitionStats | None = None) -> None:
        """Take the partition over now (the caller holds the lock)."""
        if number in self.parts:
            return
        await self._install(await self._prepare(number, stats))

    async def _prepare(self, number: int, stats: PartitionStats | None) -> _Partition:
        """A new producer (which fences the previous owner's and settles its transaction),
        then the partition's state restored from the changelog. Touches nothing shared."""
        producer = await transactional_producer(self.bootstrap, self._transactional_id(number))
        try:
            cache, timers, restored, restore_ms = await self._restore(number)
        except BaseException:
            await stop_quietly(producer)
            raise
        tps = self._tps(number)
        processor = Processor(self.specs, cache, owns=self._owns(number),
                              triggers_source=self.topics.triggers)
        part = _Partition(number=number, tps=tps, producer=producer, cache=cache,
                          timers=timers, processor=processor, stats=stats or PartitionStats())
        part.stats.restores += 1
        part.stats.restored_states += restored
        part.stats.restore_ms += restore_ms
        return part

    async def _install(self, part: _Partition) -> None:
        # aiokafka may already have fetched this partition from a committed offset read
        # before the previous owner's transaction settled: resume from a fresh one.
        try:
            await self._rewind(part)
        except BaseException:
            await stop_quietly(part.producer)
            raise
        self.parts[part.number] = part
        log.info("partition %d acquired: %d runs restored in %d ms, %d timers armed",
                 part.number, part.stats.restored_states, part.stats.restore_ms,
                 len(part.timers))

    def _take_over(self, number: int) -> None:
        """Pause the newly assigned partition and take it over in the background, while
        the consumer keeps polling (and the group keeps hearing from this member)."""
        assert self.consumer is not None
        if number in self.parts or number in self._takeovers:
            return
        tps = self._assigned(number)
        if len(tps) < len(self._tps(number)):
            log.error("partition %d: assigned %s without its pair; the group mixes "
                      "assignors or the topics' partition counts changed", number, tps)
        self.consumer.pause(*tps)
        task = asyncio.get_running_loop().create_task(self._take_over_task(number))
        self._takeovers[number] = task
        task.add_done_callback(
            lambda done: self._takeovers.pop(number) if self._takeovers.get(number) is done
            else None)

    async def _take_over_task(self, number: int) -> None:
        assert self.consumer is not None
        stats = PartitionStats()
        part: _Partition | None = None
        try:
            part = await self._prepare(number, stats)
            async with self.lock:
                if self._still_assigned(number) and number not in self.parts:
                    await self._install(part)
                    self.consumer.resume(*part.tps)
                    part = None  # installed: the producer is the partition's now
        except Exception as exc:
            log.warning("partition %d: cannot take it over yet (%r); retrying", number, exc)
            self._pause_and_reclaim(number, stats)
        finally:
            if part is not None:  # revoked, cancelled or failed: the producer is not ours
                await stop_quietly(part.producer)

    async def _cancel_takeovers(self, numbers: Iterable[int] | None = None) -> None:
        """Stop the takeovers of ``numbers`` (all if None) and wait for them to end."""
        tasks = [task for number, task in list(self._takeovers.items())
                 if numbers is None or number in numbers]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _release(self, number: int) -> None:
        part = self.parts.pop(number, None)
        if part is None:
            return
        self._retire_stats(part.stats)
        await stop_quietly(part.producer)

    def _retire_stats(self, stats: PartitionStats) -> None:
        for name in PartitionStats.__slots__:
            setattr(self.retired, name, getattr(self.retired, name) + getattr(stats, name))

    async def _restore(self, number: int) -> tuple[StateCache, TimerService, int, int]:
        """Read the partition's state changelog up to its last stable offset."""
        started = self.clock.now_ms()
        tp = TopicPartition(self.topics.state, number)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap,
                                    isolation_level="read_committed",
                                    enable_auto_commit=False, max_partition_fetch_bytes=8 << 20)
        await consumer.start()
        snapshots: dict[str, bytes] = {}
        try:
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            while await consumer.position(tp) < end:
                fetched = await consumer.getmany(tp, timeout_ms=500, max_records=10_000)
                for message in fetched.get(tp, []):
                    key = message.key.decode() if message.key else ""
                    if message.value is None:
                        snapshots.pop(key, None)
                    else:
                        snapshots[key] = message.value
        finally:
            await stop_quietly(consumer)
        cache = StateCache()
        states: dict[str, RunState] = {}
        for i, (run_id, payload) in enumerate(snapshots.items()):
            state = decode(payload)
            if isinstance(state, RunState):
                states[run_id] = state
            if i % RESTORE_SLICE == RESTORE_SLICE - 1:
                await asyncio.sleep(0)  # decoding is CPU-bound: let the others run
        cache.commit(states)
        timers = TimerService(lambda run_id, timer_id: _armed(cache, run_id, timer_id))
        for state in states.values():
            timers.restore(state)
        return cache, timers, len(states), self.clock.now_ms() - started

    async def _take_back(self, part: _Partition, why: str) -> None:
        """Recreate the producer (fencing the old one), restore from the changelog, and
        resume from the committed input offset."""
        log.warning("partition %d: %s; recreating its producer and restoring", part.number, why)
        self.parts.pop(part.number, None)
        await stop_quietly(part.producer)
        if not self._still_assigned(part.number):
            self._retire_stats(part.stats)
            return
        async with self.lock:
            await self._acquire_or_retry(part.number, part.stats)

    def _still_assigned(self, number: int) -> bool:
        """Every partition read for ``number`` is still assigned to this member."""
        return len(self._assigned(number)) == len(self._tps(number))

    async def _acquire_or_retry(self, number: int, stats: PartitionStats | None = None) -> None:
        """Acquire the partition; if the broker cannot be reached (it may be restarting),
        pause it and keep trying while it stays assigned. The process never dies of it."""
        try:
            await self._acquire(number, stats)
        except Exception as exc:
            log.warning("partition %d: cannot take it over yet (%r); retrying", number, exc)
            self._pause_and_reclaim(number, stats or PartitionStats())

    def _pause_and_reclaim(self, number: int, stats: PartitionStats) -> None:
        assert self.consumer is not None
        if self._still_assigned(number):
            self.consumer.pause(*self._tps(number))
            asyncio.get_running_loop().create_task(self._reclaim_later(number, stats))
        else:
            self._retire_stats(stats)

    async def _rewind(self, part: _Partition) -> None:
        """Seek each of the partition's inputs back to its committed offset."""
        assert self.consumer is not None
        for tp in part.tps:
            part.next_offsets[tp] = await seek_committed(self.consumer, tp)

    # ------------------------------------------------------------------ processing

    async def _poll(self) -> Fetched:
        """Records of the partitions with nothing in hand. Returns early, with nothing,
        when a busy partition finishes, so that it gets its next batch at once instead of
        after the others' poll timeout."""
        assert self.consumer is not None
        self._reap()
        idle = [tp for number, part in self.parts.items()
                if number not in self._busy and number not in self._leaving for tp in part.tps]
        self._freed.clear()
        if not idle:
            if self._busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), self.poll_ms / 1000)
            else:
                await asyncio.sleep(self.poll_ms / 1000)
            return {}
        fetch = self.consumer.getmany(*idle, timeout_ms=self.poll_ms, max_records=self.max_batch)
        if not self._busy:
            fetched: Fetched = await fetch
            return fetched
        getter: asyncio.Future[Fetched] = asyncio.ensure_future(fetch)
        freed = asyncio.ensure_future(self._freed.wait())
        try:
            await asyncio.wait((getter, freed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            freed.cancel()
        if getter.done():
            return getter.result()
        # aiokafka hands records out without awaiting once it has them, so a getmany
        # cancelled while it waits has taken nothing from its buffers.
        getter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            return await getter
        return {}

    def _dispatch(self, records: Fetched) -> None:
        """Start the work of each idle partition that has records or timers due: one
        task per partition, so one partition's commit round trip holds back only its
        own next batch, and the transactions of different partitions overlap."""
        fetched: dict[int, dict[TopicPartition, Sequence[Any]]] = {}
        for tp, messages in records.items():
            if messages:
                fetched.setdefault(tp.partition, {})[tp] = messages
        now = self.clock.now_ms()
        for number, part in self.parts.items():
            if number in self._busy or number in self._leaving:
                continue  # its records stay in the consumer's buffer (not polled)
            due = part.timers.next_due()
            by_tp = fetched.get(number)
            if by_tp or (due is not None and due <= now):
                task = asyncio.get_running_loop().create_task(self._work(part, by_tp or {}))
                self._busy[number] = task

    async def _work(self, part: _Partition,
                    fetched: Mapping[TopicPartition, Sequence[Any]]) -> None:
        try:
            if fetched:
                await self._process(part, fetched)
            if self.parts.get(part.number) is part:
                await self._fire_timers(part)
        finally:
            self._freed.set()

    def _reap(self) -> None:
        """Forget the partition tasks that ended; an error in one stops the engine, as
        it would have in the loop itself."""
        for number, task in list(self._busy.items()):
            if task.done():
                del self._busy[number]
                error = None if task.cancelled() else task.exception()
                if error is not None:
                    raise error

    async def _settle(self, numbers: Iterable[int] | None = None) -> None:
        """Stop starting work for ``numbers`` (all if None) and wait for what is in hand."""
        leaving = list(self._busy if numbers is None else numbers)
        self._leaving.update(leaving)
        tasks = [self._busy[n] for n in leaving if n in self._busy]
        if tasks:
            await asyncio.wait(tasks)
        self._reap()
        if numbers is None:
            self._leaving.clear()

    async def _process(self, part: _Partition,
                       fetched: Mapping[TopicPartition, Sequence[Any]]) -> None:
        inputs = [Input(tp.topic, part.number, m.offset, m.value or b"")
                  for tp in part.tps for m in fetched.get(tp, ())
                  if m.offset >= part.next_offsets.get(tp, 0)]
        if not inputs:
            return
        batch = part.processor.process(inputs, self.clock.now_ms())
        unknown = any(d.reason == "unknown_workflow" for d in batch.dead_letters)
        # A spec deployed just before its first trigger may not have reached us yet. (Decide
        # again even if this catch-up added nothing: another partition's may have.)
        if unknown and self.refresh_specs is not None:
            await self.refresh_specs()
            batch = part.processor.process(inputs, self.clock.now_ms())
        if part.aborts >= MAX_ABORTS:
            log.warning("partition %d: %d transactions in a row aborted; isolating its "
                        "%d inputs", part.number, part.aborts, len(inputs))
            await self._process_one_by_one(part, inputs)
            return
        try:
            records = self._records(part.number, batch)
        except Exception:
            log.exception("partition %d: encoding a batch failed; isolating the input",
                          part.number)
            await self._process_one_by_one(part, inputs)
            return
        offsets = _next_offsets(inputs)
        if await self._transact(part, records, offsets):
            self._committed(part, batch)
            part.next_offsets.update(offsets)
            part.aborts = 0

    async def _process_one_by_one(self, part: _Partition, inputs: list[Input]) -> None:
        """Each input in a transaction of its own; an input whose outcome cannot be
        encoded or written becomes a dead letter, so the partition keeps moving."""
        for item in inputs:
            tp = TopicPartition(item.source, item.partition)
            offsets = {tp: item.offset + 1}
            batch = part.processor.process([item], self.clock.now_ms())
            try:
                records = self._records(part.number, batch)
                committed = await self._transact(part, records, offsets)
            except Exception as exc:
                log.exception("partition %d: input %s/%d cannot be processed", part.number,
                              item.source, item.offset)
                committed, batch = False, self._dead_batch(part, item, f"{exc!r}")
            still_ours = self.parts.get(part.number) is part  # not recreated or fenced
            if not committed and still_ours and part.next_offsets.get(tp) == item.offset:
                batch = self._dead_batch(part, item, "its outcome was refused by Kafka")
                committed = await self._transact(part, self._records(part.number, batch),
                                                 offsets)
            if not committed:
                return
            self._committed(part, batch)
            part.next_offsets[tp] = item.offset + 1
        part.aborts = 0

    def _dead_batch(self, part: _Partition, item: Input, why: str) -> Batch:
        dead = dead_letter(item.source, item.partition, item.offset, "engine_error",
                           f"processing failed: {why}", item.payload, self.clock.now_ms())
        return Batch(last=item, inputs=1, dead_letters=[dead])

    def _committed(self, part: _Partition, batch: Batch) -> None:
        # The transaction is durable: only now does its state become the committed state.
        part.cache.commit(batch.states)
        for run_id, timer in batch.timers:
            part.timers.arm(run_id, timer.timer_id, timer.due_at)
        part.stats.batches += 1
        part.stats.inputs += batch.inputs
        part.stats.events += len(batch.events)
        for dead in batch.dead_letters:
            log.warning("dead letter %s/%d/%d: %s: %s", dead.source, dead.partition, dead.offset,
                        dead.reason, dead.detail)
        if self.on_committed is not None:
            self.on_committed(batch.events)

    def _records(self, number: int, batch: Batch) -> list[Record]:
        """Encode everything first: nothing can fail halfway through the transaction for
        a reason that is not Kafka's."""
        t = self.topics
        out: list[Record] = []
        headers: dict[str, Headers] = {}
        for event in batch.events:
            out.append((t.events, number, event.run_id.encode(), encode(event),
                        _event_headers(event, headers)))
        for rec in batch.recorded:
            command = rec.command
            out.append((t.events, number, rec.run_id.encode(), encode(rec), trace_headers(
                command.correlation_id or rec.run_id, command.command_id, command.tenant)))
        for state in batch.states.values():
            out.append((t.state, number, state.run_id.encode(), encode(state), []))
        for task in batch.tasks:
            out.append((t.tasks(task.queue), number, task.run_id.encode(), encode(task),
                        trace_headers(task.correlation_id, task.task_id, task.tenant)))
        for note in batch.notifications:
            out.append((t.notifications, number, note.run_id.encode(), encode(note),
                        trace_headers(note.correlation_id, note.approval_id, note.tenant)))
        for dead in batch.dead_letters:
            out.append((t.dead_letters, number, dead.run_id.encode() or None, encode(dead),
                        [("reason", dead.reason.encode())]))
        out.extend(start_run_record(t, start) for start in batch.forwards)
        return out

    async def _transact(self, part: _Partition, records: list[Record],
                        offsets: Mapping[TopicPartition, int] | None) -> bool:
        """One transaction: the records, and the input offsets if given. True if committed."""
        outcome = await run_transaction(part.producer, records, offsets, self.group_id,
                                        self.commit_timeout_s)
        if outcome is Outcome.FENCED:
            await self._fenced(part)
        elif outcome is Outcome.ABORTED:
            part.stats.aborted += 1
            part.aborts += 1
            await self._rewind(part)
        elif outcome is Outcome.UNKNOWN:
            part.stats.unknown_outcomes += 1
            await self._take_back(part, "transaction outcome unknown")
        return outcome is Outcome.COMMITTED

    async def _fenced(self, part: _Partition) -> None:
        part.stats.fenced += 1
        log.warning("partition %d: producer fenced; another engine process owns it",
                    part.number)
        self.parts.pop(part.number, None)
        await stop_quietly(part.producer)
        self._pause_and_reclaim(part.number, part.stats)

    async def _reclaim_later(self, number: int, stats: PartitionStats) -> None:
        """Take a paused partition back after a pause, for as long as it stays assigned."""
        delay = self.refence_pause_s
        while True:
            await asyncio.sleep(delay)
            async with self.lock:
                assert self.consumer is not None
                if not self._still_assigned(number) or number in self.parts:
                    return
                try:
                    await self._acquire(number, stats)
                except Exception as exc:
                    log.warning("partition %d: still cannot take it over (%r)", number, exc)
                else:
                    self.consumer.resume(*self._tps(number))
                    return
            delay = min(delay * 2, 30.0)

    async def _fire_timers(self, part: _Partition) -> None:
        due = part.timers.due(self.clock.now_ms())
        if not due:
            return
        records: list[Record] = [
            (self.topics.inputs, part.number, c.run_id.encode(), encode(c),
             trace_headers(c.run_id, c.command_id, c.tenant)) for c in due]
        await self._transact(part, records, None)


def _next_offsets(inputs: Sequence[Input]) -> dict[TopicPartition, int]:
    """The offsets to commit once ``inputs`` are done: one past the last of each partition."""
    return {TopicPartition(item.source, item.partition): item.offset + 1 for item in inputs}


def _event_headers(event: Event, cache: dict[str, Headers]) -> Headers:
    """Headers of an event; the trace part is shared by the events of one command."""
    base = cache.get(event.causation_id)
    if base is None:
        base = trace_headers(event.correlation_id, event.causation_id, event.tenant)
        cache[event.causation_id] = base
    return [*base, ("type", event.TYPE.encode())]


def _armed(cache: StateCache, run_id: str, timer_id: str) -> bool:
    state = cache.get(run_id)
    return state is not None and timer_id in state.timers
