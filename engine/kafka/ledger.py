"""The workers' idempotency ledger in PostgreSQL: completed results by idempotency key.

A worker records a result here before it reports it, and looks a task's key up before
calling its tool, so a redelivered task whose key already completed is answered from
the ledger instead of calling the tool again. The first result recorded for a key wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg.types.json import Jsonb

from engine.worker.sdk import LedgerEntry

log = logging.getLogger("terranoha.kafka.ledger")

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS terranoha_worker_ledger (
    idempotency_key text PRIMARY KEY,
    queue text,
    result jsonb,
    cost double precision,
    confidence double precision,
    recorded_at timestamptz DEFAULT now()
)
"""


class PostgresLedger:
    """One autocommit connection, reopened once when PostgreSQL drops it (a restart,
    an idle timeout). Safe to share between the tasks of one event loop."""

    def __init__(self, dsn: str, *, connect_timeout_s: int = 10) -> None:
        self.dsn = dsn
        self.connect_timeout_s = connect_timeout_s
        self.reconnects = 0
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._connecting = asyncio.Lock()

    async def open(self) -> None:
        """Connect and create the table if it is missing."""
        # Two workers creating the table at the same moment: one of them loses, harmlessly.
        with contextlib.suppress(psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
            await self._run(lambda conn: conn.execute(SCHEMA))

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def lookup(self, idempotency_key: str) -> LedgerEntry | None:
        """The completed result recorded for ``idempotency_key``, if any."""
        async def query(conn: psycopg.AsyncConnection[Any]) -> Any:
            cur = await conn.execute(
                "SELECT result, cost, confidence FROM terranoha_worker_ledger "
                "WHERE idempotency_key = %s", (idempotency_key,))
            return await cur.fetchone()

        row = await self._run(query)
        if row is None:
            return None
        result, cost, confidence = row
        return LedgerEntry(idempotency_key, result, float(cost or 0.0), confidence)

    async def record(self, entry: LedgerEntry, queue: str) -> bool:
        """Remember ``entry``; False if its key was recorded already (the first one stays)."""
        async def insert(conn: psycopg.AsyncConnection[Any]) -> int:
            cur = await conn.execute(
                "INSERT INTO terranoha_worker_ledger "
                "(idempotency_key, queue, result, cost, confidence) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (idempotency_key) DO NOTHING",
                (entry.idempotency_key, queue, Jsonb(entry.result), entry.cost,
                 entry.confidence))
            return cur.rowcount

        return await self._run(insert) == 1

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        async with self._connecting:
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, connect_timeout=self.connect_timeout_s)
            return self._conn

    async def _run(self, operation: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        """Run ``operation``; if the connection is gone, reconnect and run it once more.
        Every operation is a single idempotent statement, so running it twice is safe."""
        conn = await self._connection()
        try:
            return await operation(conn)
        except psycopg.OperationalError as exc:
            log.warning("PostgreSQL connection lost (%s); reconnecting", exc)
            await self._discard(conn)
            self.reconnects += 1
            return await operation(await self._connection())

    async def _discard(self, conn: psycopg.AsyncConnection[Any]) -> None:
        async with self._connecting:
            if self._conn is conn:
                self._conn = None
        with contextlib.suppress(psycopg.Error):
            await conn.close()
