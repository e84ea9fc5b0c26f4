"""The HTTP API application: FastAPI (OpenAPI 3.1 at ``/openapi.json``, docs at
``/docs``) over one ``ApiBackend``.

Each resource is one router module under ``engine.api.routes``; ``ROUTERS`` lists them.
A new resource (schedules, correlated messages) is a module with a ``router`` whose
``dependencies`` include ``principal``, added to ``ROUTERS``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from engine.api.context import ApiContext
from engine.api.problems import BodyLimit, install
from engine.api.routes import approvals, dead_letters, hooks, runs, workflows

MAX_BODY = 1 << 20
"""Request bodies over this many bytes are refused with 413."""

ROUTERS: tuple[APIRouter, ...] = (runs.router, approvals.router, workflows.router,
                                  dead_letters.router, hooks.router)


def create_app(ctx: ApiContext, *, max_body: int = MAX_BODY,
               routers: Sequence[APIRouter] = ROUTERS) -> FastAPI:
    """The application; it starts the backend on start-up and closes it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ctx.backend.start()
        try:
            yield
        finally:
            await ctx.backend.close()

    app = FastAPI(title="Terranoha", version="1", lifespan=lifespan,
                  description="Start and follow runs, decide approvals, deploy workflows. "
                  "Every /v1 request needs Authorization: Bearer with an API key or an "
                  "OIDC token; errors are RFC 9457 problem details.")
    app.state.ctx = ctx
    install(app)
    for router in routers:
        app.include_router(router)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: answers without credentials and says nothing about runs."""
        return {"status": "ok"}

    app.add_middleware(BodyLimit, limit=max_body)
    return app
