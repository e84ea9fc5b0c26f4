"""The PostgreSQL projector against the real broker and database: rows equal a fresh fold
of the topic, after SIGKILLs and PostgreSQL restarts too."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from engine.runtime.specs import SpecRegistry
from projections import postgres as pg_projection
from projections.postgres import (
    PostgresProjector,
    ProjectionError,
    checksum,
    counts,
    migrate,
    rebuild,
    run_projector,
    sla_postgres,
    stored_offsets,
    timeline_from_postgres,
)
from projections.project import EVENT_COLUMNS, RUN_COLUMNS, STEP_COLUMNS, project_run
from projections.records import SlaMetrics
from projections.sla import sla_aggregates
from tests.infra import kafka_bootstrap, postgres_dsn
from tests.integration.kafka_harness import Cluster, stop_process, wait_ready
from tests.projections.kafka_log import (
    ROOT,
    EventLog,
    ensure_postgres,
    last_offsets,
    restart_postgres,
    stored_index,
    stored_runs,
    wait_until,
)
from tests.projections.scenarios import CLAIMS, SECRETS, completed, many_runs, scripted_runs
from tests.projections.test_sla import NOW
from tests.projections.test_sla import rows as pure_rows

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

Schemas = Callable[[], str]


async def _project_until_caught_up(log: EventLog, dsn: str, **kwargs: object) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(run_projector(log.bootstrap, log.topics, dsn, stop, **kwargs))  # type: ignore[arg-type]
    try:
        await wait_until(lambda: asyncio.to_thread(log.caught_up, dsn), 60, "the projector")
    finally:
        stop.set()
        await task


def _assert_fresh_fold(log: EventLog, dsn: str) -> None:
    runs, index = log.expected_rows()
    stored = stored_runs(dsn)
    assert stored.keys() == runs.keys()
    for run_id, expected in runs.items():
        assert stored[run_id] == expected, run_id
    assert set(stored_index(dsn)) == index
    assert counts(dsn)["run_events"] == len(index)


def _assert_same_figures(got: list[SlaMetrics], want: list[SlaMetrics]) -> None:
    """Equal, floats to the last few bits (PostgreSQL sums in another order)."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        for name, value in dataclasses.asdict(b).items():
            actual = getattr(a, name)
            if isinstance(value, float):
                assert actual == pytest.approx(value, rel=1e-12), name
            else:
                assert actual == value, name


def test_migrations_are_versioned_and_idempotent(pg: Schemas) -> None:
    dsn = pg()
    assert migrate(dsn) == [1, 2]
    assert migrate(dsn) == []
    with psycopg.connect(dsn) as conn:
        assert [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")] == [
            1,
            2,
        ]
        columns = {
            (t, c)
            for t, c in conn.execute(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema()"
            )
        }
    for table, spec in (
        ("runs", RUN_COLUMNS),
        ("steps", STEP_COLUMNS),
        ("run_events", EVENT_COLUMNS),
    ):
        assert {c for t, c in columns if t == table} == {c.name for c in spec}, table


