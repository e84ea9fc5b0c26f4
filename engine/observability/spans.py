"""Run traces built from committed events: ``RunSpans`` folds a run's events into
OpenTelemetry spans, with ids and times taken from the log, never from a clock.

One trace per run (trace id from the correlation id, as in the records' ``traceparent``):

- the run span, ``run <workflow>``, from ``RunStarted`` to the run's end;
- a span per step visit, ``step <step>``, from ``StepStarted`` to ``StepCompleted``,
  ``StepFailed``, a ``goto`` of a business error handler (status ``branched``) or the
  run's end, with events for retries, approvals, escalations, signals and SLA breaches;
- a span per task attempt, ``task <queue>``, from ``TaskDispatched`` to ``TaskCompleted``
  or ``TaskFailed``, child of its step span. Its id is the one the task record's
  ``traceparent`` header names, so the worker's tool span nests under it.

Span ids come from (run id, step, visit) and the task id (run id, step, visit, phase,
attempt), start and end times from the events' ``ts``: translating the same events twice
gives the same spans. Payloads reach attributes only redacted, under the run's policy
(``projections.redaction``), with the run's taint so a secret hidden once stays hidden.

A span is handed out when it ends. ``RunSpans`` keeps the open spans of unfinished runs
in memory; a process that starts in the middle of a run (a restart, a partition moving)
picks the run up from its committed state when given ``state_of``: the spans that were
open then begin where the state says the step began, or at the first event seen.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event as SpanEvent
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from engine.core import events as ev
from engine.core.state import RunState
from engine.observability._ids import attempt_span_id, run_span_id, step_span_id, trace_id_of
from projections.redaction import DEFAULT_POLICY, PolicyBook, RedactionPolicy

SCOPE = InstrumentationScope("terranoha.engine")
MAX_PAYLOAD_CHARS = 4096
"""Redacted payloads longer than this are cut, with a marker, to keep spans small."""

Attributes = dict[str, Any]
StateOf = Callable[[str], RunState | None]


@dataclass(slots=True)
class _Open:
    name: str
    span_id: int
    parent_id: int | None
    start: int
    attributes: Attributes
    events: list[SpanEvent] = field(default_factory=list)
    error: str | None = None


@dataclass(slots=True)
class _Run:
    run_id: str
    trace_id: int
    policy: RedactionPolicy
    base: Attributes
    root: _Open
    last_seq: int = 0
    taint: set[str] = field(default_factory=set)
    steps: dict[str, _Open] = field(default_factory=dict)
    attempts: dict[str, _Open] = field(default_factory=dict)
    visits: dict[str, int] = field(default_factory=dict)


class RunSpans:
    """Folds committed events, batch after batch, into finished spans (see module doc)."""

    def __init__(self, book: PolicyBook | None = None, *, state_of: StateOf | None = None,
                 resource: Resource | None = None, max_runs: int = 100_000) -> None:
        self.book = book if book is not None else PolicyBook()
        self.state_of = state_of
        self.resource = resource or Resource.create({"service.name": "terranoha"})
        self.max_runs = max_runs
        self._runs: dict[str, _Run] = {}

    def __len__(self) -> int:
        return len(self._runs)

    def apply(self, events: Iterable[ev.Event]) -> list[ReadableSpan]:
        """The spans that ``events`` end, children before their parents."""
        out: list[ReadableSpan] = []
        for event in events:
            run = self._runs.get(event.run_id)
            if run is not None and event.seq <= run.last_seq:
                continue  # already seen: redelivery or replay
            if run is None:
                if isinstance(event, ev.CommandRejected):
                    continue  # a late command for a run that ended: no trace to add it to
                run = self._begin(event)
            run.last_seq = event.seq
            redacted = run.policy.event(event, run.taint)
            self._apply(run, redacted, out)
        return out

    # ------------------------------------------------------------------ runs

    def _begin(self, event: ev.Event) -> _Run:
        if len(self._runs) >= self.max_runs:
            # Runs that never end must not grow memory without bound: drop the oldest.
            self._runs.pop(next(iter(self._runs)))
        state = self.state_of(event.run_id) if self.state_of is not None else None
        workflow, version, started, correlation = "", 0, event.ts, event.correlation_id
        if isinstance(event, ev.RunStarted):
            workflow, version = event.workflow, event.version
        elif state is not None:
            workflow, version, started = state.workflow, state.version, state.started_at
            correlation = state.correlation_id or correlation
        policy = self.book.policy(workflow, version) if workflow else DEFAULT_POLICY
        base: Attributes = {"terranoha.run_id": event.run_id, "terranoha.workflow": workflow,
                            "terranoha.workflow.version": version,
                            "terranoha.tenant": event.tenant}
        root = _Open(f"run {workflow}".rstrip(), run_span_id(event.run_id), None, started,
                     {**base, "terranoha.correlation_id": correlation})
        run = _Run(event.run_id, trace_id_of(correlation), policy, base, root)
        if state is not None and state.current is not None and not isinstance(
                event, ev.RunStarted):
            current = state.current
            run.visits[current.step] = current.visit
            run.steps[current.step] = self._step(run, current.step, current.visit,
                                                 current.kind, current.started_at)
        self._runs[event.run_id] = run
        return run

    def _step(self, run: _Run, step: str, visit: int, kind: str, ts: int) -> _Open:
        attributes = {**run.base, "terranoha.step": step, "terranoha.step.visit": visit,
                      "terranoha.step.kind": kind}
        return _Open(f"step {step}", step_span_id(run.run_id, step, visit), run.root.span_id,
                     ts, attributes)

    def _step_of(self, run: _Run, step: str, ts: int) -> _Open:
        """The open span of ``step``, opened here if its start was not seen."""
        span = run.steps.get(step)
        if span is None:
            visit = run.visits.get(step, 1)
            span = run.steps[step] = self._step(run, step, visit, "", ts)
        return span

    # ------------------------------------------------------------------ events

    def _apply(self, run: _Run, e: ev.Event, out: list[ReadableSpan]) -> None:
        step_name = getattr(e, "step", None)
        if isinstance(e, ev.RunStarted):
            run.root.start = e.ts
            run.root.attributes.update({
                "terranoha.requested_by": e.requested_by, "terranoha.priority": e.priority,
                "terranoha.run.input": _payload(e.input)})
        elif isinstance(e, ev.StepStarted):
            previous = run.steps.pop(e.step, None)
            if previous is not None:
                self._end(run, previous, e.ts, "superseded", out)
            run.visits[e.step] = e.visit
            run.steps[e.step] = self._step(run, e.step, e.visit, e.kind, e.ts)
        elif isinstance(e, ev.TaskDispatched):
            step = self._step_of(run, e.step, e.ts)
            run.attempts[e.task_id] = _Open(
                f"task {e.queue}", attempt_span_id(e.task_id), step.span_id, e.ts,
                {**run.base, "terranoha.step": e.step,
                 "terranoha.step.visit": step.attributes["terranoha.step.visit"],
                 "terranoha.task.attempt": e.attempt, "terranoha.task.phase": e.phase,
                 "terranoha.task.queue": e.queue, "terranoha.task.id": e.task_id,
                 "terranoha.task.input": _payload(e.input)})
        elif isinstance(e, ev.TaskCompleted | ev.TaskFailed):
            self._attempt_ended(run, e, out)
        elif isinstance(e, ev.StepCompleted):
            span = self._step_of(run, e.step, e.ts)
            span.attributes["terranoha.step.result"] = _payload(e.result)
            self._end(run, run.steps.pop(e.step), e.ts, "completed", out)
        elif isinstance(e, ev.StepFailed):
            span = self._step_of(run, e.step, e.ts)
            span.attributes.update(_error(e.error_class, e.code, e.message))
            span.error = f"{e.code}: {e.message}"
            self._end(run, run.steps.pop(e.step), e.ts, "failed", out)
        elif isinstance(e, ev.BusinessErrorHandled):
            span = self._step_of(run, e.step, e.ts)
            span.events.append(_event("business error handled", e.ts, code=e.code,
                                      action=e.action, target=e.target))
            if e.action == "goto":
                self._end(run, run.steps.pop(e.step), e.ts, "branched", out)
        elif isinstance(e, ev.RunCompleted | ev.RunFailed | ev.RunCancelled):
            self._run_ended(run, e, out)
        else:
            name, attributes = _span_event(e)
            if name:
                target = (self._step_of(run, step_name, e.ts) if isinstance(step_name, str)
                          and step_name and not _run_level(e) else run.root)
                target.events.append(_event(name, e.ts, **attributes))

    def _attempt_ended(self, run: _Run, e: ev.TaskCompleted | ev.TaskFailed,
                       out: list[ReadableSpan]) -> None:
        span = run.attempts.pop(e.task_id, None)
        if span is None:  # its dispatch came before this process started
            step = self._step_of(run, e.step, e.ts)
            span = _Open("task", attempt_span_id(e.task_id), step.span_id, e.ts,
                         {**run.base, "terranoha.step": e.step,
                          "terranoha.task.attempt": e.attempt, "terranoha.task.phase": e.phase,
                          "terranoha.task.id": e.task_id})
        cost = e.cost if math.isfinite(e.cost) else 0.0
        span.attributes["terranoha.cost"] = cost
        for holder in (run.steps.get(e.step), run.root):
            if holder is not None:
                holder.attributes["terranoha.cost"] = holder.attributes.get(
                    "terranoha.cost", 0.0) + cost
        if isinstance(e, ev.TaskCompleted):
            span.attributes["terranoha.task.result"] = _payload(e.result)
            if e.confidence is not None:
                span.attributes["terranoha.task.confidence"] = e.confidence
            self._end(run, span, e.ts, "completed", out)
        else:
            span.attributes.update(_error(e.error_class, e.code, e.message))
            span.error = f"{e.code}: {e.message}"
            self._end(run, span, e.ts, "failed", out)

    def _run_ended(self, run: _Run, e: ev.Event, out: list[ReadableSpan]) -> None:
        status = {ev.RunCompleted: "completed", ev.RunFailed: "failed",
                  ev.RunCancelled: "cancelled"}[type(e)]
        for span in list(run.attempts.values()):
            self._end(run, span, e.ts, status if status == "cancelled" else "abandoned", out)
        for span in list(run.steps.values()):
            self._end(run, span, e.ts, status if status == "cancelled" else "unfinished", out)
        run.attempts.clear()
        run.steps.clear()
        if isinstance(e, ev.RunCompleted):
            run.root.attributes["terranoha.run.output"] = _payload(e.output)
        elif isinstance(e, ev.RunFailed):
            run.root.attributes.update(_error(e.error_class, e.code, e.message))
            if e.step:
                run.root.attributes["terranoha.step"] = e.step
            run.root.error = f"{e.code}: {e.message}"
        elif isinstance(e, ev.RunCancelled):
            run.root.attributes.update({"terranoha.cancel.by": e.by,
                                        "terranoha.cancel.reason": e.reason})
        self._end(run, run.root, e.ts, status, out)
        self._runs.pop(run.run_id, None)

    def _end(self, run: _Run, span: _Open, ts: int, status: str,
             out: list[ReadableSpan]) -> None:
        key = "terranoha.run.status" if span is run.root else (
            "terranoha.task.status" if span.name.startswith("task") else "terranoha.step.status")
        span.attributes[key] = status
        flags = TraceFlags(TraceFlags.SAMPLED)
        parent = None if span.parent_id is None else SpanContext(
            run.trace_id, span.parent_id, is_remote=False, trace_flags=flags)
        out.append(ReadableSpan(
            name=span.name,
            context=SpanContext(run.trace_id, span.span_id, is_remote=False, trace_flags=flags),
            parent=parent, resource=self.resource, attributes=span.attributes,
            events=span.events, kind=SpanKind.INTERNAL,
            status=Status(StatusCode.ERROR, span.error) if span.error else Status(
                StatusCode.OK if status == "completed" else StatusCode.UNSET),
            start_time=span.start * 1_000_000, end_time=max(ts, span.start) * 1_000_000,
            instrumentation_scope=SCOPE))


# ---------------------------------------------------------------------- helpers


def _payload(value: Any) -> str:
    """An already redacted payload as a JSON attribute value."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    if len(text) > MAX_PAYLOAD_CHARS:
        return text[:MAX_PAYLOAD_CHARS] + "...[cut]"
    return text


