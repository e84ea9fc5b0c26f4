"""One batch of inputs in, everything it produced out: the heart of every backend.

``Processor.process`` decodes each input, turns triggers into ``StartRun`` commands,
decides and evolves, and collects events, recorded commands, state snapshots, task
commands, notifications, armed timers and dead letters into a ``Batch``. It changes
nothing outside the batch: the backend writes the batch atomically and then calls
``StateCache.commit``. An aborted write leaves the cache as it was.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from engine.codec import DecodeError, decode
from engine.core.admission_records import Acquire, AdmissionCommand, Release
from engine.core.commands import Command, CorrelateMessage, StartRun
from engine.core.correlation import (
    CloseSubscription,
    CorrelationCommand,
    OpenSubscription,
    PublishMessage,
    RejectCorrelation,
    refused_delivery,
    subscription_changes,
)
from engine.core.decide import process
from engine.core.events import Event, TimerArmed
from engine.core.flow import FlowLimits
from engine.core.outbox import Notification, TaskCommand, outgoing
from engine.core.policies import run_id_for
from engine.core.records import DeadLetter, RecordedCommand, Trigger
from engine.core.state import RunState
from engine.runtime.specs import SpecRegistry

MAX_INPUT_BYTES = 1 << 20
"""Inputs larger than this go to dead letters (reason ``oversize``)."""

MAX_DEAD_PAYLOAD = 4 << 20
"""A dead letter keeps at most this much of the original bytes, so it always fits on the
dead-letter topic (8 MiB); the detail says when the payload was cut."""


def dead_letter(
    source: str,
    partition: int,
    offset: int,
    reason: str,
    detail: str,
    payload: bytes,
    ts: int,
    run_id: str = "",
) -> DeadLetter:
    """A dead letter with the original bytes (up to ``MAX_DEAD_PAYLOAD``)."""
    if len(payload) > MAX_DEAD_PAYLOAD:
        detail += f" (payload cut to its first {MAX_DEAD_PAYLOAD} of {len(payload)} bytes)"
        payload = payload[:MAX_DEAD_PAYLOAD]
    return DeadLetter(
        source=source,
        partition=partition,
        offset=offset,
        reason=reason,
        detail=detail,
        payload=payload,
        ts=ts,
        run_id=run_id,
    )


ORIGIN_INLINE_BYTES = 256 << 10
"""A forwarded trigger carries its original bytes along while trigger and ``StartRun``
together stay below this: the forwarded record must stay well under the broker's default
limit of 1 MiB per record on the run inputs topic. A larger one carries its position."""

Headers = Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Input:
    """One input record and where it came from (topic or table, partition, offset).

    ``headers`` are the record's Kafka headers (none on the embedded store); only the
    origin headers of a forwarded trigger are read, and only to write a dead letter."""

    source: str
    partition: int
    offset: int
    payload: bytes
    headers: Headers = ()


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a forwarded ``StartRun`` was first read as a trigger, and that trigger's
    bytes (None when it was too large to carry along)."""

    source: str
    partition: int
    offset: int
    payload: bytes | None


def origin_headers(trigger: Input, forwarded_size: int) -> list[tuple[str, bytes]]:
    """The headers that tie a forwarded ``StartRun`` to the trigger it came from, so a
    dead letter of the forward names and keeps the trigger, as one of the trigger itself
    would."""
    headers = [
        ("origin_topic", trigger.source.encode()),
        ("origin_partition", str(trigger.partition).encode()),
        ("origin_offset", str(trigger.offset).encode()),
    ]
    if len(trigger.payload) + forwarded_size <= ORIGIN_INLINE_BYTES:
        headers.append(("origin_payload", trigger.payload))
    return headers


