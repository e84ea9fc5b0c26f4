"""One PostgreSQL connection that comes back after PostgreSQL drops it, for the ledgers
(the workers' idempotency ledger, the notifier's delivery ledger)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import psycopg


class PgConnection:
    """One autocommit connection, opened on first use and again after it was discarded
    (PostgreSQL restarted, an idle timeout). Safe to share between the tasks of one
    event loop: they wait for one another while it (re)connects."""

    def __init__(self, dsn: str, connect_timeout_s: int = 10) -> None:
        self.dsn = dsn
        self.connect_timeout_s = connect_timeout_s
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._connecting = asyncio.Lock()

    async def get(self) -> psycopg.AsyncConnection[Any]:
        async with self._connecting:
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, connect_timeout=self.connect_timeout_s
                )
            return self._conn

    async def discard(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Forget ``conn`` (it failed); the next ``get`` opens a new one."""
        async with self._connecting:
            if self._conn is conn:
                self._conn = None
        with contextlib.suppress(psycopg.Error):
            await conn.close()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
