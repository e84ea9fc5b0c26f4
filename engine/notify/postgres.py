"""The delivery ledger in PostgreSQL, for the notifier on Kafka.

It lives in a schema of its own, ``terranoha_notify`` (table ``deliveries``), apart
from the projections and the workers' ledger, and every row names its deployment
(``Topics.deployment(app)``): deployments sharing a database never settle each other's
deliveries. A lost connection is reopened and the statement retried until PostgreSQL
answers: a delivery made must not be forgotten, or it would be made again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg

from engine.notify.deliver import persistently
from engine.notify.ledger import DeliveryLedger, Outcome
from engine.notify.routing import ChannelKind, Target
from engine.pgconn import PgConnection

log = logging.getLogger("terranoha.notify.postgres")

T = TypeVar("T")

SCHEMA_NAME = "terranoha_notify"
SCHEMA = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA_NAME};
CREATE TABLE IF NOT EXISTS {SCHEMA_NAME}.deliveries (
    deployment text NOT NULL,
    notification_id text NOT NULL,
    channel text NOT NULL,
    target text NOT NULL,
    outcome text NOT NULL,
    attempts integer NOT NULL,
    detail text NOT NULL DEFAULT '',
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (deployment, notification_id, channel, target)
)
"""


class PostgresDeliveryLedger(DeliveryLedger):
    """One autocommit connection, reopened when PostgreSQL drops it. Safe to share
    between the tasks of one event loop (psycopg serialises the statements)."""

    def __init__(self, dsn: str, *, deployment: str, connect_timeout_s: int = 10) -> None:
        self.dsn = dsn
        self.deployment = deployment
        self.connect_timeout_s = connect_timeout_s
        self.reconnects = 0
        self._pg = PgConnection(dsn, connect_timeout_s)

    async def open(self) -> None:
        """Connect and create the schema and table if they are missing. Unlike later
        statements, this fails at once when PostgreSQL cannot be reached."""
        conn = await self._connection()
        # Two notifiers creating them at the same moment: one of them loses, harmlessly.
        with contextlib.suppress(
            psycopg.errors.UniqueViolation,
            psycopg.errors.DuplicateTable,
            psycopg.errors.DuplicateSchema,
        ):
            await conn.execute(SCHEMA)

    async def close(self) -> None:
        await self._pg.close()

    async def outcomes(self, notification_id: str) -> dict[Target, Outcome]:
        async def query(conn: psycopg.AsyncConnection[Any]) -> list[Any]:
            cur = await conn.execute(
                f"SELECT channel, target, outcome FROM {SCHEMA_NAME}.deliveries "
                "WHERE deployment = %s AND notification_id = %s",
                (self.deployment, notification_id),
            )
            return await cur.fetchall()

        rows = await self._run(query)
        return {
            Target(ChannelKind(channel), target): Outcome(outcome)
            for channel, target, outcome in rows
        }

    async def record(
        self,
        notification_id: str,
        target: Target,
        outcome: Outcome,
        attempts: int,
        detail: str = "",
    ) -> bool:
        async def insert(conn: psycopg.AsyncConnection[Any]) -> int:
            cur = await conn.execute(
                f"INSERT INTO {SCHEMA_NAME}.deliveries (deployment, notification_id, channel, "
                "target, outcome, attempts, detail) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING",
                (
                    self.deployment,
                    notification_id,
                    target.channel.value,
                    target.name,
                    outcome.value,
                    attempts,
                    detail,
                ),
            )
            return cur.rowcount

        return await self._run(insert) == 1

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        return await self._pg.get()

    async def _run(self, operation: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        """Run ``operation`` (one idempotent statement) until PostgreSQL answers it."""

        async def attempt() -> T:
            conn = await self._connection()
            try:
                return await operation(conn)
            except psycopg.OperationalError:
                await self._discard(conn)
                self.reconnects += 1
                raise

        return await persistently(
            "delivery ledger", attempt, lambda exc: isinstance(exc, psycopg.OperationalError)
        )

    async def _discard(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await self._pg.discard(conn)
