"""The records of schedules: the validated definition, commands, events and state.

A schedule starts runs of a workflow at nominal times given by a cron expression in an
IANA time zone, or by a fixed interval. Commands are keyed by ``schedule_id``; the
events of one schedule are its log; ``ScheduleState`` is their fold. The definition is
validated at the edge (``engine.runtime.schedule_spec``); the core trusts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar


class OverlapPolicy(StrEnum):
    """What a nominal time does while runs of the schedule are still going."""

    SKIP = "skip"
    """Record the nominal time as skipped and start nothing."""
    BUFFER_ONE = "buffer_one"
    """Keep one nominal time and start it when the running ones have ended; skip more."""
    ALLOW_ALL = "allow_all"
    """Start a run anyway."""
    CANCEL_OTHER = "cancel_other"
    """Cancel the running ones, then start a run."""


class FireReason(StrEnum):
    TICK = "tick"
    CATCH_UP = "catch_up"
    TRIGGER = "trigger"
    BACKFILL = "backfill"
    BUFFERED = "buffered"


class MissReason(StrEnum):
    OUTSIDE_WINDOW = "outside_window"
    """The engine was down (or behind) longer than the catch-up window."""
    PAUSED = "paused"


class SkipReason(StrEnum):
    OVERLAP = "overlap"
    BUFFER_FULL = "buffer_full"


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleSpec:
    """A validated schedule definition. Times are milliseconds since the epoch (UTC);
    durations are milliseconds. Exactly one of ``cron`` and ``interval`` is set."""

    TYPE: ClassVar[str] = "ScheduleSpec"
    VERSION: ClassVar[int] = 1
    schedule_id: str
    workflow: str
    version: int = 0
    """0: the latest deployed version when the run starts."""
    tenant: str = "default"
    input: Any = field(default_factory=dict)
    cron: str = ""
    """5 fields (minute first) or 6 (seconds first)."""
    interval: int = 0
    anchor: int = 0
    """Interval schedules fire at ``anchor + k * interval``."""
    timezone: str = "UTC"
    overlap: OverlapPolicy = OverlapPolicy.SKIP
    catch_up_window: int = 3_600_000
    """A nominal time later than this when the engine gets to it is missed, not run."""
    jitter: int = 0
    """Each nominal time fires up to this much later, by a delay derived from the
    schedule id and the nominal time (the same on every replay)."""
    paused: bool = False
    """Created paused."""


@dataclass(frozen=True, slots=True)
class ScheduledRun:
    run_id: str
    nominal: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleState:
    TYPE: ClassVar[str] = "ScheduleState"
    VERSION: ClassVar[int] = 1
    schedule_id: str
    spec: ScheduleSpec
    created_at: int
    paused: bool = False
    deleted: bool = False
    next_nominal: int | None = None
    """The next nominal time to consider; None when the calendar has no more."""
    running: tuple[ScheduledRun, ...] = ()
    buffered: int | None = None
    recent: tuple[int, ...] = ()
    """The nominal times started most recently, so a repeated ``trigger`` request (the
    same nominal time) is refused."""
    started: int = 0
    skipped: int = 0
    missed: int = 0
    last_started: int | None = None


# Commands: what someone asks a schedule to do. ``command_id`` is unique per request.


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleCommand:
    TYPE: ClassVar[str] = "ScheduleCommand"
    VERSION: ClassVar[int] = 1
    command_id: str
    schedule_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateSchedule(ScheduleCommand):
    TYPE: ClassVar[str] = "CreateSchedule"
    spec: ScheduleSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class PauseSchedule(ScheduleCommand):
    TYPE: ClassVar[str] = "PauseSchedule"
    by: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumeSchedule(ScheduleCommand):
    TYPE: ClassVar[str] = "ResumeSchedule"
    by: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteSchedule(ScheduleCommand):
    TYPE: ClassVar[str] = "DeleteSchedule"
    by: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TriggerSchedule(ScheduleCommand):
    """Start a run now. ``at`` (set by the edge that took the request) is its nominal
    time, so a repeated request is the same run."""

    TYPE: ClassVar[str] = "TriggerSchedule"
    at: int
    by: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class BackfillSchedule(ScheduleCommand):
    """Start a run for every nominal time in ``[start, end]``, whatever the overlap policy."""

    TYPE: ClassVar[str] = "BackfillSchedule"
    start: int
    end: int
    by: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class FireScheduleTick(ScheduleCommand):
    """The schedule's timer: ``nominal`` is due. Stale ticks are ignored."""

    TYPE: ClassVar[str] = "FireScheduleTick"
    nominal: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportRunEnded(ScheduleCommand):
    """Written by the run engine, in the transaction of the run's last event, when a run
    started by a schedule ends."""

    TYPE: ClassVar[str] = "ReportRunEnded"
    run_id: str
    outcome: str


