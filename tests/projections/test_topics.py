"""The run timelines and SLA metrics topics, written exactly once from the events topic."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from engine.codec import decode
from engine.runtime.specs import SpecRegistry
from projections._kafka import topic_partitions
from projections.project import ProjectionError, project_run, run_row
from projections.records import RunTimeline, SlaMetrics, timeline_record
from projections.sla import sla_aggregates
from projections.topics import TopicProjector, sla_topic, timelines_topic
from tests.projections.kafka_log import EventLog, wait_until
from tests.projections.scenarios import (
    BASE,
    BOOK,
    CLAIMS,
    HOUR,
    SECRETS,
    completed,
    many_runs,
    scripted_runs,
)
from tests.projections.test_sla import NOW

pytestmark = [pytest.mark.kafka]


async def _read(bootstrap: str, topic: str) -> tuple[dict[bytes, bytes], bytes]:
    """The latest value of every key of ``topic``, and all its bytes."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    latest: dict[bytes, bytes] = {}
    everything = bytearray()
    try:
        parts = [TopicPartition(topic, p) for p in await topic_partitions(bootstrap, topic)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        while [tp for tp in parts if await consumer.position(tp) < end[tp]]:
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                for m in messages:
                    latest[m.key] = m.value
                    everything += m.value
    finally:
        await consumer.stop()
    return latest, bytes(everything)


def _close(a: SlaMetrics, b: SlaMetrics) -> None:
    for name, value in dataclasses.asdict(b).items():
        actual = getattr(a, name)
        if isinstance(value, float):
            assert actual == pytest.approx(value, rel=1e-12), name
        else:
            assert actual == value, (a.key, name)


def test_topics_equal_a_fresh_fold_after_a_crash(event_log: EventLog) -> None:
    runs: dict[str, Any] = {**scripted_runs(), **many_runs(60, start=BASE + 24 * HOUR)}
    items = list(runs.items())
    app = event_log.topics.prefix
    group = f"{app}-timelines"

    def projector() -> TopicProjector:
        return TopicProjector(
            event_log.bootstrap, event_log.topics, app=app, batch=17, clock=lambda: NOW
        )

    async def go() -> None:
        await event_log.publish(dict(items[:20]), per_txn=9)
        await event_log.publish_aborted(completed("ghost", BASE))
        first = asyncio.create_task(projector().run(asyncio.Event()))
        await event_log.publish(dict(items[20:]), per_txn=9, pause_s=0.01, seed=3)
        first.cancel()  # a crash: wherever it was, its open transaction is left behind
        with contextlib.suppress(asyncio.CancelledError):
            await first
        stop = asyncio.Event()
        second = asyncio.create_task(projector().run(stop))
        await wait_until(lambda: event_log.group_caught_up(group), 60, "the projector")
        stop.set()
        stats = await second
        assert stats.events < sum(len(e) for e in runs.values()), "it resumed, not restarted"

    asyncio.run(go())
    timelines, raw_timelines = asyncio.run(
        _read(event_log.bootstrap, timelines_topic(event_log.topics))
    )
    expected = {
        run_id: timeline_record(project_run(events, BOOK))
        for run_id, events in event_log.runs.items()
    }
    got = {key.decode(): decode(value) for key, value in timelines.items()}
    assert got.keys() == expected.keys()
    for run_id, record in got.items():
        assert isinstance(record, RunTimeline)
        assert record == expected[run_id], run_id

    metrics, raw_metrics = asyncio.run(_read(event_log.bootstrap, sla_topic(event_log.topics)))
    rows = [run_row(project_run(events, BOOK)) for events in event_log.runs.values()]
    want = {m.key: m for w in ("1m", "1h") for m in sla_aggregates(rows, w, now_ms=NOW)}
    have = {key.decode(): decode(value) for key, value in metrics.items()}
    assert have.keys() == want.keys()
    for key, value in have.items():
        assert isinstance(value, SlaMetrics)
        _close(value, want[key])
    hour = have[f"claims|acme|1h|{BASE}"]
    assert isinstance(hour, SlaMetrics)
    assert (hour.started, hour.completed, hour.approvals_overdue) == (9, 4, 1)

    leaked = [s for s in SECRETS if s.encode() in raw_timelines + raw_metrics]
    assert not leaked, f"secrets on the projection topics: {leaked}"


def test_a_second_instance_fences_the_first(event_log: EventLog) -> None:
    app = event_log.topics.prefix
    specs = SpecRegistry([CLAIMS])

    async def go() -> None:
        await event_log.publish(many_runs(5))
        ready = asyncio.Event()

        async def started() -> None:
            ready.set()

        first = asyncio.create_task(
            TopicProjector(event_log.bootstrap, event_log.topics, app=app, specs=specs).run(
                asyncio.Event(), started
            )
        )
        await asyncio.wait_for(ready.wait(), 30)
        stop = asyncio.Event()
        second_ready = asyncio.Event()

        async def second_started() -> None:
            second_ready.set()

        second = asyncio.create_task(
            TopicProjector(event_log.bootstrap, event_log.topics, app=app, specs=specs).run(
                stop, second_started
            )
        )
        await asyncio.wait_for(second_ready.wait(), 30)
        # The first instance learns it was fenced at its next transaction: keep giving
        # it events until it does (it may have projected a first round before).
        for round_no in range(12):
            await event_log.publish(many_runs(2, prefix=f"more{round_no}"), seed=round_no)
            done, _ = await asyncio.wait({first}, timeout=5)
            if done:
                break
        with pytest.raises(ProjectionError, match="took over"):
            await asyncio.wait_for(first, 1)
        await wait_until(
            lambda: event_log.group_caught_up(f"{app}-timelines"), 60, "the second projector"
        )
        stop.set()
        await second

    asyncio.run(go())
    # The fenced producer leaves aiokafka futures holding ProducerFenced: let their
    # finalizers run now, not in the middle of some later compile().
    gc.collect()
