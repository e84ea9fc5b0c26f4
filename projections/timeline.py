"""The timeline of a run, folded from its events: steps, states, durations, attempts,
waits, approver decisions and cost. Pure: the CLI, the SQLite and PostgreSQL projectors
and the timeline topic all build it with ``build_timeline``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from engine.core import events as ev
from engine.core.durations import format_duration


@dataclass(slots=True)
class StepEntry:
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

    @property
    def duration_ms(self) -> int | None:
        return None if self.ended_at is None else self.ended_at - self.started_at


@dataclass(slots=True)
class Timeline:
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


def apply(t: Timeline, e: ev.Event) -> None:
    """Fold one event into the timeline."""
    step = getattr(e, "step", None)
    entry = _current(t, step) if isinstance(step, str) else None
    if isinstance(e, ev.RunStarted):
        t.workflow, t.version, t.tenant = e.workflow, e.version, e.tenant
        t.correlation_id, t.started_at, t.status = e.correlation_id, e.ts, "Running"
    elif isinstance(e, ev.StepStarted):
        t.steps.append(StepEntry(step=e.step, visit=e.visit, kind=e.kind, started_at=e.ts))
        t.status = "Running"
    elif entry is not None and isinstance(e, ev.TaskDispatched):
        entry.attempts += 1
        t.attempts += 1
        _end_wait(entry, e.ts)
        entry.status = "running"
        t.status = "Running"
    elif entry is not None and isinstance(e, ev.TaskCompleted):
        entry.cost += e.cost
        t.cost += e.cost
        entry.result = e.result
    elif entry is not None and isinstance(e, ev.TaskFailed):
        entry.cost += e.cost
        t.cost += e.cost
        entry.errors.append({"attempt": e.attempt, "class": e.error_class, "code": e.code,
                             "message": e.message})
    elif entry is not None and isinstance(e, ev.RetryScheduled):
        entry.status = "retry"
        entry._wait_from = e.ts
        t.status = "Retry"
    elif entry is not None and isinstance(e, ev.ApprovalRequested | ev.SignalAwaited
                                          | ev.SleepStarted):
        entry.status = "waiting"
        entry._wait_from = e.ts
        t.status = "Waiting"
    elif entry is not None and isinstance(e, ev.ApprovalVoted):
        entry.decisions.append({"approver": e.approver, "decision": "approved", "ts": e.ts})
    elif entry is not None and isinstance(e, ev.ApprovalGranted):
        if e.approvers:
            entry.decisions.append({"approver": e.approvers[-1], "decision": "approved",
                                    "ts": e.ts})
        _end_wait(entry, e.ts)
        entry.status = "running"
        t.status = "Running"
    elif entry is not None and isinstance(e, ev.ApprovalRejected):
        entry.decisions.append({"approver": e.approver, "decision": "rejected", "ts": e.ts})
        _end_wait(entry, e.ts)
    elif entry is not None and isinstance(e, ev.ApprovalExpired):
        entry.decisions.append({"approver": "", "decision": "expired", "ts": e.ts})
        _end_wait(entry, e.ts)
    elif entry is not None and isinstance(e, ev.Escalated):
        t.escalations += 1
        entry.note = f"escalated to {e.to}"
    elif isinstance(e, ev.SignalReceived):
        last = t.steps[-1] if t.steps else None
        if last is not None and last.status == "waiting":
            _end_wait(last, e.ts)
    elif entry is not None and isinstance(e, ev.BusinessErrorHandled):
        _end_wait(entry, e.ts)
        entry.note = f"{e.code}: {e.action} {e.target}"
        if e.action == "goto":
            entry.status, entry.ended_at = "branched", e.ts
    elif entry is not None and isinstance(e, ev.StepCompleted):
        _end_wait(entry, e.ts)
        entry.status, entry.ended_at, entry.result = "completed", e.ts, e.result
    elif entry is not None and isinstance(e, ev.StepFailed):
        _end_wait(entry, e.ts)
        entry.status, entry.ended_at = "failed", e.ts
        entry.note = f"{e.code}: {e.message}"
    elif isinstance(e, ev.SlaBreached):
        t.sla_breaches += 1
    elif isinstance(e, ev.CommandRejected):
        t.rejected_commands += 1
    elif isinstance(e, ev.RunCompleted):
        t.status, t.ended_at = "Completed", e.ts
    elif isinstance(e, ev.RunFailed):
        t.status, t.ended_at = "Failed", e.ts
        t.error = {"step": e.step, "class": e.error_class, "code": e.code,
                   "message": e.message, "field": e.field}
    elif isinstance(e, ev.RunCancelled):
        t.status, t.ended_at = "Cancelled", e.ts
        for open_entry in t.steps:
            if open_entry.ended_at is None:
                _end_wait(open_entry, e.ts)
                open_entry.status, open_entry.ended_at = "cancelled", e.ts


def render_timeline(t: Timeline) -> str:
    """A fixed-width table for terminals."""
    lines = [
        f"run {t.run_id}  {t.workflow} v{t.version}  tenant {t.tenant}",
        f"status {t.status}  duration {format_duration(t.duration_ms)}  attempts {t.attempts}"
        f"  cost ${t.cost:.4f}  escalations {t.escalations}  sla breaches {t.sla_breaches}",
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
    if t.error:
        lines += ["", f"error: {t.error['code']} ({t.error['class']}) at step {t.error['step']}:"
                  f" {t.error['message']}"]
    return "\n".join(lines)
