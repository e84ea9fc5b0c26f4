"""``/v1/hooks``: webhook triggers. A delivery is authenticated by its signature (see
``engine.api.hooks``), not by an API key; listing the hooks and their counters needs
admin."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from engine.api.context import Caller, Ctx, principal, require
from engine.api.hooks import RefusedDelivery, parse_body, verify
from engine.api.identity import Role
from engine.api.problems import Problem, not_found, unauthorized
from engine.api.routes.runs import RunView, start_or_find

router = APIRouter(prefix="/v1/hooks", tags=["hooks"])


class HookView(BaseModel):
    name: str
    verify: str
    workflow: str
    tenant: str
    accepted: int
    refused: dict[str, int]


class HookList(BaseModel):
    hooks: list[HookView]


@router.get(
    "", response_model=HookList, dependencies=[Depends(principal), Depends(require(Role.ADMIN))]
)
async def list_hooks(ctx: Ctx, caller: Caller) -> dict[str, Any]:
    """The hooks of the caller's tenants, with accepted and refused deliveries so far."""
    return {
        "hooks": [
            {
                "name": name,
                "verify": hook.verify.value,
                "workflow": hook.workflow,
                "tenant": hook.tenant,
                **ctx.hooks.counts(name),
            }
            for name, hook in sorted(ctx.hooks.hooks.items())
            if caller.sees(hook.tenant)
        ]
    }


@router.post(
    "/{name}",
    status_code=201,
    response_model=RunView,
    responses={
        200: {
            "description": "the run this delivery started already, or "
            "Slack's url_verification challenge"
        },
        401: {"description": "unsigned, badly signed or stale"},
    },
)
async def deliver(name: str, request: Request, response: Response, ctx: Ctx) -> Any:
    """Start the hook's run from a signed delivery; a redelivery is the same run."""
    hook = ctx.hooks.hooks.get(name)
    if hook is None:
        raise not_found(f"no hook {name}")
    body = await request.body()
    headers = {k.lower(): v for k, v in request.headers.items()}
    try:
        delivery = verify(hook, body, headers)
    except RefusedDelivery as exc:
        ctx.hooks.refused[(name, exc.reason)] += 1
        raise unauthorized(f"{exc.reason}: {exc}") from None
    try:
        parsed = parse_body(body, headers)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Problem(
            422,
            "Invalid request",
            f"the body is not JSON: {exc}",
            field="body",
            kind="invalid-request",
        ) from None
    if isinstance(parsed, dict) and parsed.get("type") == "url_verification":
        return JSONResponse({"challenge": str(parsed.get("challenge", ""))})
    doc = {"body": parsed, "headers": headers}
    key = str(hook.key.search(doc) or "") if hook.key is not None else delivery
    if not key:
        raise Problem(
            422,
            "Invalid request",
            f"hook {name}: the delivery has no id to use as idempotency key; set key: in the hook",
            field="hook.key",
            kind="invalid-request",
        )
    data = hook.input.search(doc)
    if not isinstance(data, dict):
        raise Problem(
            422,
            "Invalid request",
            f"hook {name}: its input expression gave {type(data).__name__}, not an object",
            field="hook.input",
            kind="invalid-request",
        )
    status, view = await start_or_find(
        ctx,
        workflow=hook.workflow,
        version=hook.version,
        tenant=hook.tenant,
        key=key,
        data=data,
        requested_by=f"hook:{name}",
        key_field="hook.key",
        input_field="input",
    )
    ctx.hooks.accepted[name] += 1
    response.status_code = status
    response.headers["Location"] = f"/v1/runs/{view['run_id']}"
    return view
