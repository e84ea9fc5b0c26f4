"""``decide``: validate a command against run state and return the events it causes.

``process`` is the form the runtime uses: it returns the events and the state after
them. Each event is applied with ``evolve`` the moment it is emitted, so the state a
later decision in the same command sees is exactly the state replay would build.
Nothing here raises on bad input: a command that cannot apply becomes a
``CommandRejected`` event, and a run whose data breaks an expression fails with a
diagnostic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.core import commands as cmd
from engine.core import events as ev
from engine.core.durations import format_duration
from engine.core.errors import ExpressionError
from engine.core.evolve import evolve, wait_ref
from engine.core.expressions import evaluate, map_input, truthy
from engine.core.flow import LEASE_MARGIN_MS, FlowLimits
from engine.core.kinds import (
    ApprovalReason,
    ErrorClass,
    HandlerAction,
    Phase,
    Resume,
    StepKind,
    TimerKind,
    escalated,
    granted_reason,
    is_escalation,
)
from engine.core.policies import backoff_ms, idempotency_key, identity, task_id
from engine.core.spec import FAIL, ApprovalSpec, Handler, StepSpec, WorkflowSpec, check_input
from engine.core.state import Approval, RunState, Waiting

MAX_TRANSITIONS = 100
"""Steps one command may enter before the run is failed as a runaway loop."""

C = TypeVar("C", bound=cmd.Command)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one command: the events, and the state after them.

    ``state`` is None when the command addressed a run that does not exist (the
    only event is then a ``CommandRejected`` with sequence 0, not part of any run log).
    """

    state: RunState | None
    events: list[ev.Event]


def decide(
    state: RunState | None,
    command: cmd.Command,
    spec: WorkflowSpec | None,
    now: int,
    flow: FlowLimits | None = None,
) -> list[ev.Event]:
    """The events ``command`` causes in ``state`` at time ``now`` (ms), under the limits
    document ``flow`` (None: no flow control)."""
    return process(state, command, spec, now, flow).events


def process(
    state: RunState | None,
    command: cmd.Command,
    spec: WorkflowSpec | None,
    now: int,
    flow: FlowLimits | None = None,
) -> Decision:
    """Decide and evolve together; ``state`` is not modified."""
    ctx = _Context(state, command, spec, now, flow)
    handler = _HANDLERS.get(type(command))
    if handler is None:
        ctx.reject(
            "unknown command", f"{type(command).__name__} is not a command this engine knows"
        )
    elif state is None and not isinstance(command, cmd.StartRun):
        ctx.reject("unknown run", f"no run {command.run_id!r}; check the run id")
    elif spec is None or (
        state is not None and state.workflow and spec.key != (state.workflow, state.version)
    ):
        ctx.reject(
            "workflow not deployed",
            "deploy the workflow version this run uses before sending it commands",
        )
    else:
        try:
            handler(ctx, command)
        except ExpressionError as exc:
            ctx.fail_run(ErrorClass.PERMANENT, "EXPRESSION_FAILED", str(exc), None)
    return Decision(ctx.state, ctx.events)


