"""Error classes reported by workers: transient, permanent, business; timeouts; bad results."""

from __future__ import annotations

import pytest

from engine.core.events import (
    ApprovalGranted,
    ApprovalRequested,
    BusinessErrorHandled,
    Escalated,
    RetryScheduled,
    RunCompleted,
    RunFailed,
    SignalAwaited,
    SignalReceived,
    StepCompleted,
    StepFailed,
    StepStarted,
    TaskCompleted,
    TaskDispatched,
    TaskFailed,
    TimerArmed,
    TimerFired,
)
from engine.core.policies import backoff_ms
from engine.core.spec import RetryPolicy
from engine.core.state import RunStatus
from tests.harness import RUN, Flow, wf

RETRY = {"max_attempts": 4, "initial": "1s", "multiplier": 2, "max": "3s", "jitter": "full"}
CALL = {"id": "call", "task": "crm.lookup", "retry": RETRY}


# --------------------------------------------------------------------------- transient


def test_transient_error_schedules_a_retry_with_backoff() -> None:
    flow = Flow(wf(CALL))
    flow.given(flow.start())
    first = flow.task("call")
    flow.when(flow.fail("call", "transient", "UNAVAILABLE")).then(
        (TaskFailed, {"error_class": "transient", "code": "UNAVAILABLE", "attempt": 1}),
        (RetryScheduled, {"step": "call", "phase": "task", "attempt": 2}),
        (TimerArmed, {"kind": "retry", "step": "call"}),
    ).then_status(RunStatus.RETRY)
    scheduled = flow.then_contains(RetryScheduled)
    assert 0 <= scheduled.delay_ms < 1000
    assert scheduled.due_at == flow.now + scheduled.delay_ms == flow.due("retry")
    flow.fire("retry").then(
        TimerFired,
        (TaskDispatched, {"attempt": 2, "idempotency_key": first.idempotency_key}),
        TimerArmed,
    ).then_status(RunStatus.RUNNING)
    assert flow.task("call").task_id != first.task_id


def test_backoff_delays_stay_below_the_capped_exponential_ceiling() -> None:
    flow = Flow(wf(CALL))
    flow.given(flow.start())
    delays = []
    for attempt in (1, 2, 3):
        flow.when(flow.fail("call", "transient"))
        scheduled = flow.then_contains(RetryScheduled)
        assert scheduled.attempt == attempt + 1
        ceiling = min(3000, 1000 * 2 ** (attempt - 1))
        assert 0 <= scheduled.delay_ms < ceiling
        delays.append(scheduled.delay_ms)
        flow.fire("retry")
    policy = RetryPolicy.model_validate(RETRY)
    assert delays == [backoff_ms(policy, RUN, "call", n) for n in (1, 2, 3)]


@pytest.mark.parametrize("attempt", range(1, 12))
def test_backoff_is_deterministic_and_within_bounds(attempt: int) -> None:
    policy = RetryPolicy(initial=500, multiplier=3.0, max=20_000)
    ceiling = min(20_000, 500 * 3 ** (attempt - 1))
    for run in ("r1", "r2", "r3"):
        delay = backoff_ms(policy, run, "step", attempt)
        assert 0 <= delay < ceiling
        assert delay == backoff_ms(policy, run, "step", attempt)


def test_backoff_without_jitter_is_the_ceiling() -> None:
    policy = RetryPolicy(initial=1000, multiplier=2.0, max=5000, jitter="none")
    assert [backoff_ms(policy, "r", "s", n) for n in (1, 2, 3, 4, 5)] == [
        1000,
        2000,
        4000,
        5000,
        5000,
    ]


def test_same_run_step_attempt_gives_the_same_delay_in_two_runs_of_the_flow() -> None:
    def delays() -> list[int]:
        flow = Flow(wf(CALL))
        flow.given(flow.start())
        out = []
        for _ in range(3):
            flow.when(flow.fail("call", "transient"))
            out.append(flow.then_contains(RetryScheduled).delay_ms)
            flow.fire("retry")
        return out

    assert delays() == delays()