def test_rows_equal_a_fresh_fold_and_aborted_events_never_show(
    event_log: EventLog, pg: Schemas
) -> None:
    dsn = pg()
    runs = scripted_runs()

    async def go() -> None:
        await event_log.publish(dict(list(runs.items())[:6]), per_txn=7)
        await event_log.publish_aborted(completed("ghost", 0))
        await event_log.publish(dict(list(runs.items())[6:]), per_txn=7, seed=2)
        await _project_until_caught_up(event_log, dsn, batch=13)

    asyncio.run(go())
    _assert_fresh_fold(event_log, dsn)
    assert "ghost" not in stored_runs(dsn)
    with psycopg.connect(dsn) as conn:
        dump = str(conn.execute("SELECT array_agg(t::text) FROM runs t").fetchone())
        dump += str(conn.execute("SELECT array_agg(t::text) FROM steps t").fetchone())
    assert not [s for s in SECRETS if s in dump]

    # the SLA figures from SQL are the hand-checked figures of test_sla
    _assert_same_figures(
        sla_postgres(dsn, window="1h", now_ms=NOW), sla_aggregates(pure_rows(), "1h", now_ms=NOW)
    )
    _assert_same_figures(
        sla_postgres(dsn, window="1m", tenant="acme", now_ms=NOW),
        sla_aggregates(pure_rows(), "1m", tenant="acme", now_ms=NOW),
    )
    one = sla_postgres(dsn, workflow="claims", tenant="acme", window="1h", now_ms=NOW)[0]
    assert (one.started, one.completed, one.approvals_overdue, one.p95_ms) == (
        9,
        4,
        1,
        pytest.approx(564000.0),
    )
    assert len(sla_postgres(dsn, window="1m", now_ms=NOW)) == 11

    timeline = timeline_from_postgres(dsn, "r9")
    assert timeline is not None and timeline.sla_breached and timeline.status == "Completed"
    assert timeline_from_postgres(dsn, "zzz") is None


def test_rebuild_gives_the_same_checksum_and_reports_progress(
    event_log: EventLog, pg: Schemas
) -> None:
    live, fresh = pg(), pg()
    asyncio.run(event_log.publish(many_runs(50), per_txn=40))
    asyncio.run(_project_until_caught_up(event_log, live))
    seen: list[tuple[int, int]] = []
    stats = asyncio.run(
        rebuild(
            event_log.bootstrap,
            event_log.topics,
            fresh,
            progress=lambda done, total: seen.append((done, total)),
            batch=97,
        )
    )
    assert stats.events == sum(len(e) for e in event_log.runs.values())
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] >= event_log.records
    assert checksum(live) == checksum(fresh)
    # rebuilding in place gives the same rows again
    asyncio.run(rebuild(event_log.bootstrap, event_log.topics, live))
    assert checksum(live) == checksum(fresh)
    _assert_fresh_fold(event_log, live)


def test_a_running_projector_blocks_a_rebuild(event_log: EventLog, pg: Schemas) -> None:
    dsn = pg()
    specs = SpecRegistry([CLAIMS])

    async def go() -> None:
        stop = asyncio.Event()
        started = asyncio.Event()

        async def ready() -> None:
            started.set()

        task = asyncio.create_task(
            run_projector(
                event_log.bootstrap, event_log.topics, dsn, stop, specs=specs, ready=ready
            )
        )
        await asyncio.wait_for(started.wait(), 30)
        try:
            with pytest.raises(ProjectionError, match="stop it before rebuilding"):
                await rebuild(event_log.bootstrap, event_log.topics, dsn, specs=specs)
        finally:
            stop.set()
            await task

    asyncio.run(go())


async def _start(log: EventLog, dsn: str, errors: Path) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with errors.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "projections.postgres",
            "--kafka",
            log.bootstrap,
            "--postgres",
            dsn,
            "--topic-prefix",
            log.topics.prefix,
            "--batch",
            "60",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert line.startswith(b"projecting"), (line, errors.read_text()[-2000:])
    return proc


@pytest.mark.slow
@pytest.mark.chaos
def test_sigkill_mid_batch_then_restart(event_log: EventLog, pg: Schemas, tmp_path: Path) -> None:
    seed = int(os.environ.get("TERRANOHA_SEED", random.randrange(1 << 30)))
    print(f"seed {seed}")
    rng = random.Random(seed)
    live, fresh = pg(), pg()
    errors = tmp_path / "projector.err"

    async def go() -> int:
        publisher = asyncio.create_task(
            event_log.publish(many_runs(1200), per_txn=60, pause_s=0.01, seed=seed)
        )
        kills = 0
        proc = await _start(event_log, live, errors)
        while not publisher.done() or kills < 3:
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            kills += 1
            proc = await _start(event_log, live, errors)
        await publisher
        await wait_until(lambda: asyncio.to_thread(event_log.caught_up, live), 90, "the projector")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, errors.read_text()[-3000:]
        return kills

    kills = asyncio.run(go())
    print(f"{kills} kills, {event_log.records} records")
    asyncio.run(rebuild(event_log.bootstrap, event_log.topics, fresh))
    assert checksum(live) == checksum(fresh)
    _assert_fresh_fold(event_log, live)


