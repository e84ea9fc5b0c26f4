"""``/v1/messages``: publish a message correlated by (tenant, name, key) to the runs that
wait for it (see the README's "Events correlated by a business key").

The answer is 202 once the message is durable (``acks=all`` or the SQLite commit):
delivery to the waiting runs follows, as for ``terranoha publish``."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from engine.api.context import Caller, Ctx, principal, require
from engine.api.identity import Role
from engine.api.problems import Problem
from engine.core.correlation import DEFAULT_TTL_MS, MessageError, new_message
from engine.core.spec import Duration

router = APIRouter(
    prefix="/v1/messages",
    tags=["messages"],
    dependencies=[Depends(principal), Depends(require(Role.TRIGGER))],
)


class MessageBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    key: str = Field(min_length=1, max_length=500, description="the correlation key")
    data: JsonValue = None
    ttl: Duration = Field(
        DEFAULT_TTL_MS,
        description="how long it waits for a run (1h, "
        "30s, or milliseconds); 0 reaches only the waits open now",
    )
    message_id: str | None = Field(
        None, min_length=1, max_length=200, description="the same id again is the same message"
    )
    tenant: str | None = Field(None, min_length=1, max_length=200)


class Published(BaseModel):
    message_id: str
    name: str
    key: str
    tenant: str
    ttl_ms: int


@router.post("", status_code=202, response_model=Published)
async def publish(
    body: MessageBody, ctx: Ctx, caller: Caller, response: Response
) -> dict[str, Any]:
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
            f"{caller.subject} may not publish for tenant {tenant!r}",
            field="body.tenant",
            kind="forbidden",
        )
    try:
        message = new_message(
            message_id=body.message_id or str(uuid.uuid4()),
            name=body.name,
            key=body.key,
            data=body.data,
            ttl_ms=body.ttl,
            tenant=tenant,
        )
    except MessageError as exc:
        field, _, detail = str(exc).partition(": ")
        raise Problem(
            422,
            "Invalid request",
            str(exc),
            field=f"body.{field}",
            kind="invalid-request",
            reason=detail,
        ) from None
    await ctx.backend.publish(message)
    return {
        "message_id": message.message_id,
        "name": message.name,
        "key": message.key,
        "tenant": message.tenant,
        "ttl_ms": message.ttl_ms,
    }
