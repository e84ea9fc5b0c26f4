"""Run-level behaviour: SLA, cancel, idempotent start, input checks, stale inputs, timers,
unknown runs, cost, the event envelope, and the derived run status."""

from __future__ import annotations

import pytest

from engine.core import commands as cmd
from engine.core.decide import Decision, decide, process
from engine.core.events import (
    ApprovalRequested,
    CommandRejected,
    RetryScheduled,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunStarted,
    SlaBreached,
    StepCompleted,
    StepStarted,
    TaskCompleted,
    TaskDispatched,
    TaskFailed,
    TimerArmed,
    TimerFired,
)
from engine.core.evolve import fold
from engine.core.spec import load_spec
from engine.core.state import RunStatus
from tests.harness import RUN, T0, Flow, wf

HOUR = 3_600_000


TWO_TASKS = wf({"id": "a", "task": "q.a", "retry": {"max_attempts": 3}}, {"id": "b", "task": "q.b"})


# --------------------------------------------------------------------------- run SLA


def test_run_sla_breach_is_recorded_while_the_run_keeps_going() -> None:
    flow = Flow({**TWO_TASKS, "sla": "4h"})
    flow.when(flow.start()).then(
        (RunStarted, {"sla_due_at": T0 + 4 * HOUR}),
        (TimerArmed, {"kind": "run_sla", "due_at": T0 + 4 * HOUR}),
        StepStarted,
        TaskDispatched,
        TimerArmed,
    )
    flow.fire("run_sla").then(
        (TimerFired, {"kind": "run_sla"}),
        (SlaBreached, {"scope": "run", "step": None, "due_at": T0 + 4 * HOUR}),
    ).then_status(RunStatus.RUNNING)
    assert flow.state is not None and flow.state.sla_breached
    flow.when(flow.complete("a")).then(
        TaskCompleted, StepCompleted, StepStarted, TaskDispatched, TimerArmed
    )


def test_run_sla_timer_is_cleared_when_the_run_ends_in_time() -> None:
    flow = Flow({**TWO_TASKS, "sla": "4h"})
    flow.given(flow.start())
    timer = flow.timers("run_sla")[0]
    flow.given(flow.complete("a")).given(flow.complete("b"))
    flow.after(4 * HOUR).when(flow.fire_id(timer)).then_rejected("run ended")


# --------------------------------------------------------------------------- cancel


def test_cancel_ends_the_run_clears_timers_and_refuses_later_commands() -> None:
    flow = Flow({**TWO_TASKS, "sla": "4h"})
    flow.given(flow.start())
    task = flow.task("a")
    timers = flow.timers()
    assert len(timers) == 2
    flow.when(flow.cancel(by="ops", reason="customer withdrew")).then(
        (RunCancelled, {"by": "ops", "reason": "customer withdrew"}),
    ).then_status(RunStatus.CANCELLED)
    assert flow.state is not None and flow.state.timers == {}
    flow.when(flow.complete("a", task_id=task.task_id)).then_rejected("run ended")
    flow.when(flow.signal("anything")).then_rejected("run ended")
    flow.when(flow.cancel()).then_rejected("run ended")
    flow.after(5 * HOUR)
    for timer in timers:
        flow.when(flow.fire_id(timer)).then_rejected("run ended")


def test_cancel_while_retrying() -> None:
    flow = Flow(TWO_TASKS)
    flow.given(flow.start()).given(flow.fail("a", "transient"))
    assert flow.state is not None and flow.state.status is RunStatus.RETRY
    flow.when(flow.cancel()).then(RunCancelled)
    assert flow.state.timers == {}


# --------------------------------------------------------------------------- start


def test_second_start_of_the_same_run_is_a_duplicate() -> None:
    flow = Flow(TWO_TASKS)
    flow.given(flow.start({"x": 1}))
    flow.when(flow.start({"x": 2})).then_rejected("duplicate start")
    assert sum(isinstance(e, RunStarted) for e in flow.log) == 1
    assert flow.state is not None and flow.state.input == {"x": 1}


def test_start_after_the_run_ended_is_still_a_duplicate() -> None:
    flow = Flow(wf({"id": "a", "task": "q"}))
    flow.given(flow.start()).given(flow.complete("a"))
    flow.when(flow.start()).then_rejected("duplicate start")