class _Context:
    """One command being decided: emits events and keeps the evolving state."""

    __slots__ = ("command", "entered", "events", "flow", "now", "spec", "state")

    def __init__(
        self,
        state: RunState | None,
        command: cmd.Command,
        spec: WorkflowSpec | None,
        now: int,
        flow: FlowLimits | None = None,
    ) -> None:
        self.flow = flow
        self.state = state
        self.command = command
        self.spec = spec
        self.now = now
        self.events: list[ev.Event] = []
        self.entered = 0

    # ------------------------------------------------------------------ plumbing

    @property
    def run(self) -> RunState:
        assert self.state is not None
        return self.state

    @property
    def workflow(self) -> WorkflowSpec:
        assert self.spec is not None
        return self.spec

    def emit(self, event_type: type[ev.Event], **fields: Any) -> None:
        c = self.command
        s = self.state
        if s is None:
            seq, tenant, correlation = 1, c.tenant, c.correlation_id or c.run_id
        else:
            seq, tenant, correlation = s.seq + 1, s.tenant, s.correlation_id
        event = event_type(
            run_id=c.run_id,
            seq=seq,
            ts=self.now,
            tenant=tenant,
            correlation_id=correlation,
            causation_id=c.command_id,
            **fields,
        )
        self.state = evolve(s, event)
        self.events.append(event)

    def reject(self, reason: str, detail: str = "") -> None:
        c = self.command
        by, at_step = _sender(c)
        fields = {
            "command_type": c.TYPE,
            "command_id": c.command_id,
            "reason": reason,
            "detail": detail,
            "by": by,
            "at_step": at_step,
        }
        if self.state is None or not self.state.workflow:
            # No run to record it in: the runtime sends it to dead letters.
            self.events.append(
                ev.CommandRejectedV2(
                    run_id=c.run_id,
                    seq=0,
                    ts=self.now,
                    tenant=c.tenant,
                    correlation_id=c.correlation_id,
                    causation_id=c.command_id,
                    **fields,
                )
            )
            return
        self.emit(ev.CommandRejectedV2, **fields)

    def active(self) -> bool:
        if self.run.terminal:
            self.reject("run ended", f"run is {self.run.status.value}; nothing more can happen")
            return False
        return True

    def arm(self, kind: TimerKind, step: str, ref: str, due_at: int) -> None:
        timer_id = f"{kind}@{self.run.seq + 1}"
        self.emit(ev.TimerArmed, timer_id=timer_id, kind=kind, step=step, ref=ref, due_at=due_at)

    def step_spec(self) -> StepSpec:
        current = self.run.current
        assert current is not None
        return self.workflow.step(current.step)

    # ------------------------------------------------------------------ steps

    def enter(self, step_id: str | None) -> None:
        if step_id is None:
            self.complete_run()
            return
        self.entered += 1
        if self.entered > MAX_TRANSITIONS:
            self.fail_run(
                ErrorClass.PERMANENT,
                "LOOP_LIMIT",
                f"more than {MAX_TRANSITIONS} steps entered for one command; "
                f"the loop through {step_id!r} never waits",
                None,
            )
            return
        step = self.workflow.step(step_id)
        visit = self.run.visits.get(step_id, 0) + 1
        self.emit(ev.StepStarted, step=step_id, visit=visit, kind=step.kind)
        _ENTER[step.kind](self, step)

    def wait_ref(self) -> str:
        current = self.run.current
        assert current is not None
        return wait_ref(current)

    def task_input(self, step: StepSpec, phase: Phase) -> Any:
        data = self.run.data()
        mapped = map_input(step.input, data) if step.input is not None else self.run.input
        if phase is Phase.COMMIT:
            current = self.run.current
            base = mapped if isinstance(mapped, dict) else {"input": mapped}
            return {**base, "change_set": current.change_set if current else None}
        return mapped

    def dispatch(self, phase: Phase, attempt: int) -> None:
        step = self.step_spec()
        current = self.run.current
        assert current is not None
        queue = _queue_of(step, phase)
        tid = task_id(self.run.run_id, step.id, current.visit, phase, attempt)
        flow = self.flow
        slot = flow.slot_for(queue) if flow is not None else None
        if flow is not None and slot is not None:
            key, limits = slot
            self.emit(
                ev.SlotRequested,
                step=step.id,
                phase=phase,
                attempt=attempt,
                task_id=tid,
                key=key,
                limits=limits,
                limits_version=flow.version,
                lease_ms=step.timeout + LEASE_MARGIN_MS,
                priority=self.run.priority,
            )
            return
        self.send_task(phase, attempt)

    def send_task(self, phase: Phase, attempt: int) -> None:
        """Dispatch the current step's task (now, or when its slot is granted)."""
        step = self.step_spec()
        current = self.run.current
        assert current is not None
        queue = _queue_of(step, phase)
        tid = task_id(self.run.run_id, step.id, current.visit, phase, attempt)
        timeout_at = self.now + step.timeout
        self.emit(
            ev.TaskDispatched,
            step=step.id,
            phase=phase,
            attempt=attempt,
            task_id=tid,
            queue=queue,
            idempotency_key=idempotency_key(self.run.run_id, step.id, current.visit, phase),
            input=self.task_input(step, phase),
            timeout_at=timeout_at,
        )
        self.arm(TimerKind.TASK_TIMEOUT, step.id, tid, timeout_at)

    def request_approval(self, reason: str, spec: ApprovalSpec, payload: Any) -> None:
        """Ask ``spec``'s approvers; ``reason`` (an ``ApprovalReason``, or the
        ``escalation:<reason>`` of an escalated one) says what a grant leads to."""
        current = self.run.current
        assert current is not None
        approval_id = f"{current.step}#{current.visit}/{reason}@{self.run.seq + 1}"
        expires_at = self.now + spec.expires_after if spec.expires_after is not None else None
        self.emit(
            ev.ApprovalRequested,
            step=current.step,
            approval_id=approval_id,
            reason=reason,
            approvers=list(spec.approvers),
            quorum=spec.quorum,
            exclude_requester=spec.exclude_requester,
            requester=self.run.requested_by,
            payload=payload,
            expires_at=expires_at,
        )
        if spec.remind_every is not None:
            due = self.now + spec.remind_every
            if expires_at is None or due < expires_at:
                self.arm(TimerKind.APPROVAL_REMINDER, current.step, approval_id, due)
        if expires_at is not None:
            self.arm(TimerKind.APPROVAL_EXPIRY, current.step, approval_id, expires_at)
        if spec.sla is not None:
            self.arm(TimerKind.APPROVAL_SLA, current.step, approval_id, self.now + spec.sla)

    def approval_spec(self, approval: Approval) -> ApprovalSpec:
        step = self.step_spec()
        if is_escalation(approval.reason):
            return ApprovalSpec(approvers=list(approval.approvers))
        if approval.reason == ApprovalReason.REVIEW and step.review is not None:
            return step.review
        assert step.approval is not None
        return step.approval

    def await_signal(self, name: str, key: str | None, timeout: int | None, resume: Resume) -> None:
        current = self.run.current
        assert current is not None
        timeout_at = self.now + timeout if timeout is not None else None
        self.emit(
            ev.SignalAwaited,
            step=current.step,
            name=name,
            key=key,
            resume=resume,
            timeout_at=timeout_at,
        )
        if timeout_at is not None:
            self.arm(TimerKind.SIGNAL_TIMEOUT, current.step, self.wait_ref(), timeout_at)
        if resume is Resume.COMPLETE and name in self.run.unconsumed:
            self.complete_step(self.run.signals.get(name))

    def choose(self, step: StepSpec) -> None:
        data = self.run.data()
        branch, target = (
            -1,
            (step.default if step.default is not None else self.workflow.next_step(step.id)),
        )
        for j, option in enumerate(step.choice or []):
            if truthy(evaluate(option.when, data)):
                branch, target = j, option.goto
                break
        self.emit(ev.ChoiceEvaluated, step=step.id, branch=branch, target=target)
        self.emit(ev.StepCompleted, step=step.id, result={"branch": branch, "target": target})
        self.enter(target)

    def complete_step(self, result: Any) -> None:
        current = self.run.current
        assert current is not None
        self.emit(ev.StepCompleted, step=current.step, result=result)
        self.enter(self.workflow.next_step(current.step))

    def complete_run(self) -> None:
        spec = self.workflow
        if spec.output is not None:
            output = evaluate(spec.output, self.run.data())
        else:
            finished = [e for e in self.events if isinstance(e, ev.StepCompleted)]
            output = finished[-1].result if finished else None
        self.emit(ev.RunCompleted, output=output)

    def fail_run(self, error_class: ErrorClass, code: str, message: str, field: str | None) -> None:
        current = self.run.current
        step = current.step if current is not None else None
        if step is not None:
            self.emit(
                ev.StepFailed,
                step=step,
                error_class=error_class,
                code=code,
                message=message,
                field=field,
            )
        self.emit(
            ev.RunFailed,
            step=step,
            error_class=error_class,
            code=code,
            message=message,
            field=field,
        )

    # ------------------------------------------------------------------ outcomes

    def handle_failure(
        self, error_class: ErrorClass, code: str, message: str, field: str | None
    ) -> None:
        step = self.step_spec()
        current = self.run.current
        assert current is not None
        if error_class is ErrorClass.PERMANENT:
            self.fail_run(ErrorClass.PERMANENT, code, message, field)
        elif error_class is ErrorClass.BUSINESS:
            handler = step.on_business_error.get(code) or step.on_business_error.get("*")
            if handler is None:
                hint = f"; add on_business_error.{code} to step {step.id!r} to handle it"
                self.fail_run(ErrorClass.BUSINESS, code, message + hint, field)
            else:
                self.apply_handler(handler, code, message, ErrorClass.BUSINESS)
        elif current.attempt < step.retry.max_attempts:
            delay = backoff_ms(step.retry, self.run.run_id, step.id, current.attempt)
            due = self.now + delay
            self.emit(
                ev.RetryScheduled,
                step=step.id,
                phase=current.phase,
                attempt=current.attempt + 1,
                delay_ms=delay,
                due_at=due,
            )
            self.arm(TimerKind.RETRY, step.id, self.wait_ref(), due)
        else:
            summary = f"gave up after {current.attempt} attempts; last error {code}: {message}"
            if step.on_exhausted is not None:
                self.apply_handler(
                    step.on_exhausted, "RETRIES_EXHAUSTED", summary, ErrorClass.TRANSIENT
                )
            else:
                self.fail_run(ErrorClass.TRANSIENT, "RETRIES_EXHAUSTED", summary, field)

    def apply_handler(
        self, handler: Handler, code: str, message: str, error_class: ErrorClass
    ) -> None:
        current = self.run.current
        assert current is not None
        action = handler.action
        if action is HandlerAction.FAIL:
            self.fail_run(error_class, code, message, None)
            return
        target = handler.goto or handler.wait_event or handler.escalate or ""
        self.emit(
            ev.BusinessErrorHandled, step=current.step, code=code, action=action, target=target
        )
        if action is HandlerAction.GOTO:
            self.enter(handler.goto)
        elif action is HandlerAction.WAIT_EVENT:
            assert handler.wait_event is not None
            self.await_signal(handler.wait_event, None, handler.timeout, Resume.RETRY)
        else:
            self.escalate(handler, code, message, ApprovalReason.ESCALATION)

    def escalate(self, handler: Handler, code: str, message: str, reason: str) -> None:
        current = self.run.current
        assert current is not None and handler.escalate is not None
        self.emit(ev.Escalated, step=current.step, to=handler.escalate, reason=code)
        spec = ApprovalSpec(approvers=[handler.escalate], expires_after=handler.expires_after)
        self.request_approval(reason, spec, {"code": code, "message": message})

    def after_grant(self, approval: Approval, approvers: list[str]) -> None:
        """The quorum is met: do what the approval was asked for (``_ON_GRANT``). An
        escalated approval does what its original would have done."""
        rule = _ON_GRANT.get(granted_reason(approval.reason), _grant_approval)
        rule(self, approvers)

    def on_approval_end(
        self, handler: Handler, approval: Approval, code: str, message: str
    ) -> None:
        """An approval expired or was rejected: fail, go to a step, or escalate."""
        if handler.action is HandlerAction.ESCALATE:
            self.escalate(handler, code, message, escalated(approval.reason))
        elif handler.action is HandlerAction.GOTO:
            self.enter(handler.goto)
        else:
            self.fail_run(ErrorClass.BUSINESS, code, message, None)


