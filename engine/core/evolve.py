"""``evolve(state, event) -> state``: the only code that changes run state.

One evolver per event (type, version), registered in ``EVOLVERS``. Live processing and
replay both call ``evolve``, so they cannot drift. Evolvers are total: any event applied
to any state (even none) yields a state and never raises. A bug in an old evolver is
fixed by a new event version, not by editing the old one.

An event with no evolver is an error (``UnknownEventError``), as Zeebe's missing event
applier is: skipping it would build a state that silently differs from the one the
engine that wrote it had, and every later decision would rest on that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from engine.core import events as ev
from engine.core.errors import UnknownEventError
from engine.core.kinds import Phase
from engine.core.state import Approval, RunState, RunStatus, StepState, Timer, Waiting, replace

E = TypeVar("E", bound=ev.Event)
Evolver = Callable[[RunState, Any], RunState]
EVOLVERS: dict[type[ev.Event], Evolver] = {}


_Typed = Callable[[RunState, E], RunState]


def evolver(event_type: type[E]) -> Callable[[_Typed[E]], _Typed[E]]:
    def register(fn: _Typed[E]) -> _Typed[E]:
        EVOLVERS[event_type] = fn
        return fn

    return register


def evolve(state: RunState | None, event: ev.Event) -> RunState:
    """Apply one event; ``UnknownEventError`` if its type has no evolver."""
    fn = EVOLVERS.get(type(event))
    if fn is None:
        raise UnknownEventError(event)
    if state is None:
        state = RunState(
            run_id=event.run_id, tenant=event.tenant, correlation_id=event.correlation_id
        )
    return fn(state, event)


def fold(events: Iterable[ev.Event], state: RunState | None = None) -> RunState | None:
    """Replay: the state after ``events``, starting from ``state``."""
    for event in events:
        state = evolve(state, event)
    return state


def _with(mapping: Mapping[str, Any], key: str, value: Any) -> Mapping[str, Any]:
    copy = dict(mapping)
    copy[key] = value
    return copy


def _drop_timers(timers: Mapping[str, Timer], ref: str) -> Mapping[str, Timer]:
    if not any(t.ref == ref for t in timers.values()):
        return timers
    return {k: t for k, t in timers.items() if t.ref != ref}


def _step(state: RunState, step: str, **changes: Any) -> StepState | None:
    """The current step with ``changes``, if the event is about the current step."""
    current = state.current
    if current is None or current.step != step:
        return current
    return replace(current, **changes)


@evolver(ev.RunStarted)
def _run_started(state: RunState, e: ev.RunStarted) -> RunState:
    return replace(
        state,
        seq=e.seq,
        workflow=e.workflow,
        version=e.version,
        input=e.input,
        idempotency_key=e.idempotency_key,
        requested_by=e.requested_by,
        priority=e.priority,
        started_at=e.ts,
        correlation_id=e.correlation_id,
    )


@evolver(ev.StepStarted)
def _step_started(state: RunState, e: ev.StepStarted) -> RunState:
    return replace(
        state,
        seq=e.seq,
        current=StepState(step=e.step, visit=e.visit, kind=e.kind, started_at=e.ts),
        visits=_with(state.visits, e.step, e.visit),
    )


@evolver(ev.TaskDispatched)
def _task_dispatched(state: RunState, e: ev.TaskDispatched) -> RunState:
    held = state.current is not None and bool(state.current.slot)
    current = _step(
        state,
        e.step,
        waiting=Waiting.TASK,
        phase=e.phase,
        attempt=e.attempt,
        task_id=e.task_id,
        idempotency_key=e.idempotency_key,
        **({"slot_at": e.ts} if held else {}),
    )
    return replace(state, seq=e.seq, current=current, attempts=state.attempts + 1)


@evolver(ev.SlotRequested)
def _slot_requested(state: RunState, e: ev.SlotRequested) -> RunState:
    current = _step(
        state,
        e.step,
        waiting=Waiting.SLOT,
        phase=e.phase,
        attempt=e.attempt,
        task_id=e.task_id,
        slot=e.key,
        slot_at=e.ts,
    )
    return replace(state, seq=e.seq, current=current)


@evolver(ev.SlotReleased)
def _slot_released(state: RunState, e: ev.SlotReleased) -> RunState:
    return replace(state, seq=e.seq, current=_step(state, e.step, slot="", slot_at=0))


@evolver(ev.TaskCompleted)
def _task_completed(state: RunState, e: ev.TaskCompleted) -> RunState:
    changes: dict[str, Any] = {"waiting": Waiting.NOTHING, "result": e.result}
    if e.phase == Phase.PREPARE:
        changes["change_set"] = e.result
    return replace(
        state,
        seq=e.seq,
        current=_step(state, e.step, **changes),
        cost=state.cost + e.cost,
        timers=_drop_timers(state.timers, e.task_id),
    )


@evolver(ev.TaskFailed)
def _task_failed(state: RunState, e: ev.TaskFailed) -> RunState:
    error = {
        "step": e.step,
        "class": e.error_class,
        "code": e.code,
        "message": e.message,
        "field": e.field,
        "attempt": e.attempt,
    }
    return replace(
        state,
        seq=e.seq,
        current=_step(state, e.step, waiting=Waiting.NOTHING),
        cost=state.cost + e.cost,
        timers=_drop_timers(state.timers, e.task_id),
        last_error=error,
    )


@evolver(ev.RetryScheduled)
def _retry_scheduled(state: RunState, e: ev.RetryScheduled) -> RunState:
    return replace(state, seq=e.seq, current=_step(state, e.step, waiting=Waiting.RETRY))


@evolver(ev.TimerArmed)
def _timer_armed(state: RunState, e: ev.TimerArmed) -> RunState:
    timer = Timer(timer_id=e.timer_id, kind=e.kind, step=e.step, ref=e.ref, due_at=e.due_at)
    return replace(state, seq=e.seq, timers=_with(state.timers, e.timer_id, timer))


@evolver(ev.TimerFired)
def _timer_fired(state: RunState, e: ev.TimerFired) -> RunState:
    if e.timer_id not in state.timers:
        return replace(state, seq=e.seq)
    timers = {k: t for k, t in state.timers.items() if k != e.timer_id}
    return replace(state, seq=e.seq, timers=timers)


@evolver(ev.ApprovalRequested)
def _approval_requested(state: RunState, e: ev.ApprovalRequested) -> RunState:
    approval = Approval(
        approval_id=e.approval_id,
        reason=e.reason,
        approvers=tuple(e.approvers),
        quorum=e.quorum,
        exclude_requester=e.exclude_requester,
        requested_at=e.ts,
        expires_at=e.expires_at,
    )
    current = _step(state, e.step, waiting=Waiting.APPROVAL, approval=approval)
    return replace(state, seq=e.seq, current=current)


def _approval(state: RunState, step: str, approval_id: str) -> Approval | None:
    current = state.current
    if current is None or current.step != step or current.approval is None:
        return None
    return current.approval if current.approval.approval_id == approval_id else None


@evolver(ev.ApprovalVoted)
def _approval_voted(state: RunState, e: ev.ApprovalVoted) -> RunState:
    approval = _approval(state, e.step, e.approval_id)
    if approval is None:
        return replace(state, seq=e.seq)
    voted = replace(approval, votes=(*approval.votes, e.approver))
    return replace(state, seq=e.seq, current=_step(state, e.step, approval=voted))


def _approval_closed(state: RunState, e: Any) -> RunState:
    return replace(
        state,
        seq=e.seq,
        current=_step(state, e.step, waiting=Waiting.NOTHING, approval=None),
        timers=_drop_timers(state.timers, e.approval_id),
    )


EVOLVERS[ev.ApprovalGranted] = _approval_closed
EVOLVERS[ev.ApprovalRejected] = _approval_closed
EVOLVERS[ev.ApprovalExpired] = _approval_closed


@evolver(ev.ApprovalReminded)
def _approval_reminded(state: RunState, e: ev.ApprovalReminded) -> RunState:
    approval = _approval(state, e.step, e.approval_id)
    if approval is None:
        return replace(state, seq=e.seq)
    reminded = replace(approval, reminders=e.reminder)
    return replace(state, seq=e.seq, current=_step(state, e.step, approval=reminded))


@evolver(ev.Escalated)
def _escalated(state: RunState, e: ev.Escalated) -> RunState:
    return replace(state, seq=e.seq, escalations=state.escalations + 1)


@evolver(ev.SignalAwaited)
def _signal_awaited(state: RunState, e: ev.SignalAwaited) -> RunState:
    current = _step(
        state, e.step, waiting=Waiting.SIGNAL, signal=e.name, resume=e.resume, signal_key=e.key
    )
    return replace(state, seq=e.seq, current=current)


def wait_ref(step: StepState) -> str:
    """The ``ref`` of the timers that belong to a step's current wait."""
    return f"{step.step}#{step.visit}"