def test_invalid_input_fails_the_run_with_the_field_path() -> None:
    flow = Flow({**TWO_TASKS, "input": {"order_id": "string", "amount": "number"}})
    flow.when(flow.start({"order_id": "o1", "amount": "ten"})).then(
        RunStarted,
        (
            RunFailed,
            {
                "step": None,
                "error_class": "permanent",
                "code": "INVALID_INPUT",
                "field": "input.amount",
            },
        ),
    ).then_status(RunStatus.FAILED)
    failed = flow.last[-1]
    assert isinstance(failed, RunFailed) and "expected number" in failed.message


def test_missing_required_input_names_the_field() -> None:
    flow = Flow({**TWO_TASKS, "input": {"order_id": "string", "note": "string?"}})
    flow.when(flow.start({})).then(
        RunStarted, (RunFailed, {"code": "INVALID_INPUT", "field": "input.order_id"})
    )


def test_an_undeclared_input_field_fails_the_run_naming_it() -> None:
    flow = Flow({**TWO_TASKS, "input": {"order_id": "string"}})
    flow.when(flow.start({"order_id": "o1", "ammount": 10})).then(
        RunStarted, (RunFailed, {"code": "INVALID_INPUT", "field": "input.ammount"})
    )
    failed = flow.last[-1]
    assert isinstance(failed, RunFailed)
    assert failed.message == (
        "input.ammount: field 'ammount' is not declared; the spec "
        "declares order_id (strict_input: false accepts others)"
    )


def test_a_lenient_spec_accepts_undeclared_input_fields() -> None:
    flow = Flow({**TWO_TASKS, "input": {"order_id": "string"}, "strict_input": False})
    flow.when(flow.start({"order_id": "o1", "note": "x"})).then(
        RunStarted, StepStarted, TaskDispatched, TimerArmed
    )


def test_a_spec_without_an_input_schema_checks_nothing() -> None:
    flow = Flow(TWO_TASKS)
    flow.when(flow.start({"anything": 1})).then(RunStarted, StepStarted, TaskDispatched, TimerArmed)


def test_input_that_is_not_an_object_is_invalid() -> None:
    flow = Flow({**TWO_TASKS, "input": {"order_id": "string"}})
    flow.when(flow.start(["o1"])).then(
        RunStarted, (RunFailed, {"code": "INVALID_INPUT", "field": "input"})
    )


def test_start_for_another_workflow_is_rejected_without_a_run() -> None:
    spec = load_spec(TWO_TASKS)
    start = cmd.StartRun(command_id="c1", run_id=RUN, workflow="other", version=1)
    decision = process(None, start, spec, T0)
    assert decision.state is None
    [rejected] = decision.events
    assert isinstance(rejected, CommandRejected) and rejected.reason == "unknown workflow"
    assert rejected.seq == 0


def test_start_without_a_deployed_spec_is_rejected() -> None:
    start = cmd.StartRun(command_id="c1", run_id=RUN, workflow="w", version=1)
    decision = process(None, start, None, T0)
    assert decision.state is None
    [rejected] = decision.events
    assert isinstance(rejected, CommandRejected)
    assert (rejected.reason, rejected.seq) == ("workflow not deployed", 0)


def test_command_for_a_run_of_another_spec_version_is_rejected() -> None:
    flow = Flow(TWO_TASKS)
    flow.given(flow.start())
    v2 = load_spec({**TWO_TASKS, "version": 2})
    before = flow.state
    assert before is not None
    decision = process(before, flow.complete("a"), v2, T0)
    [rejected] = decision.events
    assert isinstance(rejected, CommandRejected) and rejected.reason == "workflow not deployed"
    assert decision.state is not None and decision.state.current == before.current


# --------------------------------------------------------------------------- stale inputs


def test_duplicate_task_result_is_stale() -> None:
    flow = Flow(TWO_TASKS)
    flow.given(flow.start())
    first = flow.complete("a", {"n": 1})
    flow.when(first).then(TaskCompleted, StepCompleted, StepStarted, TaskDispatched, TimerArmed)
    flow.when(
        cmd.CompleteTask(
            command_id="dup", run_id=RUN, step="a", task_id=first.task_id, result={"n": 1}
        )
    ).then_rejected("stale result")


def test_result_for_an_earlier_attempt_is_stale() -> None:
    flow = Flow(TWO_TASKS)
    flow.given(flow.start())
    attempt1 = flow.task("a")
    flow.given(flow.fail("a", "transient"))
    flow.when(flow.complete("a", task_id=attempt1.task_id)).then_rejected("stale result")
    flow.fire("retry")
    flow.when(flow.fail("a", "transient", task_id=attempt1.task_id)).then_rejected("stale result")