def _sender(c: cmd.Command) -> tuple[str, str]:
    """Who sent ``c`` as the command names them, and the step it is about."""
    if isinstance(c, cmd.DecideApproval):
        return c.approver, c.step
    if isinstance(c, cmd.CompleteTask | cmd.FailTask):
        return "", c.step
    if isinstance(c, cmd.CancelRun):
        return c.by, ""
    if isinstance(c, cmd.StartRun):
        return c.requested_by, ""
    return "", ""


# ---------------------------------------------------------------------- entering a step
# One function per step kind, as Zeebe registers one processor per intent.

_StepEntry = Callable[[_Context, StepSpec], None]
_ENTER: dict[StepKind, _StepEntry] = {}


def _enters(kind: StepKind) -> Callable[[_StepEntry], _StepEntry]:
    def register(fn: _StepEntry) -> _StepEntry:
        _ENTER[kind] = fn
        return fn

    return register


@_enters(StepKind.TASK)
def _enter_task(ctx: _Context, step: StepSpec) -> None:
    if step.approval is not None:
        payload = ctx.task_input(step, Phase.TASK)
        ctx.request_approval(ApprovalReason.CRITICAL, step.approval, payload)
    else:
        ctx.dispatch(Phase.TASK, 1)


@_enters(StepKind.PREPARE_COMMIT)
def _enter_prepare_commit(ctx: _Context, step: StepSpec) -> None:
    ctx.dispatch(Phase.PREPARE, 1)


