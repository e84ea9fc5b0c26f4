"""The API on both backends: ``api`` is a running server over the embedded store or over
the real broker with a ``terranoha serve --kafka`` doing the engine's work."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.api.backends import ApiBackend, EmbeddedApiBackend, KafkaApiBackend
from engine.kafka.client import KafkaClient
from engine.kafka.topics import Topics, delete_topics
from tests.api.server import Api, serve_api
from tests.cli.conftest import cli  # noqa: F401 - the in-process command line, for tests here
from tests.infra import kafka_bootstrap

ROOT = Path(__file__).resolve().parents[2]

PAYOUT = """\
workflow: api-payout
version: 1
input: {amount: integer}
redact: ["$.input.card"]
steps:
  - id: docs
    wait_event: {name: docs, timeout: 1h}
  - id: sign_off
    approval: {approvers: [finance], quorum: 2, exclude_requester: true}
"""


def _kafka_backend(prefix: str) -> ApiBackend:
    bootstrap = kafka_bootstrap()
    topics = Topics(prefix=prefix, partitions=2)

    async def create() -> None:
        async with KafkaClient(bootstrap, topics, app=prefix) as client:
            await client.create_topics(topics)

    asyncio.run(create())
    return KafkaApiBackend(bootstrap, topics, app=prefix)


def _engine(prefix: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "serve",
            "--kafka",
            kafka_bootstrap(),
            "--topic-prefix",
            prefix,
            "--app",
            prefix,
            "--partitions",
            "2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(b"serving"):
        proc.kill()
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"serve did not start: {line!r}\n{err.decode(errors='replace')}")
    return proc


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    if request.param == "embedded":
        with serve_api(EmbeddedApiBackend(tmp_path / "store.db"), tmp_path / "keys.db") as a:
            yield a
        return
    prefix = f"a{uuid.uuid4().hex[:10]}"
    backend = _kafka_backend(prefix)
    engine = _engine(prefix)
    try:
        with serve_api(backend, tmp_path / "keys.db") as a:
            yield a
    finally:
        engine.terminate()
        engine.communicate(timeout=30)
        asyncio.run(delete_topics(kafka_bootstrap(), prefix))


@pytest.fixture
def embedded_api(tmp_path: Path) -> Iterator[Api]:
    with serve_api(EmbeddedApiBackend(tmp_path / "store.db"), tmp_path / "keys.db") as a:
        yield a