def test_exhausted_retries_fail_the_run() -> None:
    flow = Flow(wf({**CALL, "retry": {**RETRY, "max_attempts": 2}}))
    flow.given(flow.start()).given(flow.fail("call", "transient"))
    flow.fire("retry")
    flow.when(flow.fail("call", "transient", "UNAVAILABLE", "down")).then(
        (TaskFailed, {"attempt": 2}),
        (StepFailed, {"code": "RETRIES_EXHAUSTED"}),
        (RunFailed, {"step": "call", "error_class": "transient", "code": "RETRIES_EXHAUSTED"}),
    ).then_status(RunStatus.FAILED)
    failed = flow.last[-1]
    assert isinstance(failed, RunFailed)
    assert "2 attempts" in failed.message and "UNAVAILABLE: down" in failed.message


def test_exhausted_retries_run_the_on_exhausted_handler() -> None:
    flow = Flow(
        wf(
            {**CALL, "retry": {**RETRY, "max_attempts": 1}, "on_exhausted": {"goto": "fallback"}},
            {"id": "done", "task": "q", "end": True},
            {"id": "fallback", "task": "human.queue"},
        )
    )
    flow.given(flow.start())
    flow.when(flow.fail("call", "transient")).then(
        TaskFailed,
        (
            BusinessErrorHandled,
            {"code": "RETRIES_EXHAUSTED", "action": "goto", "target": "fallback"},
        ),
        (StepStarted, {"step": "fallback"}),
        (TaskDispatched, {"queue": "human.queue"}),
        TimerArmed,
    )


def test_unknown_error_class_is_treated_as_transient() -> None:
    flow = Flow(wf(CALL))
    flow.given(flow.start())
    flow.when(flow.fail("call", "flaky")).then(
        (TaskFailed, {"error_class": "transient"}), RetryScheduled, TimerArmed
    )


# --------------------------------------------------------------------------- permanent


def test_permanent_error_fails_fast_with_code_message_and_field() -> None:
    flow = Flow(wf(CALL, {"id": "next", "task": "q"}))
    flow.given(flow.start())
    flow.when(
        flow.fail("call", "permanent", "BAD_ORDER", "order id malformed", field="input.order_id")
    ).then(
        (TaskFailed, {"error_class": "permanent", "attempt": 1}),
        (StepFailed, {"step": "call", "code": "BAD_ORDER", "field": "input.order_id"}),
        (
            RunFailed,
            {
                "step": "call",
                "error_class": "permanent",
                "code": "BAD_ORDER",
                "message": "order id malformed",
                "field": "input.order_id",
            },
        ),
    )
    assert flow.state is not None
    assert flow.state.error == {
        "step": "call",
        "class": "permanent",
        "code": "BAD_ORDER",
        "message": "order id malformed",
        "field": "input.order_id",
    }


# --------------------------------------------------------------------------- business


def test_business_error_goto() -> None:
    flow = Flow(
        wf(
            {**CALL, "on_business_error": {"AMOUNT_OVER_LIMIT": {"goto": "manual"}}},
            {"id": "done", "task": "q", "end": True},
            {"id": "manual", "task": "human.review"},
        )
    )
    flow.given(flow.start())
    flow.when(flow.fail("call", "business", "AMOUNT_OVER_LIMIT")).then(
        (TaskFailed, {"error_class": "business"}),
        (BusinessErrorHandled, {"code": "AMOUNT_OVER_LIMIT", "action": "goto", "target": "manual"}),
        (StepStarted, {"step": "manual"}),
        TaskDispatched,
        TimerArmed,
    )


def test_wildcard_business_handler_catches_other_codes() -> None:
    flow = Flow(
        wf({**CALL, "on_business_error": {"*": {"goto": "other"}}}, {"id": "other", "task": "q"})
    )
    flow.given(flow.start())
    flow.when(flow.fail("call", "business", "WHATEVER")).then(
        TaskFailed,
        (BusinessErrorHandled, {"code": "WHATEVER"}),
        StepStarted,
        TaskDispatched,
        TimerArmed,
    )