@_enters(StepKind.APPROVAL)
def _enter_approval(ctx: _Context, step: StepSpec) -> None:
    assert step.approval is not None
    payload = map_input(step.input, ctx.run.data()) if step.input is not None else None
    ctx.request_approval(ApprovalReason.APPROVAL, step.approval, payload)


@_enters(StepKind.WAIT_EVENT)
def _enter_wait_event(ctx: _Context, step: StepSpec) -> None:
    assert step.wait_event is not None
    wait = step.wait_event
    key = evaluate(wait.key, ctx.run.data()) if wait.key is not None else None
    if wait.key is not None and key is None:
        ctx.fail_run(
            ErrorClass.PERMANENT,
            "CORRELATION_KEY_MISSING",
            f"wait_event.key {wait.key!r} of step {step.id!r} is null for this run: "
            "no message could ever match it",
            None,
        )
        return
    ctx.await_signal(wait.name, None if key is None else str(key), wait.timeout, Resume.COMPLETE)


@_enters(StepKind.CHOICE)
def _enter_choice(ctx: _Context, step: StepSpec) -> None:
    ctx.choose(step)


@_enters(StepKind.SLEEP)
def _enter_sleep(ctx: _Context, step: StepSpec) -> None:
    assert step.sleep is not None
    until = ctx.now + step.sleep
    ctx.emit(ev.SleepStarted, step=step.id, until=until)
    ctx.arm(TimerKind.SLEEP, step.id, ctx.wait_ref(), until)


