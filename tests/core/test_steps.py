"""Every step kind, given / when / then on events."""

from __future__ import annotations

from engine.core.events import (
    ApprovalGranted,
    ApprovalRejected,
    ApprovalRequested,
    ChoiceEvaluated,
    RetryScheduled,
    RunCompleted,
    RunFailed,
    RunStarted,
    SignalAwaited,
    SignalReceived,
    SleepStarted,
    StepCompleted,
    StepFailed,
    StepStarted,
    TaskCompleted,
    TaskDispatched,
    TaskFailed,
    TimerArmed,
    TimerFired,
)
from engine.core.state import RunStatus
from tests.harness import RUN, T0, Flow, wf

# --------------------------------------------------------------------------- task


def test_task_step_dispatches_its_input_and_completes_the_run_with_its_result() -> None:
    flow = Flow(wf({"id": "lookup", "task": "crm.get_order", "timeout": "30s"}))
    flow.when(flow.start({"order_id": "o1"})).then(
        RunStarted,
        (StepStarted, {"step": "lookup", "visit": 1, "kind": "task"}),
        (
            TaskDispatched,
            {
                "step": "lookup",
                "phase": "task",
                "attempt": 1,
                "queue": "crm.get_order",
                "input": {"order_id": "o1"},
                "idempotency_key": f"{RUN}/lookup/1",
                "timeout_at": T0 + 30_000,
            },
        ),
        (TimerArmed, {"kind": "task_timeout", "step": "lookup", "due_at": T0 + 30_000}),
    )
    flow.when(flow.complete("lookup", {"total": 12})).then(
        (TaskCompleted, {"step": "lookup", "result": {"total": 12}}),
        (StepCompleted, {"step": "lookup", "result": {"total": 12}}),
        (RunCompleted, {"output": {"total": 12}}),
    )
    assert flow.state is not None and flow.state.timers == {}


def test_task_input_mapping_reads_earlier_results() -> None:
    flow = Flow(
        wf(
            {"id": "lookup", "task": "crm.get_order"},
            {
                "id": "notify",
                "task": "mail.send",
                "input": {"to": "steps.lookup.result.email", "order": "input.order_id"},
            },
        )
    )
    flow.given(flow.start({"order_id": "o1"}))
    flow.when(flow.complete("lookup", {"email": "c@example.com"})).then(
        TaskCompleted,
        StepCompleted,
        (StepStarted, {"step": "notify"}),
        (TaskDispatched, {"queue": "mail.send", "input": {"to": "c@example.com", "order": "o1"}}),
        TimerArmed,
    )


def test_run_output_expression_is_evaluated_at_the_end() -> None:
    flow = Flow(wf({"id": "a", "task": "q"}, {"id": "b", "task": "q"}, output="steps.a.result.x"))
    flow.given(flow.start()).given(flow.complete("a", {"x": 7}))
    flow.when(flow.complete("b", {"x": 8})).then(
        TaskCompleted, StepCompleted, (RunCompleted, {"output": 7})
    )


# --------------------------------------------------------------------------- prepare_commit

PREPARE_COMMIT = {
    "id": "refund",
    "prepare_commit": {"prepare": "payments.prepare", "commit": "payments.commit"},
    "approval": {"approvers": ["finance"]},
    "retry": {"max_attempts": 3, "initial": "1s"},
}


def test_prepare_commit_asks_approval_of_the_change_set_then_commits_with_the_step_key() -> None:
    flow = Flow(wf(PREPARE_COMMIT))
    flow.when(flow.start({"amount": 40})).then(
        RunStarted,
        StepStarted,
        (
            TaskDispatched,
            {
                "phase": "prepare",
                "queue": "payments.prepare",
                "idempotency_key": f"{RUN}/refund/1/prepare",
            },
        ),
        TimerArmed,
    )
    change_set = {"refund": 40, "account": "A-1"}
    flow.when(flow.complete("refund", change_set)).then(
        (TaskCompleted, {"phase": "prepare", "result": change_set}),
        (
            ApprovalRequested,
            {
                "reason": "prepare_commit",
                "approvers": ["finance"],
                "payload": change_set,
                "requester": "alice",
            },
        ),
    ).then_status(RunStatus.WAITING)
    flow.when(flow.approve("refund", "bob", "finance")).then(
        (ApprovalGranted, {"approvers": ["bob"]}),
        (
            TaskDispatched,
            {
                "phase": "commit",
                "queue": "payments.commit",
                "attempt": 1,
                "idempotency_key": f"{RUN}/refund/1",
                "input": {"amount": 40, "change_set": change_set},
            },
        ),
        TimerArmed,
    )
    flow.when(flow.complete("refund", {"refunded": True})).then(
        (TaskCompleted, {"phase": "commit"}),
        (StepCompleted, {"result": {"refunded": True}}),
        RunCompleted,
    )


