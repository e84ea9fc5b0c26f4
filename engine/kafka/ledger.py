"""The workers' idempotency ledger in PostgreSQL: completed results by idempotency key.

A worker records a result here before it reports it, and looks a task's key up before
calling its tool, so a redelivered task whose key already completed is answered from
the ledger instead of calling the tool again. The first result recorded for a key wins.

The ledger holds tool results as the tools returned them, secrets included: it must
answer a redelivered task with exactly the result the run was given, so it cannot
redact. It therefore lives apart from the projections (which are redacted and meant to
be read): in a schema of its own, ``terranoha_ledger`` (table ``results``), which grants
nothing to PUBLIC, reached through a DSN of its own (``--ledger-dsn``) so that it can be
owned by a role that the projections' readers are not.

Earlier versions kept it in ``terranoha_worker_ledger`` on the search path, beside the
projections. ``open`` moves this deployment's entries out of that table into the
ledger's schema, in one transaction, before any lookup: none is lost, so no tool is
called again for a key that completed before the upgrade.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import psycopg
from psycopg.types.json import Jsonb

from engine.core.errors import TerranohaError
from engine.pgconn import PgConnection
from engine.worker.sdk import LedgerEntry

log = logging.getLogger("terranoha.kafka.ledger")

T = TypeVar("T")

SCHEMA_NAME = "terranoha_ledger"
OLD_TABLE = "terranoha_worker_ledger"
"""Where earlier versions kept the ledger: resolved on the search path, beside the
projections."""


def _schema_sql(schema: str) -> str:
    return f"""
REVOKE ALL ON SCHEMA {schema} FROM PUBLIC;
CREATE TABLE IF NOT EXISTS {schema}.results (
    idempotency_key text PRIMARY KEY,
    queue text,
    result jsonb,
    cost double precision,
    confidence double precision,
    recorded_at timestamptz DEFAULT now()
);
REVOKE ALL ON {schema}.results FROM PUBLIC;
"""


def _move_sql(schema: str) -> str:
    return f"""
WITH moved AS (
    DELETE FROM {OLD_TABLE} WHERE starts_with(idempotency_key, %s)
    RETURNING idempotency_key, queue, result, cost, confidence, recorded_at
)
INSERT INTO {schema}.results (idempotency_key, queue, result, cost, confidence, recorded_at)
SELECT * FROM moved ON CONFLICT (idempotency_key) DO NOTHING
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


class LedgerError(TerranohaError):
    """The ledger cannot be opened as it is; the message says what to do."""


class PostgresLedger:
    """One autocommit connection, reopened once when PostgreSQL drops it (a restart,
    an idle timeout). Safe to share between the tasks of one event loop; concurrent
    lookups and records are coalesced into one statement each."""

    def __init__(
        self,
        dsn: str,
        *,
        namespace: str = "",
        connect_timeout_s: int = 10,
        schema: str = SCHEMA_NAME,
    ) -> None:
        if not schema.isidentifier() or schema != schema.lower():
            raise ValueError(f"ledger schema {schema!r}: use lower-case letters, digits and _")
        self.dsn = dsn
        # Keys are unique within one application; several applications (topic prefixes)
        # may share a database without answering each other's tasks.
        self.namespace = namespace
        self.schema = schema
        self.table = f"{schema}.results"
        self.connect_timeout_s = connect_timeout_s
        self.reconnects = 0
        self._pg = PgConnection(dsn, connect_timeout_s)
        self._lookups: Coalescer[str, LedgerEntry | None] = Coalescer(self._lookup_many)
        self._records: Coalescer[tuple[LedgerEntry, str], bool] = Coalescer(self._record_many)

    async def open(self) -> None:
        """Connect, create the schema and table if they are missing, and move this
        deployment's entries out of the table earlier versions used."""
        try:
            for _ in range(3):
                try:
                    await self._run(self._create)
                    break
                except (
                    psycopg.errors.UniqueViolation,
                    psycopg.errors.DuplicateTable,
                    psycopg.errors.DuplicateSchema,
                ):
                    # Another worker created them at the same moment; once it has
                    # committed, every IF NOT EXISTS holds and the statements go through.
                    await asyncio.sleep(0.1)
            moved = await self._run(self._move_old_entries)
        except BaseException:
            await self.close()
            raise
        if moved:
            log.info(
                "moved %d ledger entries of %r from %s to %s",
                moved,
                self.namespace,
                OLD_TABLE,
                self.table,
            )

    async def _create(self, conn: psycopg.AsyncConnection[Any]) -> None:
        # CREATE SCHEMA IF NOT EXISTS needs the right to create schemas even when the
        # schema exists: a role given a schema by its administrator (README) lacks it.
        cur = await conn.execute("SELECT to_regnamespace(%s) IS NOT NULL", (self.schema,))
        row = await cur.fetchone()
        if row is None or not row[0]:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
        await conn.execute(_schema_sql(self.schema))

    async def _move_old_entries(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Move the entries of this namespace out of the old table. Other deployments'
        entries stay there for their own workers to move. A ledger without a namespace
        (``serve`` always gives one) moves nothing: it cannot tell its entries from
        another deployment's."""
        if not self.namespace:
            return 0
        cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (OLD_TABLE,))
        row = await cur.fetchone()
        if row is None or not row[0]:
            return 0
        try:
            async with conn.transaction():
                moved = await conn.execute(_move_sql(self.schema), (f"{self.namespace}/",))
                return moved.rowcount
        except psycopg.errors.UndefinedTable:
            return 0  # another worker dropped it between the check and the move
        except psycopg.errors.InsufficientPrivilege as exc:
            raise LedgerError(
                f"the ledger found entries of earlier versions in {OLD_TABLE} but its role "
                f"may not move them ({exc}); move them as that table's owner: "
                f"INSERT INTO {self.table} SELECT * FROM {OLD_TABLE} ON CONFLICT DO NOTHING; "
                f"DROP TABLE {OLD_TABLE}; then start the worker again"
            ) from exc

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
                f"SELECT idempotency_key, result, cost, confidence FROM {self.table} "
                "WHERE idempotency_key = ANY(%s)",
                (list(stored),),
            )
            return await cur.fetchall()

        found = {
            stored[key]: LedgerEntry(stored[key], result, float(cost or 0.0), confidence)
            for key, result, cost, confidence in await self._run(query)
        }
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
                f"INSERT INTO {self.table} "
                "(idempotency_key, queue, result, cost, confidence) "
                "SELECT * FROM unnest(%s::text[], %s::text[], %s::jsonb[], %s::float8[], "
                "%s::float8[]) ON CONFLICT (idempotency_key) DO NOTHING "
                "RETURNING idempotency_key",
                (
                    [self._stored(e.idempotency_key) for e, _ in rows],
                    [q for _, q in rows],
                    [Jsonb(e.result) for e, _ in rows],
                    [e.cost for e, _ in rows],
                    [e.confidence for e, _ in rows],
                ),
            )
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