# ---------------------------------------------------------------------- granted approvals
# What the grant of an approval leads to, by the reason it was requested for.

_GrantRule = Callable[[_Context, list[str]], None]
_ON_GRANT: dict[str, _GrantRule] = {}


def _on_grant(reason: ApprovalReason) -> Callable[[_GrantRule], _GrantRule]:
    def register(fn: _GrantRule) -> _GrantRule:
        _ON_GRANT[reason] = fn
        return fn

    return register


@_on_grant(ApprovalReason.CRITICAL)
def _grant_critical(ctx: _Context, approvers: list[str]) -> None:
    ctx.dispatch(Phase.TASK, 1)


@_on_grant(ApprovalReason.PREPARE_COMMIT)
def _grant_prepare_commit(ctx: _Context, approvers: list[str]) -> None:
    ctx.dispatch(Phase.COMMIT, 1)


@_on_grant(ApprovalReason.REVIEW)
def _grant_review(ctx: _Context, approvers: list[str]) -> None:
    current = ctx.run.current
    assert current is not None
    ctx.complete_step(current.result)


@_on_grant(ApprovalReason.ESCALATION)
def _grant_escalation(ctx: _Context, approvers: list[str]) -> None:
    ctx.complete_step({"resolved_by": approvers})


@_on_grant(ApprovalReason.APPROVAL)
def _grant_approval(ctx: _Context, approvers: list[str]) -> None:
    ctx.complete_step({"approved_by": approvers})


# ---------------------------------------------------------------------- command handlers

_HANDLERS: dict[type[cmd.Command], Callable[[_Context, Any], None]] = {}


_CommandHandler = Callable[[_Context, C], None]


def _handles(command_type: type[C]) -> Callable[[_CommandHandler[C]], _CommandHandler[C]]:
    def register(fn: _CommandHandler[C]) -> _CommandHandler[C]:
        _HANDLERS[command_type] = fn
        return fn

    return register


@_handles(cmd.StartRun)
def _start_run(ctx: _Context, c: cmd.StartRun) -> None:
    if ctx.state is not None and ctx.state.workflow:
        ctx.reject(
            "duplicate start",
            f"run {c.run_id} already exists for idempotency key {c.idempotency_key!r}",
        )
        return
    spec = ctx.workflow
    if spec.workflow != c.workflow:
        ctx.reject("unknown workflow", f"spec {spec.workflow!r} does not match {c.workflow!r}")
        return
    sla_due = ctx.now + spec.sla if spec.sla is not None else None
    ctx.emit(
        ev.RunStarted,
        workflow=spec.workflow,
        version=spec.version,
        input=c.input,
        idempotency_key=c.idempotency_key,
        requested_by=c.requested_by,
        priority=c.priority,
        sla_due_at=sla_due,
    )
    if sla_due is not None:
        ctx.arm(TimerKind.RUN_SLA, "", c.run_id, sla_due)
    problem = check_input(spec.input, c.input, "input", strict=spec.strict_input)
    if problem is not None:
        path, message = problem
        ctx.fail_run(ErrorClass.PERMANENT, "INVALID_INPUT", f"{path}: {message}", path)
        return
    excluding = spec.requester_excluded_at()
    if excluding is not None and not identity(c.requested_by):
        # Without a requester, "anyone but the requester" is anyone: four-eyes would hold
        # in name only. Refuse at the start, before any step has an effect.
        ctx.fail_run(
            ErrorClass.PERMANENT,
            "REQUESTER_REQUIRED",
            f"step {excluding!r} has an approval the requester may not vote in, "
            "but the run names no requester: start it with requested_by (--as on "
            "the command line), or set exclude_requester: false",
            "requested_by",
        )
        return
    ctx.enter(spec.steps[0].id)


def _release_slot(ctx: _Context, outcome: str, cost: float) -> None:
    """Give back the slot the current task holds or waits for, if any."""
    current = ctx.run.current
    if current is None or not current.slot:
        return
    ctx.emit(
        ev.SlotReleased,
        step=current.step,
        task_id=current.task_id,
        key=current.slot,
        outcome=outcome if current.waiting is Waiting.TASK else "cancelled",
        cost=cost,
        latency_ms=max(0, ctx.now - current.slot_at),
    )


def _awaited_slot(ctx: _Context, tid: str, key: str) -> bool:
    if not ctx.active():
        return False
    current = ctx.run.current
    if (
        current is None
        or current.waiting is not Waiting.SLOT
        or current.task_id != tid
        or current.slot != key
    ):
        ctx.reject(
            "stale grant",
            f"task {tid} does not wait for a slot on {key}: the run "
            "moved on, or the grant came twice",
        )
        return False
    return True


