"""``terranoha schedules --kafka`` against the real broker, with a ``terranoha serve
--kafka`` process running the schedule processor and the engine."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.kafka.topics import delete_topics
from tests.cli.conftest import Cli
from tests.cli.test_kafka import PARTITIONS, _serve, _stop
from tests.infra import kafka_bootstrap

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

HOLD = """\
workflow: hold
version: 1
steps:
  - id: wait
    wait_event: {name: never, timeout: 1h}
"""


@pytest.fixture
def kafka() -> Iterator[list[str]]:
    bootstrap = kafka_bootstrap()
    prefix = f"c{uuid.uuid4().hex[:10]}"
    yield ["--kafka", bootstrap, "--topic-prefix", prefix, "--app", prefix]
    asyncio.run(delete_topics(bootstrap, prefix))


def test_schedules_on_kafka(cli: Cli, kafka: list[str], tmp_path: Path) -> None:
    (tmp_path / "hold.yaml").write_text(HOLD)
    assert cli("topics", "create", *kafka, "--partitions", PARTITIONS).code == 0
    assert cli("workflows", "deploy", str(tmp_path / "hold.yaml"), *kafka).code == 0
    proc = _serve(kafka[:4], tmp_path)
    try:
        created = cli(
            "schedules",
            "create",
            "--id",
            "hourly",
            "--workflow",
            "hold",
            "--cron",
            "0 * * * *",
            "--timezone",
            "America/New_York",
            *kafka,
        )
        assert created.code == 0, created.err
        assert "schedule hourly created" in created.out
        assert "hourly" in cli("schedules", "list", *kafka).out
        triggered = cli("schedules", "trigger", "hourly", *kafka)
        assert triggered.code == 0 and "started run" in triggered.out, triggered.out
        run_id = triggered.out.split("started run ")[1].split()[0]
        deadline = time.monotonic() + 60
        status = cli("status", run_id, *kafka)
        while "Waiting" not in status.out and time.monotonic() < deadline:
            time.sleep(0.3)
            status = cli("status", run_id, *kafka)
        assert "Waiting" in status.out, status.out + status.err
        skipped = cli("schedules", "trigger", "hourly", *kafka)
        assert "skipped" in skipped.out and "(overlap)" in skipped.out
        shown = cli("schedules", "show", "hourly", *kafka)
        assert f"running: {run_id}" in shown.out and "skipped 1" in shown.out
        assert "paused" in cli("schedules", "pause", "hourly", *kafka).out
        assert cli("schedules", "delete", "hourly", *kafka).code == 0
        assert "no schedules" in cli("schedules", "list", *kafka).out
    finally:
        _stop(proc)
