"""Projections in PostgreSQL: runs, steps, the event index and SLA figures.

The projector reads every partition of the run events topic (read_committed, manual
assignment, no consumer group: its offsets live in PostgreSQL). Each batch it polls is
folded into the touched runs' timelines and written in ONE database transaction with
the last offset read of each partition (``projector_offsets``): the rows and the offsets
commit together or not at all, so after a crash, a kill or a PostgreSQL restart it
resumes from the stored offsets with nothing missing and nothing doubled.

One projector per schema: it holds a session advisory lock for its name while it runs
(a second one waits for it; ``rebuild`` refuses to start). Point several projections at
one database with a schema each (``with_schema``).

    python -m projections.postgres --kafka 127.0.0.1:29092 --postgres DSN [--schema S]
    python -m projections.postgres ... --rebuild
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from psycopg import sql
from psycopg.conninfo import make_conninfo

from engine.codec import DecodeError, decode
from engine.core.events import Event
from engine.kafka.specs import SpecFollower
from engine.kafka.topics import Topics
from engine.runtime.specs import SpecRegistry
from projections._kafka import topic_partitions
from projections._pg_schema import (
    CHECKSUM_TABLES,
    MIGRATIONS,
    MIGRATIONS_TABLE,
    OFFSETS_UPSERT,
    upsert,
)

if TYPE_CHECKING:
    from projections.query import EventIndex
from engine.runtime.redaction import PolicyBook
from projections.project import (
    EVENT_COLUMNS,
    EVENT_KEY,
    RUN_COLUMNS,
    RUN_KEY,
    STEP_COLUMNS,
    STEP_KEY,
    Column,
    Located,
    ProjectedBatch,
    ProjectionError,
    ProjectorStats,
    db_value,
    project_batch,
    run_row,
    step_rows,
)
from projections.records import SlaMetrics
from projections.sla import metrics_of, window_ms
from projections.timeline import Timeline, timeline_from_dict

log = logging.getLogger("terranoha.projections.postgres")

DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)
"""What a lost or refused connection raises: reconnect and resume from stored offsets."""

_RUNS_UPSERT = upsert("runs", RUN_COLUMNS, RUN_KEY)
_STEPS_UPSERT = upsert("steps", STEP_COLUMNS, STEP_KEY)
_EVENTS_INSERT = upsert("run_events", EVENT_COLUMNS, EVENT_KEY, update=False)

Progress = Callable[[int, int], None]
"""``progress(records_done, records_total)``."""


# --------------------------------------------------------------------------- schema


def with_schema(dsn: str, schema: str) -> str:
    """``dsn`` with ``search_path`` set to ``schema``: every table the projection reads
    and writes is then in that schema."""
    return make_conninfo(dsn, options=f"-c search_path={schema}")


def create_schema(dsn: str, schema: str) -> str:
    """Create ``schema`` if missing; return ``with_schema(dsn, schema)``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    return with_schema(dsn, schema)


def migrate(dsn: str) -> list[int]:
    """Apply the migrations not applied yet, each in its own transaction, in order;
    return the versions applied. Safe to run concurrently (an advisory lock)."""
    applied: list[int] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        schema = conn.execute("SELECT current_schema()").fetchone()
        if schema is None or schema[0] is None:
            raise ProjectionError(
                "no schema to create the projection tables in: the "
                "search_path names none that exists (create_schema)"
            )
        for version, name, body in MIGRATIONS:
            with conn.transaction():
                conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(current_schema() || "
                    "':terranoha-migrations'))"
                )
                conn.execute(MIGRATIONS_TABLE)
                done = conn.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = %s", (version,)
                ).fetchone()
                if done:
                    continue
                conn.execute(body)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name)
                )
                applied.append(version)
    return applied


def checksum(dsn: str) -> str:
    """A digest of every row of runs, steps and run_events, independent of row order and
    of when or how the rows were written: equal digests, equal projections."""
    digest = hashlib.sha256()
    with psycopg.connect(dsn) as conn:
        for table in CHECKSUM_TABLES:
            query = sql.SQL(
                "SELECT count(*), coalesce(md5(string_agg(h, '' ORDER BY h)), '') "
                "FROM (SELECT md5(t::text) AS h FROM {} t) s"
            ).format(sql.Identifier(table))
            row = conn.execute(query).fetchone()
            assert row is not None
            digest.update(f"{table}:{row[0]}:{row[1]};".encode())
    return digest.hexdigest()


