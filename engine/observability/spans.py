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
(``engine.runtime.redaction``), with the run's taint so a secret hidden once stays hidden.

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
from engine.core.kinds import HandlerAction
from engine.core.state import RunState, RunStatus
from engine.core.trace_ids import attempt_span_id, run_span_id, step_span_id, trace_id_of
from engine.runtime.redaction import DEFAULT_POLICY, PolicyBook, RedactionPolicy

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

    def __init__(
        self,
        book: PolicyBook | None = None,
        *,
        state_of: StateOf | None = None,
        resource: Resource | None = None,
        max_runs: int = 100_000,
    ) -> None:
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
        base: Attributes = {
            "terranoha.run_id": event.run_id,
            "terranoha.workflow": workflow,
            "terranoha.workflow.version": version,
            "terranoha.tenant": event.tenant,
        }
        root = _Open(
            f"run {workflow}".rstrip(),
            run_span_id(event.run_id),
            None,
            started,
            {**base, "terranoha.correlation_id": correlation},
        )
        run = _Run(event.run_id, trace_id_of(correlation), policy, base, root)
        if state is not None and state.current is not None and not isinstance(event, ev.RunStarted):
            current = state.current
            run.visits[current.step] = current.visit
            run.steps[current.step] = self._step(
                run, current.step, current.visit, current.kind, current.started_at
            )
        self._runs[event.run_id] = run
        return run

    def _step(self, run: _Run, step: str, visit: int, kind: str, ts: int) -> _Open:
        attributes = {
            **run.base,
            "terranoha.step": step,
            "terranoha.step.visit": visit,
            "terranoha.step.kind": kind,
        }
        return _Open(
            f"step {step}", step_span_id(run.run_id, step, visit), run.root.span_id, ts, attributes
        )

    def _step_of(self, run: _Run, step: str, ts: int) -> _Open:
        """The open span of ``step``, opened here if its start was not seen."""
        span = run.steps.get(step)
        if span is None:
            visit = run.visits.get(step, 1)
            span = run.steps[step] = self._step(run, step, visit, "", ts)
        return span

    # ------------------------------------------------------------------ events

    def _apply(self, run: _Run, e: ev.Event, out: list[ReadableSpan]) -> None:
        """Open or end spans (``_SPAN_CHANGES``), or add a span event (``_SPAN_EVENTS``)
        to the step's span or the run's."""
        change = _SPAN_CHANGES.get(type(e))
        if change is not None:
            change(self, run, e, out)
            return
        describe = _SPAN_EVENTS.get(type(e))
        if describe is None:
            return
        name, attributes = describe(e)
        step_name = getattr(e, "step", None)
        target = (
            self._step_of(run, step_name, e.ts)
            if isinstance(step_name, str) and step_name and not _run_level(e)
            else run.root
        )
        target.events.append(_event(name, e.ts, **attributes))

    def _run_started(self, run: _Run, e: ev.RunStarted, out: list[ReadableSpan]) -> None:
        run.root.start = e.ts
        run.root.attributes.update(
            {
                "terranoha.requested_by": e.requested_by,
                "terranoha.priority": e.priority,
                "terranoha.run.input": _payload(e.input),
            }
        )

    def _step_started(self, run: _Run, e: ev.StepStarted, out: list[ReadableSpan]) -> None:
        previous = run.steps.pop(e.step, None)
        if previous is not None:
            self._end(run, previous, e.ts, "superseded", out)
        run.visits[e.step] = e.visit
        run.steps[e.step] = self._step(run, e.step, e.visit, e.kind, e.ts)

    def _task_dispatched(self, run: _Run, e: ev.TaskDispatched, out: list[ReadableSpan]) -> None:
        step = self._step_of(run, e.step, e.ts)
        run.attempts[e.task_id] = _Open(
            f"task {e.queue}",
            attempt_span_id(e.task_id),
            step.span_id,
            e.ts,
            {
                **run.base,
                "terranoha.step": e.step,
                "terranoha.step.visit": step.attributes["terranoha.step.visit"],
                "terranoha.task.attempt": e.attempt,
                "terranoha.task.phase": e.phase,
                "terranoha.task.queue": e.queue,
                "terranoha.task.id": e.task_id,
                "terranoha.task.input": _payload(e.input),
            },
        )

    def _step_completed(self, run: _Run, e: ev.StepCompleted, out: list[ReadableSpan]) -> None:
        span = self._step_of(run, e.step, e.ts)
        span.attributes["terranoha.step.result"] = _payload(e.result)
        self._end(run, run.steps.pop(e.step), e.ts, "completed", out)

    def _step_failed(self, run: _Run, e: ev.StepFailed, out: list[ReadableSpan]) -> None:
        span = self._step_of(run, e.step, e.ts)
        span.attributes.update(_error(e.error_class, e.code, e.message))
        span.error = f"{e.code}: {e.message}"
        self._end(run, run.steps.pop(e.step), e.ts, "failed", out)

    def _business_error_handled(
        self, run: _Run, e: ev.BusinessErrorHandled, out: list[ReadableSpan]
    ) -> None:
        span = self._step_of(run, e.step, e.ts)
        span.events.append(
            _event("business error handled", e.ts, code=e.code, action=e.action, target=e.target)
        )
        if e.action == HandlerAction.GOTO:
            self._end(run, run.steps.pop(e.step), e.ts, "branched", out)

    def _attempt_ended(
        self, run: _Run, e: ev.TaskCompleted | ev.TaskFailed, out: list[ReadableSpan]
    ) -> None:
        span = run.attempts.pop(e.task_id, None)
        if span is None:  # its dispatch came before this process started
            step = self._step_of(run, e.step, e.ts)
            span = _Open(
                "task",
                attempt_span_id(e.task_id),
                step.span_id,
                e.ts,
                {
                    **run.base,
                    "terranoha.step": e.step,
                    "terranoha.task.attempt": e.attempt,
                    "terranoha.task.phase": e.phase,
                    "terranoha.task.id": e.task_id,
                },
            )
        cost = e.cost if math.isfinite(e.cost) else 0.0
        span.attributes["terranoha.cost"] = cost
        for holder in (run.steps.get(e.step), run.root):
            if holder is not None:
                holder.attributes["terranoha.cost"] = (
                    holder.attributes.get("terranoha.cost", 0.0) + cost
                )
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
        outcome = _OUTCOMES[type(e)]
        status = outcome.value.lower()
        cancelled = outcome is RunStatus.CANCELLED
        for span in list(run.attempts.values()):
            self._end(run, span, e.ts, status if cancelled else "abandoned", out)
        for span in list(run.steps.values()):
            self._end(run, span, e.ts, status if cancelled else "unfinished", out)
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
            run.root.attributes.update(
                {"terranoha.cancel.by": e.by, "terranoha.cancel.reason": e.reason}
            )
        self._end(run, run.root, e.ts, status, out)
        self._runs.pop(run.run_id, None)

    def _end(self, run: _Run, span: _Open, ts: int, status: str, out: list[ReadableSpan]) -> None:
        key = (
            "terranoha.run.status"
            if span is run.root
            else (
                "terranoha.task.status" if span.name.startswith("task") else "terranoha.step.status"
            )
        )
        span.attributes[key] = status
        flags = TraceFlags(TraceFlags.SAMPLED)
        parent = (
            None
            if span.parent_id is None
            else SpanContext(run.trace_id, span.parent_id, is_remote=False, trace_flags=flags)
        )
        out.append(
            ReadableSpan(
                name=span.name,
                context=SpanContext(run.trace_id, span.span_id, is_remote=False, trace_flags=flags),
                parent=parent,
                resource=self.resource,
                attributes=span.attributes,
                events=span.events,
                kind=SpanKind.INTERNAL,
                status=Status(StatusCode.ERROR, span.error)
                if span.error
                else Status(StatusCode.OK if status == "completed" else StatusCode.UNSET),
                start_time=span.start * 1_000_000,
                end_time=max(ts, span.start) * 1_000_000,
                instrumentation_scope=SCOPE,
            )
        )


