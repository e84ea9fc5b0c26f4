"""A run events topic written by the tests: scripted runs published the way the engine
publishes them (transactions, keyed by run id, a recorded command beside the events),
with every record's position remembered; and PostgreSQL chores (schemas, a restart)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from engine.codec import encode
from engine.core import commands as cmd
from engine.core import events as ev
from engine.core.records import RecordedCommand
from engine.kafka.specs import publish_spec
from engine.kafka.topics import Topics, ensure_topics
from projections._kafka import topic_partitions
from projections.postgres import create_schema, stored_offsets
from projections.project import EVENT_COLUMNS, RUN_COLUMNS, json_text, project_run, run_row
from tests.projections.scenarios import BOOK, CLAIMS

ROOT = Path(__file__).resolve().parents[2]


class EventLog:
    """A unique-prefix events topic and what was committed to it."""

    def __init__(self, bootstrap: str, partitions: int = 3) -> None:
        self.bootstrap = bootstrap
        self.topics = Topics(prefix=f"p{uuid.uuid4().hex[:10]}", partitions=partitions)
        self.runs: dict[str, list[ev.Event]] = defaultdict(list)
        self.positions: dict[tuple[str, int], tuple[int, int]] = {}
        self.last: dict[int, int] = {}
        self.records = 0

    async def setup(self) -> None:
        await ensure_topics(self.bootstrap, self.topics.core_topics())
        await publish_spec(self.bootstrap, self.topics, CLAIMS)

    async def delete(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            names = [n for n in await admin.list_topics() if n.startswith(f"{self.topics.prefix}.")]
            if names:
                await admin.delete_topics(names)
        finally:
            await admin.close()

    async def publish(
        self,
        runs: dict[str, list[ev.Event]],
        per_txn: int = 50,
        pause_s: float = 0.0,
        seed: int = 1,
    ) -> None:
        """Interleave the runs' events (each run in order), in transactions of about
        ``per_txn`` records; a recorded command follows each run's first event."""
        rng = random.Random(seed)
        queues = {run_id: list(events) for run_id, events in runs.items()}
        order: list[ev.Event] = []
        while queues:
            run_id = rng.choice(sorted(queues)[:8])
            order.append(queues[run_id].pop(0))
            if not queues[run_id]:
                del queues[run_id]
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=True,
            transactional_id=f"{self.topics.prefix}-writer",
        )
        await producer.start()
        try:
            for start in range(0, len(order), per_txn):
                sent: list[tuple[ev.Event | None, Any]] = []
                async with producer.transaction():
                    for event in order[start : start + per_txn]:
                        sent.append((event, await self._send(producer, event)))
                        if event.seq == 1:
                            sent.append((None, await self._send(producer, _recorded(event))))
                for event, future in sent:
                    meta = await future
                    self.last[meta.partition] = max(self.last.get(meta.partition, -1), meta.offset)
                    self.records += 1
                    if event is not None:
                        self.runs[event.run_id].append(event)
                        self.positions[(event.run_id, event.seq)] = (meta.partition, meta.offset)
                if pause_s:
                    await asyncio.sleep(pause_s)
        finally:
            await producer.stop()

    async def publish_aborted(self, events: Iterable[ev.Event]) -> None:
        """Events in a transaction that aborts: read_committed readers never see them."""
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            transactional_id=f"{self.topics.prefix}-aborter",
        )
        await producer.start()
        try:
            await producer.begin_transaction()
            for event in events:
                await self._send(producer, event)
            await producer.flush()
            await producer.abort_transaction()
        finally:
            await producer.stop()

    async def _send(self, producer: AIOKafkaProducer, record: Any) -> Any:
        return await producer.send(
            self.topics.events,
            encode(record),
            key=record.run_id.encode(),
            partition=self.topics.partition_of(record.run_id),
        )

    def caught_up(self, dsn: str, name: str = "postgres") -> bool:
        stored = stored_offsets(dsn, self.topics.events, name)
        return all(stored.get(p, -1) >= offset for p, offset in self.last.items())

    async def group_caught_up(self, group: str) -> bool:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=group, enable_auto_commit=False
        )
        await consumer.start()
        try:
            for partition, offset in self.last.items():
                committed = await consumer.committed(TopicPartition(self.topics.events, partition))
                if committed is None or committed <= offset:
                    return False
            return True
        finally:
            await consumer.stop()

    def expected_rows(self) -> tuple[dict[str, dict[str, Any]], set[tuple[Any, ...]]]:
        """The runs rows (as PostgreSQL returns them) and event index rows of a fresh
        fold of what was committed."""
        runs = {}
        for run_id, events in self.runs.items():
            row = run_row(project_run(events, BOOK))
            runs[run_id] = {c.name: _as_stored(c.kind, row[c.name]) for c in RUN_COLUMNS}
        index = {
            (e.run_id, e.seq, e.TYPE, e.ts, *self.positions[(e.run_id, e.seq)])
            for events in self.runs.values()
            for e in events
        }
        return runs, index


