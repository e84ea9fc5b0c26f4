"""The schedule core: ``decide`` and ``evolve`` for one schedule, with time as an input.

Exactly once per nominal time
-----------------------------
A schedule keeps ``next_nominal``, the next nominal time it has not decided about. A
tick decides every nominal time from there up to ``now`` and moves ``next_nominal``
past them in the same events, so no nominal time is decided twice; each gets exactly
one outcome: started, skipped or buffered (overlap policy), or missed (later than the
catch-up window, or while paused; recorded as a range with a count, never dropped).

The run of a nominal time has the idempotency key ``schedule:<id>@<nominal>`` and so
the run id ``run_id_for(tenant, key)``: a backfill or a trigger that names a nominal
time that already ran addresses the same run, which the run engine refuses to start
again.

The calendar (cron in a time zone) is passed in: computing it needs time-zone data, and
the core does no I/O. ``engine.runtime.schedule_spec.CronCalendar`` is the real one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Protocol

from engine.core.commands import CancelRun, Command, StartRun
from engine.core.events import Event
from engine.core.outbox import Notification, NotificationKind
from engine.core.policies import run_id_for
from engine.core.schedule_records import (
    BackfillSchedule,
    CreateSchedule,
    DeleteSchedule,
    FireReason,
    FireScheduleTick,
    MissReason,
    OverlapPolicy,
    PauseSchedule,
    ReportRunEnded,
    ResumeSchedule,
    ScheduleAdvanced,
    ScheduleBackfilled,
    ScheduleCommand,
    ScheduleCommandRejected,
    ScheduleCreated,
    ScheduleDeleted,
    ScheduledRun,
    ScheduledRunBuffered,
    ScheduledRunCancelRequested,
    ScheduledRunEnded,
    ScheduledRunSkipped,
    ScheduledRunStarted,
    ScheduleEvent,
    SchedulePaused,
    ScheduleResumed,
    ScheduleSpec,
    ScheduleState,
    ScheduleTicksMissed,
    SkipReason,
    TriggerSchedule,
)
from engine.core.state import RunState

MAX_STARTS_PER_TICK = 500
"""Nominal times one tick decides; the rest are decided by the next tick, due at once."""
MAX_COUNTED_MISSES = 100_000
"""Missed nominal times counted one by one; past that the count is a lower bound."""
MAX_BACKFILL = 1000
"""Nominal times one backfill may start."""
TRIGGER_MEMORY = 64
"""Started nominal times remembered to refuse a repeated trigger request."""

LATE_MS = 1000
"""A tick decided this long after it was due is a catch-up (recorded as such)."""

KEY_PREFIX = "schedule:"


class Calendar(Protocol):
    def next_cron(self, expr: str, timezone: str, after: int) -> int | None:
        """The first nominal time of ``expr`` in ``timezone`` strictly after ``after``."""
        ...


def next_after(spec: ScheduleSpec, after: int, calendar: Calendar) -> int | None:
    """The first nominal time of ``spec`` strictly after ``after`` (ms)."""
    if spec.interval:
        if after < spec.anchor:
            return spec.anchor
        return spec.anchor + ((after - spec.anchor) // spec.interval + 1) * spec.interval
    return calendar.next_cron(spec.cron, spec.timezone, after)


def nominal_times(
    spec: ScheduleSpec, start: int, end: int, calendar: Calendar, limit: int
) -> Iterator[int]:
    """Nominal times in ``[start, end]``, at most ``limit`` of them."""
    at = next_after(spec, start - 1, calendar)
    while at is not None and at <= end and limit > 0:
        yield at
        limit -= 1
        at = next_after(spec, at, calendar)


def jitter_delay(schedule_id: str, nominal: int, jitter: int) -> int:
    """How long after ``nominal`` it fires: in ``[0, jitter]``, from a hash of the schedule
    and the nominal time, so replay and every process agree."""
    if jitter <= 0:
        return 0
    digest = hashlib.blake2b(f"{schedule_id}\x1f{nominal}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (jitter + 1)


def due_at(state: ScheduleState) -> int | None:
    """When the schedule's next tick is due (None: no timer)."""
    if state.deleted or state.paused or state.next_nominal is None:
        return None
    return state.next_nominal + jitter_delay(
        state.schedule_id, state.next_nominal, state.spec.jitter
    )


