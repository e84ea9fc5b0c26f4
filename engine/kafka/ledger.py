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
from typing import Any, Generic, TypeVar

import psycopg
from psycopg.types.json import Jsonb

from engine.pgconn import PgConnection
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


K = TypeVar("K")


class Coalescer(Generic[K, T]):
    """Calls made while a statement is running wait for the next one, which serves them
    all: many concurrent tasks cost one round trip instead of one each."""

    def __init__(self, flush: Callable[[list[K]], Awaitable[list[T]]]) -> None:
        self._flush = flush
        self._pending: list[tuple[K, asyncio.Future[T]]] = []
        self._draining = False

    async def submit(self, item: K) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await self._flush([item for item, _ in batch])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._draining = False


class PostgresLedger:
    """One autocommit connection, reopened once when PostgreSQL drops it (a restart,
    an idle timeout). Safe to share between the tasks of one event loop; concurrent
    lookups and records are coalesced into one statement each."""

    def __init__(self, dsn: str, *, namespace: str = "", connect_timeout_s: int = 10) -> None:
        self.dsn = dsn
        # Keys are unique within one application; several applications (topic prefixes)
        # may share a database without answering each other's tasks.
        self.namespace = namespace
        self.connect_timeout_s = connect_timeout_s
        self.reconnects = 0
        self._pg = PgConnection(dsn, connect_timeout_s)
        self._lookups: Coalescer[str, LedgerEntry | None] = Coalescer(self._lookup_many)
        self._records: Coalescer[tuple[LedgerEntry, str], bool] = Coalescer(self._record_many)

    async def open(self) -> None:
        """Connect and create the table if it is missing."""
        # Two workers creating the table at the same moment: one of them loses, harmlessly.
        with contextlib.suppress(psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
            await self._run(lambda conn: conn.execute(SCHEMA))

    async def close(self) -> None:
        await self._pg.close()

    async def lookup(self, idempotency_key: str) -> LedgerEntry | None:
        """The completed result recorded for ``idempotency_key``, if any."""
        return await self._lookups.submit(idempotency_key)

    async def record(self, entry: LedgerEntry, queue: str) -> bool:
        """Remember ``entry``; False if its key was recorded already (the first one stays)."""
        return await self._records.submit((entry, queue))

    async def _lookup_many(self, keys: list[str]) -> list[LedgerEntry | None]:
        stored = {self._stored(key): key for key in keys}

        async def query(conn: psycopg.AsyncConnection[Any]) -> list[Any]:
            cur = await conn.execute(
                "SELECT idempotency_key, result, cost, confidence FROM terranoha_worker_ledger "
                "WHERE idempotency_key = ANY(%s)", (list(stored),))
            return await cur.fetchall()

        found = {stored[key]: LedgerEntry(stored[key], result, float(cost or 0.0), confidence)
                 for key, result, cost, confidence in await self._run(query)}
        return [found.get(key) for key in keys]

    def _stored(self, key: str) -> str:
        return f"{self.namespace}/{key}" if self.namespace else key

    async def _record_many(self, items: list[tuple[LedgerEntry, str]]) -> list[bool]:
        first: dict[str, tuple[LedgerEntry, str]] = {}
        for entry, queue in items:
            first.setdefault(entry.idempotency_key, (entry, queue))
        rows = list(first.values())

        async def insert(conn: psycopg.AsyncConnection[Any]) -> set[str]:
            cur = await conn.execute(
                "INSERT INTO terranoha_worker_ledger "
                "(idempotency_key, queue, result, cost, confidence) "
                "SELECT * FROM unnest(%s::text[], %s::text[], %s::jsonb[], %s::float8[], "
                "%s::float8[]) ON CONFLICT (idempotency_key) DO NOTHING "
                "RETURNING idempotency_key",
                ([self._stored(e.idempotency_key) for e, _ in rows], [q for _, q in rows],
                 [Jsonb(e.result) for e, _ in rows], [e.cost for e, _ in rows],
                 [e.confidence for e, _ in rows]))
            return {row[0] for row in await cur.fetchall()}

        inserted = await self._run(insert)
        out = []
        for entry, _ in items:
            key = entry.idempotency_key
            out.append(self._stored(key) in inserted and first[key][0] is entry)
        return out

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        return await self._pg.get()

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
        await self._pg.discard(conn)
