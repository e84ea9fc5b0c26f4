"""Errors as RFC 9457 problem details, and the request-size limit.

Every error the API returns is ``application/problem+json`` with ``type``, ``title``,
``status`` and ``detail``; one caused by a field of the request also names it in ``field``
(``body.input.amount``, ``header.Idempotency-Key``), and a validation error lists every
offending field in ``errors``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.api.backends import BackendUnavailableError
from engine.kafka.client import KafkaClientError

log = logging.getLogger("terranoha.api")

PROBLEM = "application/problem+json"
TYPES = "https://terranoha.dev/problems/"


class Problem(Exception):
    """An error answer: raise it from a route and the client gets it as problem JSON."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        field: str | None = None,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.field = field
        self.kind = kind or title.lower().replace(" ", "-")
        self.headers = headers or {}
        self.extra = extra

    def body(self, instance: str) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": TYPES + self.kind,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
        }
        if self.field is not None:
            doc["field"] = self.field
        doc.update(self.extra)
        return doc


def problem_response(problem: Problem, instance: str) -> JSONResponse:
    return JSONResponse(
        problem.body(instance),
        status_code=problem.status,
        media_type=PROBLEM,
        headers=problem.headers,
    )


def unauthorized(detail: str) -> Problem:
    return Problem(
        401,
        "Unauthorized",
        detail,
        kind="unauthorized",
        headers={"WWW-Authenticate": 'Bearer realm="terranoha"'},
    )


def not_found(what: str) -> Problem:
    return Problem(404, "Not found", what, kind="not-found")


def _location(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc)


def install(app: FastAPI) -> None:
    """Answer every error of ``app`` as problem details."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": _location(e.get("loc", ())), "detail": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"field": "body", "detail": "invalid request"}
        problem = Problem(
            422,
            "Invalid request",
            f"{first['field']}: {first['detail']}",
            field=first["field"],
            kind="invalid-request",
            errors=errors,
        )
        return problem_response(problem, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if (
            exc.status_code in (404, 405)
            and _needs_credentials(request.url.path)
            and not await _has_credentials(request)
        ):
            # No route matched: without valid credentials the answer is still 401, so
            # the API's shape is not probed anonymously.
            request.app.state.ctx.unauthorized += 1
            problem = unauthorized("send Authorization: Bearer with an API key or an OIDC token")
            return problem_response(problem, request.url.path)
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "Error")
        problem = Problem(exc.status_code, title, str(exc.detail), headers=dict(exc.headers or {}))
        return problem_response(problem, request.url.path)

    @app.exception_handler(BackendUnavailableError)
    async def _down(request: Request, exc: BackendUnavailableError) -> JSONResponse:
        problem = Problem(
            503,
            "Backend unavailable",
            f"{exc}; retry later",
            kind="backend-unavailable",
            headers={"Retry-After": "5"},
        )
        return problem_response(problem, request.url.path)

    @app.exception_handler(KafkaClientError)
    async def _kafka(request: Request, exc: KafkaClientError) -> JSONResponse:
        log.warning("Kafka operation failed: %s", exc)
        problem = Problem(
            503,
            "Backend unavailable",
            str(exc),
            kind="backend-unavailable",
            headers={"Retry-After": "5"},
        )
        return problem_response(problem, request.url.path)


def _needs_credentials(path: str) -> bool:
    return path.startswith("/v1") and not path.startswith("/v1/hooks/")


async def _has_credentials(request: Request) -> bool:
    from engine.api.context import authenticate

    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    return await authenticate(request.app.state.ctx, token.strip()) is not None


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with 413, whether it says its length
    up front or streams it: the body is counted as it arrives and never buffered past
    the limit."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.limit:
                    await self._refuse(scope, send)
                    return
        seen = 0
        started = refused = False

        async def counting_receive() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # Answer now and tell the application the client went away, so it
                    # stops reading; whatever it sends afterwards is dropped.
                    refused = True
                    if not started:
                        await self._refuse(scope, send)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception:
            if not refused:
                raise

    async def _refuse(self, scope: Scope, send: Send) -> None:
        body = Problem(
            413,
            "Request too large",
            f"the request body is over {self.limit} bytes; send less",
            field="body",
            kind="too-large",
        ).body(scope.get("path", ""))
        data = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", PROBLEM.encode()),
                    (b"content-length", str(len(data)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})


class _TooLarge(Exception):
    pass