def test_commit_retries_keep_the_same_idempotency_key() -> None:
    flow = Flow(wf(PREPARE_COMMIT))
    flow.given(flow.start()).given(flow.complete("refund", {"c": 1}))
    flow.given(flow.approve("refund", "bob", "finance"))
    first = flow.task("refund")
    flow.when(flow.fail("refund", "transient", "TIMEOUT")).then(
        TaskFailed, (RetryScheduled, {"phase": "commit", "attempt": 2}), TimerArmed
    )
    flow.fire("retry").then(
        TimerFired, (TaskDispatched, {"phase": "commit", "attempt": 2}), TimerArmed
    )
    second = flow.task("refund")
    assert second.task_id != first.task_id
    assert second.idempotency_key == first.idempotency_key == f"{RUN}/refund/1"


def test_prepare_without_approval_commits_directly() -> None:
    step = {**PREPARE_COMMIT}
    del step["approval"]
    flow = Flow(wf(step))
    flow.given(flow.start())
    flow.when(flow.complete("refund", {"c": 1})).then(
        (TaskCompleted, {"phase": "prepare"}),
        (
            TaskDispatched,
            {
                "phase": "commit",
                "idempotency_key": f"{RUN}/refund/1",
                "input": {"change_set": {"c": 1}},
            },
        ),
        TimerArmed,
    )


def test_review_if_on_prepare_commit_gates_the_approval() -> None:
    spec = wf({**PREPARE_COMMIT, "review_if": "result.amount > `100`"})
    small = Flow(spec)
    small.given(small.start())
    small.when(small.complete("refund", {"amount": 50})).then(
        TaskCompleted, (TaskDispatched, {"phase": "commit"}), TimerArmed
    )
    large = Flow(spec)
    large.given(large.start())
    large.when(large.complete("refund", {"amount": 500})).then(
        TaskCompleted, (ApprovalRequested, {"reason": "prepare_commit"})
    )


# --------------------------------------------------------------------------- approval step


def test_approval_step_requests_with_its_input_and_completes_on_grant() -> None:
    flow = Flow(
        wf(
            {
                "id": "sign_off",
                "approval": {"approvers": ["managers"]},
                "input": {"amount": "input.amount"},
            }
        )
    )
    flow.when(flow.start({"amount": 900})).then(
        RunStarted,
        (StepStarted, {"kind": "approval"}),
        (
            ApprovalRequested,
            {
                "reason": "approval",
                "approvers": ["managers"],
                "quorum": 1,
                "payload": {"amount": 900},
            },
        ),
    ).then_status(RunStatus.WAITING)
    flow.when(flow.approve("sign_off", "bob", "managers")).then(
        ApprovalGranted, (StepCompleted, {"result": {"approved_by": ["bob"]}}), RunCompleted
    )


def test_critical_task_waits_for_approval_before_dispatch() -> None:
    flow = Flow(
        wf(
            {
                "id": "wire",
                "task": "bank.wire",
                "critical": True,
                "approval": {"approvers": ["finance"]},
            }
        )
    )
    flow.when(flow.start({"amount": 5})).then(
        RunStarted,
        StepStarted,
        (ApprovalRequested, {"reason": "critical", "payload": {"amount": 5}}),
    )
    flow.when(flow.approve("wire", "bob", "finance")).then(
        ApprovalGranted, (TaskDispatched, {"queue": "bank.wire", "attempt": 1}), TimerArmed
    )


# --------------------------------------------------------------------------- wait_event

WAIT = {"id": "wait", "wait_event": {"name": "bank_details", "key": "input.order_id"}}


