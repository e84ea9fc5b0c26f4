"""Fixtures for the projection tests that need the real broker and database: a
unique-prefix events topic and a PostgreSQL schema per test, removed afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest

from tests.infra import kafka_bootstrap, postgres_dsn
from tests.projections.kafka_log import EventLog, drop_schema, new_schema


@pytest.fixture
def event_log() -> Iterator[EventLog]:
    log = EventLog(kafka_bootstrap())
    asyncio.run(log.setup())
    yield log
    asyncio.run(log.delete())


@pytest.fixture
def pg() -> Iterator[Callable[[], str]]:
    """Makes fresh schemas: call it for a DSN whose tables live in a new schema."""
    base = postgres_dsn()
    made: list[str] = []

    def make() -> str:
        name, dsn = new_schema(base)
        made.append(name)
        return dsn

    yield make
    for name in made:
        drop_schema(base, name)