def idempotency_key(schedule_id: str, nominal: int) -> str:
    return f"{KEY_PREFIX}{schedule_id}@{nominal}"


def run_id_of(spec: ScheduleSpec, nominal: int) -> str:
    """The run of ``spec`` at ``nominal``: the same on every backend, every replay."""
    return run_id_for(spec.tenant, idempotency_key(spec.schedule_id, nominal))


def schedule_origin(idempotency: str) -> tuple[str, int] | None:
    """(schedule id, nominal time) of a run's idempotency key, if a schedule started it."""
    if not idempotency.startswith(KEY_PREFIX) or "@" not in idempotency:
        return None
    schedule_id, _, nominal = idempotency[len(KEY_PREFIX) :].rpartition("@")
    return (schedule_id, int(nominal)) if nominal.isdigit() and schedule_id else None


class _Decision:
    """Events of one command, each folded as it is emitted."""

    def __init__(
        self, state: ScheduleState | None, command: ScheduleCommand, now: int, calendar: Calendar
    ) -> None:
        self.state = state
        self.command = command
        self.now = now
        self.calendar = calendar
        self.events: list[ScheduleEvent] = []

    def emit(self, cls: type[ScheduleEvent], **fields: object) -> None:
        event = cls(
            schedule_id=self.command.schedule_id,
            causation_id=self.command.command_id,
            at=self.now,
            **fields,
        )
        self.events.append(event)
        self.state = evolve(self.state, event)

    def reject(self, reason: str, detail: str) -> None:
        self.emit(ScheduleCommandRejected, command=self.command.TYPE, reason=reason, detail=detail)

    @property
    def current(self) -> ScheduleState:
        assert self.state is not None
        return self.state

    def fire(self, nominal: int, reason: FireReason) -> None:
        """Start ``nominal``'s run, as the overlap policy says."""
        state = self.current
        policy = state.spec.overlap
        if state.running and reason is not FireReason.BACKFILL:
            if policy is OverlapPolicy.SKIP:
                self.emit(ScheduledRunSkipped, nominal=nominal, reason=SkipReason.OVERLAP)
                return
            if policy is OverlapPolicy.BUFFER_ONE:
                if state.buffered is None:
                    self.emit(ScheduledRunBuffered, nominal=nominal)
                else:
                    self.emit(ScheduledRunSkipped, nominal=nominal, reason=SkipReason.BUFFER_FULL)
                return
            if policy is OverlapPolicy.CANCEL_OTHER:
                for run in state.running:
                    self.emit(
                        ScheduledRunCancelRequested,
                        run_id=run.run_id,
                        nominal=run.nominal,
                        tenant=state.spec.tenant,
                    )
        spec = state.spec
        self.emit(
            ScheduledRunStarted,
            nominal=nominal,
            run_id=run_id_of(spec, nominal),
            reason=reason,
            tenant=spec.tenant,
            workflow=spec.workflow,
            version=spec.version,
            input=spec.input,
        )

    def miss(self, reason: MissReason, first: int, until: int) -> int | None:
        """Record the nominal times from ``first`` up to ``until`` (exclusive) as missed;
        return the first nominal time at or after ``until``."""
        spec, count, last = self.current.spec, 0, first
        at: int | None = first
        while at is not None and at < until and count < MAX_COUNTED_MISSES:
            count, last = count + 1, at
            at = next_after(spec, at, self.calendar)
        truncated = at is not None and at < until
        if truncated:
            at = next_after(spec, until - 1, self.calendar)
        if count:
            self.emit(
                ScheduleTicksMissed,
                first=first,
                last=last,
                count=count,
                reason=reason,
                truncated=truncated,
                tenant=spec.tenant,
            )
        return at


Handler = Callable[[_Decision, ScheduleCommand], None]
_HANDLERS: dict[type[ScheduleCommand], Handler] = {}


def _handles(cls: type[ScheduleCommand]) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _HANDLERS[cls] = fn
        return fn

    return register