def forwarded_origin(item: Input) -> Origin | None:
    """The trigger ``item`` was forwarded from, if it is a forward.

    The headers are believed only when they agree with the record: its ``StartRun`` has
    the command id of a trigger at that position, and the carried bytes are a trigger of
    that workflow. Anyone may write the run inputs topic; a made-up origin must not make a
    dead letter blame a record it did not come from."""
    if not item.headers:
        return None
    found = {k: v for k, v in item.headers if k.startswith("origin_")}
    try:
        source = found["origin_topic"].decode()
        partition = int(found["origin_partition"])
        offset = int(found["origin_offset"])
        start = decode(item.payload)
    except (KeyError, ValueError, DecodeError):
        return None
    if not isinstance(start, StartRun) or (
        start.command_id != f"trigger:{source}/{partition}/{offset}"
    ):
        return None
    payload = found.get("origin_payload")
    if payload is not None:
        try:
            trigger = decode(payload)
        except DecodeError:
            return None
        if not isinstance(trigger, Trigger) or trigger.workflow != start.workflow:
            return None
    return Origin(source, partition, offset, payload)


def dead_letter_of(item: Input, reason: str, detail: str, ts: int, run_id: str = "") -> DeadLetter:
    """The dead letter of ``item``. A forwarded ``StartRun`` is dead-lettered as the
    trigger it came from: that trigger's topic, partition, offset and bytes, with where
    the forward was read in the detail."""
    origin = forwarded_origin(item)
    if origin is None:
        return dead_letter(
            item.source, item.partition, item.offset, reason, detail, item.payload, ts, run_id
        )
    detail += (
        f" (the trigger read at {origin.source}/{origin.partition}/{origin.offset}, "
        f"forwarded as a StartRun to {item.source}/{item.partition}/{item.offset})"
    )
    payload = origin.payload
    if payload is None:
        detail += (
            "; the trigger was too large to carry along: the payload is the "
            "forwarded StartRun, the trigger's own bytes are at its position"
        )
        payload = item.payload
    return dead_letter(
        origin.source, origin.partition, origin.offset, reason, detail, payload, ts, run_id
    )


