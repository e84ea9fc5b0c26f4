"""The same scenarios on every backend: step kinds, error classes, approvals, timers,
idempotent start, poison input. A feature is done when it passes on Kafka too."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from engine.codec import encode
from engine.core.commands import CancelRun, CompleteTask, DecideApproval, DeliverSignal
from engine.core.policies import run_id_for
from engine.core.records import Trigger
from engine.core.spec import load_spec
from engine.core.state import Waiting
from engine.worker import BusinessError, PermanentError, TaskContext, ToolRegistry, TransientError
from tests.conformance.drivers import Driver

FAST_RETRY = {"max_attempts": 4, "initial": "20ms", "max": "100ms"}

SPECS = [
    load_spec(
        {
            "workflow": "basic",
            "version": 1,
            "input": {"n": "integer"},
            "steps": [
                {"id": "fetch", "task": "c.flaky", "input": {"n": "input.n"}, "retry": FAST_RETRY},
                {
                    "id": "route",
                    "choice": [{"when": "steps.fetch.result.n > `10`", "goto": "big"}],
                    "default": "nap",
                },
                {"id": "nap", "sleep": "150ms", "next": "finish"},
                {"id": "big", "task": "c.echo", "input": {"size": "'big'"}, "next": "finish"},
                {"id": "finish", "task": "c.echo", "input": {"n": "steps.fetch.result.n"}},
            ],
        }
    ),
    load_spec(
        {
            "workflow": "errors",
            "version": 1,
            "input": {"mode": "string"},
            "steps": [
                {
                    "id": "act",
                    "task": "c.fail",
                    "input": {"mode": "input.mode", "extra": "signals.more_input"},
                    "retry": {"max_attempts": 2, "initial": "20ms"},
                    "on_business_error": {
                        "DETOUR": {"goto": "alternative"},
                        "NEED_INPUT": {"wait_event": "more_input", "timeout": "20s"},
                        "ESCALATE": {"escalate": "leads"},
                    },
                    "next": "done",
                },
                {
                    "id": "alternative",
                    "task": "c.echo",
                    "input": {"took": "'alternative'"},
                    "end": True,
                },
                {"id": "done", "task": "c.echo", "input": {"took": "'main'"}},
            ],
        }
    ),
    load_spec(
        {
            "workflow": "humans",
            "version": 1,
            "input": {"amount": "number"},
            "steps": [
                {
                    "id": "classify",
                    "task": "c.classify",
                    "input": {"amount": "input.amount"},
                    "review_if": "confidence < `0.8`",
                    "review": {"approvers": ["experts"]},
                },
                {
                    "id": "pay",
                    "prepare_commit": {"prepare": "c.prepare", "commit": "c.commit"},
                    "input": {"amount": "input.amount"},
                    "approval": {"approvers": ["finance"], "quorum": 2},
                },
                {"id": "confirm", "wait_event": {"name": "confirmed", "timeout": "20s"}},
            ],
        }
    ),
    load_spec(
        {
            "workflow": "expiry",
            "version": 1,
            "steps": [
                {
                    "id": "gate",
                    "approval": {
                        "approvers": ["a"],
                        "expires_after": "200ms",
                        "on_expire": {"escalate": "leads"},
                    },
                },
                {"id": "wait", "wait_event": {"name": "never", "timeout": "200ms"}},
            ],
        }
    ),
    load_spec(
        {
            "workflow": "bad-result",
            "version": 1,
            "input": {"kind": "string"},
            "steps": [
                {
                    "id": "act",
                    "task": "c.bad_result",
                    "input": {"kind": "input.kind"},
                    "retry": FAST_RETRY,
                }
            ],
        }
    ),
]


def _registry(counter: dict[str, int]) -> ToolRegistry:
    registry = ToolRegistry()

    def count(ctx: TaskContext) -> None:
        counter[ctx.idempotency_key] = counter.get(ctx.idempotency_key, 0) + 1

    @registry.tool("c.flaky")
    def flaky(ctx: TaskContext) -> dict[str, Any]:
        count(ctx)
        if ctx.attempt < 3:
            raise TransientError("UNAVAILABLE", f"attempt {ctx.attempt} fails")
        return {"n": ctx.input["n"]}

    @registry.tool("c.echo")
    def echo(ctx: TaskContext) -> dict[str, Any]:
        count(ctx)
        return dict(ctx.input)

    @registry.tool("c.fail")
    def fail(ctx: TaskContext) -> dict[str, Any]:
        count(ctx)
        mode = ctx.input["mode"]
        if mode == "permanent":
            raise PermanentError("BAD_PARAM", "amount must be positive", field="input.amount")
        if mode == "transient":
            raise TransientError("DOWN", "still down")
        if mode == "need_input" and not ctx.input.get("extra"):
            raise BusinessError("NEED_INPUT", "missing bank details")
        if mode in ("detour", "escalate"):
            raise BusinessError(mode.upper(), "rule says no")
        return {"ok": True}

    @registry.tool("c.bad_result")
    def bad_result(ctx: TaskContext) -> Any:
        count(ctx)
        if ctx.input["kind"] == "nan":
            return {"score": float("nan")}
        if ctx.input["kind"] == "huge":
            return {"text": "x" * (1 << 20)}
        return {"thing": object()}

    @registry.tool("c.classify")
    def classify(ctx: TaskContext) -> Any:
        from engine.worker import TaskResult

        confidence = 0.5 if ctx.input["amount"] > 100 else 0.95
        return TaskResult({"label": "refund"}, cost=0.01, confidence=confidence)

    @registry.tool("c.prepare")
    def prepare(ctx: TaskContext) -> dict[str, Any]:
        return {"amount": ctx.input["amount"]}

    @registry.tool("c.commit")
    def commit(ctx: TaskContext) -> dict[str, Any]:
        count(ctx)
        return {"paid": ctx.input["change_set"]["amount"]}

    return registry


@pytest.fixture
def env(driver: Driver) -> Iterator[tuple[Driver, dict[str, int]]]:
    counter: dict[str, int] = {}
    driver.start(SPECS, _registry(counter))
    try:
        yield driver, counter
    finally:
        driver.stop()


def _start(d: Driver, workflow: str, data: dict[str, Any], by: str = "req") -> str:
    key = uuid.uuid4().hex
    d.submit(Trigger(workflow=workflow, idempotency_key=key, input=data, requested_by=by))
    return run_id_for("default", key)


def _approve(d: Driver, run_id: str, step: str, who: str, role: str, approve: bool = True) -> None:
    d.submit(
        DecideApproval(
            command_id=uuid.uuid4().hex,
            run_id=run_id,
            step=step,
            approver=who,
            roles=(role,),
            approve=approve,
        )
    )


def _types(d: Driver, run_id: str) -> list[str]:
    return [e.TYPE for e in d.events(run_id)]


def _contiguous(d: Driver, run_id: str) -> None:
    seqs = [e.seq for e in d.events(run_id)]
    assert seqs == list(range(1, len(seqs) + 1)), seqs


def test_retry_choice_sleep_and_completion(env: tuple[Driver, dict[str, int]]) -> None:
    d, counter = env
    small = _start(d, "basic", {"n": 3})
    big = _start(d, "basic", {"n": 30})
    state = d.wait_status(small, "Completed")
    assert state.results["finish"] == {"n": 3}
    assert "nap" in state.results and "big" not in state.results
    state = d.wait_status(big, "Completed")
    assert state.results["big"] == {"size": "big"} and "nap" not in state.results
    types = _types(d, small)
    assert types.count("RetryScheduled") == 2 and "SleepStarted" in types
    key = next(k for k in counter if k.startswith(f"{small}/fetch"))
    assert counter[key] == 3, "two transient failures, then success, under one key"
    _contiguous(d, small)


def test_error_classes(env: tuple[Driver, dict[str, int]]) -> None:
    d, _ = env
    permanent = _start(d, "errors", {"mode": "permanent"})
    transient = _start(d, "errors", {"mode": "transient"})
    detour = _start(d, "errors", {"mode": "detour"})
    state = d.wait_status(permanent, "Failed")
    assert state.error is not None and state.error["code"] == "BAD_PARAM"
    assert state.error["field"] == "input.amount"
    assert _types(d, permanent).count("TaskDispatched") == 1, "permanent errors fail fast"
    state = d.wait_status(transient, "Failed")
    assert state.error is not None and state.error["code"] == "RETRIES_EXHAUSTED"
    state = d.wait_status(detour, "Completed")
    assert state.results["alternative"] == {"took": "alternative"}
    assert "done" not in state.results


def test_business_error_asks_for_more_input(env: tuple[Driver, dict[str, int]]) -> None:
    d, _ = env
    run_id = _start(d, "errors", {"mode": "need_input"})
    d.wait(
        run_id,
        lambda s: s.current is not None and s.current.waiting is Waiting.SIGNAL,
        what="waiting for more input",
    )
    d.submit(
        DeliverSignal(
            command_id=uuid.uuid4().hex, run_id=run_id, name="more_input", data={"iban": "DE00"}
        )
    )
    state = d.wait_status(run_id, "Completed")
    types = _types(d, run_id)
    assert types.count("StepStarted") == 3 and "SignalReceived" in types
    assert state.visits["act"] == 2, "the step ran again, as a new visit"


def test_business_error_escalates_to_a_group(env: tuple[Driver, dict[str, int]]) -> None:
    d, _ = env
    run_id = _start(d, "errors", {"mode": "escalate"})
    d.wait(
        run_id,
        lambda s: s.current is not None and s.current.waiting is Waiting.APPROVAL,
        what="waiting for the escalation group",
    )
    _approve(d, run_id, "act", "lee", "leads")
    state = d.wait_status(run_id, "Completed")
    assert state.escalations == 1 and state.results["done"] == {"took": "main"}


def test_review_four_eyes_and_signal(env: tuple[Driver, dict[str, int]]) -> None:
    d, counter = env
    run_id = _start(d, "humans", {"amount": 500.0}, by="ann")
    d.wait(
        run_id,
        lambda s: (
            s.current is not None
            and s.current.step == "classify"
            and s.current.waiting is Waiting.APPROVAL
        ),
        what="expert review",
    )
    _approve(d, run_id, "classify", "eve", "experts")
    d.wait(
        run_id,
        lambda s: (
            s.current is not None
            and s.current.step == "pay"
            and s.current.waiting is Waiting.APPROVAL
        ),
        what="four-eyes approval",
    )
    _approve(d, run_id, "pay", "ann", "finance")  # the requester: refused
    _approve(d, run_id, "pay", "bob", "finance")
    _approve(d, run_id, "pay", "bob", "finance")  # the same approver twice: refused
    _approve(d, run_id, "pay", "eve", "experts")  # not in the group: refused
    _approve(d, run_id, "pay", "cat", "finance")
    d.wait(
        run_id,
        lambda s: s.current is not None and s.current.step == "confirm",
        what="waiting for confirmation",
    )
    d.submit(
        DeliverSignal(
            command_id=uuid.uuid4().hex, run_id=run_id, name="confirmed", data={"by": "customer"}
        )
    )
    state = d.wait_status(run_id, "Completed")
    reasons = [getattr(e, "reason", "") for e in d.events(run_id) if e.TYPE == "CommandRejected"]
    assert reasons == ["self-approval", "duplicate approval", "not an approver"]
    assert state.results["pay"] == {"paid": 500.0}
    assert counter[f"{run_id}/pay/1"] == 1, "one commit, under the step's key"
    assert abs(state.cost - 0.01) < 1e-9
    _contiguous(d, run_id)


def test_approver_names_are_one_identity_and_a_run_needs_a_requester(
    env: tuple[Driver, dict[str, int]],
) -> None:
    d, _ = env
    nobody = _start(d, "humans", {"amount": 20.0}, by="")
    failed = d.wait_status(nobody, "Failed")
    assert failed.error is not None and failed.error["code"] == "REQUESTER_REQUIRED"
    assert failed.error["field"] == "requested_by" and "pay" not in failed.results

    run_id = _start(d, "humans", {"amount": 20.0}, by="Ann")
    d.wait(
        run_id,
        lambda s: (
            s.current is not None
            and s.current.step == "pay"
            and s.current.waiting is Waiting.APPROVAL
        ),
        what="four-eyes approval",
    )
    _approve(d, run_id, "nostep", "bob", "finance")  # no such step
    _approve(d, run_id, "pay", " ANN", "finance")  # the requester, spelt otherwise
    _approve(d, run_id, "pay", "bob", "finance")
    _approve(d, run_id, "pay", "Bob\t", "finance")  # bob again
    _approve(d, run_id, "pay", "  ", "finance")  # nobody
    _approve(d, run_id, "pay", "cat", "finance")
    d.wait(
        run_id,
        lambda s: s.current is not None and s.current.step == "confirm",
        what="waiting for confirmation",
    )
    rejected = [e for e in d.events(run_id) if e.TYPE == "CommandRejected"]
    assert [getattr(e, "reason", "") for e in rejected] == [
        "unknown step",
        "self-approval",
        "duplicate approval",
        "no approver",
    ]
    assert getattr(rejected[0], "detail", "") == (
        "humans v1 has no step 'nostep'; step 'pay' is waiting for approval"
    )
    assert d.wait_status(run_id, "Waiting").results["pay"] == {"paid": 20.0}


@pytest.mark.parametrize(
    ("kind", "code"),
    [("nan", "RESULT_NOT_ENCODABLE"), ("huge", "RESULT_TOO_LARGE"), ("object", "RESULT_NOT_JSON")],
)
def test_a_result_that_cannot_travel_fails_the_task_at_once(
    env: tuple[Driver, dict[str, int]], kind: str, code: str
) -> None:
    d, counter = env
    run_id = _start(d, "bad-result", {"kind": kind})
    state = d.wait_status(run_id, "Failed")
    assert state.error is not None
    assert (state.error["class"], state.error["code"]) == ("permanent", code), state.error
    assert counter[f"{run_id}/act/1"] == 1, "called once: not retried, not answered by a ledger"
    assert not d.dead_letters(), "the result is refused by the worker, not dead-lettered"


def test_high_confidence_skips_review(env: tuple[Driver, dict[str, int]]) -> None:
    d, _ = env
    run_id = _start(d, "humans", {"amount": 20.0})
    d.wait(
        run_id, lambda s: s.current is not None and s.current.step == "pay", what="the payment step"
    )
    assert "ApprovalRequested" not in _types(d, run_id)[:8]


def test_expiry_escalation_and_signal_timeout(env: tuple[Driver, dict[str, int]]) -> None:
    d, _ = env
    run_id = _start(d, "expiry", {})
    d.wait(run_id, lambda s: s.escalations == 1, what="escalation after expiry")
    _approve(d, run_id, "gate", "lee", "leads")
    state = d.wait_status(run_id, "Failed")
    assert state.error is not None and state.error["code"] == "SIGNAL_TIMEOUT"
    types = _types(d, run_id)
    assert "ApprovalExpired" in types and "Escalated" in types and "TimerFired" in types


def test_idempotent_start_cancel_and_late_commands(env: tuple[Driver, dict[str, int]]) -> None:
    d, _ = env
    trigger = Trigger(workflow="expiry", idempotency_key="same-key", input={}, requested_by="ann")
    d.submit(trigger, trigger, trigger)
    run_id = run_id_for("default", "same-key")
    d.wait(run_id, lambda s: s.current is not None, what="started")
    d.submit(CancelRun(command_id=uuid.uuid4().hex, run_id=run_id, reason="test", by="ops"))
    d.wait_status(run_id, "Cancelled")
    _approve(d, run_id, "gate", "lee", "a")
    d.wait(
        run_id,
        lambda s: any(getattr(e, "command_type", "") == "DecideApproval" for e in d.events(run_id)),
        what="the late approval rejected",
    )
    types = _types(d, run_id)
    assert types.count("RunStarted") == 1
    rejected = [e for e in d.events(run_id) if e.TYPE == "CommandRejected"]
    by_type = {
        t: [getattr(e, "reason", "") for e in rejected if getattr(e, "command_type", "") == t]
        for t in ("StartRun", "DecideApproval")
    }
    assert by_type == {"StartRun": ["duplicate start"] * 2, "DecideApproval": ["run ended"]}


def test_poison_inputs_go_to_dead_letters(env: tuple[Driver, dict[str, int]]) -> None:
    d, _ = env
    d.submit_raw(b"\x07not avro at all")
    d.submit_raw(encode(Trigger(workflow="basic", idempotency_key="t"))[:-4])
    d.submit_raw(b"\x00\x00\x01\x00\x00" + b"\x02")
    d.submit(Trigger(workflow="no-such-workflow", idempotency_key="u"))
    run_id = _start(d, "basic", {"n": 1})
    d.wait_status(run_id, "Completed")
    deadline_reasons = {"bad_magic", "truncated", "unknown_schema", "unknown_workflow"}
    for _ in range(200):
        reasons = {dl.reason for dl in d.dead_letters()}
        if deadline_reasons <= reasons:
            break
        import time

        time.sleep(0.05)
    assert deadline_reasons <= reasons, reasons
    poison = next(dl for dl in d.dead_letters() if dl.reason == "bad_magic")
    assert poison.payload == b"\x07not avro at all"


def test_a_duplicate_task_result_changes_nothing(env: tuple[Driver, dict[str, int]]) -> None:
    d, counter = env
    run_id = _start(d, "basic", {"n": 40})
    state = d.wait_status(run_id, "Completed")
    dispatched = next(
        e
        for e in d.events(run_id)
        if e.TYPE == "TaskDispatched" and getattr(e, "step", "") == "big"
    )
    d.submit(
        CompleteTask(
            command_id=uuid.uuid4().hex,
            run_id=run_id,
            step="big",
            task_id=dispatched.task_id,  # type: ignore[attr-defined]
            result={"size": "forged"},
        )
    )
    d.wait(run_id, lambda s: s.seq > state.seq, what="the duplicate result audited")
    rejected = [e for e in d.events(run_id) if e.TYPE == "CommandRejected"]
    assert [getattr(e, "reason", "") for e in rejected] == ["run ended"]
    final = d.state(run_id)
    assert final is not None and final.results["big"] == {"size": "big"}
    assert counter[f"{run_id}/big/1"] == 1
