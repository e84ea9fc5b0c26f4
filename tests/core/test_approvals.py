"""Approvals: quorum, who may approve, reject, reminders, expiry, escalation, SLA, late votes."""

from __future__ import annotations

from typing import Any

from engine.core.events import (
    ApprovalExpired,
    ApprovalGranted,
    ApprovalRejected,
    ApprovalReminded,
    ApprovalRequested,
    ApprovalVoted,
    CommandRejected,
    CommandRejectedV2,
    Escalated,
    RunCancelled,
    RunFailed,
    RunStarted,
    SlaBreached,
    StepCompleted,
    StepFailed,
    StepStarted,
    TaskDispatched,
    TimerArmed,
    TimerFired,
)
from engine.core.state import RunStatus
from tests.harness import T0, Flow

HOUR = 3_600_000


def approval_flow(run_by: str = "alice", **approval: Any) -> Flow:
    """A one-approval-step workflow (then a task), started by ``run_by``."""
    spec = {
        "workflow": "w",
        "version": 1,
        "steps": [
            {"id": "sign", "approval": {"approvers": ["finance"], **approval}},
            {"id": "pay", "task": "payments.pay", "end": True},
            {"id": "manual", "task": "human.handle"},
        ],
    }
    flow = Flow(spec)
    flow.given(flow.start(by=run_by))
    return flow


# --------------------------------------------------------------------------- who and how many


def test_four_eyes_needs_two_distinct_approvers() -> None:
    flow = approval_flow(quorum=2)
    flow.when(flow.approve("sign", "bob", "finance", comment="ok")).then(
        (ApprovalVoted, {"approver": "bob", "comment": "ok"})
    ).then_status(RunStatus.WAITING)
    flow.when(flow.approve("sign", "bob", "finance")).then_rejected("duplicate approval")
    flow.when(flow.approve("sign", "carol", "finance")).then(
        (ApprovalGranted, {"approvers": ["bob", "carol"]}),
        (StepCompleted, {"result": {"approved_by": ["bob", "carol"]}}),
        (StepStarted, {"step": "pay"}),
        TaskDispatched,
        TimerArmed,
    )


def test_requester_may_not_approve_their_own_run() -> None:
    flow = approval_flow(run_by="alice")
    flow.when(flow.approve("sign", "alice", "finance")).then_rejected("self-approval")
    assert flow.state is not None and flow.state.status is RunStatus.WAITING


def test_requester_may_approve_when_not_excluded() -> None:
    flow = approval_flow(run_by="alice", exclude_requester=False)
    flow.when(flow.approve("sign", "alice", "finance")).then(
        ApprovalGranted, StepCompleted, StepStarted, TaskDispatched, TimerArmed
    )


def test_non_member_is_not_an_approver() -> None:
    flow = approval_flow()
    flow.when(flow.approve("sign", "mallory", "sales")).then_rejected("not an approver")
    flow.when(flow.approve("sign", "mallory")).then_rejected("not an approver")


def test_approval_for_another_step_is_rejected() -> None:
    flow = approval_flow()
    flow.when(flow.approve("pay", "bob", "finance")).then_rejected("no pending approval")


def test_approval_for_a_step_that_does_not_exist_says_so_and_names_the_waiting_step() -> None:
    flow = approval_flow()
    flow.when(flow.approve("nostep", "bob", "finance")).then(
        (
            CommandRejectedV2,
            {
                "reason": "unknown step",
                "by": "bob",
                "at_step": "nostep",
                "detail": "w v1 has no step 'nostep'; step 'sign' is waiting for approval",
            },
        )
    )
    flow.when(flow.approve("pay", "bob", "finance")).then(
        (
            CommandRejectedV2,
            {
                "reason": "no pending approval",
                "detail": "step 'pay' is not waiting for approval: it was "
                "decided, expired, or the run is elsewhere; step "
                "'sign' is waiting for approval",
            },
        )
    )
    flow.when(flow.approve("sign", "bob", "finance")).then(
        ApprovalGranted, StepCompleted, StepStarted, TaskDispatched, TimerArmed
    )
    flow.when(flow.approve("sign", "bob", "finance")).then(
        (CommandRejectedV2, {"reason": "no pending approval"})
    )
    rejected = flow.last[0]
    assert isinstance(rejected, CommandRejected)
    assert rejected.detail.endswith("; no step is waiting for approval")