# Events: what happened to a schedule. ``at`` is when it was decided.


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleEvent:
    TYPE: ClassVar[str] = "ScheduleEvent"
    VERSION: ClassVar[int] = 1
    schedule_id: str
    causation_id: str
    at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleCreated(ScheduleEvent):
    TYPE: ClassVar[str] = "ScheduleCreated"
    spec: ScheduleSpec
    next_nominal: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulePaused(ScheduleEvent):
    TYPE: ClassVar[str] = "SchedulePaused"
    by: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleResumed(ScheduleEvent):
    TYPE: ClassVar[str] = "ScheduleResumed"
    next_nominal: int | None
    by: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleDeleted(ScheduleEvent):
    TYPE: ClassVar[str] = "ScheduleDeleted"
    by: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduledRunStarted(ScheduleEvent):
    """Causes the ``StartRun`` of ``run_id`` on the run inputs, in the same transaction;
    it carries what that command needs, so the command is derived from the event alone."""

    TYPE: ClassVar[str] = "ScheduledRunStarted"
    nominal: int
    run_id: str
    reason: FireReason
    tenant: str
    workflow: str
    version: int
    input: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduledRunSkipped(ScheduleEvent):
    TYPE: ClassVar[str] = "ScheduledRunSkipped"
    nominal: int
    reason: SkipReason


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduledRunBuffered(ScheduleEvent):
    TYPE: ClassVar[str] = "ScheduledRunBuffered"
    nominal: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleTicksMissed(ScheduleEvent):
    """``count`` nominal times from ``first`` to ``last`` were not run. ``truncated``:
    there were more than could be counted; ``count`` is a lower bound."""

    TYPE: ClassVar[str] = "ScheduleTicksMissed"
    first: int
    last: int
    count: int
    reason: MissReason
    truncated: bool = False
    tenant: str = "default"


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleAdvanced(ScheduleEvent):
    TYPE: ClassVar[str] = "ScheduleAdvanced"
    next_nominal: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduledRunCancelRequested(ScheduleEvent):
    """Causes a ``CancelRun`` of ``run_id`` (overlap policy ``cancel_other``)."""

    TYPE: ClassVar[str] = "ScheduledRunCancelRequested"
    run_id: str
    nominal: int
    tenant: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduledRunEnded(ScheduleEvent):
    TYPE: ClassVar[str] = "ScheduledRunEnded"
    run_id: str
    nominal: int
    outcome: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleBackfilled(ScheduleEvent):
    TYPE: ClassVar[str] = "ScheduleBackfilled"
    start: int
    end: int
    count: int
    by: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleCommandRejected(ScheduleEvent):
    TYPE: ClassVar[str] = "ScheduleCommandRejected"
    command: str
    reason: str
    detail: str


SCHEDULE_COMMAND_TYPES: tuple[type[ScheduleCommand], ...] = (
    CreateSchedule,
    PauseSchedule,
    ResumeSchedule,
    DeleteSchedule,
    TriggerSchedule,
    BackfillSchedule,
    FireScheduleTick,
    ReportRunEnded,
)

SCHEDULE_EVENT_TYPES: tuple[type[ScheduleEvent], ...] = (
    ScheduleCreated,
    SchedulePaused,
    ScheduleResumed,
    ScheduleDeleted,
    ScheduledRunStarted,
    ScheduledRunSkipped,
    ScheduledRunBuffered,
    ScheduleTicksMissed,
    ScheduleAdvanced,
    ScheduledRunCancelRequested,
    ScheduledRunEnded,
    ScheduleBackfilled,
    ScheduleCommandRejected,
)