def test_wait_event_completes_when_the_signal_arrives_while_waiting() -> None:
    flow = Flow(wf(WAIT, {"id": "after", "task": "q"}))
    flow.when(flow.start({"order_id": "o1"})).then(
        RunStarted,
        StepStarted,
        (SignalAwaited, {"name": "bank_details", "key": "o1", "resume": "complete"}),
    ).then_status(RunStatus.WAITING)
    flow.when(flow.signal("bank_details", {"iban": "X"})).then(
        (SignalReceived, {"name": "bank_details", "data": {"iban": "X"}}),
        (StepCompleted, {"step": "wait", "result": {"iban": "X"}}),
        (StepStarted, {"step": "after"}),
        TaskDispatched,
        TimerArmed,
    )


def test_signal_arriving_before_the_wait_is_buffered_and_consumed_by_it() -> None:
    flow = Flow(wf({"id": "first", "task": "q"}, WAIT))
    flow.given(flow.start({"order_id": "o1"}))
    flow.when(flow.signal("bank_details", {"iban": "early"})).then(SignalReceived)
    assert flow.state is not None and flow.state.unconsumed == {"bank_details"}
    flow.when(flow.complete("first")).then(
        TaskCompleted,
        StepCompleted,
        (StepStarted, {"step": "wait"}),
        SignalAwaited,
        (StepCompleted, {"step": "wait", "result": {"iban": "early"}}),
        RunCompleted,
    )
    assert flow.state is not None and flow.state.unconsumed == frozenset()


def test_wait_event_timeout_fails_the_run_by_default() -> None:
    flow = Flow(wf({"id": "wait", "wait_event": {"name": "s", "timeout": "1h"}}))
    flow.when(flow.start()).then(
        RunStarted,
        StepStarted,
        (SignalAwaited, {"timeout_at": T0 + 3_600_000}),
        (TimerArmed, {"kind": "signal_timeout", "due_at": T0 + 3_600_000}),
    )
    flow.fire("signal_timeout").then(
        TimerFired,
        (StepFailed, {"code": "SIGNAL_TIMEOUT"}),
        (RunFailed, {"step": "wait", "error_class": "business", "code": "SIGNAL_TIMEOUT"}),
    ).then_status(RunStatus.FAILED)


def test_wait_event_timeout_can_goto_another_step() -> None:
    flow = Flow(
        wf(
            {
                "id": "wait",
                "wait_event": {"name": "s", "timeout": "1h", "on_timeout": {"goto": "nudge"}},
            },
            {"id": "done", "task": "q", "end": True},
            {"id": "nudge", "task": "mail.send"},
        )
    )
    flow.given(flow.start())
    flow.fire("signal_timeout").then(
        TimerFired,
        (StepStarted, {"step": "nudge"}),
        (TaskDispatched, {"queue": "mail.send"}),
        TimerArmed,
    )


def test_signal_answered_before_its_timeout_clears_the_timeout_timer() -> None:
    flow = Flow(
        wf(
            {"id": "wait", "wait_event": {"name": "s", "timeout": "1h"}},
            {"id": "next", "task": "q"},
        )
    )
    flow.given(flow.start())
    timeout = flow.timers("signal_timeout")[0]
    flow.when(flow.signal("s")).then(
        SignalReceived, StepCompleted, StepStarted, TaskDispatched, TimerArmed
    )
    assert timeout not in flow.timers()
    flow.after(3_600_000).when(flow.fire_id(timeout)).then_rejected("stale timer")


# --------------------------------------------------------------------------- choice

CHOICE = {
    "id": "route",
    "choice": [
        {"when": "input.amount > `1000`", "goto": "big"},
        {"when": "input.vip", "goto": "vip"},
    ],
    "default": "small",
}
ROUTES = [
    {"id": "big", "task": "q.big", "end": True},
    {"id": "vip", "task": "q.vip", "end": True},
    {"id": "small", "task": "q.small", "end": True},
]


def test_choice_takes_the_first_true_branch() -> None:
    flow = Flow(wf(CHOICE, *ROUTES))
    flow.when(flow.start({"amount": 5000, "vip": True})).then(
        RunStarted,
        (StepStarted, {"step": "route", "kind": "choice"}),
        (ChoiceEvaluated, {"branch": 0, "target": "big"}),
        (StepCompleted, {"step": "route", "result": {"branch": 0, "target": "big"}}),
        (StepStarted, {"step": "big"}),
        (TaskDispatched, {"queue": "q.big"}),
        TimerArmed,
    )