def counts(dsn: str) -> dict[str, int]:
    """Rows per projection table."""
    out = {}
    with psycopg.connect(dsn) as conn:
        for table in CHECKSUM_TABLES:
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
            ).fetchone()
            out[table] = int(row[0]) if row else 0
    return out


def stored_offsets(dsn: str, topic: str, name: str = "postgres") -> dict[int, int]:
    """The last offset projected, per partition of ``topic`` (none before the first
    migration)."""
    with psycopg.connect(dsn) as conn:
        try:
            rows = conn.execute(
                'SELECT "partition", "offset" FROM projector_offsets '
                "WHERE projector = %s AND topic = %s",
                (name, topic),
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return {}
    return {int(p): int(o) for p, o in rows}


# --------------------------------------------------------------------------- queries


def event_offsets(dsn: str, run_id: str, topic: str, partition: int) -> EventIndex | None:
    """``projections.query.event_index`` on PostgreSQL: one indexed query and the
    projector's position on the run's partition."""
    from projections.query import EventIndex

    with psycopg.connect(dsn) as conn:
        try:
            rows = conn.execute(
                'SELECT "partition", "offset" FROM projector_offsets '
                "WHERE projector = %s AND topic = %s",
                ("postgres", topic),
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return None
        if not rows:
            return None
        projected = {int(p): int(o) for p, o in rows}
        found = conn.execute(
            'SELECT "offset" FROM run_events WHERE run_id = %s AND "partition" = %s ORDER BY seq',
            (run_id, partition),
        ).fetchall()
    return EventIndex(partition, [int(o) for (o,) in found], projected.get(partition, -1) + 1)


def timeline_from_postgres(dsn: str, run_id: str) -> Timeline | None:
    """The projected (redacted) timeline of a run, by id or unambiguous id prefix."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT state FROM runs WHERE run_id = %s", (run_id,)).fetchone()
        if row is None:
            rows = conn.execute(
                "SELECT state FROM runs WHERE starts_with(run_id, %s) LIMIT 2", (run_id,)
            ).fetchall()
            row = rows[0] if len(rows) == 1 else None
    return timeline_from_dict(row[0]) if row is not None else None


def sla_postgres(
    dsn: str,
    workflow: str | None = None,
    tenant: str | None = None,
    window: str = "1h",
    now_ms: int | None = None,
) -> list[SlaMetrics]:
    """SLA figures per (workflow, tenant, bucket of ``window``) from the runs table."""
    width = window_ms(window)
    now = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT * FROM sla_metrics(%s, %s) "
            "WHERE (%s::text IS NULL OR workflow = %s) AND (%s::text IS NULL OR tenant = %s) "
            "ORDER BY bucket_start, workflow, tenant",
            (width, now, workflow, workflow, tenant, tenant),
        ).fetchall()
    return [
        metrics_of(
            workflow=r[0],
            tenant=r[1],
            window=window,
            width_ms=width,
            bucket=r[2],
            started=r[3],
            completed=r[4],
            failed=r[5],
            cancelled=r[6],
            mean_ms=r[7],
            p95_ms=r[8],
            cost_sum=r[9] or 0.0,
            escalated=r[10],
            waiting=r[11],
            overdue=r[12],
            breaches=r[13],
            now_ms=now,
        )
        for r in rows
    ]


# --------------------------------------------------------------------------- projector


def _columns(columns: Sequence[Column], rows: Iterable[Mapping[str, Any]]) -> list[list[Any]]:
    """Rows as one list per column: the parameters of an unnest() statement."""
    out: list[list[Any]] = [[] for _ in columns]
    for row in rows:
        for i, column in enumerate(columns):
            out[i].append(db_value(column, row[column.name]))
    return out


async def _close_quietly(conn: psycopg.AsyncConnection[Any] | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            await conn.close()


class PostgresProjector:
    """Projects the run events topic into the tables of ``dsn`` (see the module doc).

    ``specs`` gives the redaction rules; without it the projector follows the specs
    topic. ``cache_runs`` bounds the timelines kept in memory between batches (others
    are read back from the ``runs`` table when their run moves again).
    """

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        dsn: str,
        *,
        name: str = "postgres",
        batch: int = 2000,
        poll_ms: int = 20,
        specs: SpecRegistry | None = None,
        cache_runs: int = 50_000,
        retry_max_s: float = 5.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.topic = topics.events
        self.dsn = dsn
        self.name = name
        self.batch = batch
        self.poll_ms = poll_ms
        self.cache_runs = cache_runs
        self.retry_max_s = retry_max_s
        self.stats = ProjectorStats()
        self._specs = specs
        self._follower: SpecFollower | None = None
        self.book = PolicyBook(specs)
        self._cache: OrderedDict[str, Timeline] = OrderedDict()
        self._next: dict[int, int] = {}
        self._reading: AIOKafkaConsumer | None = None

    # ------------------------------------------------------------------ running

    async def run(
        self, stop: asyncio.Event, ready: Callable[[], Awaitable[None]] | None = None
    ) -> ProjectorStats:
        """Project until ``stop`` is set. ``ready`` is awaited once, when the projector
        has its offsets and starts reading."""
        started = time.monotonic()
        await self._start_specs()
        consumer = self._consumer()
        await consumer.start()
        conn: psycopg.AsyncConnection[Any] | None = None
        self._reading = consumer
        try:
            parts = await self._partitions(stop)
            if not parts:
                return self.stats
            consumer.assign(parts)
            while not stop.is_set():
                try:
                    if conn is None:
                        conn = await self._open(stop)
                        if conn is None:
                            break
                        await self._seek(conn, consumer, parts)
                        if ready is not None:
                            await ready()
                            ready = None
                    fetched = await consumer.getmany(
                        timeout_ms=self.poll_ms, max_records=self.batch
                    )
                    if fetched:
                        await self._project(conn, fetched)
                except DB_ERRORS as exc:
                    log.warning(
                        "PostgreSQL connection lost (%s); reconnecting, then resuming "
                        "from the stored offsets",
                        exc,
                    )
                    self.stats.reconnects += 1
                    await _close_quietly(conn)
                    conn = None
                    # A commit may have happened or not: only the stored state is trusted.
                    self._cache.clear()
        finally:
            self._reading = None
            await _close_quietly(conn)
            with contextlib.suppress(Exception):
                await consumer.stop()
            await self._stop_specs()
            self.stats.seconds = time.monotonic() - started
        return self.stats

    def behind(self) -> dict[int, int | None]:
        """Records between the next one to project and the end of each partition of the
        run events topic while ``run`` reads (None where no fetch has told the end yet;
        transaction markers count, so an idle partition may show one or two)."""
        consumer = self._reading
        if consumer is None:
            return {}
        out: dict[int, int | None] = {}
        for partition, next_offset in list(self._next.items()):
            end = consumer.highwater(TopicPartition(self.topic, partition))
            out[partition] = None if end is None else max(0, int(end) - next_offset)
        return out

    async def rebuild(self, progress: Progress | None = None) -> ProjectorStats:
        """Delete every projection row and this projector's offsets, then project the
        topic from its beginning up to its end as it is now. Refuses to start while a
        projector of the same name runs. Readers see the tables fill up again; stopping
        half-way leaves consistent rows and offsets a projector resumes from."""
        started = time.monotonic()
        await asyncio.to_thread(migrate, self.dsn)
        conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        consumer = self._consumer()
        try:
            if not await self._lock(conn):
                raise ProjectionError(
                    f"the projector {self.name!r} is running on this schema: stop it "
                    "before rebuilding (it resumes from the rebuilt offsets)"
                )
            parts = await self._partitions(None)
            await self._start_specs()
            async with conn.transaction():
                await conn.execute("TRUNCATE runs, steps, run_events")
                await conn.execute(
                    "DELETE FROM projector_offsets WHERE projector = %s AND topic = %s",
                    (self.name, self.topic),
                )
            self._cache.clear()
            await consumer.start()
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            begin = await consumer.beginning_offsets(parts)
            end = await consumer.end_offsets(parts)
            total = sum(end[tp] - begin[tp] for tp in parts)
            self._next = {tp.partition: 0 for tp in parts}
            while True:
                positions = {tp: await consumer.position(tp) for tp in parts}
                remaining = [tp for tp in parts if positions[tp] < end[tp]]
                if progress is not None:
                    progress(sum(min(positions[tp], end[tp]) - begin[tp] for tp in parts), total)
                if not remaining:
                    break
                fetched = await consumer.getmany(*remaining, timeout_ms=500, max_records=self.batch)
                if fetched:
                    await self._project(conn, fetched)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()
            await _close_quietly(conn)
            await self._stop_specs()
            self.stats.seconds = time.monotonic() - started
        return self.stats

    # ------------------------------------------------------------------ setup

    def _consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 << 20,
        )

    async def _start_specs(self) -> None:
        if self._specs is None and self._follower is None:
            self._follower = SpecFollower(self.bootstrap, self.topics)
            await self._follower.start()
            self.book = PolicyBook(self._follower.registry)

    async def _stop_specs(self) -> None:
        if self._follower is not None:
            with contextlib.suppress(Exception):
                await self._follower.stop()
            self._follower = None

    async def _partitions(self, stop: asyncio.Event | None) -> list[TopicPartition]:
        waited = False
        while True:
            numbers = await topic_partitions(self.bootstrap, self.topic)
            if numbers:
                return [TopicPartition(self.topic, p) for p in numbers]
            if stop is None:
                raise ProjectionError(
                    f"topic {self.topic} does not exist: check "
                    "--topic-prefix, or start the engine first"
                )
            if not waited:
                log.warning("waiting for topic %s to exist", self.topic)
                waited = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if stop.is_set():
                return []

    async def _lock(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        cur = await conn.execute(
            "SELECT pg_try_advisory_lock(hashtext(current_schema() || ':terranoha-projector:' "
            "|| %s))",
            (self.name,),
        )
        row = await cur.fetchone()
        return bool(row and row[0])

    async def _open(self, stop: asyncio.Event) -> psycopg.AsyncConnection[Any] | None:
        """Connect, migrate and take the projector lock, retrying with backoff until it
        works or ``stop`` is set."""
        delay, told = 0.1, False
        while not stop.is_set():
            conn = None
            try:
                await asyncio.to_thread(migrate, self.dsn)
                conn = await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, connect_timeout=5
                )
                if await self._lock(conn):
                    return conn
                if not told:
                    log.warning("another projector named %r holds this schema; waiting", self.name)
                    told = True
            except DB_ERRORS as exc:
                log.warning("PostgreSQL unavailable (%s); retrying in %.1fs", exc, delay)
            await _close_quietly(conn)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, self.retry_max_s)
        return None

    async def _seek(
        self,
        conn: psycopg.AsyncConnection[Any],
        consumer: AIOKafkaConsumer,
        parts: list[TopicPartition],
    ) -> None:
        cur = await conn.execute(
            'SELECT "partition", "offset" FROM projector_offsets '
            "WHERE projector = %s AND topic = %s",
            (self.name, self.topic),
        )
        stored = {int(p): int(o) for p, o in await cur.fetchall()}
        for tp in parts:
            offset = stored.get(tp.partition)
            if offset is None:
                await consumer.seek_to_beginning(tp)
                self._next[tp.partition] = 0
            else:
                consumer.seek(tp, offset + 1)
                self._next[tp.partition] = offset + 1

    # ------------------------------------------------------------------ batches

    def _decode(self, value: bytes | None) -> Event | None:
        if value is None:
            return None
        try:
            record = decode(value)
        except DecodeError as exc:
            self.stats.undecodable += 1
            log.warning("a record of %s does not decode (%s); not projected", self.topic, exc)
            return None
        return record if isinstance(record, Event) else None

    async def _project(
        self, conn: psycopg.AsyncConnection[Any], fetched: Mapping[TopicPartition, Sequence[Any]]
    ) -> None:
        items: list[Located] = []
        for tp, messages in fetched.items():
            floor = self._next.get(tp.partition, 0)
            for message in messages:
                if message.offset >= floor:  # below: stored already (a fetch raced a seek)
                    items.append((self._decode(message.value), tp.partition, message.offset))
        if not items:
            return
        events = [e for e, _, _ in items if e is not None]
        if self._follower is not None and self.book.missing(events):
            await self._follower.catch_up()
        await self._load(conn, events)
        batch = project_batch(self._cache, items, self.book)
        await self._store(conn, batch)
        for partition, offset in batch.offsets.items():
            self._next[partition] = offset + 1
        self._adopt(batch.touched)
        self.stats.batches += 1
        self.stats.records += len(items)
        self.stats.events += len(batch.events)
        self.stats.skipped += batch.skipped
        self.stats.runs_written += len(batch.touched)

    async def _load(self, conn: psycopg.AsyncConnection[Any], events: list[Event]) -> None:
        """Read the stored timelines of the runs of ``events`` not in memory (a run
        whose first event here is its first event ever has none)."""
        first: dict[str, int] = {}
        for event in events:
            first.setdefault(event.run_id, event.seq)
        wanted = [run_id for run_id, seq in first.items() if seq > 1 and run_id not in self._cache]
        if not wanted:
            return
        cur = await conn.execute("SELECT run_id, state FROM runs WHERE run_id = ANY(%s)", (wanted,))
        for run_id, state in await cur.fetchall():
            self._cache[run_id] = timeline_from_dict(state)

    async def _store(self, conn: psycopg.AsyncConnection[Any], batch: ProjectedBatch) -> None:
        runs = [run_row(t) for t in batch.touched.values()]
        steps = [
            row
            for run_id, t in batch.touched.items()
            for row in self._changed_steps(self._cache.get(run_id), t)
        ]
        parts = sorted(batch.offsets)
        async with conn.transaction(), conn.cursor() as cur:
            if runs:
                await cur.execute(_RUNS_UPSERT, _columns(RUN_COLUMNS, runs))
            if steps:
                await cur.execute(_STEPS_UPSERT, _columns(STEP_COLUMNS, steps))
            if batch.events:
                await cur.execute(
                    _EVENTS_INSERT, _columns(EVENT_COLUMNS, (e.as_dict() for e in batch.events))
                )
            await cur.execute(
                OFFSETS_UPSERT, (self.name, self.topic, parts, [batch.offsets[p] for p in parts])
            )

    @staticmethod
    def _changed_steps(before: Timeline | None, after: Timeline) -> list[dict[str, Any]]:
        rows = step_rows(after)
        if before is None:
            return rows
        old = step_rows(before)
        return [row for row in rows if row["idx"] >= len(old) or old[row["idx"]] != row]

    def _adopt(self, touched: dict[str, Timeline]) -> None:
        cache = self._cache
        for run_id, timeline in touched.items():
            cache[run_id] = timeline
            cache.move_to_end(run_id)
        while len(cache) > self.cache_runs:
            cache.popitem(last=False)


async def run_projector(
    bootstrap: str,
    topics: Topics,
    dsn: str,
    stop: asyncio.Event,
    name: str = "postgres",
    batch: int = 2000,
    *,
    specs: SpecRegistry | None = None,
    ready: Callable[[], Awaitable[None]] | None = None,
) -> ProjectorStats:
    """Project ``topics.events`` into ``dsn`` until ``stop`` is set (see the module doc).
    Survives PostgreSQL restarts; a Kafka error that is not retriable ends it (run it
    again: it resumes from the stored offsets)."""
    projector = PostgresProjector(bootstrap, topics, dsn, name=name, batch=batch, specs=specs)
    return await projector.run(stop, ready)


async def rebuild(
    bootstrap: str,
    topics: Topics,
    dsn: str,
    *,
    name: str = "postgres",
    progress: Progress | None = None,
    batch: int = 5000,
    specs: SpecRegistry | None = None,
) -> ProjectorStats:
    """Drop the projection rows and offsets and project the events topic again from
    offset 0; ``progress(done, total)`` is called after each batch (records)."""
    projector = PostgresProjector(bootstrap, topics, dsn, name=name, batch=batch, specs=specs)
    return await projector.rebuild(progress)


# --------------------------------------------------------------------------- command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m projections.postgres",
        description="Project the run events topic into PostgreSQL until stopped (SIGTERM/SIGINT).",
    )
    parser.add_argument("--kafka", required=True, metavar="HOST:PORT")
    parser.add_argument("--postgres", required=True, metavar="DSN")
    parser.add_argument("--topic-prefix", default="terranoha")
    parser.add_argument("--schema", help="PostgreSQL schema for the tables (created)")
    parser.add_argument("--name", default="postgres", help="projector name (its offsets)")
    parser.add_argument("--batch", type=int, default=2000, help="records per transaction")
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="drop the projection and project the topic again, then exit",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    dsn = create_schema(args.postgres, args.schema) if args.schema else args.postgres
    topics = Topics(prefix=args.topic_prefix)
    if args.rebuild:

        def show(done: int, total: int) -> None:
            print(f"rebuild {done}/{total}", flush=True)

        stats = asyncio.run(
            rebuild(args.kafka, topics, dsn, name=args.name, progress=show, batch=args.batch)
        )
        print(
            f"rebuilt: {stats.events} events in {stats.seconds:.1f}s "
            f"({stats.events_per_s:.0f} events/s)",
            flush=True,
        )
        return 0
    return asyncio.run(_serve(args.kafka, topics, dsn, args.name, args.batch))


async def _serve(bootstrap: str, topics: Topics, dsn: str, name: str, batch: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def ready() -> None:
        print(f"projecting {topics.events} into PostgreSQL (projector {name})", flush=True)

    stats = await run_projector(bootstrap, topics, dsn, stop, name, batch, ready=ready)
    print(
        f"stopped: {stats.events} events in {stats.batches} batches, {stats.reconnects} reconnects",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
