"""Where the real Kafka broker and PostgreSQL server are, for the tests that need them.

They are started by ``bash deploy/local/infra.sh up`` (``make test`` does it). When one is
unreachable the test fails with what to run: these tests are never skipped.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[1]
INFRA_ENV = ROOT / ".local" / "infra.env"
DEFAULTS = {
    "TERRANOHA_KAFKA": "127.0.0.1:29092",
    "TERRANOHA_POSTGRES": "postgresql://terranoha:terranoha@127.0.0.1:25432/terranoha",
}
START_HINT = "start the local infrastructure with `bash deploy/local/infra.sh up`"


def setting(name: str) -> str:
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


def kafka_bootstrap() -> str:
    bootstrap = setting("TERRANOHA_KAFKA")
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except OSError as exc:
        pytest.fail(f"Kafka is not reachable at {bootstrap} ({exc}); {START_HINT}", pytrace=False)
    return bootstrap


def postgres_dsn() -> str:
    dsn = setting("TERRANOHA_POSTGRES")
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            conn.execute("select 1")
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {dsn} ({exc}); {START_HINT}", pytrace=False)
    return dsn