@_handles(cmd.GrantSlot)
def _grant_slot(ctx: _Context, c: cmd.GrantSlot) -> None:
    if not _awaited_slot(ctx, c.task_id, c.key):
        return
    current = ctx.run.current
    assert current is not None
    ctx.send_task(Phase(current.phase), current.attempt)


@_handles(cmd.RefuseSlot)
def _refuse_slot(ctx: _Context, c: cmd.RefuseSlot) -> None:
    if not _awaited_slot(ctx, c.task_id, c.key):
        return
    _release_slot(ctx, "cancelled", 0.0)
    ctx.handle_failure(ErrorClass.BUSINESS, c.code, c.message, None)


def _awaited_task(ctx: _Context, step: str, tid: str) -> bool:
    if not ctx.active():
        return False
    current = ctx.run.current
    if (
        current is None
        or current.step != step
        or current.waiting is not Waiting.TASK
        or current.task_id != tid
    ):
        ctx.reject(
            "stale result",
            f"task {tid} is not awaited: it was already reported, timed out, or the run moved on",
        )
        return False
    return True


@_handles(cmd.CompleteTask)
def _complete_task(ctx: _Context, c: cmd.CompleteTask) -> None:
    if not _awaited_task(ctx, c.step, c.task_id):
        return
    current = ctx.run.current
    assert current is not None
    step = ctx.step_spec()
    common = {
        "step": c.step,
        "phase": current.phase,
        "attempt": current.attempt,
        "task_id": c.task_id,
        "cost": c.cost,
    }
    if step.result is not None and current.phase == Phase.TASK:
        problem = check_input(step.result, c.result, "result")
        if problem is not None:
            path, message = problem
            text = f"{step.task} returned an invalid result: {path}: {message}"
            _release_slot(ctx, "failed", c.cost)
            ctx.emit(
                ev.TaskFailed,
                error_class=ErrorClass.PERMANENT,
                code="SCHEMA_VIOLATION",
                message=text,
                field=path,
                **common,
            )
            ctx.handle_failure(ErrorClass.PERMANENT, "SCHEMA_VIOLATION", text, path)
            return
    _release_slot(ctx, "ok", c.cost)
    ctx.emit(ev.TaskCompleted, result=c.result, confidence=c.confidence, **common)
    data = {**ctx.run.data(), "result": c.result, "confidence": c.confidence}
    if current.phase == Phase.PREPARE:
        wanted = step.review_if is None or truthy(evaluate(step.review_if, data))
        if step.approval is not None and wanted:
            ctx.request_approval(ApprovalReason.PREPARE_COMMIT, step.approval, c.result)
        else:
            ctx.dispatch(Phase.COMMIT, 1)
    elif (
        step.review is not None
        and current.phase == Phase.TASK
        and (step.review_if is None or truthy(evaluate(step.review_if, data)))
    ):
        ctx.request_approval(
            ApprovalReason.REVIEW, step.review, {"result": c.result, "confidence": c.confidence}
        )
    else:
        ctx.complete_step(c.result)


@_handles(cmd.FailTask)
def _fail_task(ctx: _Context, c: cmd.FailTask) -> None:
    if not _awaited_task(ctx, c.step, c.task_id):
        return
    current = ctx.run.current
    assert current is not None
    # A worker's class is taken as it says when it is one the engine handles specially;
    # anything else (empty, a typo, a class a newer SDK invented) is retried.
    error_class = (
        ErrorClass(c.error_class)
        if c.error_class in (ErrorClass.PERMANENT, ErrorClass.BUSINESS)
        else ErrorClass.TRANSIENT
    )
    _release_slot(ctx, "failed", c.cost)
    ctx.emit(
        ev.TaskFailed,
        step=c.step,
        phase=current.phase,
        attempt=current.attempt,
        task_id=c.task_id,
        error_class=error_class,
        code=c.code,
        message=c.message,
        field=c.field,
        cost=c.cost,
    )
    ctx.handle_failure(error_class, c.code, c.message, c.field)