def test_result_with_a_wrong_task_id_is_stale() -> None:
    flow = Flow(TWO_TASKS)
    flow.given(flow.start())
    flow.when(flow.complete("a", task_id="bogus")).then_rejected("stale result")
    flow.when(flow.complete("b", task_id=flow.task("a").task_id)).then_rejected("stale result")


# --------------------------------------------------------------------------- timers


def test_timer_never_fires_early() -> None:
    flow = Flow(TWO_TASKS)
    flow.given(flow.start()).given(flow.fail("a", "transient"))
    [timer] = flow.timers("retry")
    due = flow.due("retry")
    flow.at(due - 1).when(flow.fire_id(timer)).then_rejected("timer not due")
    assert flow.state is not None and flow.state.status is RunStatus.RETRY
    flow.at(due).when(flow.fire_id(timer)).then(TimerFired, TaskDispatched, TimerArmed)


def test_timer_never_fires_twice() -> None:
    flow = Flow(TWO_TASKS)
    flow.given(flow.start()).given(flow.fail("a", "transient"))
    [timer] = flow.timers("retry")
    flow.at(flow.due("retry")).when(flow.fire_id(timer)).then(
        TimerFired, TaskDispatched, TimerArmed
    )
    flow.when(flow.fire_id(timer)).then_rejected("stale timer")


def test_unknown_timer_is_stale() -> None:
    flow = Flow(TWO_TASKS)
    flow.given(flow.start())
    flow.when(flow.fire_id("retry@999")).then_rejected("stale timer")


# --------------------------------------------------------------------------- unknown run


@pytest.mark.parametrize(
    "command",
    [
        cmd.CompleteTask(command_id="x1", run_id="ghost", step="a", task_id="t"),
        cmd.FailTask(
            command_id="x2",
            run_id="ghost",
            step="a",
            task_id="t",
            error_class="transient",
            code="E",
        ),
        cmd.DecideApproval(command_id="x3", run_id="ghost", step="a", approver="bob"),
        cmd.DeliverSignal(command_id="x4", run_id="ghost", name="s"),
        cmd.FireTimer(command_id="x5", run_id="ghost", timer_id="t"),
        cmd.CancelRun(command_id="x6", run_id="ghost"),
    ],
)
def test_command_for_an_unknown_run_is_rejected_outside_any_log(command: cmd.Command) -> None:
    decision = process(None, command, load_spec(TWO_TASKS), T0)
    assert isinstance(decision, Decision) and decision.state is None
    [rejected] = decision.events
    assert isinstance(rejected, CommandRejected)
    assert (rejected.seq, rejected.reason, rejected.run_id) == (0, "unknown run", "ghost")
    assert (rejected.command_type, rejected.command_id) == (command.TYPE, command.command_id)
    assert decide(None, command, load_spec(TWO_TASKS), T0) == decision.events


def test_unknown_command_type_is_rejected() -> None:
    flow = Flow(TWO_TASKS)
    flow.given(flow.start())
    flow.when(cmd.Command(command_id="odd", run_id=RUN)).then_rejected("unknown command")


# --------------------------------------------------------------------------- cost


def test_cost_accumulates_over_completed_and_failed_tasks() -> None:
    flow = Flow(TWO_TASKS)
    flow.given(flow.start())
    flow.when(flow.fail("a", "transient", cost=0.25)).then(
        (TaskFailed, {"cost": 0.25}), RetryScheduled, TimerArmed
    )
    flow.fire("retry")
    flow.when(flow.complete("a", cost=0.5)).then(
        (TaskCompleted, {"cost": 0.5}), StepCompleted, StepStarted, TaskDispatched, TimerArmed
    )
    flow.given(flow.complete("b", cost=1.0))
    assert flow.state is not None and flow.state.cost == pytest.approx(1.75)
    assert flow.state.attempts == 3


# --------------------------------------------------------------------------- envelope