def test_a_refusal_records_who_sent_the_command_and_the_step_it_was_about() -> None:
    flow = approval_flow(run_by="alice")
    flow.when(flow.approve("sign", "alice", "finance")).then(
        (
            CommandRejectedV2,
            {
                "command_type": "DecideApproval",
                "reason": "self-approval",
                "by": "alice",
                "at_step": "sign",
            },
        )
    )
    flow.given(flow.approve("sign", "bob", "finance")).when(flow.cancel(by="ops")).then(
        RunCancelled
    )
    flow.when(flow.cancel(by="ops")).then(
        (
            CommandRejectedV2,
            {"command_type": "CancelRun", "reason": "run ended", "by": "ops", "at_step": ""},
        )
    )


# --------------------------------------------------------------------------- identities


def test_names_that_differ_by_case_or_spaces_are_one_approver() -> None:
    flow = approval_flow(quorum=2)
    flow.when(flow.approve("sign", "bob", "finance")).then(ApprovalVoted)
    for same in ("bob ", " bob", "BOB", "bob\t", "Bob"):
        flow.when(flow.approve("sign", same, "finance")).then_rejected("duplicate approval")
    flow.when(flow.approve("sign", "carol", "finance")).then(
        (ApprovalGranted, {"approvers": ["bob", "carol"]}),
        StepCompleted,
        StepStarted,
        TaskDispatched,
        TimerArmed,
    )


def test_the_requester_is_recognised_whatever_the_case_or_spaces() -> None:
    flow = approval_flow(run_by="Alice")
    for same in ("alice", " ALICE", "alice\n"):
        flow.when(flow.approve("sign", same, "finance")).then_rejected("self-approval")


def test_an_empty_approver_is_no_vote() -> None:
    flow = approval_flow()
    for nobody in ("", "   ", "\t"):
        flow.when(flow.approve("sign", nobody, "finance")).then_rejected("no approver")
    assert flow.state is not None and flow.state.current is not None
    assert flow.state.current.approval is not None and flow.state.current.approval.votes == ()


def test_a_run_without_a_requester_cannot_start_when_an_approval_excludes_the_requester() -> None:
    flow = Flow(
        {
            "workflow": "w",
            "version": 1,
            "steps": [
                {"id": "fetch", "task": "crm.get"},
                {"id": "sign", "approval": {"approvers": ["finance"], "quorum": 2}},
            ],
        }
    )
    flow.when(flow.start(by="")).then(
        RunStarted,
        (RunFailed, {"code": "REQUESTER_REQUIRED", "field": "requested_by", "step": None}),
    ).then_status(RunStatus.FAILED)
    failed = flow.last[-1]
    assert isinstance(failed, RunFailed) and "step 'sign'" in failed.message


def test_an_escalation_also_needs_a_requester() -> None:
    flow = Flow(
        {
            "workflow": "w",
            "version": 1,
            "steps": [
                {"id": "fetch", "task": "crm.get", "on_business_error": {"X": {"escalate": "ops"}}}
            ],
        }
    )
    flow.when(flow.start(by="  ")).then(RunStarted, (RunFailed, {"code": "REQUESTER_REQUIRED"}))


def test_without_an_excluding_approval_no_requester_is_needed() -> None:
    flow = approval_flow(run_by="", exclude_requester=False)
    assert flow.state is not None and flow.state.status is RunStatus.WAITING


# --------------------------------------------------------------------------- reject


def test_reject_fails_the_run_by_default() -> None:
    flow = approval_flow()
    flow.when(flow.approve("sign", "bob", "finance", reject=True, comment="too much")).then(
        (ApprovalRejected, {"approver": "bob", "comment": "too much"}),
        (StepFailed, {"code": "APPROVAL_REJECTED"}),
        (
            RunFailed,
            {
                "step": "sign",
                "error_class": "business",
                "code": "APPROVAL_REJECTED",
                "message": "rejected by bob: too much",
            },
        ),
    ).then_status(RunStatus.FAILED)