@evolver(ev.SignalReceived)
def _signal_received(state: RunState, e: ev.SignalReceived) -> RunState:
    signals = _with(state.signals, e.name, e.data)
    current = state.current
    if current is not None and current.waiting is Waiting.SIGNAL and current.signal == e.name:
        # The awaited delivery is the answer: an older buffered one of the same name must not
        # answer a later wait as well (its data was overwritten by this one anyway).
        return replace(
            state,
            seq=e.seq,
            signals=signals,
            unconsumed=state.unconsumed - {e.name},
            current=replace(current, waiting=Waiting.NOTHING, signal="", signal_key=None),
            timers=_drop_timers(state.timers, wait_ref(current)),
        )
    return replace(state, seq=e.seq, signals=signals, unconsumed=state.unconsumed | {e.name})


@evolver(ev.SleepStarted)
def _sleep_started(state: RunState, e: ev.SleepStarted) -> RunState:
    return replace(state, seq=e.seq, current=_step(state, e.step, waiting=Waiting.TIMER))


def _only_seq(state: RunState, e: ev.Event) -> RunState:
    return replace(state, seq=e.seq)


for _event_type in (
    ev.ChoiceEvaluated,
    ev.BusinessErrorHandled,
    ev.CommandRejected,
    ev.CommandRejectedV2,
):
    EVOLVERS[_event_type] = _only_seq