@pytest.mark.slow
@pytest.mark.chaos
def test_postgres_restarted_under_load(event_log: EventLog, pg: Schemas) -> None:
    live, fresh = pg(), pg()
    base = postgres_dsn()

    async def go() -> int:
        stop = asyncio.Event()
        projector = PostgresProjector(event_log.bootstrap, event_log.topics, live, batch=50)
        task = asyncio.create_task(projector.run(stop))
        publisher = asyncio.create_task(event_log.publish(many_runs(400), per_txn=40, pause_s=0.02))
        try:
            await asyncio.sleep(1.5)
            await asyncio.to_thread(restart_postgres)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(restart_postgres)
            await publisher
            await wait_until(
                lambda: asyncio.to_thread(event_log.caught_up, live),
                90,
                "the projector after the restarts",
            )
        finally:
            stop.set()
            await task
            await asyncio.to_thread(ensure_postgres, base)
        return projector.stats.reconnects

    try:
        reconnects = asyncio.run(go())
    finally:
        ensure_postgres(base)
    print(f"{reconnects} reconnects, {event_log.records} records")
    assert reconnects >= 1
    asyncio.run(rebuild(event_log.bootstrap, event_log.topics, fresh))
    assert checksum(live) == checksum(fresh)
    _assert_fresh_fold(event_log, live)


def test_the_module_entry_point_rebuilds(event_log: EventLog, pg: Schemas) -> None:
    dsn = pg()
    asyncio.run(event_log.publish(many_runs(8)))
    assert (
        pg_projection.main(
            [
                "--kafka",
                event_log.bootstrap,
                "--postgres",
                dsn,
                "--topic-prefix",
                event_log.topics.prefix,
                "--rebuild",
            ]
        )
        == 0
    )
    _assert_fresh_fold(event_log, dsn)


@pytest.mark.slow
def test_a_real_engine_is_projected(
    pg: Schemas, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``terranoha serve --kafka`` runs the durable workflow; the projector follows."""
    live, fresh = pg(), pg()
    migrate(live)
    cluster = Cluster(kafka_bootstrap(), postgres_dsn(), tmp_path)
    request.addfinalizer(cluster.delete_topics)
    cluster.setup()
    run_ids = cluster.trigger(20)
    proc = cluster.serve()
    wait_ready(proc)

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(run_projector(cluster.bootstrap, cluster.topics, live, stop))

        async def all_completed() -> bool:
            done = await asyncio.to_thread(stored_runs, live)
            return all(done.get(r, {}).get("status") == "Completed" for r in run_ids)

        try:
            await wait_until(all_completed, 100, "20 completed runs in PostgreSQL")
            await asyncio.to_thread(stop_process, proc)
            last = await last_offsets(cluster.bootstrap, cluster.topics.events)

            async def caught_up() -> bool:
                stored = await asyncio.to_thread(stored_offsets, live, cluster.topics.events)
                return all(stored.get(p, -1) >= o for p, o in last.items())

            await wait_until(caught_up, 30, "the projector")
        finally:
            stop.set()
            await task
            if proc.poll() is None:
                stop_process(proc)

    asyncio.run(go())
    asyncio.run(rebuild(cluster.bootstrap, cluster.topics, fresh))
    assert checksum(live) == checksum(fresh)
    runs, _, _ = cluster.read_log()
    stored = stored_runs(live)
    for run_id in run_ids:
        timeline = project_run(sorted(runs[run_id], key=lambda e: e.seq))
        assert stored[run_id]["last_seq"] == timeline.last_seq
        assert stored[run_id]["attempts"] == timeline.attempts >= 4
    assert counts(live)["run_events"] == sum(len(events) for events in runs.values())
