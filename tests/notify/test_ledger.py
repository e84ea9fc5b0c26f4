"""The delivery ledger contract, run against every ledger: SQLite (the embedded store)
and PostgreSQL (the Kafka backend's)."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from uuid import uuid4

import psycopg
import pytest

from engine.embedded.store import Store
from engine.notify import ChannelKind, DeliveryLedger, Outcome, SqliteDeliveryLedger, Target
from engine.notify.postgres import PostgresDeliveryLedger

HOOK = Target(ChannelKind.WEBHOOK, "ops")
MAIL = Target(ChannelKind.EMAIL, "ann@example.com")


class DeliveryLedgerContract(ABC):
    """What every delivery ledger does. Subclasses say how to make one."""

    @abstractmethod
    def ledger(self) -> AbstractAsyncContextManager[DeliveryLedger]:
        """A fresh, open ledger for the span of the block."""

    def check(self, scenario: Callable[[DeliveryLedger], Awaitable[None]]) -> None:
        async def main() -> None:
            async with self.ledger() as ledger:
                await scenario(ledger)

        asyncio.run(main())

    def test_a_target_is_settled_once_and_the_first_outcome_stays(self) -> None:
        async def scenario(ledger: DeliveryLedger) -> None:
            nid = f"ntf_{uuid4().hex}"
            assert await ledger.outcomes(nid) == {}
            assert await ledger.record(nid, HOOK, Outcome.DELIVERED, 3)
            assert not await ledger.record(nid, HOOK, Outcome.DEAD_LETTERED, 1, "late")
            assert await ledger.record(nid, MAIL, Outcome.DEAD_LETTERED, 1, "550 no such user")
            assert await ledger.outcomes(nid) == {
                HOOK: Outcome.DELIVERED,
                MAIL: Outcome.DEAD_LETTERED,
            }
            assert await ledger.outcomes(f"ntf_{uuid4().hex}") == {}

        self.check(scenario)

    def test_concurrent_records_of_one_target_settle_it_once(self) -> None:
        async def scenario(ledger: DeliveryLedger) -> None:
            nid = f"ntf_{uuid4().hex}"
            won = await asyncio.gather(
                *(ledger.record(nid, HOOK, Outcome.DELIVERED, 1) for _ in range(5))
            )
            assert sorted(won) == [False] * 4 + [True]

        self.check(scenario)


class TestSqliteDeliveryLedger(DeliveryLedgerContract):
    @pytest.fixture(autouse=True)
    def _store(self, tmp_path: Path) -> None:
        self.path = tmp_path / "ledger.db"

    @asynccontextmanager
    async def ledger(self) -> AsyncIterator[DeliveryLedger]:
        store = Store(self.path)
        try:
            yield SqliteDeliveryLedger(store)
        finally:
            store.close()


@pytest.mark.postgres
class TestPostgresDeliveryLedger(DeliveryLedgerContract):
    @pytest.fixture(autouse=True)
    def _dsn(self, postgres_dsn: str) -> None:
        self.dsn = postgres_dsn
        self.deployment = f"d{uuid4().hex[:8]}"

    @asynccontextmanager
    async def ledger(self) -> AsyncIterator[DeliveryLedger]:
        ledger = PostgresDeliveryLedger(self.dsn, deployment=self.deployment)
        await ledger.open()
        try:
            yield ledger
        finally:
            await ledger.close()

    def test_deployments_sharing_a_database_keep_their_own_deliveries(self) -> None:
        async def main() -> None:
            nid = f"ntf_{uuid4().hex}"
            first = PostgresDeliveryLedger(self.dsn, deployment=f"a{uuid4().hex[:6]}")
            second = PostgresDeliveryLedger(self.dsn, deployment=f"b{uuid4().hex[:6]}")
            for ledger in (first, second):
                await ledger.open()
            try:
                assert await first.record(nid, HOOK, Outcome.DELIVERED, 1)
                assert await second.outcomes(nid) == {}
                assert await second.record(nid, HOOK, Outcome.DELIVERED, 1)
            finally:
                await first.close()
                await second.close()

        asyncio.run(main())

    def test_the_ledger_lives_in_its_own_schema_and_survives_a_dropped_connection(self) -> None:
        async def main() -> None:
            nid = f"ntf_{uuid4().hex}"
            ledger = PostgresDeliveryLedger(self.dsn, deployment=self.deployment)
            await ledger.open()
            try:
                assert await ledger.record(nid, HOOK, Outcome.DELIVERED, 1)
                conn = await ledger._pg.get()  # the connection it uses
                assert conn is not None
                with psycopg.connect(self.dsn, autocommit=True) as admin:
                    admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
                    tables = admin.execute(
                        "SELECT table_name FROM information_schema.tables "
                        "WHERE table_schema = 'terranoha_notify'"
                    ).fetchall()
                assert tables == [("deliveries",)]
                assert await ledger.outcomes(nid) == {HOOK: Outcome.DELIVERED}
                assert ledger.reconnects == 1
            finally:
                await ledger.close()

        asyncio.run(main())