def _error(error_class: str, code: str, message: str) -> Attributes:
    return {"error.type": code, "terranoha.error.class": error_class,
            "terranoha.error.code": code, "terranoha.error.message": message}


def _event(name: str, ts: int, **attributes: Any) -> SpanEvent:
    clean = {k: v for k, v in attributes.items() if v is not None}
    return SpanEvent(name, clean, timestamp=ts * 1_000_000)


def _run_level(e: ev.Event) -> bool:
    return isinstance(e, ev.SlaBreached) and e.scope == "run"


def _span_event(e: ev.Event) -> tuple[str, Attributes]:
    """The span event an event becomes (name, attributes), or ("", {}) for none."""
    if isinstance(e, ev.RetryScheduled):
        return "retry scheduled", {"terranoha.task.attempt": e.attempt,
                                   "terranoha.task.phase": e.phase,
                                   "terranoha.retry.delay_ms": e.delay_ms,
                                   "terranoha.retry.due_at": e.due_at}
    if isinstance(e, ev.ApprovalRequested):
        return "approval requested", {
            "terranoha.approval.id": e.approval_id, "terranoha.approval.reason": e.reason,
            "terranoha.approval.approvers": list(e.approvers),
            "terranoha.approval.quorum": e.quorum, "terranoha.approval.expires_at": e.expires_at,
            "terranoha.approval.payload": _payload(e.payload)}
    if isinstance(e, ev.ApprovalVoted):
        return "approval voted", {"terranoha.approval.id": e.approval_id,
                                  "terranoha.approval.approver": e.approver,
                                  "terranoha.approval.comment": e.comment}
    if isinstance(e, ev.ApprovalGranted):
        return "approval granted", {"terranoha.approval.id": e.approval_id,
                                    "terranoha.approval.approvers": list(e.approvers),
                                    "terranoha.approval.comment": e.comment}
    if isinstance(e, ev.ApprovalRejected):
        return "approval rejected", {"terranoha.approval.id": e.approval_id,
                                     "terranoha.approval.approver": e.approver,
                                     "terranoha.approval.comment": e.comment}
    if isinstance(e, ev.ApprovalExpired):
        return "approval expired", {"terranoha.approval.id": e.approval_id}
    if isinstance(e, ev.ApprovalReminded):
        return "approval reminded", {"terranoha.approval.id": e.approval_id,
                                     "terranoha.approval.reminder": e.reminder}
    if isinstance(e, ev.Escalated):
        return "escalated", {"terranoha.escalation.to": e.to,
                             "terranoha.escalation.reason": e.reason}
    if isinstance(e, ev.SlaBreached):
        return "sla breached", {"terranoha.sla.scope": e.scope, "terranoha.sla.due_at": e.due_at}
    if isinstance(e, ev.SignalAwaited):
        return "signal awaited", {"terranoha.signal.name": e.name,
                                  "terranoha.signal.timeout_at": e.timeout_at}
    if isinstance(e, ev.SignalReceived):
        return "signal received", {"terranoha.signal.name": e.name,
                                   "terranoha.signal.data": _payload(e.data)}
    if isinstance(e, ev.SleepStarted):
        return "sleep started", {"terranoha.sleep.until": e.until}
    if isinstance(e, ev.ChoiceEvaluated):
        return "choice evaluated", {"terranoha.choice.branch": e.branch,
                                    "terranoha.choice.target": e.target}
    if isinstance(e, ev.CommandRejected):
        return "command rejected", {"terranoha.command.type": e.command_type,
                                    "terranoha.command.id": e.command_id,
                                    "terranoha.command.reason": e.reason,
                                    "terranoha.command.detail": e.detail,
                                    "terranoha.command.by": getattr(e, "by", "")}
    return "", {}
