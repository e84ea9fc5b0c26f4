"""The schedule processor on the real broker: its ticks write one ``StartRun`` per nominal
time to the run inputs in its transactions, a processor down across three ticks catches
them up when it returns (restored from its changelog), and nominal times older than the
catch-up window are recorded as missed, not run and not dropped."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Iterator
from uuid import uuid4

import pytest

from engine.codec import decode, encode
from engine.core.commands import StartRun
from engine.core.outbox import Notification
from engine.core.schedule_records import (
    CreateSchedule,
    DeleteSchedule,
    FireReason,
    ScheduleCommand,
    ScheduledRunStarted,
    ScheduleTicksMissed,
)
from engine.core.schedules import run_id_of, schedule_origin
from engine.kafka.schedules import ScheduleProcessor, schedule_new_topics, schedule_topics
from engine.kafka.topics import Topics, delete_topics, ensure_topics, key_partition
from engine.runtime.schedule_spec import load_schedule
from tests.kafka.helpers import produce, read_all, running

pytestmark = pytest.mark.kafka

SECOND = 1000


@pytest.fixture
def topics(kafka_bootstrap: str) -> Iterator[Topics]:
    t = Topics(prefix=f"s{uuid4().hex[:8]}", partitions=2)
    asyncio.run(ensure_topics(kafka_bootstrap, [*t.core_topics(), *schedule_new_topics(t)]))
    yield t
    asyncio.run(delete_topics(kafka_bootstrap, t.prefix))


async def _send(bootstrap: str, topics: Topics, command: ScheduleCommand) -> None:
    keyed = schedule_topics(topics)
    key = command.schedule_id.encode()
    await produce(
        bootstrap, keyed.inputs, [(encode(command), key, key_partition(key, keyed.partitions))]
    )


async def _starts(bootstrap: str, topics: Topics) -> list[StartRun]:
    records = await read_all(bootstrap, topics.inputs, topics.partitions)
    return [r for m in records if isinstance(r := decode(m.value), StartRun)]


async def _schedule_log(bootstrap: str, topics: Topics) -> list[object]:
    keyed = schedule_topics(topics)
    return [decode(m.value) for m in await read_all(bootstrap, keyed.events, keyed.partitions)]


async def _until_starts(
    bootstrap: str, topics: Topics, count: int, timeout_s: float = 30.0
) -> list[StartRun]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        starts = await _starts(bootstrap, topics)
        if len(starts) >= count or loop.time() > deadline:
            return starts
        await asyncio.sleep(0.2)


def _nominals(starts: list[StartRun]) -> list[int]:
    out = []
    for start in starts:
        origin = schedule_origin(start.idempotency_key)
        assert origin is not None, start
        out.append(origin[1])
    return out


def test_a_processor_down_across_three_ticks_starts_each_once_when_it_returns(
    kafka_bootstrap: str, topics: Topics
) -> None:
    spec = load_schedule(
        {
            "id": "every-second",
            "workflow": "report",
            "interval": "1s",
            "overlap": "allow_all",
            "catch_up_window": "1h",
        }
    )

    down: list[int] = []

    async def scenario() -> list[StartRun]:
        await _send(
            kafka_bootstrap,
            topics,
            CreateSchedule(command_id="create", schedule_id=spec.schedule_id, spec=spec),
        )
        async with running(ScheduleProcessor(kafka_bootstrap, topics, app=topics.prefix).run):
            await _until_starts(kafka_bootstrap, topics, 2)
        before = len(await _starts(kafka_bootstrap, topics))
        down.append(int(time.time() * 1000))
        await asyncio.sleep(3.5)  # down across three ticks
        down.append(int(time.time() * 1000))
        async with running(ScheduleProcessor(kafka_bootstrap, topics, app=topics.prefix).run):
            await _until_starts(kafka_bootstrap, topics, before + 4)
            await _send(
                kafka_bootstrap,
                topics,
                DeleteSchedule(command_id="delete", schedule_id=spec.schedule_id),
            )
            await asyncio.sleep(1.5)
        return await _starts(kafka_bootstrap, topics)

    starts = asyncio.run(scenario())
    nominals = _nominals(starts)
    doubled = {n: c for n, c in Counter(nominals).items() if c > 1}
    assert not doubled, f"nominal times started twice: {doubled}"
    ordered = sorted(nominals)
    gaps = [(a, b) for a, b in itertools.pairwise(ordered) if b - a != SECOND]
    assert not gaps, f"nominal times never started between {gaps}"
    assert len(ordered) >= 6
    assert all(s.run_id == run_id_of(spec, n) for s, n in zip(starts, nominals, strict=True))
    during = [n for n in nominals if down[0] < n < down[1]]
    assert len(during) >= 3, f"the three ticks of the downtime: {during}"
    log = asyncio.run(_schedule_log(kafka_bootstrap, topics))
    caught_up = {
        e.nominal
        for e in log
        if isinstance(e, ScheduledRunStarted) and e.reason is FireReason.CATCH_UP
    }
    assert min(during) in caught_up, "the oldest tick of the downtime was a catch-up"


def test_times_outside_the_window_are_recorded_as_missed(
    kafka_bootstrap: str, topics: Topics
) -> None:
    spec = load_schedule(
        {
            "id": "strict",
            "workflow": "report",
            "interval": "1s",
            "overlap": "allow_all",
            "catch_up_window": "0s",
        }
    )

    async def scenario() -> None:
        await _send(
            kafka_bootstrap,
            topics,
            CreateSchedule(command_id="create", schedule_id=spec.schedule_id, spec=spec),
        )
        async with running(ScheduleProcessor(kafka_bootstrap, topics, app=topics.prefix).run):
            await _until_starts(kafka_bootstrap, topics, 1)
        await asyncio.sleep(3.5)
        async with running(ScheduleProcessor(kafka_bootstrap, topics, app=topics.prefix).run):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while loop.time() < deadline and not any(
                isinstance(e, ScheduleTicksMissed)
                for e in await _schedule_log(kafka_bootstrap, topics)
            ):
                await asyncio.sleep(0.2)
            await _send(
                kafka_bootstrap,
                topics,
                DeleteSchedule(command_id="delete", schedule_id=spec.schedule_id),
            )
            await asyncio.sleep(1.0)

    asyncio.run(scenario())
    log = asyncio.run(_schedule_log(kafka_bootstrap, topics))
    missed = [e for e in log if isinstance(e, ScheduleTicksMissed)]
    assert missed and sum(m.count for m in missed) >= 2
    started = {e.nominal for e in log if isinstance(e, ScheduledRunStarted)}
    for m in missed:
        assert m.first not in started and m.last not in started
    nominals = _nominals(asyncio.run(_starts(kafka_bootstrap, topics)))
    assert sorted(nominals) == sorted(started), "each started nominal time has one StartRun"
    notes = [
        decode(m.value)
        for m in asyncio.run(read_all(kafka_bootstrap, topics.notifications, topics.partitions))
    ]
    alerts = [n for n in notes if isinstance(n, Notification) and n.kind == "schedule_missed"]
    assert len(alerts) == len(missed), "each missed range is an alert, in its transaction"
