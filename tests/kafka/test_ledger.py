"""The PostgreSQL idempotency ledger against the real server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from engine.kafka.ledger import LedgerError, PostgresLedger
from engine.worker.sdk import LedgerEntry

pytestmark = pytest.mark.postgres


def test_first_result_recorded_for_a_key_wins(postgres_dsn: str) -> None:
    key = f"idem-{uuid4().hex}"

    async def scenario() -> None:
        ledger = PostgresLedger(postgres_dsn)
        await ledger.open()
        try:
            assert await ledger.lookup(key) is None
            assert await ledger.record(LedgerEntry(key, {"a": [1, "two"]}, 0.5, 0.75), "q")
            assert not await ledger.record(LedgerEntry(key, "other", 9.0, None), "q")
            assert await ledger.lookup(key) == LedgerEntry(key, {"a": [1, "two"]}, 0.5, 0.75)
        finally:
            await ledger.close()

    asyncio.run(scenario())


def test_ledger_reconnects_when_postgres_drops_its_connection(postgres_dsn: str) -> None:
    key = f"idem-{uuid4().hex}"

    async def scenario() -> None:
        ledger = PostgresLedger(postgres_dsn)
        await ledger.open()
        try:
            assert await ledger.record(LedgerEntry(key, [1, "two"], 0.5, None), "q") is True
            assert await ledger.record(LedgerEntry(key, "other", 9.0, None), "q") is False
            conn = await ledger._pg.get()  # the connection it uses
            assert conn is not None
            with psycopg.connect(postgres_dsn, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
            assert await ledger.lookup(key) == LedgerEntry(key, [1, "two"], 0.5, None)
            assert ledger.reconnects == 1
        finally:
            await ledger.close()

    asyncio.run(scenario())


def test_applications_sharing_a_database_do_not_see_each_others_keys(postgres_dsn: str) -> None:
    async def scenario() -> None:
        key = f"run/{uuid4().hex}/step/1"
        first, second = (
            PostgresLedger(postgres_dsn, namespace=f"app-{uuid4().hex[:6]}") for _ in range(2)
        )
        await first.open()
        await second.open()
        try:
            assert await first.record(LedgerEntry(key, {"by": "first"}, 0.5, None), "q")
            assert await second.lookup(key) is None
            assert await second.record(LedgerEntry(key, {"by": "second"}, 0.0, None), "q")
            found = await first.lookup(key)
            assert found is not None and found.result == {"by": "first"}
            many = await asyncio.gather(*(first.lookup(key) for _ in range(20)))
            assert all(entry is not None and entry.cost == 0.5 for entry in many)
        finally:
            await first.close()
            await second.close()

    asyncio.run(scenario())


def _with_role(dsn: str, role: str, password: str) -> str:
    """``dsn`` with another user and password."""
    parts = urlsplit(dsn)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{role}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@contextlib.contextmanager
def _roles(dsn: str, *names: str) -> Iterator[dict[str, str]]:
    """Login roles made for one test (and dropped after it), by name: their DSNs."""
    made = {name: f"{name}_{uuid4().hex[:8]}" for name in names}
    with psycopg.connect(dsn, autocommit=True) as admin:
        for role in made.values():
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(role)
                )
            )
        try:
            yield {name: _with_role(dsn, role, role) for name, role in made.items()}
        finally:
            for role in made.values():
                admin.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
                admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_the_ledger_lives_in_its_own_schema_not_beside_the_projections(postgres_dsn: str) -> None:
    key = f"run/{uuid4().hex}/step/1"
    namespace = f"app-{uuid4().hex[:6]}"

    async def scenario() -> None:
        ledger = PostgresLedger(postgres_dsn, namespace=namespace)
        await ledger.open()
        try:
            assert await ledger.record(LedgerEntry(key, {"api_token": "s3cr3t"}, 0.0, None), "q")
        finally:
            await ledger.close()

    asyncio.run(scenario())
    with psycopg.connect(postgres_dsn) as conn:
        stored = f"{namespace}/{key}"
        rows = conn.execute(
            "SELECT result FROM terranoha_ledger.results WHERE idempotency_key = %s", (stored,)
        ).fetchall()
        assert rows == [({"api_token": "s3cr3t"},)]
        # Nothing of it on the search path, where the projections are.
        old = conn.execute("SELECT to_regclass('terranoha_worker_ledger') IS NOT NULL").fetchone()
        if old is not None and old[0]:
            assert conn.execute(
                "SELECT count(*) FROM terranoha_worker_ledger WHERE idempotency_key = %s", (stored,)
            ).fetchone() == (0,)
        public = conn.execute(
            "SELECT has_schema_privilege('public', 'terranoha_ledger', 'USAGE')"
        ).fetchone()
        assert public == (False,), "the ledger's schema must grant nothing to PUBLIC"


def test_entries_of_earlier_versions_are_moved_so_no_tool_is_called_again(
    postgres_dsn: str,
) -> None:
    ours, theirs = f"app-{uuid4().hex[:6]}", f"app-{uuid4().hex[:6]}"
    key = f"run/{uuid4().hex}/step/1"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        _old_table(conn)
        for namespace in (ours, theirs):
            conn.execute(
                "INSERT INTO terranoha_worker_ledger (idempotency_key, queue, result, "
                "cost, confidence) VALUES (%s, 'q', %s, 0.5, NULL)",
                (f"{namespace}/{key}", Jsonb({"paid": namespace})),
            )

    async def scenario() -> LedgerEntry | None:
        ledger = PostgresLedger(postgres_dsn, namespace=ours)
        await ledger.open()
        try:
            return await ledger.lookup(key)
        finally:
            await ledger.close()

    assert asyncio.run(scenario()) == LedgerEntry(key, {"paid": ours}, 0.5, None)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        left = conn.execute(
            "SELECT idempotency_key FROM terranoha_worker_ledger WHERE idempotency_key IN (%s, %s)",
            (f"{ours}/{key}", f"{theirs}/{key}"),
        ).fetchall()
        # Ours moved out; the other deployment's stays for its own workers to move.
        assert left == [(f"{theirs}/{key}",)]
        conn.execute(
            "DELETE FROM terranoha_worker_ledger WHERE idempotency_key = %s", (f"{theirs}/{key}",)
        )


def test_a_reader_of_the_projections_cannot_read_a_ledger_with_a_role_of_its_own(
    postgres_dsn: str,
) -> None:
    """The deployment the README describes: the ledger under its own role and schema,
    the projections readable by a role that may read the public schema's tables."""
    schema = f"ledger_{uuid4().hex[:8]}"
    key = f"run/{uuid4().hex}/step/1"
    with _roles(postgres_dsn, "ledger", "reader") as dsn:
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            _old_table(admin)
            reader = _role_of(dsn["reader"])
            # As the README has the administrator do it: a schema the ledger's role owns.
            admin.execute(
                sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(
                    sql.Identifier(schema), sql.Identifier(_role_of(dsn["ledger"]))
                )
            )
            admin.execute(
                sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(sql.Identifier(reader))
            )
            admin.execute(
                sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(
                    sql.Identifier(reader)
                )
            )

        async def record() -> LedgerEntry | None:
            ledger = PostgresLedger(dsn["ledger"], namespace="app", schema=schema)
            await ledger.open()
            try:
                await ledger.record(LedgerEntry(key, {"access_token": "s3cr3t"}, 0.0, None), "q")
                return await ledger.lookup(key)
            finally:
                await ledger.close()

        try:
            # The table of earlier versions is there, and the new role may not touch it:
            # the worker refuses to start rather than miss entries and call tools again.
            with pytest.raises(LedgerError, match="move them as that table's owner"):
                asyncio.run(record())
            with psycopg.connect(postgres_dsn, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("GRANT SELECT, DELETE ON terranoha_worker_ledger TO {}").format(
                        sql.Identifier(_role_of(dsn["ledger"]))
                    )
                )
            found = asyncio.run(record())
            assert found is not None and found.result == {"access_token": "s3cr3t"}
            asyncio.run(_opened(postgres_dsn))  # the default schema exists too
            with psycopg.connect(dsn["reader"], autocommit=True) as conn:
                for query in (
                    f"SELECT result FROM {schema}.results",
                    "SELECT result FROM terranoha_ledger.results",
                ):
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        conn.execute(query)
        finally:
            with psycopg.connect(postgres_dsn, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                )


def _old_table(conn: psycopg.Connection[Any]) -> None:
    """The table earlier versions kept the ledger in, as they created it."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS terranoha_worker_ledger (idempotency_key text "
        "PRIMARY KEY, queue text, result jsonb, cost double precision, "
        "confidence double precision, recorded_at timestamptz DEFAULT now())"
    )


async def _opened(dsn: str) -> None:
    ledger = PostgresLedger(dsn)
    await ledger.open()
    await ledger.close()


def _role_of(dsn: str) -> str:
    return urlsplit(dsn).username or ""


def test_a_ledger_schema_name_is_checked() -> None:
    with pytest.raises(ValueError, match="ledger schema"):
        PostgresLedger("postgresql://x", schema="x; DROP TABLE y")