# ---------------------------------------------------------------------- helpers


def _payload(value: Any) -> str:
    """An already redacted payload as a JSON attribute value."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    if len(text) > MAX_PAYLOAD_CHARS:
        return text[:MAX_PAYLOAD_CHARS] + "...[cut]"
    return text


def _error(error_class: str, code: str, message: str) -> Attributes:
    return {
        "error.type": code,
        "terranoha.error.class": error_class,
        "terranoha.error.code": code,
        "terranoha.error.message": message,
    }


def _event(name: str, ts: int, **attributes: Any) -> SpanEvent:
    clean = {k: v for k, v in attributes.items() if v is not None}
    return SpanEvent(name, clean, timestamp=ts * 1_000_000)


def _run_level(e: ev.Event) -> bool:
    return isinstance(e, ev.SlaBreached) and e.scope == "run"


_Describe = Callable[[Any], tuple[str, Attributes]]
_SPAN_EVENTS: dict[type[ev.Event], _Describe] = {}
"""The span event each event becomes: its name and attributes."""


def _describes(*event_types: type[ev.Event]) -> Callable[[_Describe], _Describe]:
    def register(fn: _Describe) -> _Describe:
        for event_type in event_types:
            _SPAN_EVENTS[event_type] = fn
        return fn

    return register


@_describes(ev.RetryScheduled)
def _retry_scheduled(e: ev.RetryScheduled) -> tuple[str, Attributes]:
    return "retry scheduled", {
        "terranoha.task.attempt": e.attempt,
        "terranoha.task.phase": e.phase,
        "terranoha.retry.delay_ms": e.delay_ms,
        "terranoha.retry.due_at": e.due_at,
    }


@_describes(ev.ApprovalRequested)
def _approval_requested(e: ev.ApprovalRequested) -> tuple[str, Attributes]:
    return "approval requested", {
        "terranoha.approval.id": e.approval_id,
        "terranoha.approval.reason": e.reason,
        "terranoha.approval.approvers": list(e.approvers),
        "terranoha.approval.quorum": e.quorum,
        "terranoha.approval.expires_at": e.expires_at,
        "terranoha.approval.payload": _payload(e.payload),
    }


@_describes(ev.ApprovalVoted)
def _approval_voted(e: ev.ApprovalVoted) -> tuple[str, Attributes]:
    return "approval voted", {
        "terranoha.approval.id": e.approval_id,
        "terranoha.approval.approver": e.approver,
        "terranoha.approval.comment": e.comment,
    }


@_describes(ev.ApprovalGranted)
def _approval_granted(e: ev.ApprovalGranted) -> tuple[str, Attributes]:
    return "approval granted", {
        "terranoha.approval.id": e.approval_id,
        "terranoha.approval.approvers": list(e.approvers),
        "terranoha.approval.comment": e.comment,
    }


@_describes(ev.ApprovalRejected)
def _approval_rejected(e: ev.ApprovalRejected) -> tuple[str, Attributes]:
    return "approval rejected", {
        "terranoha.approval.id": e.approval_id,
        "terranoha.approval.approver": e.approver,
        "terranoha.approval.comment": e.comment,
    }


@_describes(ev.ApprovalExpired)
def _approval_expired(e: ev.ApprovalExpired) -> tuple[str, Attributes]:
    return "approval expired", {"terranoha.approval.id": e.approval_id}


@_describes(ev.ApprovalReminded)
def _approval_reminded(e: ev.ApprovalReminded) -> tuple[str, Attributes]:
    return "approval reminded", {
        "terranoha.approval.id": e.approval_id,
        "terranoha.approval.reminder": e.reminder,
    }


@_describes(ev.Escalated)
def _escalated(e: ev.Escalated) -> tuple[str, Attributes]:
    return "escalated", {"terranoha.escalation.to": e.to, "terranoha.escalation.reason": e.reason}


@_describes(ev.SlaBreached)
def _sla_breached(e: ev.SlaBreached) -> tuple[str, Attributes]:
    return "sla breached", {"terranoha.sla.scope": e.scope, "terranoha.sla.due_at": e.due_at}


@_describes(ev.SignalAwaited)
def _signal_awaited(e: ev.SignalAwaited) -> tuple[str, Attributes]:
    return "signal awaited", {
        "terranoha.signal.name": e.name,
        "terranoha.signal.timeout_at": e.timeout_at,
    }


@_describes(ev.SignalReceived)
def _signal_received(e: ev.SignalReceived) -> tuple[str, Attributes]:
    return "signal received", {
        "terranoha.signal.name": e.name,
        "terranoha.signal.data": _payload(e.data),
    }


@_describes(ev.SleepStarted)
def _sleep_started(e: ev.SleepStarted) -> tuple[str, Attributes]:
    return "sleep started", {"terranoha.sleep.until": e.until}


@_describes(ev.SlotRequested)
def _slot_requested(e: ev.SlotRequested) -> tuple[str, Attributes]:
    return "slot requested", {
        "terranoha.limit.key": e.key,
        "terranoha.limit.version": e.limits_version,
    }


@_describes(ev.SlotReleased)
def _slot_released(e: ev.SlotReleased) -> tuple[str, Attributes]:
    return "slot released", {
        "terranoha.limit.key": e.key,
        "terranoha.limit.outcome": e.outcome,
        "terranoha.limit.held_ms": e.latency_ms,
    }


@_describes(ev.ChoiceEvaluated)
def _choice_evaluated(e: ev.ChoiceEvaluated) -> tuple[str, Attributes]:
    return "choice evaluated", {
        "terranoha.choice.branch": e.branch,
        "terranoha.choice.target": e.target,
    }


@_describes(ev.CommandRejected, ev.CommandRejectedV2)
def _command_rejected(e: ev.CommandRejected) -> tuple[str, Attributes]:
    return "command rejected", {
        "terranoha.command.type": e.command_type,
        "terranoha.command.id": e.command_id,
        "terranoha.command.reason": e.reason,
        "terranoha.command.detail": e.detail,
        "terranoha.command.by": getattr(e, "by", ""),
    }


_Change = Callable[[RunSpans, _Run, Any, list[ReadableSpan]], None]
_SPAN_CHANGES: dict[type[ev.Event], _Change] = {
    ev.RunStarted: RunSpans._run_started,
    ev.StepStarted: RunSpans._step_started,
    ev.TaskDispatched: RunSpans._task_dispatched,
    ev.TaskCompleted: RunSpans._attempt_ended,
    ev.TaskFailed: RunSpans._attempt_ended,
    ev.StepCompleted: RunSpans._step_completed,
    ev.StepFailed: RunSpans._step_failed,
    ev.BusinessErrorHandled: RunSpans._business_error_handled,
    ev.RunCompleted: RunSpans._run_ended,
    ev.RunFailed: RunSpans._run_ended,
    ev.RunCancelled: RunSpans._run_ended,
}
"""Events that open or end spans, and what they do."""

_OUTCOMES: dict[type[ev.Event], RunStatus] = {
    ev.RunCompleted: RunStatus.COMPLETED,
    ev.RunFailed: RunStatus.FAILED,
    ev.RunCancelled: RunStatus.CANCELLED,
}
"""How a run ended, by the event that ended it; its span status is the lower-case name."""

IGNORED: tuple[type[ev.Event], ...] = (ev.TimerArmed, ev.TimerFired)
"""Events that change no span: timers show up through what they cause."""