def test_choice_second_branch() -> None:
    flow = Flow(wf(CHOICE, *ROUTES))
    flow.when(flow.start({"amount": 5, "vip": True})).then(
        RunStarted,
        StepStarted,
        (ChoiceEvaluated, {"branch": 1, "target": "vip"}),
        StepCompleted,
        (StepStarted, {"step": "vip"}),
        TaskDispatched,
        TimerArmed,
    )


def test_choice_default_when_no_branch_matches() -> None:
    flow = Flow(wf(CHOICE, *ROUTES))
    flow.when(flow.start({"amount": 5})).then(
        RunStarted,
        StepStarted,
        (ChoiceEvaluated, {"branch": -1, "target": "small"}),
        StepCompleted,
        (StepStarted, {"step": "small"}),
        TaskDispatched,
        TimerArmed,
    )


def test_choice_without_default_falls_through_to_the_next_step() -> None:
    choice = {k: v for k, v in CHOICE.items() if k != "default"}
    flow = Flow(wf(choice, {"id": "next", "task": "q.next"}, *ROUTES))
    flow.when(flow.start({"amount": 5})).then(
        RunStarted,
        StepStarted,
        (ChoiceEvaluated, {"branch": -1, "target": "next"}),
        StepCompleted,
        (StepStarted, {"step": "next"}),
        TaskDispatched,
        TimerArmed,
    )


# --------------------------------------------------------------------------- sleep


def test_sleep_waits_for_its_timer_then_moves_on() -> None:
    flow = Flow(wf({"id": "nap", "sleep": "10m"}, {"id": "after", "task": "q"}))
    flow.when(flow.start()).then(
        RunStarted,
        (StepStarted, {"kind": "sleep"}),
        (SleepStarted, {"until": T0 + 600_000}),
        (TimerArmed, {"kind": "sleep", "due_at": T0 + 600_000}),
    ).then_status(RunStatus.WAITING)
    timer = flow.timers("sleep")[0]
    flow.after(599_999).when(flow.fire_id(timer)).then_rejected("timer not due")
    flow.after(1).when(flow.fire_id(timer)).then(
        (TimerFired, {"kind": "sleep"}),
        (StepCompleted, {"step": "nap"}),
        (StepStarted, {"step": "after"}),
        TaskDispatched,
        TimerArmed,
    )


# --------------------------------------------------------------------------- review_if

REVIEWED = {
    "id": "classify",
    "task": "llm.classify",
    "review_if": "result.confidence < `0.8`",
    "review": {"approvers": ["refund-experts"]},
}


def test_low_confidence_result_goes_to_expert_review() -> None:
    flow = Flow(wf(REVIEWED))
    flow.given(flow.start())
    result = {"label": "refund", "confidence": 0.4}
    flow.when(flow.complete("classify", result, confidence=0.4)).then(
        TaskCompleted,
        (
            ApprovalRequested,
            {
                "reason": "review",
                "approvers": ["refund-experts"],
                "payload": {"result": result, "confidence": 0.4},
            },
        ),
    ).then_status(RunStatus.WAITING)
    flow.when(flow.approve("classify", "erin", "refund-experts")).then(
        ApprovalGranted, (StepCompleted, {"result": result}), (RunCompleted, {"output": result})
    )


def test_rejected_review_fails_the_run() -> None:
    flow = Flow(wf(REVIEWED))
    flow.given(flow.start()).given(flow.complete("classify", {"confidence": 0.2}))
    flow.when(flow.approve("classify", "erin", "refund-experts", reject=True)).then(
        ApprovalRejected, StepFailed, (RunFailed, {"code": "APPROVAL_REJECTED"})
    )


def test_high_confidence_result_skips_review() -> None:
    flow = Flow(wf(REVIEWED))
    flow.given(flow.start())
    flow.when(flow.complete("classify", {"label": "refund", "confidence": 0.95})).then(
        TaskCompleted, StepCompleted, RunCompleted
    )


def test_review_if_can_read_the_reported_confidence() -> None:
    flow = Flow(wf({**REVIEWED, "review_if": "confidence < `0.8`"}))
    flow.given(flow.start())
    flow.when(flow.complete("classify", {"label": "x"}, confidence=0.1)).then(
        TaskCompleted, (ApprovalRequested, {"reason": "review"})
    )
