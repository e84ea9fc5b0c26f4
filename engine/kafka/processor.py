"""The orchestrator on Kafka: the run core on the exactly-once stream processor.

One consumer (group ``<deployment>-engine``, read_committed; ``Topics.deployment``)
reads the run inputs topic and, when it is co-partitioned with them, the triggers topic;
task p reads partition p of both (``engine.kafka.stream``: ownership, fencing, restore,
transactions and their outcomes). A batch of task p is decided by the shared
``Processor`` and written in ONE transaction: events and recorded commands (events
topic, p; each command's events, then the command), state snapshots (state changelog,
p), task commands (task topics, p), notifications, dead letters, the ``StartRun`` of
triggers read at p for runs of other partitions (run inputs, their partition), the
subscriptions its keyed waits open and close (messages topic, by correlation key), and the
offsets of both input partitions. Only after the commit succeeds does the batch's state
enter the task's cache.

A trigger keyed by its run id lands on its run's partition and is decided in the same
transaction that reads it: one transactional hop from the trigger to the first command,
where the trigger router (for a triggers topic with another partition count) takes two.

The state changelog is the task's restore source; timers live in run state and are
re-armed on restore. A finished run leaves memory: its last snapshot on the changelog is
its compact record (``finished_record``: enough to refuse a duplicate start or a late
command exactly as the full state would), which the task's local store keeps on disk
(``state_dir``; ``engine.kafka.localstore``) and reads back when a command for the run
arrives. Without a local store, compact records stay in memory. A due timer becomes a
``FireTimer`` on the task's own run inputs partition, written in a transaction of the
task's producer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from itertools import islice
from pathlib import Path

from aiokafka import TopicPartition

from engine.codec import decode, encode
from engine.core.correlation import (
    CloseSubscription,
    OpenSubscription,
    RejectCorrelation,
    key_of,
)
from engine.core.events import Event
from engine.core.flow import FlowLimits
from engine.core.state import RunState, finished_record
from engine.kafka._util import Headers, Record, start_run_record, trace_headers
from engine.kafka.admission import AdmissionTopics
from engine.kafka.localstore import ChangelogWrite
from engine.kafka.schedules import run_ended_record
from engine.kafka.stream import OwnedTask, Step, StreamProcessor, Task, TaskStats
from engine.kafka.topics import Topics, key_partition
from engine.runtime.clock import Clock
from engine.runtime.processor import Batch, Input, Processor, StateCache, dead_letter_of
from engine.runtime.schedule_reports import schedule_reports
from engine.runtime.specs import SpecRegistry
from engine.runtime.timers import TimerService

RESTORE_SLICE = 2000
"""Snapshots decoded between two yields to the event loop while restoring."""

log = logging.getLogger("terranoha.kafka.engine")

PartitionStats = TaskStats
_Partition = OwnedTask


class RunTask(Task):
    """The runs of one partition: their committed state, their timers, and the run core
    that decides each batch against them. Active runs are in memory; finished ones, with
    a local store, on disk only."""

    local_state = True

    def __init__(self, engine: KafkaEngine, number: int) -> None:
        self.engine = engine
        self.number = number
        self.cache = StateCache(loader=self._stored, keep_loaded=False)
        self.timers = TimerService(self._armed)
        partition_of = engine.topics.partition_of
        self.processor = Processor(
            engine.specs,
            self.cache,
            owns=lambda run_id: partition_of(run_id) == number,
            triggers_source=engine.topics.triggers,
            partition_of=partition_of,
            flow=engine.flow,
        )

    def _armed(self, run_id: str, timer_id: str) -> bool:
        state = self.cache.resident(run_id)  # a finished run has no timers
        return state is not None and timer_id in state.timers

    def _stored(self, run_id: str) -> RunState | None:
        """A finished run's compact record, from the local store."""
        payload = self.store.get(run_id.encode()) if self.store is not None else None
        if payload is None:
            return None
        state = decode(payload)
        return state if isinstance(state, RunState) else None

    def split(self, values: Mapping[bytes, bytes]) -> ChangelogWrite:
        out = ChangelogWrite()
        for key, payload in values.items():
            state = decode(payload)
            finished = isinstance(state, RunState) and state.terminal
            (out.finished if finished else out.active)[key] = payload
        return out

    async def restore(self, latest: Mapping[bytes, bytes]) -> int:
        states: dict[str, RunState] = {}
        for i, (key, payload) in enumerate(latest.items()):
            state = decode(payload)
            if isinstance(state, RunState) and (self.store is None or not state.terminal):
                states[key.decode()] = finished_record(state)
            if i % RESTORE_SLICE == RESTORE_SLICE - 1:
                await asyncio.sleep(0)  # decoding is CPU-bound: let the others run
        self.cache.commit(states)
        for state in states.values():
            self.timers.restore(state)
        return len(states)

    async def process(self, inputs: Sequence[Input], now: int) -> Step:
        batch = self.processor.process(inputs, now)
        unknown = any(d.reason == "unknown_workflow" for d in batch.dead_letters)
        # A spec deployed just before its first trigger may not have reached us yet. (Decide
        # again even if this catch-up added nothing: another partition's may have.)
        if unknown and self.engine.refresh_specs is not None:
            await self.engine.refresh_specs()
            batch = self.processor.process(inputs, now)
        return self._step(batch)

    def isolated(self, item: Input, now: int, why: str) -> Step:
        dead = dead_letter_of(item, "engine_error", f"processing failed: {why}", now)
        return self._step(Batch(last=item, inputs=1, dead_letters=[dead]))

    def next_due(self) -> int | None:
        return self.timers.next_due()

    def due(self, now: int) -> Step | None:
        due = self.timers.due(now)
        if not due:
            return None
        inputs = self.engine.topics.inputs
        return Step(
            [
                (
                    inputs,
                    self.number,
                    c.run_id.encode(),
                    encode(c),
                    trace_headers(c.run_id, c.command_id, c.tenant),
                )
                for c in due
            ]
        )

    def _step(self, batch: Batch) -> Step:
        changelog = ChangelogWrite()
        finished: list[str] = []
        for run_id, state in batch.states.items():
            if state.terminal:
                batch.states[run_id] = finished_record(state)
                finished.append(run_id)
        records = self._records(batch, changelog)
        return Step(
            records,
            commit=lambda: self._committed(batch, finished),
            events=len(batch.events),
            forwards=len(batch.forwards),
            dead_letters=len(batch.dead_letters),
            changelog=changelog,
        )

    def _committed(self, batch: Batch, finished: Sequence[str]) -> None:
        self.cache.commit(batch.states)
        if self.store is not None:
            self.cache.evict(finished)  # on disk now (the processor writes the store next)
        for run_id, timer in batch.timers:
            self.timers.arm(run_id, timer.timer_id, timer.due_at)
        for dead in batch.dead_letters:
            log.warning(
                "dead letter %s/%d/%d: %s: %s",
                dead.source,
                dead.partition,
                dead.offset,
                dead.reason,
                dead.detail,
            )
        if self.engine.on_committed is not None:
            self.engine.on_committed(batch.events)

    def _records(self, batch: Batch, changelog: ChangelogWrite) -> list[Record]:
        """Encode everything first: nothing can fail halfway through the transaction for
        a reason that is not Kafka's. The state snapshots also go to ``changelog``."""
        t = self.engine.topics
        number = self.number
        out: list[Record] = []
        headers: dict[str, Headers] = {}
        # Each command's events, then the command recorded: a reader that found one of
        # the events (by its offset, from an index) finds the command right after them.
        events = iter(batch.events)
        for rec in batch.recorded:
            key = rec.run_id.encode()
            for event in islice(events, rec.last_seq - rec.first_seq + 1):
                out.append((t.events, number, key, encode(event), _event_headers(event, headers)))
            command = rec.command
            out.append(
                (
                    t.events,
                    number,
                    key,
                    encode(rec),
                    trace_headers(
                        command.correlation_id or rec.run_id, command.command_id, command.tenant
                    ),
                )
            )
        for event in events:  # none: every event belongs to a recorded command
            out.append(
                (
                    t.events,
                    number,
                    event.run_id.encode(),
                    encode(event),
                    _event_headers(event, headers),
                )
            )
        for state in batch.states.values():
            key, payload = state.run_id.encode(), encode(state)
            (changelog.finished if state.terminal else changelog.active)[key] = payload
            out.append((t.state, number, key, payload, []))
        for task in batch.tasks:
            out.append(
                (
                    t.tasks(task.queue),
                    number,
                    task.run_id.encode(),
                    encode(task),
                    trace_headers(task.correlation_id, task.task_id, task.tenant),
                )
            )
        if batch.admission:
            admission = AdmissionTopics(t).keyed.inputs
            for request in batch.admission:
                key = request.key.encode()
                out.append((admission, key_partition(key, t.partitions), key, encode(request), []))
        for note in batch.notifications:
            out.append(
                (
                    t.notifications,
                    number,
                    note.run_id.encode(),
                    encode(note),
                    trace_headers(note.correlation_id, note.approval_id, note.tenant),
                )
            )
        for dead in batch.dead_letters:
            out.append(
                (
                    t.dead_letters,
                    number,
                    dead.run_id.encode() or None,
                    encode(dead),
                    [("reason", dead.reason.encode())],
                )
            )
        out.extend(
            start_run_record(t, start, trigger)
            for start, trigger in zip(batch.forwards, batch.forwarded_from, strict=True)
        )
        for change in batch.correlation:
            if isinstance(change, OpenSubscription | CloseSubscription | RejectCorrelation):
                key = key_of(change).encode()
                out.append(
                    (
                        t.messages,
                        key_partition(key, t.partitions),
                        key,
                        encode(change),
                        trace_headers(change.run_id, f"{change.TYPE}:{change.wait}", change.tenant),
                    )
                )
        # Runs started by a schedule tell it when they end (its overlap policy).
        out.extend(run_ended_record(t, report) for report in schedule_reports(batch))
        return out


