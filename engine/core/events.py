"""Events: what happened to a run. Past-tense names, never renamed.

Each event class is one (type, version). A change to an event's meaning is a new
version class with its own evolver; the old class stays so old logs still replay.
Every event carries run id, sequence number, timestamp (ms), tenant, correlation id
and causation id (the command that caused it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine.core.limits import KeyLimits


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    TYPE: ClassVar[str] = "Event"
    VERSION: ClassVar[int] = 1

    run_id: str
    seq: int
    ts: int
    tenant: str
    correlation_id: str
    causation_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RunStarted(Event):
    TYPE: ClassVar[str] = "RunStarted"
    workflow: str
    version: int
    input: Any
    idempotency_key: str
    requested_by: str
    priority: int
    sla_due_at: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StepStarted(Event):
    TYPE: ClassVar[str] = "StepStarted"
    step: str
    visit: int
    kind: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskDispatched(Event):
    """A task command went to ``queue``; ``phase`` is task, prepare or commit."""

    TYPE: ClassVar[str] = "TaskDispatched"
    step: str
    phase: str
    attempt: int
    task_id: str
    queue: str
    idempotency_key: str
    input: Any
    timeout_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskCompleted(Event):
    TYPE: ClassVar[str] = "TaskCompleted"
    step: str
    phase: str
    attempt: int
    task_id: str
    result: Any
    cost: float = 0.0
    confidence: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskFailed(Event):
    TYPE: ClassVar[str] = "TaskFailed"
    step: str
    phase: str
    attempt: int
    task_id: str
    error_class: str
    code: str
    message: str
    field: str | None = None
    cost: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryScheduled(Event):
    TYPE: ClassVar[str] = "RetryScheduled"
    step: str
    phase: str
    attempt: int
    delay_ms: int
    due_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerArmed(Event):
    """``kind``: retry, task_timeout, approval_reminder, approval_expiry, approval_sla,
    signal_timeout, sleep, run_sla. ``ref`` names what the timer belongs to (a task id,
    an approval id, a wait); the timer is dropped when that ends."""

    TYPE: ClassVar[str] = "TimerArmed"
    timer_id: str
    kind: str
    step: str
    ref: str
    due_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerFired(Event):
    TYPE: ClassVar[str] = "TimerFired"
    timer_id: str
    kind: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ApprovalRequested(Event):
    """``reason``: critical (before a write), prepare_commit (review a change set),
    review (a result routed to experts), approval (an approval step), escalation."""

    TYPE: ClassVar[str] = "ApprovalRequested"
    step: str
    approval_id: str
    reason: str
    approvers: list[str]
    quorum: int
    exclude_requester: bool
    requester: str
    payload: Any = None
    expires_at: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ApprovalVoted(Event):
    """One approval short of the quorum."""

    TYPE: ClassVar[str] = "ApprovalVoted"
    step: str
    approval_id: str
    approver: str
    comment: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ApprovalGranted(Event):
    TYPE: ClassVar[str] = "ApprovalGranted"
    step: str
    approval_id: str
    approvers: list[str]
    comment: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ApprovalRejected(Event):
    TYPE: ClassVar[str] = "ApprovalRejected"
    step: str
    approval_id: str
    approver: str
    comment: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ApprovalReminded(Event):
    TYPE: ClassVar[str] = "ApprovalReminded"
    step: str
    approval_id: str
    reminder: int
    approvers: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class ApprovalExpired(Event):
    TYPE: ClassVar[str] = "ApprovalExpired"
    step: str
    approval_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Escalated(Event):
    TYPE: ClassVar[str] = "Escalated"
    step: str
    to: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SignalAwaited(Event):
    """The run waits for signal ``name``. ``resume`` is complete (a wait_event step) or
    retry (a business error asked for more input; the step runs again on arrival)."""

    TYPE: ClassVar[str] = "SignalAwaited"
    step: str
    name: str
    key: str | None
    resume: str
    timeout_at: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SignalReceived(Event):
    TYPE: ClassVar[str] = "SignalReceived"
    name: str
    data: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class SleepStarted(Event):
    TYPE: ClassVar[str] = "SleepStarted"
    step: str
    until: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ChoiceEvaluated(Event):
    """``branch`` is the index of the first true ``when``, or -1 for the default."""

    TYPE: ClassVar[str] = "ChoiceEvaluated"
    step: str
    branch: int
    target: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class BusinessErrorHandled(Event):
    TYPE: ClassVar[str] = "BusinessErrorHandled"
    step: str
    code: str
    action: str
    target: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StepCompleted(Event):
    TYPE: ClassVar[str] = "StepCompleted"
    step: str
    result: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StepFailed(Event):
    TYPE: ClassVar[str] = "StepFailed"
    step: str
    error_class: str
    code: str
    message: str
    field: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SlaBreached(Event):
    """``scope`` is run or step."""

    TYPE: ClassVar[str] = "SlaBreached"
    scope: str
    step: str | None
    due_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RunCompleted(Event):
    TYPE: ClassVar[str] = "RunCompleted"
    output: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunFailed(Event):
    TYPE: ClassVar[str] = "RunFailed"
    step: str | None
    error_class: str
    code: str
    message: str
    field: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunCancelled(Event):
    TYPE: ClassVar[str] = "RunCancelled"
    reason: str
    by: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandRejected(Event):
    """A command that could not apply: kept in the log as an audit record, with no effect."""

    TYPE: ClassVar[str] = "CommandRejected"
    command_type: str
    command_id: str
    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandRejectedV2(CommandRejected):
    """A refused command, with who sent it (by: the approver, canceller or requester;
    empty for workers and timers) and the step it was about (at_step, may be empty).
    Version 1's fields and two more: replay --verify matches it with a version 1 event
    an older engine recorded when their common fields agree."""

    VERSION: ClassVar[int] = 2
    by: str = ""
    at_step: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotRequested(Event):
    """The task ``task_id`` waits for a slot on limit ``key`` before it is dispatched
    (flow control); ``limits`` are the key's limits of document ``limits_version``."""

    TYPE: ClassVar[str] = "SlotRequested"
    step: str
    phase: str
    attempt: int
    task_id: str
    key: str
    limits: KeyLimits
    limits_version: int
    lease_ms: int
    priority: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotReleased(Event):
    """The slot of ``task_id`` on ``key`` is given back (or its request withdrawn):
    ``outcome`` ok, failed or cancelled."""

    TYPE: ClassVar[str] = "SlotReleased"
    step: str
    task_id: str
    key: str
    outcome: str
    cost: float
    latency_ms: int


EVENT_TYPES: dict[tuple[str, int], type[Event]] = {
    (cls.TYPE, cls.VERSION): cls
    for cls in (
        RunStarted,
        StepStarted,
        TaskDispatched,
        TaskCompleted,
        TaskFailed,
        RetryScheduled,
        TimerArmed,
        TimerFired,
        ApprovalRequested,
        ApprovalVoted,
        ApprovalGranted,
        ApprovalRejected,
        ApprovalReminded,
        ApprovalExpired,
        Escalated,
        SignalAwaited,
        SignalReceived,
        SleepStarted,
        ChoiceEvaluated,
        BusinessErrorHandled,
        StepCompleted,
        StepFailed,
        SlaBreached,
        RunCompleted,
        RunFailed,
        RunCancelled,
        CommandRejected,
        CommandRejectedV2,
        SlotRequested,
        SlotReleased,
    )
}
"""Every event class by (type, version): the codec and the evolver registry use it."""

TERMINAL_EVENTS = (RunCompleted, RunFailed, RunCancelled)