@dataclass(slots=True)
class Batch:
    """What one batch produced. Written by the backend in one atomic unit."""

    events: list[Event] = field(default_factory=list)
    recorded: list[RecordedCommand] = field(default_factory=list)
    recorded_offsets: list[int] = field(default_factory=list)
    """The offset of the input each of ``recorded`` was read from, in the same order."""
    states: dict[str, RunState] = field(default_factory=dict)
    tasks: list[TaskCommand] = field(default_factory=list)
    notifications: list[Notification] = field(default_factory=list)
    admission: list[AdmissionCommand] = field(default_factory=list)
    """Slot requests and releases for the admission processor (flow control)."""
    timers: list[tuple[str, TimerArmed]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    forwards: list[StartRun] = field(default_factory=list)
    """Triggers read here for runs that live elsewhere: their ``StartRun`` goes to the
    run's own input partition, in the same atomic unit."""
    forwarded_from: list[Input] = field(default_factory=list)
    """The trigger each of ``forwards`` was read from, in the same order."""
    correlation: list[CorrelationCommand] = field(default_factory=list)
    """The subscriptions the batch's keyed waits open and close, in order, and (on the
    embedded backend, whose one inputs table carries them) published messages. Written to
    message correlation in the same atomic unit."""
    inputs: int = 0
    last: Input | None = None


class StateCache:
    """Committed run state. A batch reads through it and never writes to it directly.

    ``loader`` finds a run that is not in memory (on disk); ``keep_loaded`` says whether
    what it found stays in memory (the embedded store: yes; a Kafka task, whose runs not
    in memory are the finished ones, no: memory follows active runs, not history)."""

    def __init__(
        self, loader: Callable[[str], RunState | None] | None = None, keep_loaded: bool = True
    ) -> None:
        self._states: dict[str, RunState] = {}
        self._loader = loader
        self._keep_loaded = keep_loaded

    def get(self, run_id: str) -> RunState | None:
        state = self._states.get(run_id)
        if state is None and self._loader is not None:
            state = self._loader(run_id)
            if state is not None and self._keep_loaded:
                self._states[run_id] = state
        return state

    def resident(self, run_id: str) -> RunState | None:
        """The run's state if it is in memory (the loader is not asked)."""
        return self._states.get(run_id)

    def commit(self, states: Mapping[str, RunState]) -> None:
        self._states.update(states)

    def evict(self, run_ids: Iterable[str]) -> None:
        """Drop runs from memory (their committed state is on disk)."""
        for run_id in run_ids:
            self._states.pop(run_id, None)

    def __len__(self) -> int:
        return len(self._states)


def trigger_to_start(trigger: Trigger, source: str, partition: int, offset: int) -> StartRun:
    """A trigger becomes exactly one run: its id comes from (tenant, idempotency key), and a
    trigger without a key takes its identity from where it was read."""
    position = f"{source}/{partition}/{offset}"
    key = trigger.idempotency_key or position
    run_id = run_id_for(trigger.tenant, key)
    return StartRun(
        command_id=f"trigger:{position}",
        run_id=run_id,
        tenant=trigger.tenant,
        correlation_id=trigger.correlation_id or run_id,
        workflow=trigger.workflow,
        version=trigger.version,
        input=trigger.input,
        idempotency_key=key,
        requested_by=trigger.requested_by,
        priority=trigger.priority,
    )


class Processor:
    """Decides a batch of inputs against committed state plus the batch's own changes.

    ``owns(run_id)`` says whether a run lives in this processor's cache (on Kafka: its
    partition); a trigger for a run that lives elsewhere becomes a forward instead of a
    decision, and a command for one is a dead letter (``wrong_partition``) naming the
    partition it belongs on (``partition_of``): deciding it here would answer "no such
    run" for a run that exists, or start a second one. Inputs from ``triggers_source``
    must be triggers: a command written there is a dead letter, since it may address a
    run owned elsewhere."""

    def __init__(
        self,
        specs: SpecRegistry,
        cache: StateCache,
        owns: Callable[[str], bool] | None = None,
        triggers_source: str | None = None,
        partition_of: Callable[[str], int] | None = None,
        accepts_messages: bool = False,
        flow: Callable[[], FlowLimits | None] | None = None,
    ) -> None:
        self.specs = specs
        self.flow = flow
        """The limits document in force (flow control), read once per batch."""
        self._limits: FlowLimits | None = None
        self.cache = cache
        self.owns = owns
        self.triggers_source = triggers_source
        self.partition_of = partition_of
        self.accepts_messages = accepts_messages
        """Published messages among the inputs go to ``Batch.correlation`` (embedded);
        otherwise they are dead letters that say where messages go."""

    def process(self, inputs: Iterable[Input], now: int) -> Batch:
        batch = Batch()
        self._limits = self.flow() if self.flow is not None else None
        for item in inputs:
            batch.inputs += 1
            batch.last = item
            if len(item.payload) > MAX_INPUT_BYTES:
                self._dead(
                    batch,
                    item,
                    "oversize",
                    f"{len(item.payload)} bytes is over the {MAX_INPUT_BYTES} byte limit",
                    now,
                )
                continue
            try:
                record = decode(item.payload)
            except DecodeError as exc:
                self._dead(batch, item, exc.reason, str(exc), now)
                continue
            if isinstance(record, Trigger):
                start = trigger_to_start(record, item.source, item.partition, item.offset)
                if self.owns is not None and not self.owns(start.run_id):
                    batch.forwards.append(start)
                    batch.forwarded_from.append(item)
                    continue
                command: Command = start
            elif item.source == self.triggers_source:
                self._dead(
                    batch,
                    item,
                    "unexpected_record",
                    f"{type(record).__name__} is not a trigger; commands go to the "
                    "run inputs topic",
                    now,
                )
                continue
            elif isinstance(record, Command):
                command = record
            elif isinstance(record, PublishMessage) and self.accepts_messages:
                batch.correlation.append(record)
                continue
            elif isinstance(
                record, PublishMessage | OpenSubscription | CloseSubscription | RejectCorrelation
            ):
                self._dead(
                    batch,
                    item,
                    "unexpected_record",
                    f"{type(record).__name__} is a message-correlation record: publish "
                    "messages to the messages topic (`terranoha publish`), keyed by "
                    "tenant/name/key",
                    now,
                )
                continue
            else:
                self._dead(
                    batch,
                    item,
                    "unexpected_record",
                    f"{type(record).__name__} is not a command or a trigger",
                    now,
                )
                continue
            self.apply(batch, item, command, now)
        return batch

    def apply(self, batch: Batch, item: Input, command: Command, now: int) -> None:
        run_id = command.run_id
        state = batch.states.get(run_id) or self.cache.get(run_id)
        if state is None and self.owns is not None and not self.owns(run_id):
            self._dead(batch, item, "wrong_partition", self._misrouted(command, item), now, run_id)
            return
        if state is not None and state.workflow:
            spec = self.specs.get(state.workflow, state.version)
        elif isinstance(command, StartRun):
            spec = self.specs.get(command.workflow, command.version)
            if spec is None:
                version = command.version or "latest"
                self._dead(
                    batch,
                    item,
                    "unknown_workflow",
                    f"workflow {command.workflow!r} version {version} is not deployed; "
                    "deploy it with `terranoha workflows deploy SPEC`",
                    now,
                    run_id,
                )
                return
        else:
            spec = None
        try:
            decision = process(state, command, spec, now, self._limits)
        except Exception as exc:  # a defect in the engine: keep the partition moving
            detail = "".join(traceback.format_exception_only(exc)).strip()
            self._dead(batch, item, "engine_error", f"{command.TYPE}: {detail}", now, run_id)
            return
        if decision.state is None:
            rejected = decision.events[0]
            reason = getattr(rejected, "reason", "rejected")
            self._dead(
                batch, item, "rejected", f"{reason}: {getattr(rejected, 'detail', '')}", now, run_id
            )
            return
        batch.states[run_id] = decision.state
        events = decision.events
        if not events:
            return
        batch.events.extend(events)
        batch.recorded.append(
            RecordedCommand(
                run_id=run_id,
                command=command,
                now=now,
                first_seq=events[0].seq,
                last_seq=events[-1].seq,
            )
        )
        batch.recorded_offsets.append(item.offset)
        batch.correlation.extend(subscription_changes(state, events, decision.state))
        if isinstance(command, CorrelateMessage):
            refused = refused_delivery(command, events)
            if refused is not None:
                batch.correlation.append(refused)
        workflow = decision.state.workflow
        for event in events:
            if isinstance(event, TimerArmed):
                batch.timers.append((run_id, event))
                continue
            for out in outgoing(event, workflow):
                if isinstance(out, TaskCommand):
                    batch.tasks.append(out)
                elif isinstance(out, Acquire | Release):
                    batch.admission.append(out)
                else:
                    batch.notifications.append(out)

    def _misrouted(self, command: Command, item: Input) -> str:
        home = (
            "another partition"
            if self.partition_of is None
            else f"partition {self.partition_of(command.run_id)}"
        )
        return (
            f"{command.TYPE} for run {command.run_id!r} reached partition {item.partition} "
            f"of {item.source}, but that run lives on {home}: every record of a run is "
            "keyed by its run id (UTF-8 bytes) and partitioned by Kafka's default "
            "partitioner (murmur2 of the key, modulo the partition count); send it "
            f"with key {command.run_id!r} and no explicit partition, or to {home}"
        )

    @staticmethod
    def _dead(
        batch: Batch, item: Input, reason: str, detail: str, now: int, run_id: str = ""
    ) -> None:
        batch.dead_letters.append(dead_letter_of(item, reason, detail, now, run_id))
