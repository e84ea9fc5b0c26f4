"""``/v1/approvals``: the caller's inbox and decisions.

The approver of a decision is the verified subject and the groups it acts for are the
verified groups; the request names neither. The engine's four-eyes rules then compare
verified identities: the requester of an API-started run is its verified subject, and a
subject that approved once is not counted twice.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from engine.api.context import Caller, Ctx, principal, visible_run
from engine.api.identity import Principal
from engine.api.problems import Problem, not_found
from engine.api.routes.runs import CommandOutcome, command_outcome
from engine.core.commands import DecideApproval
from engine.core.policies import identity
from engine.core.state import RunState, Waiting
from projections.views import redacted_view

router = APIRouter(prefix="/v1/approvals", tags=["approvals"], dependencies=[Depends(principal)])


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")
    approve: bool = Field(description="true approves, false rejects")
    comment: str = Field("", max_length=4000)


class InboxItem(BaseModel):
    run_id: str
    tenant: str
    workflow: str
    version: int
    step: str
    reason: str
    approvers: list[str]
    quorum: int
    approvals: int = Field(description="distinct approvals so far")
    approved_by: list[str]
    requested_by: str
    requested_at: int
    due_at: int | None = Field(description="when the approval expires (ms since epoch)")
    may_decide: bool
    why_not: str = ""
    review: dict[str, JsonValue] = Field(
        description="what to decide on, redacted: the change set of a prepare/commit step, "
        "or the result under review"
    )


class Inbox(BaseModel):
    approvals: list[InboxItem]


def _for(caller: Principal, state: RunState) -> bool:
    current = state.current
    return (
        caller.sees(state.tenant)
        and current is not None
        and current.waiting is Waiting.APPROVAL
        and current.approval is not None
        and bool(set(current.approval.approvers) & caller.groups)
    )


def _why_not(caller: Principal, state: RunState) -> str:
    assert state.current is not None and state.current.approval is not None
    approval = state.current.approval
    who = identity(caller.subject)
    if approval.exclude_requester and who == identity(state.requested_by):
        return "you requested this run; another approver must decide"
    if who in {identity(v) for v in approval.votes}:
        return "you approved already; the quorum needs other approvers"
    return ""


@router.get("", response_model=Inbox)
async def inbox(ctx: Ctx, caller: Caller) -> dict[str, Any]:
    """The approvals the caller's groups may decide, oldest request first."""
    specs = await ctx.specs()
    items = []
    waiting = sorted(
        (s for s in await ctx.backend.states() if _for(caller, s)),
        key=lambda s: s.current.approval.requested_at,  # type: ignore[union-attr]
    )
    for state in waiting:
        current = state.current
        assert current is not None and current.approval is not None
        approval = current.approval
        shown = redacted_view(state, specs)["current"]
        review = {k: shown[k] for k in ("change_set", "result") if shown.get(k) is not None}
        why = _why_not(caller, state)
        items.append(
            {
                "run_id": state.run_id,
                "tenant": state.tenant,
                "workflow": state.workflow,
                "version": state.version,
                "step": current.step,
                "reason": approval.reason,
                "approvers": list(approval.approvers),
                "quorum": approval.quorum,
                "approvals": len(approval.votes),
                "approved_by": list(approval.votes),
                "requested_by": state.requested_by,
                "requested_at": approval.requested_at,
                "due_at": approval.expires_at,
                "may_decide": not why,
                "why_not": why,
                "review": review,
            }
        )
    return {"approvals": items}


@router.post(
    "/{run_id}/{step}",
    response_model=CommandOutcome,
    responses={
        202: {"model": CommandOutcome, "description": "queued"},
        403: {"description": "the caller may not decide this approval"},
        409: {"description": "refused: decided already, or not waiting"},
    },
)
async def decide(
    run_id: str, step: str, body: Decision, ctx: Ctx, caller: Caller, response: Response
) -> dict[str, Any]:
    """Approve or reject as the verified caller, for its verified groups."""
    state = await visible_run(ctx, caller, run_id)
    current = state.current
    if current is None or current.step != step or current.approval is None:
        raise not_found(f"run {run_id} has no approval waiting at step {step}")
    if not set(current.approval.approvers) & caller.groups:
        raise Problem(
            403,
            "Forbidden",
            f"{caller.subject} is in none of the groups this "
            f"approval asks for ({', '.join(current.approval.approvers)})",
            kind="forbidden",
        )
    command = DecideApproval(
        command_id=str(uuid.uuid4()),
        run_id=state.run_id,
        tenant=state.tenant,
        correlation_id=state.correlation_id,
        step=step,
        approver=caller.subject,
        roles=tuple(sorted(caller.groups)),
        approve=body.approve,
        comment=body.comment,
    )
    return await command_outcome(ctx, response, command)
