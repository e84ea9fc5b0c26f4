"""The HTTP API application: FastAPI (OpenAPI 3.1 at ``/openapi.json``, docs at
``/docs``) over one ``ApiBackend``, served by uvicorn (with httptools and uvloop, which
uvicorn picks when installed: about a quarter less CPU per request than its pure-Python
parser and the default event loop).

Each resource is one router module under ``engine.api.routes``; ``ROUTERS`` lists them.
A new resource (schedules) is a module with a ``router`` whose
``dependencies`` include ``principal``, added to ``ROUTERS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

from engine.api.backends import BackendUnavailableError
from engine.api.context import ApiContext
from engine.api.problems import BodyLimit, install
from engine.api.routes import approvals, dead_letters, hooks, messages, runs, workflows
from engine.core.errors import TerranohaError

log = logging.getLogger("terranoha.api")

RECONNECT_S = (0.5, 1.0, 2.0, 5.0)
"""Waits between attempts to reach a backend that was down at start-up (the last one
repeats)."""

MAX_BODY = 1 << 20
"""Request bodies over this many bytes are refused with 413."""

ROUTERS: tuple[APIRouter, ...] = (
    runs.router,
    approvals.router,
    workflows.router,
    dead_letters.router,
    hooks.router,
    messages.router,
)


def create_app(
    ctx: ApiContext, *, max_body: int = MAX_BODY, routers: Sequence[APIRouter] = ROUTERS
) -> FastAPI:
    """The application; it starts the backend on start-up and closes it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        connecting = asyncio.create_task(_connect(ctx))
        try:
            yield
        finally:
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
            await ctx.backend.close()

    app = FastAPI(
        title="Terranoha",
        version="1",
        lifespan=lifespan,
        description="Start and follow runs, decide approvals, deploy workflows. "
        "Every /v1 request needs Authorization: Bearer with an API key or an "
        "OIDC token; errors are RFC 9457 problem details.",
    )
    app.state.ctx = ctx
    install(app)
    for router in routers:
        app.include_router(router)

    @app.get("/healthz", tags=["health"], responses={503: {"description": "backend down"}})
    async def healthz() -> JSONResponse:
        """Readiness: 200 once the backend is connected, 503 while it is not. Answers
        without credentials and says nothing about runs."""
        if ctx.down is None:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "backend unavailable"}, status_code=503)

    app.add_middleware(BodyLimit, limit=max_body)
    return app


async def _connect(ctx: ApiContext) -> None:
    """Start the backend, retrying while it is down; until then requests that need it get
    503, and requests without valid credentials still get 401."""
    attempt = 0
    while True:
        try:
            await ctx.backend.start()
        except (
            BackendUnavailableError,
            TerranohaError,
            OSError,
            TimeoutError,
            sqlite3.Error,
        ) as exc:
            ctx.down = str(exc) or type(exc).__name__
            with contextlib.suppress(Exception):
                await ctx.backend.close()
            log.warning("backend unavailable, retrying: %s", ctx.down)
            await asyncio.sleep(RECONNECT_S[min(attempt, len(RECONNECT_S) - 1)])
            attempt += 1
            continue
        ctx.down = None
        log.info("backend connected")
        return
