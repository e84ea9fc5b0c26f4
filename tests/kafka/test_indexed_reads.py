"""Reading one run on Kafka through the PostgreSQL projections' event index: the run's
records are fetched at their offsets, not by scanning its partition from the beginning
(real broker, real PostgreSQL, the real projector and engine)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from engine.cli import main as cli
from engine.codec import encode
from engine.core.commands import DeliverSignal, StartRun
from engine.core.evolve import fold
from engine.core.spec import load_spec
from engine.core.state import RunStatus
from engine.kafka.client import KafkaClient
from engine.kafka.processor import KafkaEngine
from engine.kafka.specs import publish_spec
from engine.kafka.topics import Topics
from engine.runtime.specs import SpecRegistry
from projections.postgres import migrate, run_projector, stored_offsets
from projections.query import event_index
from tests.infra import postgres_dsn
from tests.kafka.helpers import eventually, produce, running
from tests.projections.kafka_log import drop_schema, new_schema

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

SPEC = load_spec(
    {
        "workflow": "hold",
        "version": 1,
        "steps": [{"id": "wait", "wait_event": {"name": "go", "timeout": "1h"}}],
    }
)
RUN = "run-read-by-index"
OTHERS = 300


@pytest.fixture
def index() -> Iterator[str]:
    name, dsn = new_schema(postgres_dsn())
    migrate(dsn)
    yield dsn
    drop_schema(postgres_dsn(), name)


def _others(topics: Topics) -> list[str]:
    number = topics.partition_of(RUN)
    return [
        f"other-{i}"
        for i in range(OTHERS * topics.partitions)
        if topics.partition_of(f"other-{i}") == number
    ]


async def _end(bootstrap: str, topics: Topics) -> int:
    """The end offset of RUN's events partition."""
    async with KafkaClient(bootstrap, topics, app=topics.prefix) as client:
        consumer = await client._consumer_started()
        tp = TopicPartition(topics.events, topics.partition_of(RUN))
        return int((await consumer.end_offsets([tp]))[tp])


def _records(topics: Topics) -> list[tuple[bytes, bytes, int]]:
    """Many runs on RUN's partition before RUN (the history a scan would read) and after
    it (what a read that does not stop would read)."""
    number = topics.partition_of(RUN)
    others = _others(topics)
    out = []
    half = len(others) // 2
    for run_id in [*others[:half], RUN, *others[half:]]:
        out.append(
            (
                encode(
                    StartRun(
                        command_id=f"start-{run_id}",
                        run_id=run_id,
                        workflow="hold",
                        version=1,
                        idempotency_key=run_id,
                        input={"order": run_id},
                    )
                ),
                run_id.encode(),
                number,
            )
        )
        out.append(
            (
                encode(
                    DeliverSignal(
                        command_id=f"go-{run_id}", run_id=run_id, name="go", data={"ok": run_id}
                    )
                ),
                run_id.encode(),
                number,
            )
        )
    return out


def test_status_timeline_and_replay_read_a_run_at_its_indexed_offsets(
    kafka_bootstrap: str,
    topics: Topics,
    index: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    specs = SpecRegistry()
    specs.add(SPEC)

    async def main() -> None:
        await publish_spec(kafka_bootstrap, topics, SPEC)  # replay --verify reads it
        engine = KafkaEngine(kafka_bootstrap, topics, specs, app=topics.prefix, state_dir=tmp_path)
        async with (
            running(engine.run),
            running(lambda stop: run_projector(kafka_bootstrap, topics, index, stop)),
        ):
            await produce(kafka_bootstrap, topics.inputs, _records(topics))
            assert await eventually(
                lambda: (s := engine.state(RUN)) is not None and s.status is RunStatus.COMPLETED, 60
            )
            finished = engine.state(RUN)
            assert finished is not None
            done = finished.seq
            last = _others(topics)[-1]
            assert await eventually(
                lambda: (s := engine.state(last)) is not None and s.status is RunStatus.COMPLETED,
                60,
            )
            end = await _end(kafka_bootstrap, topics)
            assert await eventually(
                lambda: (
                    getattr(
                        event_index(index, RUN, topics.events, topics.partition_of(RUN)),
                        "indexed_to",
                        0,
                    )
                    >= end - 1
                ),
                60,
            ), "the projector did not catch up"
        # one more event after the projector stopped: the index does not have it
        engine = KafkaEngine(kafka_bootstrap, topics, specs, app=topics.prefix, state_dir=tmp_path)
        await produce(
            kafka_bootstrap,
            topics.inputs,
            [
                (
                    encode(DeliverSignal(command_id="late", run_id=RUN, name="go")),
                    RUN.encode(),
                    topics.partition_of(RUN),
                )
            ],
        )
        async with running(engine.run):
            assert await eventually(
                lambda: (s := engine.state(RUN)) is not None and s.seq == done + 1, 30
            )
        number = topics.partition_of(RUN)
        where = event_index(index, RUN, topics.events, number)
        assert where is not None and len(where.offsets) == done
        assert stored_offsets(index, topics.events)[number] + 1 == where.indexed_to

        async with KafkaClient(kafka_bootstrap, topics, app=topics.prefix) as client:
            indexed = await client.run_log_at(RUN, where.offsets, where.indexed_to)
            by_index = client.records_read
            scanned = await client.run_log(RUN)
            by_scan = client.records_read - by_index
        assert indexed == scanned and len(indexed.events) == done + 1
        assert len(indexed.recorded) == 3
        assert by_scan > 2 * OTHERS and by_index < by_scan / 5, (by_index, by_scan)
        state = fold(indexed.events)
        assert state.input == {"order": RUN} and state.results  # not the compact record

    asyncio.run(main())
    capsys.readouterr()
    base = [
        "--kafka",
        kafka_bootstrap,
        "--topic-prefix",
        topics.prefix,
        "--partitions",
        str(topics.partitions),
        "--app",
        topics.prefix,
    ]
    for command in (["status", RUN, "--json"], ["timeline", RUN], ["replay", RUN, "--verify"]):
        out = io.StringIO()
        assert cli([*command, *base, "--index", index], out) == 0, out.getvalue()
        assert "note:" not in capsys.readouterr().err
        assert RUN in out.getvalue() or "verified" in out.getvalue().lower()
    out = io.StringIO()
    assert cli(["status", RUN, "--json", *base, "--index", index], out) == 0
    assert '"order": "run-read-by-index"' in out.getvalue()
    out = io.StringIO()
    assert cli(["status", RUN, *base], out) == 0
    assert "no index is configured" in capsys.readouterr().err
