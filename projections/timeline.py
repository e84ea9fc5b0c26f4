"""The timeline of a run, folded from its events: steps, states, durations, attempts,
waits, approver decisions, payloads, cost and SLA state. Pure: the CLI, the SQLite and
PostgreSQL projectors and the timeline topic all build it with ``apply``.

``apply`` folds one event at a time into a mutable ``Timeline``, so a projector can keep
one per run and feed it batch after batch; ``timeline_to_dict`` / ``timeline_from_dict``
give the compact JSON form a projector stores between batches. An event whose sequence
number is not above the last one applied is ignored, so feeding an event twice changes
nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from engine.core import events as ev
from engine.core.durations import format_duration
from engine.core.kinds import HandlerAction, TimerKind
from engine.core.state import RunStatus


class StepStatus(StrEnum):
    """Where a step visit stands in a timeline."""

    RUNNING = "running"
    RETRY = "retry"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    BRANCHED = "branched"
    """A business error's handler went to another step."""
    CANCELLED = "cancelled"


@dataclass(slots=True)
class StepEntry:
    """One visit of one step. ``input`` is the task input of the latest attempt,
    ``payload`` what an approval was asked about, ``signal`` the signal (name and data)
    that resumed the step."""

    step: str
    visit: int
    kind: str
    started_at: int
    status: str = StepStatus.RUNNING
    ended_at: int | None = None
    attempts: int = 0
    waited_ms: int = 0
    cost: float = 0.0
    decisions: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""
    result: Any = None
    _wait_from: int | None = None
    input: Any = None
    payload: Any = None
    signal: Any = None

    @property
    def duration_ms(self) -> int | None:
        return None if self.ended_at is None else self.ended_at - self.started_at


@dataclass(slots=True)
class Timeline:
    """A run as operators read it. ``sla_breached`` is about the run's own SLA (breached
    when it fired, or when the run ended after ``sla_due_at``); ``sla_breaches`` counts
    every SLA breach event, step SLAs included. ``approval_since``/``approval_due_at``
    describe the approval the run is waiting for, if any. ``rejections`` lists the refused
    commands: what was refused, who sent it (when the event says: ``CommandRejected`` v2),
    the step it was about, why. ``redacted`` holds the fingerprints of the values redaction
    hid in this run (``engine.runtime.redaction``): fold state, like a step's ``_wait_from``,
    that ``timeline_view`` leaves out."""

    run_id: str
    workflow: str = ""
    version: int = 0
    tenant: str = ""
    correlation_id: str = ""
    status: str = RunStatus.PENDING
    started_at: int = 0
    ended_at: int | None = None
    cost: float = 0.0
    attempts: int = 0
    escalations: int = 0
    sla_breaches: int = 0
    rejected_commands: int = 0
    error: dict[str, Any] | None = None
    steps: list[StepEntry] = field(default_factory=list)
    requested_by: str = ""
    input: Any = None
    output: Any = None
    sla_due_at: int | None = None
    sla_breached: bool = False
    approval_id: str = ""
    approval_since: int | None = None
    approval_due_at: int | None = None
    last_seq: int = 0
    updated_at: int = 0
    events: int = 0
    redacted: list[str] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)

    @property
    def duration_ms(self) -> int | None:
        return None if self.ended_at is None else self.ended_at - self.started_at


def build_timeline(events: Iterable[ev.Event]) -> Timeline:
    timeline: Timeline | None = None
    for event in events:
        if timeline is None:
            timeline = Timeline(run_id=event.run_id)
        apply(timeline, event)
    if timeline is None:
        raise ValueError("a timeline needs at least one event")
    return timeline


def _current(t: Timeline, step: str) -> StepEntry | None:
    for entry in reversed(t.steps):
        if entry.step == step:
            return entry
    return None


def _end_wait(entry: StepEntry, ts: int) -> None:
    if entry._wait_from is not None:
        entry.waited_ms += ts - entry._wait_from
        entry._wait_from = None


