"""decode(encode(x)) == x for every record type, exactly: types, tuples, sets, enums."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.codec import decode, encode
from engine.codec._registry import core_records
from engine.core import commands as cmd
from engine.core import events as ev
from engine.core.outbox import Notification, TaskCommand
from engine.core.records import DeadLetter, RecordedCommand, Trigger
from engine.core.state import Approval, RunState, RunStatus, StepState, Timer, Waiting
from tests.codec.strategies import records
from tests.harness import RUN, Flow

RECORD_CLASSES = [r.cls for r in core_records()]
T0 = 1_700_000_000_000


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_record_round_trips(cls: type, data: st.DataObject) -> None:
    record = data.draw(records(cls))
    encoded = encode(record)
    decoded = decode(encoded)
    assert type(decoded) is cls
    assert decoded == record
    assert encode(decoded) == encoded, "equal records must encode to equal bytes"


def test_run_state_comes_back_with_its_python_types() -> None:
    state = RunState(
        run_id="r1",
        tenant="acme",
        correlation_id="c1",
        workflow="refund",
        version=3,
        input={"order": "o-1", "lines": [1, 2.5, None, True]},
        started_at=T0,
        seq=9,
        current=StepState(
            step="refund",
            visit=2,
            kind="approval",
            started_at=T0 + 5,
            waiting=Waiting.APPROVAL,
            change_set={"amount": 12.5},
            approval=Approval(
                "a1",
                "approval",
                ("finance", "ops"),
                2,
                True,
                T0 + 6,
                None,
                votes=("alice",),
                reminders=1,
            ),
        ),
        results={"lookup": {"total": 12.5}, "empty": None},
        signals={"bank": [1, 2]},
        unconsumed=frozenset({"zeta", "alpha"}),
        visits={"lookup": 1, "refund": 2},
        timers={"t1": Timer("t1", "approval_expiry", "refund", "a1", T0 + 99)},
        cost=0.25,
        outcome=RunStatus.FAILED,
        error={"code": "E", "field": None},
        output=[1, "two"],
        ended_at=T0 + 100,
        last_error=None,
    )
    decoded = decode(encode(state))
    assert decoded == state
    assert isinstance(decoded, RunState) and decoded.current is not None
    assert decoded.current.waiting is Waiting.APPROVAL
    assert decoded.outcome is RunStatus.FAILED
    assert decoded.current.approval is not None
    assert type(decoded.current.approval.approvers) is tuple
    assert type(decoded.current.approval.votes) is tuple
    assert type(decoded.unconsumed) is frozenset
    assert decoded.status is state.status


def test_empty_run_state_round_trips() -> None:
    state = RunState(run_id="r", tenant="t", correlation_id="")
    assert decode(encode(state)) == state


def test_sets_are_written_sorted_so_equal_states_give_equal_bytes() -> None:
    a = RunState(run_id="r", tenant="t", correlation_id="", unconsumed=frozenset("abcdefgh"))
    b = RunState(
        run_id="r", tenant="t", correlation_id="", unconsumed=frozenset(reversed("abcdefgh"))
    )
    assert encode(a) == encode(b)


def test_tuples_come_back_as_tuples_and_lists_as_lists() -> None:
    approval = cmd.DecideApproval(
        command_id="c", run_id="r", step="s", approver="bob", roles=("finance", "ops")
    )
    granted = ev.ApprovalGranted(
        run_id="r",
        seq=1,
        ts=T0,
        tenant="t",
        correlation_id="",
        causation_id="c",
        step="s",
        approval_id="a",
        approvers=["bob", "carol"],
    )
    assert type(_round_trip(approval).roles) is tuple
    assert type(_round_trip(granted).approvers) is list


def test_recorded_command_keeps_its_command_and_the_commands_schema() -> None:
    command = cmd.CompleteTask(
        command_id="c9",
        run_id="r",
        step="s",
        task_id="t",
        result={"ok": True},
        cost=0.5,
        confidence=0.9,
    )
    recorded = RecordedCommand(run_id="r", command=command, now=T0, first_seq=3, last_seq=5)
    decoded = _round_trip(recorded)
    assert decoded == recorded
    assert type(decoded.command) is cmd.CompleteTask


def test_dead_letter_keeps_the_original_bytes() -> None:
    letter = DeadLetter(
        source="runs.inputs",
        partition=3,
        offset=42,
        reason="bad_magic",
        detail="first byte is 255",
        payload=bytes(range(256)),
        ts=T0,
    )
    assert _round_trip(letter).payload == bytes(range(256))


@pytest.mark.parametrize(
    "value",
    [
        None,
        0,
        -1.5,
        "",
        "ünïcødé ✓",
        [],
        {},
        [None],
        {"a": {"b": [1, 2, {"c": None}]}},
        2**80,
        1e-300,
    ],
)
def test_json_fields_carry_any_json_value(value: Any) -> None:
    completed = cmd.CompleteTask(command_id="c", run_id="r", step="s", task_id="t", result=value)
    assert _round_trip(completed).result == value


def test_floats_and_missing_optionals_survive() -> None:
    completed = ev.TaskCompleted(
        run_id="r",
        seq=1,
        ts=T0,
        tenant="t",
        correlation_id="",
        causation_id="c",
        step="s",
        phase="task",
        attempt=1,
        task_id="t",
        result=None,
        cost=math.pi,
        confidence=None,
    )
    decoded = _round_trip(completed)
    assert decoded.cost == math.pi and decoded.confidence is None and decoded.result is None


def test_outbox_and_trigger_records_round_trip() -> None:
    task = TaskCommand(
        queue="crm.get_order",
        task_id="t1",
        run_id="r",
        step="lookup",
        phase="task",
        attempt=1,
        idempotency_key="r/lookup/1",
        input={"order_id": "o-1"},
        deadline=T0,
        tenant="acme",
        correlation_id="c",
        workflow="refund",
    )
    note = Notification(
        kind="approval_requested",
        run_id="r",
        step="s",
        approval_id="a",
        recipients=["finance"],
        message="approve",
        ts=T0,
        tenant="acme",
        correlation_id="c",
    )
    trigger = Trigger(workflow="refund", input={"order_id": "o-1"}, idempotency_key="k")
    for record in (task, note, trigger):
        assert _round_trip(record) == record


def _round_trip(record: Any) -> Any:
    decoded = decode(encode(record))
    assert decoded == record
    return decoded


def test_a_real_run_round_trips_at_every_step() -> None:
    """Events, states and recorded commands as ``decide`` and ``evolve`` make them."""
    spec = {
        "workflow": "refund",
        "version": 1,
        "steps": [
            {"id": "lookup", "task": "crm.get_order", "retry": {"max_attempts": 3}},
            {"id": "sign", "approval": {"approvers": ["finance"], "quorum": 2}},
            {"id": "pay", "task": "payments.pay"},
        ],
    }
    flow = Flow(spec)

    def play(command: cmd.Command) -> None:
        flow.when(command)
        assert flow.state is not None
        _round_trip(flow.state)
        for event in flow.last:
            _round_trip(event)
        _round_trip(
            RecordedCommand(
                run_id=RUN,
                command=command,
                now=flow.now,
                first_seq=flow.last[0].seq,
                last_seq=flow.last[-1].seq,
            )
        )

    play(flow.start({"order_id": "o-1", "amount": 12.5}))
    play(flow.fail("lookup", "transient", "TIMEOUT", "slow crm"))
    flow.at(flow.due("retry"))
    play(flow.timer("retry"))
    play(flow.complete("lookup", {"order": {"id": "o-1", "total": 12.5}}, cost=0.01))
    play(flow.approve("sign", "bob", "finance", comment="fine"))
    play(flow.approve("sign", "carol", "finance"))
    play(flow.complete("pay", {"paid": True}))
    assert flow.state is not None and flow.state.status is RunStatus.COMPLETED
