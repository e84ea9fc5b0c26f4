"""Finished runs on disk, and the local state store's checkpoint, on the real broker.

A run that finished leaves memory for its compact record in the partition's local store;
a duplicate start and a late command for it are still refused, exactly as before, after
the eviction, after a restart from the local store, after a restart from an empty disk,
and after a restart whose store the changelog disproves (it is rebuilt)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from engine.codec import decode, encode
from engine.core.commands import DeliverSignal, StartRun
from engine.core.events import CommandRejectedV2, Event, RunCompleted
from engine.core.spec import load_spec
from engine.core.state import RunStatus
from engine.kafka.localstore import Checkpoint
from engine.kafka.processor import KafkaEngine, RunTask
from engine.kafka.topics import Topics
from engine.runtime.specs import SpecRegistry
from tests.kafka.helpers import eventually, produce, read_all, running

SPEC = load_spec(
    {
        "workflow": "hold",
        "version": 1,
        "steps": [{"id": "wait", "wait_event": {"name": "go", "timeout": "1h"}}],
    }
)
RUN = "run-finished-long-ago"
ACTIVE = "run-still-waiting"
PARTITIONS = 3


def _partition(run_id: str) -> int:
    return Topics(partitions=PARTITIONS).partition_of(run_id)


assert _partition(RUN) == _partition(ACTIVE), "both runs must share a partition"


def _engine(bootstrap: str, topics: Topics, state_dir: Path | None) -> KafkaEngine:
    specs = SpecRegistry()
    specs.add(SPEC)
    return KafkaEngine(bootstrap, topics, specs, app=topics.prefix, state_dir=state_dir)


def _start(run_id: str, command_id: str) -> tuple[bytes, bytes, int]:
    return (
        encode(
            StartRun(
                command_id=command_id,
                run_id=run_id,
                workflow="hold",
                version=1,
                idempotency_key=f"key-{run_id}",
            )
        ),
        run_id.encode(),
        _partition(run_id),
    )


def _signal(run_id: str, command_id: str) -> tuple[bytes, bytes, int]:
    return (
        encode(DeliverSignal(command_id=command_id, run_id=run_id, name="go")),
        run_id.encode(),
        _partition(run_id),
    )


async def _run_events(bootstrap: str, topics: Topics, run_id: str) -> list[Any]:
    messages = await read_all(bootstrap, topics.events, topics.partitions)
    records = [decode(m.value) for m in messages if m.key == run_id.encode()]
    return [r for r in records if isinstance(r, Event)]


async def _rejections(bootstrap: str, topics: Topics, count: int) -> list[CommandRejectedV2]:
    async def found() -> list[CommandRejectedV2]:
        return [
            e for e in await _run_events(bootstrap, topics, RUN) if isinstance(e, CommandRejectedV2)
        ]

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while len(rejected := await found()) < count and loop.time() < deadline:
        await asyncio.sleep(0.2)
    assert len(rejected) == count, f"expected {count} rejections, found {rejected}"
    return rejected


def _task(engine: KafkaEngine) -> RunTask:
    task = engine.run_task(_partition(RUN))
    assert task is not None
    return task


async def _refuses_late_commands(
    bootstrap: str, topics: Topics, engine: KafkaEngine, round_: int
) -> None:
    """A duplicate start and a late signal for the finished run are refused, with the
    events the full state would have given (reason and next sequence number)."""
    await produce(
        bootstrap, topics.inputs, [_start(RUN, f"again-{round_}"), _signal(RUN, f"late-{round_}")]
    )
    rejected = await _rejections(bootstrap, topics, 2 * round_)
    assert [e.reason for e in rejected[-2:]] == ["duplicate start", "run ended"]
    assert [e.causation_id for e in rejected[-2:]] == [f"again-{round_}", f"late-{round_}"]
    events = await _run_events(bootstrap, topics, RUN)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert await eventually(lambda: (s := engine.state(RUN)) is not None and s.seq == len(events))
    assert _task(engine).cache.resident(RUN) is None, "a finished run stayed in memory"


def test_a_run_finished_long_ago_is_refused_after_eviction_restart_and_empty_disk(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"

    async def main() -> None:
        engine = _engine(kafka_bootstrap, topics, state_dir)
        async with running(engine.run):
            await produce(
                kafka_bootstrap,
                topics.inputs,
                [_start(RUN, "start"), _start(ACTIVE, "start-active")],
            )
            assert await eventually(
                lambda: (s := engine.state(ACTIVE)) is not None and s.status is RunStatus.WAITING
            )
            await produce(kafka_bootstrap, topics.inputs, [_signal(RUN, "go")])
            assert await eventually(
                lambda: (s := engine.state(RUN)) is not None and s.status is RunStatus.COMPLETED
            )
            task = _task(engine)
            assert task.cache.resident(RUN) is None and task.cache.resident(ACTIVE) is not None
            assert task.store is not None and task.store.counts() == (1, 1)
            compact = engine.state(RUN)
            assert compact is not None and compact.input is None and not compact.results
            await _refuses_late_commands(kafka_bootstrap, topics, engine, 1)
        assert any(
            isinstance(e, RunCompleted) for e in await _run_events(kafka_bootstrap, topics, RUN)
        )

        # A restart from the local store: it is trusted, and only active runs are loaded.
        engine = _engine(kafka_bootstrap, topics, state_dir)
        async with running(engine.run):
            assert await eventually(lambda: engine.run_task(_partition(RUN)) is not None)
            task = _task(engine)
            assert task.store is not None and task.store.discarded is None
            assert len(task.cache) == 1 and task.cache.resident(ACTIVE) is not None
            await _refuses_late_commands(kafka_bootstrap, topics, engine, 2)

        # A new machine: an empty disk, rebuilt from the changelog.
        fresh = tmp_path / "fresh"
        engine = _engine(kafka_bootstrap, topics, fresh)
        async with running(engine.run):
            assert await eventually(lambda: engine.run_task(_partition(RUN)) is not None)
            task = _task(engine)
            assert task.store is not None and task.store.counts() == (1, 1)
            assert len(task.cache) == 1
            await _refuses_late_commands(kafka_bootstrap, topics, engine, 3)

    asyncio.run(main())


def test_a_store_the_changelog_disproves_is_rebuilt_not_trusted(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    """The store's checkpoint names a record the changelog does not have there (as after
    the topic was recreated): the store is discarded and rebuilt from the changelog."""
    state_dir = tmp_path / "state"

    async def main() -> None:
        engine = _engine(kafka_bootstrap, topics, state_dir)
        async with running(engine.run):
            await produce(
                kafka_bootstrap,
                topics.inputs,
                [_start(RUN, "start"), _signal(RUN, "go"), _start(ACTIVE, "start-active")],
            )
            assert await eventually(
                lambda: (s := engine.state(ACTIVE)) is not None and s.status is RunStatus.WAITING
            )
            store = _task(engine).store
            assert store is not None and store.checkpoint is not None
            cp = store.checkpoint
            # A forged anchor (right checksum, wrong record) and a value the changelog
            # never had: a store trusted blindly would hand the value back.
            store.write(
                {b"ghost": encode(decode(store.get(ACTIVE.encode()) or b""))},
                {},
                (),
                Checkpoint(cp.position, cp.anchor, b"\0" * 32),
            )

        engine = _engine(kafka_bootstrap, topics, state_dir)
        async with running(engine.run):
            assert await eventually(lambda: engine.run_task(_partition(RUN)) is not None)
            task = _task(engine)
            assert task.store is not None and task.store.discarded is not None
            assert "no record at offset" in task.store.discarded
            assert task.store.get(b"ghost") is None
            assert task.store.counts() == (1, 1)
            await _refuses_late_commands(kafka_bootstrap, topics, engine, 1)

    asyncio.run(main())


def test_without_a_state_dir_finished_runs_stay_in_memory_as_compact_records(
    kafka_bootstrap: str, topics: Topics
) -> None:
    async def main() -> None:
        engine = _engine(kafka_bootstrap, topics, None)
        async with running(engine.run):
            await produce(
                kafka_bootstrap, topics.inputs, [_start(RUN, "start"), _signal(RUN, "go")]
            )
            assert await eventually(
                lambda: (s := engine.state(RUN)) is not None and s.status is RunStatus.COMPLETED
            )
            resident = _task(engine).cache.resident(RUN)
            assert resident is not None and resident.input is None
            await _refuses_late_commands_in_memory(kafka_bootstrap, topics)

    async def _refuses_late_commands_in_memory(bootstrap: str, t: Topics) -> None:
        await produce(bootstrap, t.inputs, [_start(RUN, "again-1"), _signal(RUN, "late-1")])
        rejected = await _rejections(bootstrap, t, 2)
        assert [e.reason for e in rejected] == ["duplicate start", "run ended"]

    asyncio.run(main())
