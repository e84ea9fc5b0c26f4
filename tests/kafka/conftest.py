"""Fixtures for the tests that run against the real Kafka broker and PostgreSQL server
started by ``bash deploy/local/infra.sh up``. When a server is unreachable the test
fails with what to run: these tests are never skipped."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import psycopg
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from engine.kafka.topics import Topics, ensure_topics

ROOT = Path(__file__).resolve().parents[2]
INFRA_ENV = ROOT / ".local" / "infra.env"
DEFAULTS = {
    "TERRANOHA_KAFKA": "127.0.0.1:29092",
    "TERRANOHA_POSTGRES": "postgresql://terranoha:terranoha@127.0.0.1:25432/terranoha",
}
START_HINT = "start the local infrastructure with `bash deploy/local/infra.sh up`"


def _setting(name: str) -> str:
    """``name`` from the environment, else from .local/infra.env, else the infra default."""
    value = os.environ.get(name)
    if value:
        return value
    if INFRA_ENV.exists():
        for line in INFRA_ENV.read_text().splitlines():
            key, _, rest = line.removeprefix("export ").partition("=")
            if key.strip() == name and rest.strip():
                return rest.strip().strip("'\"")
    return DEFAULTS[name]


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    bootstrap = _setting("TERRANOHA_KAFKA")
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except OSError as exc:
        pytest.fail(f"Kafka is not reachable at {bootstrap} ({exc}); {START_HINT}",
                    pytrace=False)
    return bootstrap


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    dsn = _setting("TERRANOHA_POSTGRES")
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            conn.execute("select 1")
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {dsn} ({exc}); {START_HINT}",
                    pytrace=False)
    return dsn


@pytest.fixture
def topics(kafka_bootstrap: str) -> Iterator[Topics]:
    """Fresh core topics under a unique prefix, deleted afterwards."""
    t = Topics(prefix=f"t{uuid4().hex[:8]}", partitions=3, trigger_partitions=3)
    asyncio.run(ensure_topics(kafka_bootstrap, t.core_topics()))
    yield t
    asyncio.run(_delete_topics(kafka_bootstrap, t.prefix))


async def _delete_topics(bootstrap: str, prefix: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [n for n in await admin.list_topics() if n.startswith(f"{prefix}.")]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()