def test_business_error_wait_event_reruns_the_step_with_a_new_visit_and_key() -> None:
    flow = Flow(
        wf(
            {
                **CALL,
                "on_business_error": {
                    "MISSING_BANK_DETAILS": {"wait_event": "bank_details", "timeout": "48h"}
                },
            }
        )
    )
    flow.given(flow.start())
    first = flow.task("call")
    flow.when(flow.fail("call", "business", "MISSING_BANK_DETAILS")).then(
        TaskFailed,
        (BusinessErrorHandled, {"action": "wait_event", "target": "bank_details"}),
        (SignalAwaited, {"name": "bank_details", "resume": "retry"}),
        (TimerArmed, {"kind": "signal_timeout"}),
    ).then_status(RunStatus.WAITING)
    flow.when(flow.signal("bank_details", {"iban": "DE00"})).then(
        SignalReceived,
        (StepStarted, {"step": "call", "visit": 2}),
        (TaskDispatched, {"attempt": 1, "idempotency_key": f"{RUN}/call/2"}),
        TimerArmed,
    )
    second = flow.task("call")
    assert second.idempotency_key != first.idempotency_key
    assert second.task_id != first.task_id
    assert flow.timers("signal_timeout") == []
    flow.when(flow.complete("call", {"ok": True})).then(TaskCompleted, StepCompleted, RunCompleted)


def test_business_error_wait_event_times_out() -> None:
    flow = Flow(
        wf(
            {
                **CALL,
                "on_business_error": {"MISSING": {"wait_event": "more_input", "timeout": "1h"}},
            }
        )
    )
    flow.given(flow.start()).given(flow.fail("call", "business", "MISSING"))
    flow.fire("signal_timeout").then(
        TimerFired, StepFailed, (RunFailed, {"code": "SIGNAL_TIMEOUT", "step": "call"})
    )


def test_business_error_escalate_asks_the_escalation_group_and_grant_completes_the_step() -> None:
    flow = Flow(
        wf(
            {**CALL, "on_business_error": {"FRAUD_SUSPECTED": {"escalate": "fraud-team"}}},
            {"id": "next", "task": "q"},
        )
    )
    flow.given(flow.start())
    flow.when(flow.fail("call", "business", "FRAUD_SUSPECTED", "score 0.97")).then(
        TaskFailed,
        (BusinessErrorHandled, {"action": "escalate", "target": "fraud-team"}),
        (Escalated, {"to": "fraud-team", "reason": "FRAUD_SUSPECTED"}),
        (
            ApprovalRequested,
            {
                "reason": "escalation",
                "approvers": ["fraud-team"],
                "payload": {"code": "FRAUD_SUSPECTED", "message": "score 0.97"},
            },
        ),
    ).then_status(RunStatus.WAITING)
    assert flow.state is not None and flow.state.escalations == 1
    flow.when(flow.approve("call", "frank", "finance")).then_rejected("not an approver")
    flow.when(flow.approve("call", "frank", "fraud-team")).then(
        ApprovalGranted,
        (StepCompleted, {"result": {"resolved_by": ["frank"]}}),
        (StepStarted, {"step": "next"}),
        TaskDispatched,
        TimerArmed,
    )


def test_unhandled_business_error_fails_the_run_with_a_hint() -> None:
    flow = Flow(wf(CALL))
    flow.given(flow.start())
    flow.when(flow.fail("call", "business", "CARD_EXPIRED", "card expired")).then(
        TaskFailed, StepFailed, (RunFailed, {"error_class": "business", "code": "CARD_EXPIRED"})
    )
    failed = flow.last[-1]
    assert isinstance(failed, RunFailed)
    assert failed.message.startswith("card expired")
    assert "add on_business_error.CARD_EXPIRED to step 'call'" in failed.message


# --------------------------------------------------------------------------- timeouts and results