def test_reject_can_goto_another_step() -> None:
    flow = approval_flow(on_reject={"goto": "manual"})
    flow.when(flow.approve("sign", "bob", "finance", reject=True)).then(
        ApprovalRejected, (StepStarted, {"step": "manual"}), TaskDispatched, TimerArmed
    )


def test_reject_can_escalate_to_another_group() -> None:
    flow = approval_flow(on_reject={"escalate": "finance-leads"})
    flow.when(flow.approve("sign", "bob", "finance", reject=True)).then(
        ApprovalRejected,
        (Escalated, {"to": "finance-leads", "reason": "APPROVAL_REJECTED"}),
        (ApprovalRequested, {"reason": "escalation:approval", "approvers": ["finance-leads"]}),
    )
    assert flow.state is not None and flow.state.escalations == 1
    flow.when(flow.approve("sign", "lena", "finance-leads")).then(
        ApprovalGranted, StepCompleted, (StepStarted, {"step": "pay"}), TaskDispatched, TimerArmed
    )


def test_one_reject_ends_a_four_eyes_approval_after_a_vote() -> None:
    flow = approval_flow(quorum=2)
    flow.given(flow.approve("sign", "bob", "finance"))
    flow.when(flow.approve("sign", "carol", "finance", reject=True)).then(
        ApprovalRejected, StepFailed, RunFailed
    )


# --------------------------------------------------------------------------- reminders and expiry


def test_reminders_are_re_armed_until_expiry() -> None:
    flow = approval_flow(remind_every="1h", expires_after="3h30m")
    assert flow.timers() == flow.timers("approval_reminder") + flow.timers("approval_expiry")
    assert flow.due("approval_reminder") == T0 + HOUR
    for n in (1, 2):
        flow.fire("approval_reminder").then(
            (TimerFired, {"kind": "approval_reminder"}),
            (ApprovalReminded, {"step": "sign", "reminder": n, "approvers": ["finance"]}),
            (TimerArmed, {"kind": "approval_reminder", "due_at": T0 + (n + 1) * HOUR}),
        ).then_status(RunStatus.WAITING)
    # the next reminder would fall after the expiry: none is armed
    flow.fire("approval_reminder").then(TimerFired, (ApprovalReminded, {"reminder": 3}))
    assert flow.timers() == flow.timers("approval_expiry")
    assert flow.state is not None and flow.state.current is not None
    assert flow.state.current.approval is not None
    assert flow.state.current.approval.reminders == 3


def test_expiry_fails_the_run_by_default() -> None:
    flow = approval_flow(expires_after="2h", remind_every="30m")
    flow.fire("approval_expiry").then(
        (TimerFired, {"kind": "approval_expiry"}),
        ApprovalExpired,
        (StepFailed, {"code": "APPROVAL_EXPIRED"}),
        (RunFailed, {"code": "APPROVAL_EXPIRED", "error_class": "business"}),
    )
    assert flow.state is not None and flow.state.timers == {}


def test_expiry_escalates_to_another_group() -> None:
    flow = approval_flow(expires_after="24h", on_expire={"escalate": "finance-leads"})
    flow.fire("approval_expiry").then(
        TimerFired,
        ApprovalExpired,
        (Escalated, {"step": "sign", "to": "finance-leads", "reason": "APPROVAL_EXPIRED"}),
        (ApprovalRequested, {"approvers": ["finance-leads"], "reason": "escalation:approval"}),
    ).then_status(RunStatus.WAITING)
    assert flow.state is not None and flow.state.escalations == 1
    flow.when(flow.approve("sign", "bob", "finance")).then_rejected("not an approver")
    flow.when(flow.approve("sign", "lena", "finance-leads")).then(
        ApprovalGranted,
        (StepCompleted, {"result": {"approved_by": ["lena"]}}),
        (StepStarted, {"step": "pay"}),
        TaskDispatched,
        TimerArmed,
    )