def _cost(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _approval_over(t: Timeline, approval_id: str | None = None) -> None:
    if approval_id is None or approval_id == t.approval_id:
        t.approval_id, t.approval_since, t.approval_due_at = "", None, None


def _ended(t: Timeline, status: RunStatus, ts: int) -> None:
    t.status, t.ended_at = status, ts
    _approval_over(t)
    if t.sla_due_at is not None and ts > t.sla_due_at:
        t.sla_breached = True


def apply(t: Timeline, e: ev.Event) -> None:
    """Fold one event into the timeline (events at or below ``last_seq`` are ignored).

    Each event type has one fold in ``_FOLDS``; a fold about a step gets the step's
    latest entry and is skipped when the timeline has none (a step it never saw start)."""
    if e.seq <= t.last_seq:
        return
    t.last_seq, t.updated_at, t.events = e.seq, e.ts, t.events + 1
    fold = _FOLDS.get(type(e))
    if fold is None:
        return
    if fold.about_step:
        entry = _current(t, e.step)  # type: ignore[attr-defined]  # every such event has one
        if entry is not None:
            fold.fn(t, entry, e)
    else:
        fold.fn(t, None, e)


_Fn = Callable[[Timeline, Any, Any], None]


@dataclass(frozen=True, slots=True)
class _Fold:
    fn: _Fn
    about_step: bool


_FOLDS: dict[type[ev.Event], _Fold] = {}
IGNORED: tuple[type[ev.Event], ...] = (
    ev.TimerFired,
    ev.ChoiceEvaluated,
    ev.ApprovalReminded,
    ev.SlotReleased,
)
"""Events that change nothing an operator reads in a timeline (beyond ``events``)."""


def _folds(*event_types: type[ev.Event], about_step: bool = False) -> Callable[[_Fn], _Fn]:
    def register(fn: _Fn) -> _Fn:
        for event_type in event_types:
            _FOLDS[event_type] = _Fold(fn, about_step)
        return fn

    return register


@_folds(ev.RunStarted)
def _run_started(t: Timeline, _: None, e: ev.RunStarted) -> None:
    t.workflow, t.version, t.tenant = e.workflow, e.version, e.tenant
    t.correlation_id, t.started_at, t.status = e.correlation_id, e.ts, RunStatus.RUNNING
    t.requested_by, t.input, t.sla_due_at = e.requested_by, e.input, e.sla_due_at


@_folds(ev.StepStarted)
def _step_started(t: Timeline, _: None, e: ev.StepStarted) -> None:
    t.steps.append(StepEntry(step=e.step, visit=e.visit, kind=e.kind, started_at=e.ts))
    t.status = RunStatus.RUNNING


@_folds(ev.TaskDispatched, about_step=True)
def _task_dispatched(t: Timeline, entry: StepEntry, e: ev.TaskDispatched) -> None:
    entry.attempts += 1
    t.attempts += 1
    entry.input = e.input
    _end_wait(entry, e.ts)
    entry.status = StepStatus.RUNNING
    t.status = RunStatus.RUNNING


@_folds(ev.TaskCompleted, about_step=True)
def _task_completed(t: Timeline, entry: StepEntry, e: ev.TaskCompleted) -> None:
    entry.cost += _cost(e.cost)
    t.cost += _cost(e.cost)
    entry.result = e.result


@_folds(ev.TaskFailed, about_step=True)
def _task_failed(t: Timeline, entry: StepEntry, e: ev.TaskFailed) -> None:
    entry.cost += _cost(e.cost)
    t.cost += _cost(e.cost)
    entry.errors.append(
        {"attempt": e.attempt, "class": e.error_class, "code": e.code, "message": e.message}
    )


@_folds(ev.RetryScheduled, about_step=True)
def _retry_scheduled(t: Timeline, entry: StepEntry, e: ev.RetryScheduled) -> None:
    entry.status = StepStatus.RETRY
    entry._wait_from = e.ts
    t.status = RunStatus.RETRY


@_folds(ev.ApprovalRequested, ev.SignalAwaited, ev.SleepStarted, ev.SlotRequested, about_step=True)
def _wait_began(
    t: Timeline,
    entry: StepEntry,
    e: ev.ApprovalRequested | ev.SignalAwaited | ev.SleepStarted | ev.SlotRequested,
) -> None:
    # A task held for a slot (flow control) waits until its dispatch: held time is wait
    # time, apart from the task's execution.
    entry.status = StepStatus.WAITING
    entry._wait_from = e.ts
    t.status = RunStatus.WAITING
    if isinstance(e, ev.ApprovalRequested):
        entry.payload = e.payload
        t.approval_id, t.approval_since, t.approval_due_at = e.approval_id, e.ts, e.expires_at


@_folds(ev.TimerArmed)
def _timer_armed(t: Timeline, _: None, e: ev.TimerArmed) -> None:
    if e.kind == TimerKind.APPROVAL_SLA and t.approval_id and e.ref == t.approval_id:
        due = t.approval_due_at
        t.approval_due_at = e.due_at if due is None else min(due, e.due_at)


@_folds(ev.ApprovalVoted, about_step=True)
def _approval_voted(t: Timeline, entry: StepEntry, e: ev.ApprovalVoted) -> None:
    entry.decisions.append({"approver": e.approver, "decision": "approved", "ts": e.ts})


@_folds(ev.ApprovalGranted, about_step=True)
def _approval_granted(t: Timeline, entry: StepEntry, e: ev.ApprovalGranted) -> None:
    if e.approvers:
        entry.decisions.append({"approver": e.approvers[-1], "decision": "approved", "ts": e.ts})
    _end_wait(entry, e.ts)
    _approval_over(t, e.approval_id)
    entry.status = StepStatus.RUNNING
    t.status = RunStatus.RUNNING


@_folds(ev.ApprovalRejected, about_step=True)
def _approval_rejected(t: Timeline, entry: StepEntry, e: ev.ApprovalRejected) -> None:
    entry.decisions.append({"approver": e.approver, "decision": "rejected", "ts": e.ts})
    _end_wait(entry, e.ts)
    _approval_over(t, e.approval_id)


@_folds(ev.ApprovalExpired, about_step=True)
def _approval_expired(t: Timeline, entry: StepEntry, e: ev.ApprovalExpired) -> None:
    entry.decisions.append({"approver": "", "decision": "expired", "ts": e.ts})
    _end_wait(entry, e.ts)
    _approval_over(t, e.approval_id)


@_folds(ev.Escalated, about_step=True)
def _escalated(t: Timeline, entry: StepEntry, e: ev.Escalated) -> None:
    t.escalations += 1
    entry.note = f"escalated to {e.to}"


@_folds(ev.SignalReceived)
def _signal_received(t: Timeline, _: None, e: ev.SignalReceived) -> None:
    last = t.steps[-1] if t.steps else None
    if last is not None and last.status == StepStatus.WAITING:
        _end_wait(last, e.ts)
        last.signal = {"name": e.name, "data": e.data}


@_folds(ev.BusinessErrorHandled, about_step=True)
def _business_error_handled(t: Timeline, entry: StepEntry, e: ev.BusinessErrorHandled) -> None:
    _end_wait(entry, e.ts)
    entry.note = f"{e.code}: {e.action} {e.target}"
    if e.action == HandlerAction.GOTO:
        entry.status, entry.ended_at = StepStatus.BRANCHED, e.ts


@_folds(ev.StepCompleted, about_step=True)
def _step_completed(t: Timeline, entry: StepEntry, e: ev.StepCompleted) -> None:
    _end_wait(entry, e.ts)
    entry.status, entry.ended_at, entry.result = StepStatus.COMPLETED, e.ts, e.result
    _approval_over(t)


@_folds(ev.StepFailed, about_step=True)
def _step_failed(t: Timeline, entry: StepEntry, e: ev.StepFailed) -> None:
    _end_wait(entry, e.ts)
    entry.status, entry.ended_at = StepStatus.FAILED, e.ts
    entry.note = f"{e.code}: {e.message}"
    _approval_over(t)


@_folds(ev.SlaBreached)
def _sla_breached(t: Timeline, _: None, e: ev.SlaBreached) -> None:
    t.sla_breaches += 1
    if e.scope == "run":
        t.sla_breached = True


@_folds(ev.CommandRejected, ev.CommandRejectedV2)
def _command_rejected(t: Timeline, _: None, e: ev.CommandRejected) -> None:
    t.rejected_commands += 1
    by, at_step = (e.by, e.at_step) if isinstance(e, ev.CommandRejectedV2) else ("", "")
    t.rejections.append(
        {
            "seq": e.seq,
            "ts": e.ts,
            "command": e.command_type,
            "by": by,
            "step": at_step,
            "reason": e.reason,
            "detail": e.detail,
        }
    )


@_folds(ev.RunCompleted)
def _run_completed(t: Timeline, _: None, e: ev.RunCompleted) -> None:
    t.output = e.output
    _ended(t, RunStatus.COMPLETED, e.ts)


@_folds(ev.RunFailed)
def _run_failed(t: Timeline, _: None, e: ev.RunFailed) -> None:
    _ended(t, RunStatus.FAILED, e.ts)
    t.error = {
        "step": e.step,
        "class": e.error_class,
        "code": e.code,
        "message": e.message,
        "field": e.field,
    }


@_folds(ev.RunCancelled)
def _run_cancelled(t: Timeline, _: None, e: ev.RunCancelled) -> None:
    _ended(t, RunStatus.CANCELLED, e.ts)
    for open_entry in t.steps:
        if open_entry.ended_at is None:
            _end_wait(open_entry, e.ts)
            open_entry.status, open_entry.ended_at = StepStatus.CANCELLED, e.ts


# --------------------------------------------------------------------------- JSON form

_STEP_FIELDS = tuple(f.name for f in fields(StepEntry))
_TIMELINE_FIELDS = tuple(f.name for f in fields(Timeline) if f.name != "steps")


def timeline_to_dict(t: Timeline) -> dict[str, Any]:
    """The whole fold state as JSON-able values; ``timeline_from_dict`` reads it back.
    Lists are copied, payload values are shared (``apply`` replaces them, never edits)."""
    out: dict[str, Any] = {name: getattr(t, name) for name in _TIMELINE_FIELDS}
    out["steps"] = [_step_to_dict(s) for s in t.steps]
    out["redacted"] = list(t.redacted)
    out["rejections"] = list(t.rejections)
    return out


_FOLD_STATE = ("redacted",)


def timeline_view(t: Timeline) -> dict[str, Any]:
    """What a reader sees (``timeline --json``): the timeline with durations, without the
    fold's own state (the redaction fingerprints, when an open wait began)."""
    out = {k: v for k, v in timeline_to_dict(t).items() if k not in _FOLD_STATE}
    out["duration_ms"] = t.duration_ms
    out["steps"] = [
        {
            **{k: v for k, v in _step_to_dict(s).items() if not k.startswith("_")},
            "duration_ms": s.duration_ms,
        }
        for s in t.steps
    ]
    return out


def _step_to_dict(s: StepEntry) -> dict[str, Any]:
    out = {name: getattr(s, name) for name in _STEP_FIELDS}
    out["decisions"] = list(s.decisions)
    out["errors"] = list(s.errors)
    return out


def timeline_from_dict(data: Mapping[str, Any]) -> Timeline:
    """Read ``timeline_to_dict``'s output (keys it does not know are ignored, missing ones
    take their defaults, so states written by an older version still load)."""
    known = {k: v for k, v in data.items() if k in _TIMELINE_FIELDS}
    timeline = Timeline(**known)
    timeline.redacted, timeline.rejections = list(timeline.redacted), list(timeline.rejections)
    for item in data.get("steps") or ():
        step = StepEntry(**{k: v for k, v in item.items() if k in _STEP_FIELDS})
        step.decisions, step.errors = list(step.decisions), list(step.errors)
        timeline.steps.append(step)
    return timeline


def copy_timeline(t: Timeline) -> Timeline:
    """A copy that ``apply`` can change without touching ``t``."""
    return timeline_from_dict(timeline_to_dict(t))


# --------------------------------------------------------------------------- rendering


def render_timeline(t: Timeline) -> str:
    """A fixed-width table for terminals."""
    sla = ""
    if t.sla_due_at is not None:
        sla = f"  sla {'BREACHED' if t.sla_breached else 'ok'}"
    lines = [
        f"run {t.run_id}  {t.workflow} v{t.version}  tenant {t.tenant}",
        f"status {t.status}  duration {format_duration(t.duration_ms)}  attempts {t.attempts}"
        f"  cost ${t.cost:.4f}  escalations {t.escalations}  sla breaches {t.sla_breaches}"
        f"{sla}",
        "",
        f"{'step':<16}{'kind':<15}{'status':<11}{'start':>9}{'duration':>10}{'waited':>9}"
        f"{'tries':>6}{'cost':>9}  notes",
    ]
    for s in t.steps:
        offset = format_duration(s.started_at - t.started_at)
        notes = [s.note] if s.note else []
        notes += [
            f"{d['decision']} by {d['approver']}" if d["approver"] else d["decision"]
            for d in s.decisions
        ]
        notes += [f"attempt {err['attempt']} {err['code']}" for err in s.errors]
        lines.append(
            f"{s.step:<16}{s.kind:<15}{s.status:<11}{'+' + offset:>9}"
            f"{format_duration(s.duration_ms):>10}{format_duration(s.waited_ms or None):>9}"
            f"{s.attempts:>6}{'$' + format(s.cost, '.4f'):>9}  {'; '.join(notes)}"
        )
    if t.rejections:
        lines += ["", "refused (kept in the run log, no effect):"]
        for r in t.rejections:
            who = f" by {r['by']}" if r["by"] else ""
            where = f" at step {r['step']}" if r["step"] else ""
            lines.append(
                f"  {'+' + format_duration(r['ts'] - t.started_at):>9}  "
                f"{r['command']}{who}{where}: {r['reason']}: {r['detail']}"
            )
    if t.error:
        lines += [
            "",
            f"error: {t.error['code']} ({t.error['class']}) at step {t.error['step']}:"
            f" {t.error['message']}",
        ]
    return "\n".join(lines)