def test_task_timeout_is_a_transient_failure() -> None:
    flow = Flow(wf({**CALL, "timeout": "30s"}))
    flow.given(flow.start())
    late = flow.task("call")
    flow.fire("task_timeout").then(
        (TimerFired, {"kind": "task_timeout"}),
        (
            TaskFailed,
            {
                "error_class": "transient",
                "code": "TASK_TIMEOUT",
                "attempt": 1,
                "task_id": late.task_id,
            },
        ),
        (RetryScheduled, {"attempt": 2}),
        TimerArmed,
    )
    flow.when(flow.complete("call", {"late": True}, task_id=late.task_id)).then_rejected(
        "stale result"
    )


def test_task_timeout_after_the_result_is_stale() -> None:
    flow = Flow(wf({**CALL, "timeout": "30s"}, {"id": "next", "task": "q"}))
    flow.given(flow.start())
    timer = flow.timers("task_timeout")[0]
    flow.given(flow.complete("call"))
    flow.after(30_000).when(flow.fire_id(timer)).then_rejected("stale timer")


def test_result_schema_violation_is_permanent_and_names_the_field() -> None:
    flow = Flow(wf({**CALL, "result": {"confidence": "number", "label": "string"}}))
    flow.given(flow.start())
    flow.when(flow.complete("call", {"confidence": "high", "label": "x"})).then(
        (
            TaskFailed,
            {"error_class": "permanent", "code": "SCHEMA_VIOLATION", "field": "result.confidence"},
        ),
        (StepFailed, {"code": "SCHEMA_VIOLATION", "field": "result.confidence"}),
        (
            RunFailed,
            {"error_class": "permanent", "code": "SCHEMA_VIOLATION", "field": "result.confidence"},
        ),
    )


def test_result_matching_its_schema_completes() -> None:
    flow = Flow(wf({**CALL, "result": {"confidence": "number", "note": "string?"}}))
    flow.given(flow.start())
    flow.when(flow.complete("call", {"confidence": 1})).then(
        TaskCompleted, StepCompleted, RunCompleted
    )


def test_expression_over_a_result_of_the_wrong_type_fails_the_run_with_a_diagnostic() -> None:
    flow = Flow(
        wf(
            {
                "id": "classify",
                "task": "llm.classify",
                "review_if": "result.confidence < `0.8`",
                "review": {"approvers": ["g"]},
            }
        )
    )
    flow.given(flow.start())
    flow.when(flow.complete("classify", {"confidence": "high"})).then(
        TaskCompleted,
        StepFailed,
        (RunFailed, {"step": "classify", "error_class": "permanent", "code": "EXPRESSION_FAILED"}),
    )
    failed = flow.last[-1]
    assert isinstance(failed, RunFailed) and "result.confidence < `0.8`" in failed.message


def test_one_signal_answers_one_wait() -> None:
    """A signal buffered before a business-error wait, then a fresh one answering that wait:
    the fresh one is the answer, and a later wait for the same name waits for a new one."""
    flow = Flow(
        wf(
            {**CALL, "on_business_error": {"MISSING": {"wait_event": "details"}}},
            {"id": "confirm", "wait_event": {"name": "details"}},
            {"id": "after", "task": "q"},
        )
    )
    flow.given(flow.start()).given(flow.signal("details", "early"))
    flow.given(flow.fail("call", "business", "MISSING"))
    flow.when(flow.signal("details", "answer")).then(
        SignalReceived, (StepStarted, {"step": "call", "visit": 2}), TaskDispatched, TimerArmed
    )
    flow.when(flow.complete("call")).then(
        TaskCompleted,
        StepCompleted,
        (StepStarted, {"step": "confirm"}),
        (SignalAwaited, {"name": "details"}),
    )
    flow.when(flow.signal("details", "confirmed")).then(
        SignalReceived,
        (StepCompleted, {"step": "confirm", "result": "confirmed"}),
        StepStarted,
        TaskDispatched,
        TimerArmed,
    )