@_handles(cmd.DecideApproval)
def _decide_approval(ctx: _Context, c: cmd.DecideApproval) -> None:
    if not ctx.active():
        return
    current = ctx.run.current
    waiting = (
        current is not None and current.waiting is Waiting.APPROVAL and current.approval is not None
    )
    elsewhere = (
        f"step {current.step!r} is waiting for approval"
        if waiting and current
        else "no step is waiting for approval"
    )
    if not ctx.workflow.has_step(c.step):
        ctx.reject(
            "unknown step",
            f"{ctx.workflow.workflow} v{ctx.workflow.version} has no step {c.step!r}; {elsewhere}",
        )
        return
    if not waiting or current is None or current.step != c.step or current.approval is None:
        ctx.reject(
            "no pending approval",
            f"step {c.step!r} is not waiting for approval: it was decided, expired, "
            f"or the run is elsewhere; {elsewhere}",
        )
        return
    approval = current.approval
    who = identity(c.approver)
    if not who:
        ctx.reject(
            "no approver",
            "a decision names who made it; give the approver's name (--as on the command line)",
        )
        return
    if not set(c.roles) & set(approval.approvers):
        ctx.reject(
            "not an approver",
            f"{c.approver} (roles: {', '.join(c.roles) or 'none'}) is in none of "
            f"{', '.join(approval.approvers)}",
        )
        return
    if approval.exclude_requester and who == identity(ctx.run.requested_by):
        ctx.reject(
            "self-approval",
            f"{c.approver} requested this run and may not approve it; ask another approver",
        )
        return
    if who in {identity(v) for v in approval.votes}:
        ctx.reject(
            "duplicate approval",
            f"{c.approver} already approved; the quorum of "
            f"{approval.quorum} needs distinct approvers (names are compared "
            "without case and surrounding spaces)",
        )
        return
    if not c.approve:
        ctx.emit(
            ev.ApprovalRejected,
            step=c.step,
            approval_id=approval.approval_id,
            approver=c.approver,
            comment=c.comment,
        )
        handler = ctx.approval_spec(approval).on_reject
        message = f"rejected by {c.approver}" + (f": {c.comment}" if c.comment else "")
        ctx.on_approval_end(handler, approval, "APPROVAL_REJECTED", message)
        return
    votes = [*approval.votes, c.approver]
    if len(votes) < approval.quorum:
        ctx.emit(
            ev.ApprovalVoted,
            step=c.step,
            approval_id=approval.approval_id,
            approver=c.approver,
            comment=c.comment,
        )
        return
    ctx.emit(
        ev.ApprovalGranted,
        step=c.step,
        approval_id=approval.approval_id,
        approvers=votes,
        comment=c.comment,
    )
    ctx.after_grant(approval, votes)


@_handles(cmd.DeliverSignal)
def _deliver_signal(ctx: _Context, c: cmd.DeliverSignal) -> None:
    if not ctx.active():
        return
    current = ctx.run.current
    awaited = current is not None and current.waiting is Waiting.SIGNAL and current.signal == c.name
    ctx.emit(ev.SignalReceived, name=c.name, data=c.data)
    if awaited:
        assert current is not None
        if current.resume == Resume.RETRY:
            ctx.enter(current.step)
        else:
            ctx.complete_step(c.data)


@_handles(cmd.CorrelateMessage)
def _correlate_message(ctx: _Context, c: cmd.CorrelateMessage) -> None:
    """A message matched this run's keyed wait ``c.wait``; it answers only that wait."""
    if not ctx.active():
        return
    current = ctx.run.current
    if (
        current is None
        or current.waiting is not Waiting.SIGNAL
        or wait_ref(current) != c.wait
        or current.signal != c.name
        or current.signal_key != c.key
    ):
        ctx.reject(
            "stale message",
            f"message {c.message_id!r} ({c.name!r}, key {c.key!r}) "
            f"answers wait {c.wait!r}, which is no longer open",
        )
        return
    ctx.emit(ev.SignalReceived, name=c.name, data=c.data)
    ctx.complete_step(c.data)


@_handles(cmd.FireTimer)
def _fire_timer(ctx: _Context, c: cmd.FireTimer) -> None:
    if not ctx.active():
        return
    timer = ctx.run.timers.get(c.timer_id)
    if timer is None:
        ctx.reject("stale timer", f"timer {c.timer_id} is not armed (fired already or cancelled)")
        return
    if timer.due_at > ctx.now:
        ctx.reject("timer not due", f"timer {c.timer_id} is due at {timer.due_at}, now {ctx.now}")
        return
    ctx.emit(ev.TimerFired, timer_id=timer.timer_id, kind=timer.kind)
    _TIMER_KINDS[timer.kind](ctx, timer.ref, timer.due_at)


def _on_run_sla(ctx: _Context, ref: str, due_at: int) -> None:
    ctx.emit(ev.SlaBreached, scope="run", step=None, due_at=due_at)


def _on_approval_sla(ctx: _Context, ref: str, due_at: int) -> None:
    current = ctx.run.current
    ctx.emit(ev.SlaBreached, scope="step", step=current.step if current else None, due_at=due_at)


