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
            conn = ledger._conn
            assert conn is not None
            with psycopg.connect(postgres_dsn, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
            assert await ledger.lookup(key) == LedgerEntry(key, [1, "two"], 0.5, None)
            assert ledger.reconnects == 1
        finally:
            await ledger.close()

    asyncio.run(scenario())