def test_every_event_carries_the_envelope() -> None:
    flow = Flow({**TWO_TASKS, "sla": "1h"})
    commands: list[tuple[cmd.Command, int]] = []

    def run(command: cmd.Command) -> None:
        commands.append((command, flow.now))
        flow.when(command)

    run(flow.start({"x": 1}, tenant="acme", correlation_id="corr-9"))
    flow.after(10)
    run(flow.fail("a", "transient"))
    flow.at(flow.due("retry"))
    run(flow.timer("retry"))
    flow.after(5)
    run(flow.complete("a"))
    run(flow.complete("a"))  # stale: a CommandRejected, still in the log
    flow.after(HOUR)
    run(flow.timer("run_sla"))
    run(flow.cancel())

    assert [e.seq for e in flow.log] == list(range(1, len(flow.log) + 1))
    by_cause = {c.command_id: now for c, now in commands}
    for event in flow.log:
        assert event.run_id == RUN
        assert event.tenant == "acme"
        assert event.correlation_id == "corr-9"
        assert event.causation_id in by_cause
        assert event.ts == by_cause[event.causation_id]
    assert {e.causation_id for e in flow.log} == set(by_cause)
    assert flow.state == fold(flow.log)


def test_correlation_id_defaults_to_the_run_id() -> None:
    flow = Flow(TWO_TASKS)
    flow.given(flow.start())
    assert {e.correlation_id for e in flow.log} == {RUN}


# --------------------------------------------------------------------------- status


def test_status_pending_before_the_first_step() -> None:
    flow = Flow(TWO_TASKS)
    flow.given(flow.start())
    started = fold(flow.log[:1])
    assert started is not None and started.status is RunStatus.PENDING


def test_status_through_a_run() -> None:
    flow = Flow(
        wf(
            {"id": "a", "task": "q"},
            {"id": "ok", "approval": {"approvers": ["g"]}},
            {"id": "w", "wait_event": {"name": "s"}},
            {"id": "z", "sleep": "1m"},
            {"id": "b", "task": "q"},
        )
    )
    flow.given(flow.start()).then_status(RunStatus.RUNNING)
    flow.given(flow.fail("a", "transient")).then_status(RunStatus.RETRY)
    flow.fire("retry").then_status(RunStatus.RUNNING)
    flow.given(flow.complete("a")).then_status(RunStatus.WAITING)
    flow.given(flow.approve("ok", "bob", "g")).then_status(RunStatus.WAITING)
    flow.given(flow.signal("s")).then_status(RunStatus.WAITING)
    flow.fire("sleep").then_status(RunStatus.RUNNING)
    flow.given(flow.complete("b")).then_status(RunStatus.COMPLETED)
    assert flow.state is not None and flow.state.terminal and flow.state.ended_at == flow.now


def test_status_between_steps_is_running_not_pending() -> None:
    flow = Flow(TWO_TASKS)
    flow.given(flow.start()).when(flow.complete("a")).then(
        TaskCompleted, StepCompleted, StepStarted, TaskDispatched, TimerArmed
    )
    completed = fold(flow.log[: flow.log.index(flow.last[1]) + 1])
    assert completed is not None and completed.current is None
    assert completed.status is RunStatus.RUNNING, "a run between two steps has started"


def test_status_after_every_event_of_a_run_is_never_pending_once_a_step_ran() -> None:
    flow = Flow(
        wf(
            {"id": "a", "task": "q"},
            {"id": "c", "choice": [{"when": "steps.a.result.ok", "goto": "b"}]},
            {"id": "b", "task": "q"},
        )
    )
    flow.given(flow.start()).given(flow.complete("a", {"ok": True})).given(flow.complete("b"))
    statuses = [
        s.status for s in (fold(flow.log[:n]) for n in range(1, len(flow.log) + 1)) if s is not None
    ]
    assert statuses[0] is RunStatus.PENDING
    assert RunStatus.PENDING not in statuses[1:], statuses
    assert statuses[-1] is RunStatus.COMPLETED


def test_status_failed_and_cancelled() -> None:
    failed = Flow(TWO_TASKS)
    failed.given(failed.start()).given(failed.fail("a", "permanent")).then_status(RunStatus.FAILED)
    cancelled = Flow(TWO_TASKS)
    cancelled.given(cancelled.start()).given(cancelled.cancel()).then_status(RunStatus.CANCELLED)


def test_waiting_on_a_critical_approval_is_waiting() -> None:
    flow = Flow(wf({"id": "a", "task": "q", "critical": True, "approval": {"approvers": ["g"]}}))
    flow.given(flow.start())
    assert isinstance(flow.log[-1], ApprovalRequested)
    flow.then_status(RunStatus.WAITING)


def test_completed_run_has_its_output() -> None:
    flow = Flow(TWO_TASKS)
    flow.given(flow.start()).given(flow.complete("a", 1))
    flow.when(flow.complete("b", 2)).then(
        TaskCompleted, StepCompleted, (RunCompleted, {"output": 2})
    )
    assert flow.state is not None and flow.state.output == 2