def _on_retry(ctx: _Context, ref: str, due_at: int) -> None:
    current = ctx.run.current
    if current is not None and current.waiting is Waiting.RETRY:
        ctx.dispatch(Phase(current.phase), current.attempt + 1)


def _on_task_timeout(ctx: _Context, ref: str, due_at: int) -> None:
    current = ctx.run.current
    if current is None or current.waiting is not Waiting.TASK or current.task_id != ref:
        return
    step = ctx.step_spec()
    message = f"no result within {format_duration(step.timeout)} (attempt {current.attempt})"
    _release_slot(ctx, "failed", 0.0)
    ctx.emit(
        ev.TaskFailed,
        step=current.step,
        phase=current.phase,
        attempt=current.attempt,
        task_id=current.task_id,
        error_class=ErrorClass.TRANSIENT,
        code="TASK_TIMEOUT",
        message=message,
        field=None,
        cost=0.0,
    )
    ctx.handle_failure(ErrorClass.TRANSIENT, "TASK_TIMEOUT", message, None)


def _pending_approval(ctx: _Context, ref: str) -> Approval | None:
    current = ctx.run.current
    if current is None or current.approval is None or current.approval.approval_id != ref:
        return None
    return current.approval


def _on_approval_reminder(ctx: _Context, ref: str, due_at: int) -> None:
    approval = _pending_approval(ctx, ref)
    if approval is None:
        return
    current = ctx.run.current
    assert current is not None
    ctx.emit(
        ev.ApprovalReminded,
        step=current.step,
        approval_id=ref,
        reminder=approval.reminders + 1,
        approvers=list(approval.approvers),
    )
    every = ctx.approval_spec(approval).remind_every
    if every is not None:
        due = ctx.now + every
        if approval.expires_at is None or due < approval.expires_at:
            ctx.arm(TimerKind.APPROVAL_REMINDER, current.step, ref, due)


def _on_approval_expiry(ctx: _Context, ref: str, due_at: int) -> None:
    approval = _pending_approval(ctx, ref)
    if approval is None:
        return
    current = ctx.run.current
    assert current is not None
    ctx.emit(ev.ApprovalExpired, step=current.step, approval_id=ref)
    handler = ctx.approval_spec(approval).on_expire
    ctx.on_approval_end(
        handler,
        approval,
        "APPROVAL_EXPIRED",
        f"no decision on step {current.step!r} before it expired",
    )


def _on_signal_timeout(ctx: _Context, ref: str, due_at: int) -> None:
    current = ctx.run.current
    if current is None or current.waiting is not Waiting.SIGNAL:
        return
    step = ctx.step_spec()
    handler = step.wait_event.on_timeout if step.wait_event is not None else FAIL
    message = f"signal {current.signal!r} did not arrive in time"
    if handler.action is HandlerAction.GOTO:
        ctx.enter(handler.goto)
    else:
        ctx.fail_run(ErrorClass.BUSINESS, "SIGNAL_TIMEOUT", message, None)


def _on_sleep(ctx: _Context, ref: str, due_at: int) -> None:
    current = ctx.run.current
    if current is not None and current.waiting is Waiting.TIMER:
        ctx.complete_step(None)


_TIMER_KINDS: dict[str, Callable[[_Context, str, int], None]] = {
    TimerKind.RUN_SLA: _on_run_sla,
    TimerKind.APPROVAL_SLA: _on_approval_sla,
    TimerKind.RETRY: _on_retry,
    TimerKind.TASK_TIMEOUT: _on_task_timeout,
    TimerKind.APPROVAL_REMINDER: _on_approval_reminder,
    TimerKind.APPROVAL_EXPIRY: _on_approval_expiry,
    TimerKind.SIGNAL_TIMEOUT: _on_signal_timeout,
    TimerKind.SLEEP: _on_sleep,
}
"""What a fired timer does, by its kind (``TimerKind``); keyed by the string the timer
carries, which is the member's value."""


@_handles(cmd.CancelRun)
def _cancel_run(ctx: _Context, c: cmd.CancelRun) -> None:
    if ctx.active():
        _release_slot(ctx, "cancelled", 0.0)
        ctx.emit(ev.RunCancelled, reason=c.reason or "cancelled", by=c.by)


def _queue_of(step: StepSpec, phase: Phase) -> str:
    """The task queue of ``step`` in ``phase``: its task's, or its prepare or commit's."""
    if phase is Phase.TASK:
        queue = step.task
    else:
        assert step.prepare_commit is not None
        queue = (
            step.prepare_commit.prepare if phase is Phase.PREPARE else step.prepare_commit.commit
        )
    assert queue is not None
    return queue
