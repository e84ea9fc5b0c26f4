"""``/v1/workflows``: deploy (admin), list and read deployed specs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from engine.api.context import Ctx, principal, require
from engine.api.identity import Role
from engine.api.problems import Problem, not_found
from engine.core.errors import SpecError
from engine.core.spec import load_spec, load_spec_yaml, spec_to_data
from engine.embedded.store import SpecConflictError

router = APIRouter(prefix="/v1/workflows", tags=["workflows"], dependencies=[Depends(principal)])


class DeployBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spec: str | dict[str, JsonValue] = Field(
        description="the spec as YAML text, or as a JSON object"
    )


class WorkflowVersion(BaseModel):
    workflow: str
    version: int
    steps: int
    spec: dict[str, JsonValue]


class Deployed(BaseModel):
    workflow: str
    version: int
    created: bool


class WorkflowList(BaseModel):
    workflows: list[WorkflowVersion]


@router.post(
    "",
    status_code=201,
    response_model=Deployed,
    responses={200: {"model": Deployed, "description": "deployed already"}},
    dependencies=[Depends(require(Role.ADMIN))],
)
async def deploy(body: DeployBody, ctx: Ctx, response: Response) -> dict[str, Any]:
    """Validate and deploy a spec. The same spec again is 200; another spec under a
    deployed (workflow, version) is 409: deploy it as a new version."""
    try:
        spec = load_spec_yaml(body.spec) if isinstance(body.spec, str) else load_spec(body.spec)
    except SpecError as exc:
        path, message = exc.issues[0] if exc.issues else ("$", str(exc))
        raise Problem(
            422,
            "Invalid spec",
            f"{path}: {message}",
            field=f"body.spec.{path}",
            kind="invalid-spec",
            errors=[{"field": f"body.spec.{p}", "detail": m} for p, m in exc.issues],
        ) from None
    try:
        created = await ctx.backend.deploy(spec)
    except SpecConflictError as exc:
        raise Problem(
            409, "Conflict", str(exc), field="body.spec.version", kind="spec-conflict"
        ) from None
    await ctx.specs(fresh=True)
    if not created:
        response.status_code = 200
    return {"workflow": spec.workflow, "version": spec.version, "created": created}


def _view(spec: Any) -> dict[str, Any]:
    return {
        "workflow": spec.workflow,
        "version": spec.version,
        "steps": len(spec.steps),
        "spec": spec_to_data(spec),
    }


@router.get("", response_model=WorkflowList, dependencies=[Depends(require(Role.READ))])
async def list_workflows(ctx: Ctx) -> dict[str, Any]:
    return {"workflows": [_view(s) for s in await ctx.specs(fresh=True)]}


@router.get("/{workflow}", response_model=WorkflowList, dependencies=[Depends(require(Role.READ))])
async def get_workflow(workflow: str, ctx: Ctx) -> dict[str, Any]:
    """Every deployed version of ``workflow``, oldest first."""
    found = [_view(s) for s in await ctx.specs(fresh=True) if s.workflow == workflow]
    if not found:
        raise not_found(f"workflow {workflow} is not deployed")
    return {"workflows": found}
