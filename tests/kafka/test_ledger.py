"""The PostgreSQL idempotency ledger against the real server."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import psycopg
import pytest

from engine.kafka.ledger import PostgresLedger
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


def test_applications_sharing_a_database_do_not_see_each_others_keys(
        postgres_dsn: str) -> None:
    async def scenario() -> None:
        key = f"run/{uuid4().hex}/step/1"
        first, second = (PostgresLedger(postgres_dsn, namespace=f"app-{uuid4().hex[:6]}")
                         for _ in range(2))
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