def decide(
    state: ScheduleState | None, command: ScheduleCommand, now: int, calendar: Calendar
) -> list[ScheduleEvent]:
    """The events ``command`` causes at ``now`` (ms). Never raises on bad input: a command
    that cannot apply is a ``ScheduleCommandRejected``; one for a schedule that does not
    exist (or a stale tick) causes nothing."""
    decision = _Decision(state, command, now, calendar)
    handler = _HANDLERS.get(type(command))
    if handler is None:
        return []
    if not isinstance(command, CreateSchedule) and (state is None or state.deleted):
        return []
    handler(decision, command)
    return decision.events


@_handles(CreateSchedule)
def _create(d: _Decision, c: ScheduleCommand) -> None:
    assert isinstance(c, CreateSchedule)
    if d.state is not None and not d.state.deleted:
        if d.state.spec != c.spec:
            d.reject(
                "exists",
                f"schedule {c.schedule_id!r} exists with another definition; delete it first",
            )
        return
    if c.spec.schedule_id != c.schedule_id:
        d.reject("id mismatch", f"the definition names {c.spec.schedule_id!r}")
        return
    d.emit(ScheduleCreated, spec=c.spec, next_nominal=next_after(c.spec, d.now, d.calendar))


@_handles(PauseSchedule)
def _pause(d: _Decision, c: ScheduleCommand) -> None:
    assert isinstance(c, PauseSchedule)
    if not d.current.paused:
        d.emit(SchedulePaused, by=c.by)


@_handles(ResumeSchedule)
def _resume(d: _Decision, c: ScheduleCommand) -> None:
    assert isinstance(c, ResumeSchedule)
    state = d.current
    if not state.paused:
        return
    if state.next_nominal is not None:
        d.miss(MissReason.PAUSED, state.next_nominal, d.now + 1)
    d.emit(ScheduleResumed, next_nominal=next_after(state.spec, d.now, d.calendar), by=c.by)
    state = d.current
    if state.buffered is not None and not state.running:
        d.fire(state.buffered, FireReason.BUFFERED)  # its run ended while paused


@_handles(DeleteSchedule)
def _delete(d: _Decision, c: ScheduleCommand) -> None:
    assert isinstance(c, DeleteSchedule)
    d.emit(ScheduleDeleted, by=c.by)


@_handles(FireScheduleTick)
def _tick(d: _Decision, c: ScheduleCommand) -> None:
    assert isinstance(c, FireScheduleTick)
    state = d.current
    due = due_at(state)
    if c.nominal != state.next_nominal or due is None or due > d.now:
        return  # stale, early, or paused: the timer that applies is re-armed from state
    spec, started = state.spec, 0
    at: int | None = state.next_nominal
    oldest = d.now - spec.catch_up_window
    if at is not None and at < oldest:
        at = d.miss(MissReason.OUTSIDE_WINDOW, at, oldest)
    while (
        at is not None
        and started < MAX_STARTS_PER_TICK
        and at + jitter_delay(spec.schedule_id, at, spec.jitter) <= d.now
    ):
        late = d.now - at - jitter_delay(spec.schedule_id, at, spec.jitter) > LATE_MS
        d.fire(at, FireReason.CATCH_UP if late else FireReason.TICK)
        started += 1
        at = next_after(spec, at, d.calendar)
    d.emit(ScheduleAdvanced, next_nominal=at)


@_handles(TriggerSchedule)
def _trigger(d: _Decision, c: ScheduleCommand) -> None:
    assert isinstance(c, TriggerSchedule)
    state = d.current
    if c.at in state.recent or c.at == state.buffered:
        return  # the same request again
    d.fire(c.at, FireReason.TRIGGER)


@_handles(BackfillSchedule)
def _backfill(d: _Decision, c: ScheduleCommand) -> None:
    assert isinstance(c, BackfillSchedule)
    if c.end < c.start:
        d.reject("bad range", "end is before start: give --from earlier than --to")
        return
    spec = d.current.spec
    times = list(nominal_times(spec, c.start, c.end, d.calendar, MAX_BACKFILL + 1))
    if len(times) > MAX_BACKFILL:
        d.reject(
            "too many",
            f"the range holds more than {MAX_BACKFILL} nominal times; "
            "backfill it in smaller ranges",
        )
        return
    d.emit(ScheduleBackfilled, start=c.start, end=c.end, count=len(times), by=c.by)
    for nominal in times:
        d.fire(nominal, FireReason.BACKFILL)