def test_escalated_approval_can_expire_in_turn() -> None:
    flow = approval_flow(
        expires_after="1h", on_expire={"escalate": "finance-leads", "expires_after": "2h"}
    )
    flow.fire("approval_expiry").then(
        TimerFired,
        ApprovalExpired,
        Escalated,
        (ApprovalRequested, {"approvers": ["finance-leads"], "expires_at": T0 + 3 * HOUR}),
        (TimerArmed, {"kind": "approval_expiry", "due_at": T0 + 3 * HOUR}),
    )
    flow.fire("approval_expiry").then(
        TimerFired, ApprovalExpired, StepFailed, (RunFailed, {"code": "APPROVAL_EXPIRED"})
    )


def test_expiry_can_goto_another_step() -> None:
    flow = approval_flow(expires_after="1h", on_expire={"goto": "manual"})
    flow.fire("approval_expiry").then(
        TimerFired, ApprovalExpired, (StepStarted, {"step": "manual"}), TaskDispatched, TimerArmed
    )


def test_critical_task_escalation_grant_dispatches_the_task() -> None:
    flow = Flow(
        {
            "workflow": "w",
            "version": 1,
            "steps": [
                {
                    "id": "wire",
                    "task": "bank.wire",
                    "critical": True,
                    "approval": {
                        "approvers": ["finance"],
                        "expires_after": "1h",
                        "on_expire": {"escalate": "cfo"},
                    },
                }
            ],
        }
    )
    flow.given(flow.start())
    flow.fire("approval_expiry").then(
        TimerFired,
        ApprovalExpired,
        Escalated,
        (ApprovalRequested, {"reason": "escalation:critical", "approvers": ["cfo"]}),
    )
    flow.when(flow.approve("wire", "cora", "cfo")).then(
        ApprovalGranted, (TaskDispatched, {"queue": "bank.wire"}), TimerArmed
    )


# --------------------------------------------------------------------------- SLA


def test_approval_sla_breach_is_recorded_and_the_approval_stays_open() -> None:
    flow = approval_flow(sla="4h")
    flow.fire("approval_sla").then(
        (TimerFired, {"kind": "approval_sla"}),
        (SlaBreached, {"scope": "step", "step": "sign", "due_at": T0 + 4 * HOUR}),
    ).then_status(RunStatus.WAITING)
    assert flow.state is not None and flow.state.sla_breached
    flow.when(flow.approve("sign", "bob", "finance")).then(
        ApprovalGranted, StepCompleted, StepStarted, TaskDispatched, TimerArmed
    )


def test_approval_sla_timer_is_dropped_when_the_approval_is_decided_in_time() -> None:
    flow = approval_flow(sla="4h")
    timer = flow.timers("approval_sla")[0]
    flow.given(flow.approve("sign", "bob", "finance"))
    flow.after(4 * HOUR).when(flow.fire_id(timer)).then_rejected("stale timer")


# --------------------------------------------------------------------------- late decisions


def test_late_approval_after_grant_is_rejected() -> None:
    flow = approval_flow()
    flow.given(flow.approve("sign", "bob", "finance"))
    flow.when(flow.approve("sign", "carol", "finance")).then_rejected("no pending approval")


def test_late_approval_after_expiry_is_rejected() -> None:
    flow = approval_flow(expires_after="1h", on_expire={"goto": "manual"})
    flow.fire("approval_expiry")
    flow.when(flow.approve("sign", "bob", "finance")).then_rejected("no pending approval")


def test_late_approval_after_expiry_failed_the_run_is_rejected() -> None:
    flow = approval_flow(expires_after="1h")
    flow.fire("approval_expiry")
    flow.when(flow.approve("sign", "bob", "finance")).then_rejected("run ended")


def test_late_approval_after_cancel_is_rejected() -> None:
    flow = approval_flow()
    flow.given(flow.cancel())
    assert isinstance(flow.log[-1], RunCancelled)
    flow.when(flow.approve("sign", "bob", "finance")).then_rejected("run ended")
