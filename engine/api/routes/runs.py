"""``/v1/runs``: start (idempotent by key), list, read, timeline, cancel, signal, and a
server-sent-events stream of a run's state."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from engine.api.context import ApiContext, Caller, Ctx, principal, require, visible_run
from engine.api.identity import Principal, Role
from engine.api.problems import Problem
from engine.core.commands import CancelRun, Command, DeliverSignal
from engine.core.events import CommandRejected
from engine.core.policies import run_id_for
from engine.core.records import Trigger
from engine.core.spec import check_input
from engine.core.state import RunState, RunStatus
from engine.runtime.redaction import PolicyBook, redact_events
from engine.runtime.specs import SpecRegistry
from engine.runtime.starts import start_conflict
from projections.timeline import build_timeline, timeline_view
from projections.views import redacted_view

router = APIRouter(prefix="/v1/runs", tags=["runs"], dependencies=[Depends(principal)])

STREAM_HEARTBEAT_S = 15.0
MAX_PAGE = 200


class StartRunBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workflow: str = Field(min_length=1, max_length=200, description="a deployed workflow")
    version: int = Field(0, ge=0, description="0: the latest deployed version")
    input: dict[str, JsonValue] = Field(default_factory=dict)
    tenant: str | None = Field(
        None, min_length=1, max_length=200, description="default: the caller's only tenant"
    )
    priority: int = Field(0, ge=-1000, le=1000)
    correlation_id: str | None = Field(None, max_length=200)


class CancelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("cancelled through the API", max_length=2000)


class SignalBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: JsonValue = None


class RunView(BaseModel):
    """A run as people may see it: payloads redacted by the run's policy."""

    model_config = ConfigDict(extra="allow")
    run_id: str
    tenant: str
    workflow: str
    version: int
    status: str
    requested_by: str


class RunPage(BaseModel):
    runs: list[RunView]
    next_cursor: str | None = Field(None, description="pass as cursor for the next page")


class CommandOutcome(BaseModel):
    """What a command did: the events it caused, or queued when the engine has not
    answered yet (202)."""

    queued: bool
    events: list[str]
    run: RunView | None


async def run_view(ctx: ApiContext, state: RunState) -> dict[str, Any]:
    view = redacted_view(state, await ctx.specs())
    view["status"] = state.status.value
    return view


@router.post(
    "",
    status_code=201,
    response_model=RunView,
    responses={
        200: {"model": RunView, "description": "the run this key started"},
        409: {"description": "the key started a run with another input"},
    },
    dependencies=[Depends(require(Role.TRIGGER))],
)
async def start_run(
    body: StartRunBody,
    ctx: Ctx,
    caller: Caller,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(max_length=200, min_length=1, description="same key, same run (per tenant)"),
    ] = None,
) -> dict[str, Any]:
    """Start a run. Its requester is the verified caller."""
    tenant = body.tenant or caller.default_tenant
    if tenant is None:
        raise Problem(
            422,
            "Invalid request",
            f"name the tenant: this caller may act for {', '.join(sorted(caller.tenants))}",
            field="body.tenant",
            kind="invalid-request",
        )
    if not caller.sees(tenant):
        raise Problem(
            403,
            "Forbidden",
            f"{caller.subject} may not start runs for tenant {tenant!r}",
            field="body.tenant",
            kind="forbidden",
        )
    key = idempotency_key.strip() if idempotency_key else str(uuid.uuid4())
    status, view = await start_or_find(
        ctx,
        workflow=body.workflow,
        version=body.version,
        tenant=tenant,
        key=key,
        data=body.input,
        priority=body.priority,
        correlation_id=body.correlation_id,
        requested_by=caller.subject,
        key_field="header.Idempotency-Key",
    )
    response.status_code = status
    response.headers["Location"] = f"/v1/runs/{view['run_id']}"
    return view


async def start_or_find(
    ctx: ApiContext,
    *,
    workflow: str,
    version: int,
    tenant: str,
    key: str,
    data: Any,
    requested_by: str,
    key_field: str,
    priority: int = 0,
    correlation_id: str | None = None,
    input_field: str = "body.input",
) -> tuple[int, dict[str, Any]]:
    """Start the run of (tenant, key) unless it exists: 201 and the new run, 200 and the
    existing one, or a 409 problem when the existing one has another workflow or input.
    The input is checked against the spec here, so a bad one is a 422 naming its field
    instead of a run that fails."""
    spec = await ctx.spec(workflow, version)
    if spec is None:
        what = f"{workflow} v{version}" if version else workflow
        raise Problem(
            422,
            "Invalid request",
            f"workflow {what} is not deployed",
            field="body.workflow",
            kind="invalid-request",
        )
    problem = check_input(spec.input, data, "input", strict=spec.strict_input)
    if problem is not None:
        where = input_field + problem[0].removeprefix("input")
        raise Problem(
            422,
            "Invalid request",
            f"{problem[0]}: {problem[1]}",
            field=where,
            kind="invalid-request",
        )
    trigger = Trigger(
        workflow=spec.workflow,
        version=spec.version,
        tenant=tenant,
        idempotency_key=key,
        input=data,
        priority=priority,
        correlation_id=correlation_id or key,
        requested_by=requested_by,
    )
    run_id = run_id_for(tenant, key)
    existing = await ctx.backend.state(run_id)
    if existing is not None:
        conflict = start_conflict(trigger, existing)
        if conflict is not None:
            raise Problem(
                409,
                "Conflict",
                f"key {key!r} already started run {run_id} with "
                f"{conflict}; use another key for a new run",
                field=key_field,
                kind="idempotency-conflict",
                run_id=run_id,
            )
        return 200, await run_view(ctx, existing)
    await ctx.backend.trigger(trigger)
    state = await ctx.backend.state(run_id) or RunState(
        run_id=run_id,
        tenant=tenant,
        correlation_id=trigger.correlation_id,
        workflow=spec.workflow,
        version=spec.version,
        idempotency_key=key,
        requested_by=requested_by,
        input=data,
    )
    return 201, await run_view(ctx, state)