@_handles(ReportRunEnded)
def _run_ended(d: _Decision, c: ScheduleCommand) -> None:
    assert isinstance(c, ReportRunEnded)
    state = d.current
    run = next((r for r in state.running if r.run_id == c.run_id), None)
    if run is None:
        return  # reported again, or a run this schedule no longer tracks
    d.emit(ScheduledRunEnded, run_id=run.run_id, nominal=run.nominal, outcome=c.outcome)
    state = d.current
    if state.buffered is not None and not state.running and not state.paused:
        d.fire(state.buffered, FireReason.BUFFERED)


# evolve: the only code that changes a schedule's state; live and replay share it.

Evolver = Callable[[ScheduleState, ScheduleEvent], ScheduleState]
EVOLVERS: dict[type[ScheduleEvent], Evolver] = {}


def _evolves(cls: type[ScheduleEvent]) -> Callable[[Evolver], Evolver]:
    def register(fn: Evolver) -> Evolver:
        EVOLVERS[cls] = fn
        return fn

    return register


def evolve(state: ScheduleState | None, event: ScheduleEvent) -> ScheduleState:
    """``state`` after ``event``. Total: an event for a schedule that was never created
    (which ``decide`` never emits) leaves an empty deleted schedule."""
    if isinstance(event, ScheduleCreated):
        return ScheduleState(
            schedule_id=event.schedule_id,
            spec=event.spec,
            created_at=event.at,
            paused=event.spec.paused,
            next_nominal=event.next_nominal,
        )
    if state is None:
        spec = ScheduleSpec(schedule_id=event.schedule_id, workflow="")
        state = ScheduleState(
            schedule_id=event.schedule_id, spec=spec, created_at=event.at, deleted=True
        )
    fold = EVOLVERS.get(type(event))
    return fold(state, event) if fold is not None else state


@_evolves(SchedulePaused)
def _paused(state: ScheduleState, event: ScheduleEvent) -> ScheduleState:
    return replace(state, paused=True)


@_evolves(ScheduleResumed)
def _resumed(state: ScheduleState, event: ScheduleEvent) -> ScheduleState:
    assert isinstance(event, ScheduleResumed)
    return replace(state, paused=False, next_nominal=event.next_nominal)


@_evolves(ScheduleDeleted)
def _deleted(state: ScheduleState, event: ScheduleEvent) -> ScheduleState:
    return replace(state, deleted=True)


@_evolves(ScheduledRunStarted)
def _started(state: ScheduleState, event: ScheduleEvent) -> ScheduleState:
    assert isinstance(event, ScheduledRunStarted)
    recent = (*state.recent, event.nominal)[-TRIGGER_MEMORY:]
    buffered = None if event.reason is FireReason.BUFFERED else state.buffered
    return replace(
        state,
        running=(*state.running, ScheduledRun(event.run_id, event.nominal)),
        started=state.started + 1,
        last_started=event.nominal,
        recent=recent,
        buffered=buffered,
    )


@_evolves(ScheduledRunSkipped)
def _skipped(state: ScheduleState, event: ScheduleEvent) -> ScheduleState:
    return replace(state, skipped=state.skipped + 1)


@_evolves(ScheduledRunBuffered)
def _buffered(state: ScheduleState, event: ScheduleEvent) -> ScheduleState:
    assert isinstance(event, ScheduledRunBuffered)
    return replace(state, buffered=event.nominal)


@_evolves(ScheduleTicksMissed)
def _missed(state: ScheduleState, event: ScheduleEvent) -> ScheduleState:
    assert isinstance(event, ScheduleTicksMissed)
    return replace(state, missed=state.missed + event.count)


@_evolves(ScheduleAdvanced)
def _advanced(state: ScheduleState, event: ScheduleEvent) -> ScheduleState:
    assert isinstance(event, ScheduleAdvanced)
    return replace(state, next_nominal=event.next_nominal)