async def last_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The offset of the last committed record of each partition of ``topic``."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    last: dict[int, int] = {}
    try:
        parts = [TopicPartition(topic, p) for p in await topic_partitions(bootstrap, topic)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        while [tp for tp in parts if await consumer.position(tp) < end[tp]]:
            for tp, messages in (await consumer.getmany(timeout_ms=500)).items():
                if messages:
                    last[tp.partition] = messages[-1].offset
    finally:
        await consumer.stop()
    return last


def _as_stored(kind: str, value: Any) -> Any:
    if kind == "json":
        text = json_text(value)
        return None if text is None else json.loads(text)
    return value


def _recorded(event: ev.Event) -> RecordedCommand:
    command = cmd.CancelRun(
        command_id=f"{event.run_id}/c1", run_id=event.run_id, reason="recorded", by="test"
    )
    return RecordedCommand(
        run_id=event.run_id, command=command, now=event.ts, first_seq=event.seq, last_seq=event.seq
    )


def stored_runs(dsn: str) -> dict[str, dict[str, Any]]:
    names = [c.name for c in RUN_COLUMNS]
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f"SELECT {', '.join(names)} FROM runs").fetchall()
    return {row[0]: dict(zip(names, row, strict=True)) for row in rows}


def stored_index(dsn: str) -> list[tuple[Any, ...]]:
    names = ", ".join(f'"{c.name}"' for c in EVENT_COLUMNS)
    with psycopg.connect(dsn) as conn:
        return [tuple(r) for r in conn.execute(f"SELECT {names} FROM run_events").fetchall()]


def new_schema(dsn: str) -> tuple[str, str]:
    """A fresh schema: (its name, a DSN whose search_path is it)."""
    name = f"p_{uuid.uuid4().hex[:12]}"
    return name, create_schema(dsn, name)


def drop_schema(dsn: str, name: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


async def wait_until(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


# --------------------------------------------------------------------------- PostgreSQL

PG_DIR = Path(os.environ.get("TERRANOHA_LOCAL_DIR") or ROOT / ".local") / "pg"
"""Where ``deploy/local/infra.sh`` keeps the local server (its PG_DIR)."""


def _pg_ctl(*args: str) -> subprocess.CompletedProcess[bytes]:
    data = PG_DIR / "data"
    version = (data / "PG_VERSION").read_text().strip()
    pg_ctl = f"/usr/lib/postgresql/{version}/bin/pg_ctl"
    command = [pg_ctl, "-D", str(data), *args]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    return subprocess.run(command, cwd=PG_DIR, capture_output=True, timeout=120, check=False)


def restart_postgres() -> None:
    """Restart the local PostgreSQL server (fast shutdown: sessions are cut)."""
    if not (PG_DIR / "data").is_dir():
        pytest.fail(
            f"this test restarts the PostgreSQL of deploy/local/infra.sh, and there "
            f"is none in {PG_DIR}: run `bash deploy/local/infra.sh up`",
            pytrace=False,
        )
    done = _pg_ctl(
        "-l", str(PG_DIR / "log" / "postgresql.log"), "restart", "-m", "fast", "-w", "-t", "60"
    )
    assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()


def ensure_postgres(dsn: str, timeout_s: float = 60.0) -> None:
    """PostgreSQL answers at ``dsn``, starting it with the infra script if needed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(psycopg.OperationalError):
            with psycopg.connect(dsn, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            return
        time.sleep(0.5)
    subprocess.run(
        ["bash", str(ROOT / "deploy" / "local" / "infra.sh"), "up"], check=True, timeout=300
    )
