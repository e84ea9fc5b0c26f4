"""A real uvicorn serving the API on a free loopback port, in a thread of the test
process, over the embedded store or the real broker; and a client that speaks to it."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from engine.api import ApiContext, KeyStore, OidcVerifier, create_app
from engine.api.backends import ApiBackend
from engine.api.identity import now_ms


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Api:
    """A running server: its URL, its key store and its context."""

    url: str
    keys: KeyStore
    ctx: ApiContext
    clients: list[httpx.Client] = field(default_factory=list)

    def key(self, subject: str, tenants: list[str], roles: list[str]) -> str:
        text, _ = self.keys.create(subject, tenants, roles, now_ms())
        return text

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=30.0)
        self.clients.append(client)
        return client


@contextmanager
def serve_api(
    backend: ApiBackend,
    keys_path: Path,
    oidc: OidcVerifier | None = None,
    max_body: int = 1 << 20,
    ready: bool = True,
    **extra: Any,
) -> Iterator[Api]:
    """The server; with ``ready``, once its backend is connected."""
    keys = KeyStore(keys_path)
    ctx = ApiContext(backend, keys=keys, oidc=oidc)
    app = create_app(ctx, max_body=max_body, **extra)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on"
        )
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started or (ready and ctx.down is not None):
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AssertionError(f"the API server did not start ({ctx.down})")
        time.sleep(0.02)
    api = Api(f"http://127.0.0.1:{port}", keys, ctx)
    try:
        yield api
    finally:
        for client in api.clients:
            client.close()
        server.should_exit = True
        thread.join(30)
        keys.close()