class KafkaEngine(StreamProcessor):
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
        state_dir: Path | None = None,
        flow: Callable[[], FlowLimits | None] | None = None,
    ) -> None:
        self.flow = flow
        """The limits document in force (flow control); None: none, tasks go at once."""
        self.read_triggers = topics.co_partitioned if read_triggers is None else read_triggers
        """Read the triggers topic beside the run inputs (default: when co-partitioned)."""
        if self.read_triggers and not topics.co_partitioned:
            raise ValueError(
                f"the triggers topic has {topics.trigger_count} partitions and "
                f"the run inputs {topics.partitions}: the orchestrator reads "
                "triggers only when the counts are equal; run the trigger "
                "router for this topic instead"
            )
        self.topics = topics
        self.specs = specs
        self.app = app
        self.refresh_specs = refresh_specs
        self.on_committed: Callable[[Sequence[Event]], None] | None = None
        """Called with the events of each committed batch (telemetry); must not raise."""
        inputs = [topics.inputs, topics.triggers] if self.read_triggers else [topics.inputs]
        super().__init__(
            bootstrap,
            name="engine",
            inputs=inputs,
            group_id=f"{topics.deployment(app)}-engine",
            transactional_id=lambda number: f"{app}-{topics.inputs}-{number}",
            make_task=lambda number: RunTask(self, number),
            changelog=self._changelog,
            clock=clock,
            max_batch=max_batch,
            poll_ms=poll_ms,
            commit_timeout_s=commit_timeout_s,
            refence_pause_s=refence_pause_s,
            instance_id=instance_id,
            state_dir=state_dir,
        )

    async def _changelog(self, number: int) -> list[TopicPartition]:
        return [TopicPartition(self.topics.state, number)]

    def run_task(self, number: int) -> RunTask | None:
        part = self.parts.get(number)
        return part.task if part is not None and isinstance(part.task, RunTask) else None

    def state(self, run_id: str) -> RunState | None:
        """Committed state of a run owned by this process (None if not owned or unknown);
        for a finished run, its compact record (the full state is the fold of its events)."""
        task = self.run_task(self.topics.partition_of(run_id))
        return task.cache.get(run_id) if task is not None else None


def _event_headers(event: Event, cache: dict[str, Headers]) -> Headers:
    """Headers of an event; the trace part is shared by the events of one command."""
    base = cache.get(event.causation_id)
    if base is None:
        base = trace_headers(event.correlation_id, event.causation_id, event.tenant)
        cache[event.causation_id] = base
    return [*base, ("type", event.TYPE.encode())]
