"""What every route needs: the backend, the verified caller, and the checks of what the
caller may do and see.

Authentication is a dependency of every ``/v1`` router, so a route cannot be added
without it; the webhook routes authenticate by signature instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from engine.api.backends import ApiBackend, BackendUnavailableError
from engine.api.hooks import Hooks
from engine.api.identity import KEY_PREFIX, KeyStore, OidcVerifier, Principal, Role
from engine.api.problems import Problem, not_found, unauthorized
from engine.core.spec import WorkflowSpec
from engine.core.state import RunState

SPECS_TTL_S = 2.0
"""How long the list of deployed specs is reused before it is read again. A start for a
workflow the list does not know reads it again at once, so a new deployment is seen."""


@dataclass
class ApiContext:
    """The server's shared parts, on ``app.state.ctx``."""

    backend: ApiBackend
    keys: KeyStore | None = None
    oidc: OidcVerifier | None = None
    hooks: Hooks = field(default_factory=Hooks)
    unauthorized: int = 0
    """Requests refused for want of valid credentials (webhooks count their own)."""
    down: str | None = "starting"
    """Why the backend cannot be used now (None once it is connected): requests that need
    it get 503 meanwhile."""
    _specs: list[WorkflowSpec] = field(default_factory=list)
    _specs_at: float = float("-inf")
    _specs_read: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def specs(self, fresh: bool = False) -> list[WorkflowSpec]:
        """The deployed specs. One read at a time: the requests that find the list stale
        together wait for the same read."""
        if not fresh and time.monotonic() - self._specs_at <= SPECS_TTL_S:
            return self._specs
        asked = time.monotonic()
        async with self._specs_read:
            if self._specs_at < asked:
                self._specs = await self.backend.specs()
                self._specs_at = time.monotonic()
        return self._specs

    async def spec(self, workflow: str, version: int = 0) -> WorkflowSpec | None:
        """The deployed spec (``version`` 0: the latest), reading the deployments again
        if the cached list does not have it."""
        for fresh in (False, True):
            found = [
                s
                for s in await self.specs(fresh)
                if s.workflow == workflow and version in (0, s.version)
            ]
            if found:
                return max(found, key=lambda s: s.version)
        return None


def _context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


async def context(request: Request) -> ApiContext:
    """The context of a route that uses the backend: 503 while the backend is down.
    (Async, as every dependency here: FastAPI runs a plain function in a thread.)"""
    ctx = _context(request)
    if ctx.down is not None:
        raise BackendUnavailableError(f"the backend is not available: {ctx.down}")
    return ctx


_bearer = HTTPBearer(auto_error=False, description="an API key (tnh_...) or an OIDC JWT")


async def principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The verified caller, or 401."""
    ctx = _context(request)
    if credentials is None or credentials.scheme.lower() != "bearer":
        ctx.unauthorized += 1
        raise unauthorized("send Authorization: Bearer with an API key or an OIDC token")
    found = await authenticate(ctx, credentials.credentials)
    if found is None:
        ctx.unauthorized += 1
        raise unauthorized(
            "the credentials are not valid (unknown, revoked or expired key, "
            "or a token whose signature, issuer, audience or expiry fails)"
        )
    return found


async def authenticate(ctx: ApiContext, token: str) -> Principal | None:
    """The principal of a bearer token: an API key or, if OIDC is set up, a JWT."""
    if token.startswith(KEY_PREFIX + "_"):
        if ctx.keys is None:
            return None
        if ctx.keys.checked(token):
            return ctx.keys.verify(token)
        return await asyncio.to_thread(ctx.keys.verify, token)
    if ctx.oidc is None:
        return None
    return await asyncio.to_thread(ctx.oidc.verify, token)


Caller = Annotated[Principal, Depends(principal)]
Ctx = Annotated[ApiContext, Depends(context)]


def require(role: Role) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that lets through callers with ``role``, and answers 403 otherwise."""

    async def check(caller: Caller) -> Principal:
        if not caller.may(role):
            raise Problem(
                403, "Forbidden", f"{caller.subject} lacks the {role.value} role", kind="forbidden"
            )
        return caller

    return check


async def visible_run(ctx: ApiContext, caller: Principal, run_id: str) -> RunState:
    """The run, if it exists and the caller's tenants include its tenant; 404 otherwise,
    the same answer either way so that ids of other tenants' runs are not confirmed."""
    state = await ctx.backend.state(run_id)
    if state is None or not caller.sees(state.tenant):
        raise not_found(f"no run {run_id}")
    return state
