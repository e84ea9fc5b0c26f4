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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from engine.core import events as ev
from engine.core.durations import format_duration


@dataclass(slots=True)
class StepEntry:
    """One visit of one step. ``input`` is the task input of the latest attempt,
    ``payload`` what an approval was asked about, ``signal`` the signal (name and data)
    that resumed the step."""

    step: str
    visit: int
    kind: str
    started_at: int
    status: str = "running"
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
    hid in this run (``projections.redaction``): fold state, like a step's ``_wait_from``,
    that ``timeline_view`` leaves out."""

    run_id: str
    workflow: str = ""
    version: int = 0
    tenant: str = ""
    correlation_id: str = ""
    status: str = "Pending"
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


def _ended(t: Timeline, status: str, ts: int) -> None:
    t.status, t.ended_at = status, ts
    _approval_over(t)
    if t.sla_due_at is not None and ts > t.sla_due_at:
        t.sla_breached = True


def apply(t: Timeline, e: ev.Event) -> None:
    """Fold one event into the timeline (events at or below ``last_seq`` are ignored)."""
    if e.seq <= t.last_seq:
        return
    t.last_seq, t.updated_at, t.events = e.seq, e.ts, t.events + 1
    step = getattr(e, "step", None)
    entry = _current(t, step) if isinstance(step, str) else None
    if isinstance(e, ev.RunStarted):
        t.workflow, t.version, t.tenant = e.workflow, e.version, e.tenant
        t.correlation_id, t.started_at, t.status = e.correlation_id, e.ts, "Running"
        t.requested_by, t.input, t.sla_due_at = e.requested_by, e.input, e.sla_due_at
    elif isinstance(e, ev.StepStarted):
        t.steps.append(StepEntry(step=e.step, visit=e.visit, kind=e.kind, started_at=e.ts))
        t.status = "Running"
    elif entry is not None and isinstance(e, ev.TaskDispatched):
        entry.attempts += 1
        t.attempts += 1
        entry.input = e.input
        _end_wait(entry, e.ts)
        entry.status = "running"
        t.status = "Running"
    elif entry is not None and isinstance(e, ev.TaskCompleted):
        entry.cost += _cost(e.cost)
        t.cost += _cost(e.cost)
        entry.result = e.result
    elif entry is not None and isinstance(e, ev.TaskFailed):
        entry.cost += _cost(e.cost)
        t.cost += _cost(e.cost)
        entry.errors.append({"attempt": e.attempt, "class": e.error_class, "code": e.code,
                             "message": e.message})
    elif entry is not None and isinstance(e, ev.RetryScheduled):
        entry.status = "retry"
        entry._wait_from = e.ts
        t.status = "Retry"
    elif entry is not None and isinstance(e, ev.ApprovalRequested | ev.SignalAwaited
                                          | ev.SleepStarted | ev.SlotRequested):
        # A task held for a slot (flow control) waits until its dispatch: held time is
        # wait time, apart from the task's execution.
        entry.status = "waiting"
        entry._wait_from = e.ts
        t.status = "Waiting"
        if isinstance(e, ev.ApprovalRequested):
            entry.payload = e.payload
            t.approval_id, t.approval_since, t.approval_due_at = (
                e.approval_id, e.ts, e.expires_at)
    elif isinstance(e, ev.TimerArmed):
        if e.kind == "approval_sla" and t.approval_id and e.ref == t.approval_id:
            due = t.approval_due_at
            t.approval_due_at = e.due_at if due is None else min(due, e.due_at)
    elif entry is not None and isinstance(e, ev.ApprovalVoted):
        entry.decisions.append({"approver": e.approver, "decision": "approved", "ts": e.ts})
    elif entry is not None and isinstance(e, ev.ApprovalGranted):
        if e.approvers:
            entry.decisions.append({"approver": e.approvers[-1], "decision": "approved",
                                    "ts": e.ts})
        _end_wait(entry, e.ts)
        _approval_over(t, e.approval_id)
        entry.status = "running"
        t.status = "Running"
    elif entry is not None and isinstance(e, ev.ApprovalRejected):
        entry.decisions.append({"approver": e.approver, "decision": "rejected", "ts": e.ts})
        _end_wait(entry, e.ts)
        _approval_over(t, e.approval_id)
    elif entry is not None and isinstance(e, ev.ApprovalExpired):
        entry.decisions.append({"approver": "", "decision": "expired", "ts": e.ts})
        _end_wait(entry, e.ts)
        _approval_over(t, e.approval_id)
    elif entry is not None and isinstance(e, ev.Escalated):
        t.escalations += 1
        entry.note = f"escalated to {e.to}"
    elif isinstance(e, ev.SignalReceived):
        last = t.steps[-1] if t.steps else None
        if last is not None and last.status == "waiting":
            _end_wait(last, e.ts)
            last.signal = {"name": e.name, "data": e.data}
    elif entry is not None and isinstance(e, ev.BusinessErrorHandled):
        _end_wait(entry, e.ts)
        entry.note = f"{e.code}: {e.action} {e.target}"
        if e.action == "goto":
            entry.status, entry.ended_at = "branched", e.ts
    elif entry is not None and isinstance(e, ev.StepCompleted):
        _end_wait(entry, e.ts)
        entry.status, entry.ended_at, entry.result = "completed", e.ts, e.result
        _approval_over(t)
    elif entry is not None and isinstance(e, ev.StepFailed):
        _end_wait(entry, e.ts)
        entry.status, entry.ended_at = "failed", e.ts
        entry.note = f"{e.code}: {e.message}"
        _approval_over(t)
    elif isinstance(e, ev.SlaBreached):
        t.sla_breaches += 1
        if e.scope == "run":
            t.sla_breached = True
    elif isinstance(e, ev.CommandRejected):
        t.rejected_commands += 1
        by, at_step = (e.by, e.at_step) if isinstance(e, ev.CommandRejectedV2) else ("", "")
        t.rejections.append({"seq": e.seq, "ts": e.ts, "command": e.command_type, "by": by,
                             "step": at_step, "reason": e.reason, "detail": e.detail})
    elif isinstance(e, ev.RunCompleted):
        t.output = e.output
        _ended(t, "Completed", e.ts)
    elif isinstance(e, ev.RunFailed):
        _ended(t, "Failed", e.ts)
        t.error = {"step": e.step, "class": e.error_class, "code": e.code,
                   "message": e.message, "field": e.field}
    elif isinstance(e, ev.RunCancelled):
        _ended(t, "Cancelled", e.ts)
        for open_entry in t.steps:
            if open_entry.ended_at is None:
                _end_wait(open_entry, e.ts)
                open_entry.status, open_entry.ended_at = "cancelled", e.ts


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
    out["steps"] = [{**{k: v for k, v in _step_to_dict(s).items() if not k.startswith("_")},
                     "duration_ms": s.duration_ms} for s in t.steps]
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
        notes += [f"{d['decision']} by {d['approver']}" if d["approver"] else d["decision"]
                  for d in s.decisions]
        notes += [f"attempt {err['attempt']} {err['code']}" for err in s.errors]
        lines.append(
            f"{s.step:<16}{s.kind:<15}{s.status:<11}{'+' + offset:>9}"
            f"{format_duration(s.duration_ms):>10}{format_duration(s.waited_ms or None):>9}"
            f"{s.attempts:>6}{'$' + format(s.cost, '.4f'):>9}  {'; '.join(notes)}")
    if t.rejections:
        lines += ["", "refused (kept in the run log, no effect):"]
        for r in t.rejections:
            who = f" by {r['by']}" if r["by"] else ""
            where = f" at step {r['step']}" if r["step"] else ""
            lines.append(f"  {'+' + format_duration(r['ts'] - t.started_at):>9}  "
                         f"{r['command']}{who}{where}: {r['reason']}: {r['detail']}")
    if t.error:
        lines += ["", f"error: {t.error['code']} ({t.error['class']}) at step {t.error['step']}:"
                  f" {t.error['message']}"]
    return "\n".join(lines)