def _cursor(state: RunState) -> str:
    return base64.urlsafe_b64encode(f"{state.started_at}:{state.run_id}".encode()).decode()


def _after(cursor: str) -> tuple[int, str]:
    try:
        started, _, run_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition(":")
        return int(started), run_id
    except (ValueError, UnicodeDecodeError):
        raise Problem(
            422,
            "Invalid request",
            "cursor is not one this API gave out; start again without it",
            field="query.cursor",
            kind="invalid-request",
        ) from None


@router.get("", response_model=RunPage, dependencies=[Depends(require(Role.READ))])
async def list_runs(
    ctx: Ctx,
    caller: Caller,
    status: RunStatus | None = None,
    workflow: Annotated[str | None, Query(max_length=200)] = None,
    tenant: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> dict[str, Any]:
    """The caller's tenants' runs, newest first."""
    after = _after(cursor) if cursor else None
    found = [
        s
        for s in await ctx.backend.states()
        if caller.sees(s.tenant)
        and (tenant is None or s.tenant == tenant)
        and (status is None or s.status is status)
        and (workflow is None or s.workflow == workflow)
    ]
    found.sort(key=lambda s: (s.started_at, s.run_id), reverse=True)
    if after is not None:
        found = [s for s in found if (s.started_at, s.run_id) < after]
    page = found[:limit]
    more = len(found) > limit
    return {
        "runs": [await run_view(ctx, s) for s in page],
        "next_cursor": _cursor(page[-1]) if more and page else None,
    }


@router.get("/{run_id}", response_model=RunView, dependencies=[Depends(require(Role.READ))])
async def get_run(run_id: str, ctx: Ctx, caller: Caller) -> dict[str, Any]:
    return await run_view(ctx, await visible_run(ctx, caller, run_id))


@router.get("/{run_id}/timeline", dependencies=[Depends(require(Role.READ))])
async def get_timeline(run_id: str, ctx: Ctx, caller: Caller) -> dict[str, Any]:
    """The run's timeline, payloads redacted."""
    await visible_run(ctx, caller, run_id)
    events = await ctx.backend.events(run_id)
    if not events:
        raise Problem(404, "Not found", f"run {run_id} has no events yet", kind="not-found")
    shown = redact_events(events, PolicyBook(SpecRegistry(await ctx.specs())))
    return timeline_view(build_timeline(shown))


async def command_outcome(ctx: Ctx, response: Response, command: Command) -> dict[str, Any]:
    submitted = await ctx.backend.submit(command)
    for event in submitted.events or ():
        if isinstance(event, CommandRejected):
            status = 403 if event.reason in ("self-approval", "not an approver") else 409
            raise Problem(
                status,
                "Refused",
                f"{event.reason}: {event.detail}",
                kind="refused",
                reason=event.reason,
            )
    if submitted.events is None:
        response.status_code = 202
    run = await run_view(ctx, submitted.state) if submitted.state is not None else None
    return {
        "queued": submitted.events is None,
        "events": [e.TYPE for e in submitted.events or ()],
        "run": run,
    }


@router.post(
    "/{run_id}/cancel", response_model=CommandOutcome, dependencies=[Depends(require(Role.OPERATE))]
)
async def cancel_run(
    run_id: str, body: CancelBody, ctx: Ctx, caller: Caller, response: Response
) -> dict[str, Any]:
    state = await visible_run(ctx, caller, run_id)
    return await command_outcome(
        ctx,
        response,
        CancelRun(
            command_id=str(uuid.uuid4()),
            run_id=state.run_id,
            tenant=state.tenant,
            correlation_id=state.correlation_id,
            reason=body.reason,
            by=caller.subject,
        ),
    )


@router.post(
    "/{run_id}/signals/{name}",
    response_model=CommandOutcome,
    dependencies=[Depends(require(Role.OPERATE))],
)
async def signal_run(
    run_id: str, name: str, body: SignalBody, ctx: Ctx, caller: Caller, response: Response
) -> dict[str, Any]:
    state = await visible_run(ctx, caller, run_id)
    return await command_outcome(
        ctx,
        response,
        DeliverSignal(
            command_id=str(uuid.uuid4()),
            run_id=state.run_id,
            tenant=state.tenant,
            correlation_id=state.correlation_id,
            name=name,
            data=body.data,
        ),
    )


@router.get(
    "/{run_id}/stream",
    dependencies=[Depends(require(Role.READ))],
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def stream_run(run_id: str, ctx: Ctx, caller: Caller, request: Request) -> StreamingResponse:
    """Server-sent events: an ``event: state`` with the run's redacted state now and at
    every change, until the run ends (then ``event: end``)."""
    first = await visible_run(ctx, caller, run_id)
    return StreamingResponse(
        _updates(ctx, caller, request, first),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store"},
    )


async def _updates(
    ctx: Ctx, caller: Principal, request: Request, state: RunState
) -> AsyncIterator[str]:
    seq = -1
    current: RunState | None = state
    while current is not None:
        if current.seq != seq:
            seq = current.seq
            view = await run_view(ctx, current)
            yield f"id: {seq}\nevent: state\ndata: {json.dumps(view, default=str)}\n\n"
            if current.terminal:
                yield f"event: end\ndata: {json.dumps({'status': current.status.value})}\n\n"
                return
        else:
            yield ": still waiting\n\n"
        if await request.is_disconnected():
            return
        current = await ctx.backend.wait_change(state.run_id, seq, STREAM_HEARTBEAT_S)