@evolver(ev.StepCompleted)
def _step_completed(state: RunState, e: ev.StepCompleted) -> RunState:
    current = state.current
    unconsumed = state.unconsumed
    timers = state.timers
    if current is not None and current.step == e.step:
        if current.signal:
            unconsumed = unconsumed - {current.signal}
        timers = _drop_timers(timers, wait_ref(current))
    return replace(
        state,
        seq=e.seq,
        current=None,
        results=_with(state.results, e.step, e.result),
        unconsumed=unconsumed,
        timers=timers,
    )


@evolver(ev.StepFailed)
def _step_failed(state: RunState, e: ev.StepFailed) -> RunState:
    current = state.current
    timers = _drop_timers(state.timers, wait_ref(current)) if current is not None else state.timers
    return replace(state, seq=e.seq, current=None, timers=timers)


@evolver(ev.SlaBreached)
def _sla_breached(state: RunState, e: ev.SlaBreached) -> RunState:
    return replace(state, seq=e.seq, sla_breached=True)


def _ended(state: RunState, e: ev.Event, outcome: RunStatus, **changes: Any) -> RunState:
    return replace(state, seq=e.seq, outcome=outcome, ended_at=e.ts, timers={}, **changes)


@evolver(ev.RunCompleted)
def _run_completed(state: RunState, e: ev.RunCompleted) -> RunState:
    return _ended(state, e, RunStatus.COMPLETED, output=e.output, current=None)


@evolver(ev.RunFailed)
def _run_failed(state: RunState, e: ev.RunFailed) -> RunState:
    error = {
        "step": e.step,
        "class": e.error_class,
        "code": e.code,
        "message": e.message,
        "field": e.field,
    }
    return _ended(state, e, RunStatus.FAILED, error=error, current=None)


@evolver(ev.RunCancelled)
def _run_cancelled(state: RunState, e: ev.RunCancelled) -> RunState:
    error = {"code": "CANCELLED", "message": e.reason, "by": e.by}
    return _ended(state, e, RunStatus.CANCELLED, error=error, current=None)
