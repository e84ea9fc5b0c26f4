"""Fixtures for the tests that run against the real Kafka broker and PostgreSQL server
started by ``bash deploy/local/infra.sh up``. When a server is unreachable the test
fails with what to run: these tests are never skipped."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from uuid import uuid4

import pytest

from engine.kafka.topics import Topics, delete_topics, ensure_topics
from tests import infra


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    return infra.kafka_bootstrap()


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    return infra.postgres_dsn()


@pytest.fixture
def topics(kafka_bootstrap: str) -> Iterator[Topics]:
    """Fresh core topics under a unique prefix, deleted afterwards."""
    t = Topics(prefix=f"t{uuid4().hex[:8]}", partitions=3, trigger_partitions=3)
    asyncio.run(ensure_topics(kafka_bootstrap, t.core_topics()))
    yield t
    asyncio.run(delete_topics(kafka_bootstrap, t.prefix))
