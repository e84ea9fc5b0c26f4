"""``/v1/dead-letters``: inputs the engine could not process, with why (operate).

A dead letter's original bytes are not returned: they may hold what redaction hides. A
letter that names a run is shown to callers of that run's tenant; one that names none
(bytes that did not decode) only to callers of every tenant."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from engine.api.context import Caller, Ctx, principal, require
from engine.api.identity import ALL_TENANTS, Role

router = APIRouter(
    prefix="/v1/dead-letters",
    tags=["dead letters"],
    dependencies=[Depends(principal), Depends(require(Role.OPERATE))],
)


class DeadLetterView(BaseModel):
    source: str
    partition: int
    offset: int
    reason: str
    detail: str
    ts: int
    run_id: str
    size: int


class DeadLetters(BaseModel):
    dead_letters: list[DeadLetterView]


@router.get("", response_model=DeadLetters)
async def list_dead_letters(ctx: Ctx, caller: Caller) -> dict[str, Any]:
    shown = []
    for dead in await ctx.backend.dead_letters():
        if ALL_TENANTS not in caller.tenants:
            state = await ctx.backend.state(dead.run_id) if dead.run_id else None
            if state is None or not caller.sees(state.tenant):
                continue
        shown.append(
            {
                "source": dead.source,
                "partition": dead.partition,
                "offset": dead.offset,
                "reason": dead.reason,
                "detail": dead.detail,
                "ts": dead.ts,
                "run_id": dead.run_id,
                "size": len(dead.payload),
            }
        )
    return {"dead_letters": shown}