@_evolves(ScheduledRunEnded)
@_evolves(ScheduledRunCancelRequested)
def _ended(state: ScheduleState, event: ScheduleEvent) -> ScheduleState:
    """A run asked to cancel no longer counts as running: it is not cancelled twice, and
    its end, when reported, changes nothing."""
    assert isinstance(event, ScheduledRunEnded | ScheduledRunCancelRequested)
    return replace(state, running=tuple(r for r in state.running if r.run_id != event.run_id))


for _cls in (ScheduleBackfilled, ScheduleCommandRejected):
    EVOLVERS[_cls] = lambda state, event: state  # recorded for the log; state unchanged


def outputs(event: ScheduleEvent) -> Sequence[Command]:
    """The run commands an event causes (written in the event's transaction)."""
    if isinstance(event, ScheduledRunStarted):
        key = idempotency_key(event.schedule_id, event.nominal)
        return [
            StartRun(
                command_id=key,
                run_id=event.run_id,
                tenant=event.tenant,
                correlation_id=event.run_id,
                workflow=event.workflow,
                version=event.version,
                input=event.input,
                idempotency_key=key,
                requested_by=f"{KEY_PREFIX}{event.schedule_id}",
            )
        ]
    if isinstance(event, ScheduledRunCancelRequested):
        return [
            CancelRun(
                command_id=f"{event.causation_id}/cancel/{event.run_id}",
                run_id=event.run_id,
                tenant=event.tenant,
                correlation_id=event.run_id,
                reason=f"overlap policy cancel_other of schedule {event.schedule_id}",
                by=f"{KEY_PREFIX}{event.schedule_id}",
            )
        ]
    return []


def alerts(event: ScheduleEvent) -> list[Notification]:
    """The notifications an event causes: nominal times missed outside the catch-up
    window are an alert (those of a pause were asked for, and are only recorded)."""
    if not isinstance(event, ScheduleTicksMissed) or event.reason is not MissReason.OUTSIDE_WINDOW:
        return []
    more = "+" if event.truncated else ""
    return [
        Notification(
            kind=NotificationKind.SCHEDULE_MISSED.value,
            run_id="",
            step=event.schedule_id,
            approval_id="",
            recipients=[],
            message=(
                f"schedule {event.schedule_id} missed {event.count}{more} nominal time(s) "
                f"from {event.first} to {event.last} (ms since the epoch): later than its "
                "catch-up window when the engine got to them"
            ),
            ts=event.at,
            tenant=event.tenant,
            correlation_id=event.causation_id,
        )
    ]


TERMINAL_EVENTS = frozenset({"RunCompleted", "RunFailed", "RunCancelled"})


def run_ended_reports(
    events: Iterable[Event], states: Mapping[str, RunState]
) -> list[ReportRunEnded]:
    """What the run engine tells the schedules in the transaction of a batch: one
    ``ReportRunEnded`` for each run started by a schedule that ended in it, or whose
    repeated start it refused after it had ended."""
    reports: list[ReportRunEnded] = []
    for event in events:
        state = states.get(event.run_id)
        # A repeated StartRun (a backfill over a nominal time that ran) of an ended run
        # is refused: the schedule counts that run as running until it hears it ended.
        refused_start = (
            event.TYPE == "CommandRejected"
            and state is not None
            and state.terminal
            and getattr(event, "command_type", "") == "StartRun"
        )
        if event.TYPE not in TERMINAL_EVENTS and not refused_start:
            continue
        origin = schedule_origin(state.idempotency_key) if state is not None else None
        if origin is None or state is None:
            continue
        reports.append(
            ReportRunEnded(
                command_id=f"ended:{event.run_id}",
                schedule_id=origin[0],
                run_id=event.run_id,
                outcome=state.status.value,
            )
        )
    return reports


def timers(state: ScheduleState) -> list[FireScheduleTick]:
    """The tick the state asks for (at ``due_at(state)``)."""
    if due_at(state) is None or state.next_nominal is None:
        return []
    return [
        FireScheduleTick(
            command_id=f"tick:{state.schedule_id}@{state.next_nominal}",
            schedule_id=state.schedule_id,
            nominal=state.next_nominal,
        )
    ]
