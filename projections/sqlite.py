"""The same projections in the embedded store's SQLite file.

``runs``, ``steps`` and ``run_events`` have the columns of their PostgreSQL namesakes
(JSON as text, booleans as 0/1) and are filled by the same pure functions. The
projector catches up from the store's ``events`` table by its global position ``pos``
(``run_events.offset`` is that position, ``partition`` is 0); each batch and its
position go in one SQLite transaction, so a crash loses nothing and doubles nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from engine.codec import DecodeError, decode
from engine.core.events import Event
from engine.embedded.store import Store
from engine.runtime.redaction import PolicyBook
from engine.runtime.specs import SpecRegistry
from projections.project import (
    EVENT_COLUMNS,
    EVENT_KEY,
    RUN_COLUMNS,
    RUN_KEY,
    STEP_COLUMNS,
    STEP_KEY,
    Column,
    Located,
    ProjectorStats,
    db_rows,
    project_batch,
    run_row,
    step_rows,
)
from projections.records import SlaMetrics
from projections.sla import sla_aggregates
from projections.timeline import Timeline, timeline_from_dict

TOPIC = "events"
Progress = Callable[[int, int], None]

_TYPES = {"text": "TEXT", "int": "INTEGER", "float": "REAL", "bool": "INTEGER", "json": "TEXT"}
_NULLABLE_JSON = {"error", "input", "output", "decisions", "errors", "payload", "signal", "result"}
_NULLABLE = {
    "ended_at",
    "duration_ms",
    "sla_due_at",
    "approval_since",
    "approval_due_at",
    *_NULLABLE_JSON,
}


def _q(name: str) -> str:
    return f'"{name}"'


def _table(name: str, columns: tuple[Column, ...], key: tuple[str, ...]) -> str:
    cols = ",\n    ".join(
        f"{_q(c.name)} {_TYPES[c.kind]}{'' if c.name in _NULLABLE else ' NOT NULL'}"
        for c in columns
    )
    return (
        f"CREATE TABLE {name} (\n    {cols},\n    PRIMARY KEY ({', '.join(_q(k) for k in key)})\n);"
    )


MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "projection tables",
        "\n".join(
            [
                _table("runs", RUN_COLUMNS, RUN_KEY),
                "CREATE INDEX runs_by_start ON runs (workflow, tenant, started_at);",
                "CREATE INDEX runs_by_status ON runs (status, updated_at);",
                _table("steps", STEP_COLUMNS, STEP_KEY),
                _table("run_events", EVENT_COLUMNS, EVENT_KEY),
                "CREATE TABLE projector_offsets (projector TEXT NOT NULL, topic TEXT NOT NULL, "
                '"partition" INTEGER NOT NULL, "offset" INTEGER NOT NULL, '
                "updated_at INTEGER NOT NULL, "
                'PRIMARY KEY (projector, topic, "partition"));',
            ]
        ),
    ),
)
"""Append-only, like PostgreSQL's. The DDL is written from the column lists once, at
version 1; a later column change is a new migration."""


def _upsert(
    table: str, columns: tuple[Column, ...], key: tuple[str, ...], update: bool = True
) -> str:
    names = ", ".join(_q(c.name) for c in columns)
    marks = ", ".join("?" for _ in columns)
    head = (
        f"INSERT INTO {table} ({names}) VALUES ({marks}) "
        f"ON CONFLICT ({', '.join(_q(k) for k in key)}) "
    )
    if not update:
        return head + "DO NOTHING"
    sets = ", ".join(f"{_q(c.name)} = excluded.{_q(c.name)}" for c in columns if c.name not in key)
    return head + f"DO UPDATE SET {sets}"


_RUNS_UPSERT = _upsert("runs", RUN_COLUMNS, RUN_KEY)
_STEPS_UPSERT = _upsert("steps", STEP_COLUMNS, STEP_KEY)
_EVENTS_INSERT = _upsert("run_events", EVENT_COLUMNS, EVENT_KEY, update=False)


def migrate(store: Store) -> list[int]:
    """Apply the projection migrations missing from the store file."""
    applied = []
    with store.transaction() as db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS projection_migrations (version INTEGER "
            "PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
        )
        done = {v for (v,) in db.execute("SELECT version FROM projection_migrations")}
        for version, name, body in MIGRATIONS:
            if version in done:
                continue
            for statement in body.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(
                "INSERT INTO projection_migrations VALUES (?, ?, ?)",
                (version, name, time.time_ns() // 1_000_000),
            )
            applied.append(version)
    return applied


class StoreProjector:
    """Projects one store file's events into its projection tables."""

    def __init__(
        self,
        path: str | Path,
        *,
        name: str = "sqlite",
        batch: int = 2000,
        specs: SpecRegistry | None = None,
        cache_runs: int = 50_000,
    ) -> None:
        self.store = Store(path)
        self.name = name
        self.batch = batch
        self.cache_runs = cache_runs
        self.book = PolicyBook(
            specs
            if specs is not None
            else SpecRegistry(self.store.specs(), loader=self.store.specs)
        )
        self.stats = ProjectorStats()
        self._cache: OrderedDict[str, Timeline] = OrderedDict()
        self._pos: int | None = None
        migrate(self.store)

    def close(self) -> None:
        self.store.close()

    def position(self) -> int:
        row = self.store.db.execute(
            'SELECT "offset" FROM projector_offsets WHERE projector = ? AND topic = ?',
            (self.name, TOPIC),
        ).fetchone()
        return int(row[0]) if row else 0

    def catch_up(self, progress: Progress | None = None) -> int:
        """Project every event stored so far; return how many were projected."""
        started = time.monotonic()
        projected = 0
        last = int(self.store.db.execute("SELECT COALESCE(MAX(pos), 0) FROM events").fetchone()[0])
        first = self.position()
        while True:
            done, count = self._step()
            projected += count
            if progress is not None:
                progress(min(self._pos or 0, last) - first, last - first)
            if done:
                break
        self.stats.seconds += time.monotonic() - started
        return projected

    def rebuild(self, progress: Progress | None = None) -> int:
        """Delete the projection rows and this projector's position, then catch up."""
        with self.store.transaction() as db:
            for table in ("runs", "steps", "run_events"):
                db.execute(f"DELETE FROM {table}")
            db.execute("DELETE FROM projector_offsets WHERE projector = ?", (self.name,))
        self._cache.clear()
        self._pos = None
        return self.catch_up(progress)

    def _step(self) -> tuple[bool, int]:
        """One batch in one transaction; (nothing left, events projected)."""
        with self.store.transaction() as db:
            pos = self.position()
            if pos != self._pos:  # someone else projected meanwhile: trust the file
                self._cache.clear()
            rows = db.execute(
                "SELECT pos, payload FROM events WHERE pos > ? ORDER BY pos LIMIT ?",
                (pos, self.batch),
            ).fetchall()
            if not rows:
                self._pos = pos
                return True, 0
            items: list[Located] = [(self._decode(payload), 0, p) for p, payload in rows]
            self._load(db, [e for e, _, _ in items if e is not None])
            batch = project_batch(self._cache, items, self.book)
            db.executemany(
                _RUNS_UPSERT, db_rows(RUN_COLUMNS, (run_row(t) for t in batch.touched.values()))
            )
            db.executemany(
                _STEPS_UPSERT,
                db_rows(
                    STEP_COLUMNS, (row for t in batch.touched.values() for row in step_rows(t))
                ),
            )
            db.executemany(
                _EVENTS_INSERT, db_rows(EVENT_COLUMNS, (e.as_dict() for e in batch.events))
            )
            last = rows[-1][0]
            db.execute(
                'INSERT INTO projector_offsets (projector, topic, "partition", "offset",'
                " updated_at) VALUES (?, ?, 0, ?, ?) ON CONFLICT (projector, topic, "
                '"partition") DO UPDATE SET "offset" = excluded."offset", '
                "updated_at = excluded.updated_at",
                (self.name, TOPIC, last, time.time_ns() // 1_000_000),
            )
        self._pos = last
        for run_id, timeline in batch.touched.items():
            self._cache[run_id] = timeline
            self._cache.move_to_end(run_id)
        while len(self._cache) > self.cache_runs:
            self._cache.popitem(last=False)
        self.stats.batches += 1
        self.stats.records += len(rows)
        self.stats.events += len(batch.events)
        self.stats.skipped += batch.skipped
        return len(rows) < self.batch, len(batch.events)

    def _decode(self, payload: bytes) -> Event | None:
        try:
            record = decode(payload)
        except DecodeError:
            self.stats.undecodable += 1
            return None
        return record if isinstance(record, Event) else None

    def _load(self, db: Any, events: list[Event]) -> None:
        wanted = list({e.run_id for e in events if e.run_id not in self._cache})
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" for _ in chunk)
            for run_id, state in db.execute(
                f"SELECT run_id, state FROM runs WHERE run_id IN ({marks})", chunk
            ):
                self._cache[run_id] = timeline_from_dict(json.loads(state))


def project_store(
    store_path: str | Path, *, batch: int = 2000, progress: Progress | None = None
) -> int:
    """Bring the projections of an embedded store up to date; return the events
    projected. Safe to call from several processes (each batch re-reads the position)."""
    projector = StoreProjector(store_path, batch=batch)
    try:
        return projector.catch_up(progress)
    finally:
        projector.close()


def rebuild_store(store_path: str | Path, progress: Progress | None = None) -> int:
    """Drop and rebuild the projections of an embedded store; return the events."""
    projector = StoreProjector(store_path)
    try:
        return projector.rebuild(progress)
    finally:
        projector.close()


async def follow_store(store_path: str | Path, stop: asyncio.Event, poll_ms: int = 200) -> None:
    """Keep the projections of a store up to date until ``stop`` is set."""
    projector = StoreProjector(store_path)
    try:
        while not stop.is_set():
            projector.catch_up()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_ms / 1000)
    finally:
        projector.close()


# --------------------------------------------------------------------------- queries


def _runs(store: Store, where: str = "", params: Iterable[Any] = ()) -> list[dict[str, Any]]:
    migrate(store)
    names = [c.name for c in RUN_COLUMNS if c.name != "state"]
    rows = store.db.execute(
        f"SELECT {', '.join(_q(n) for n in names)} FROM runs {where}", tuple(params)
    ).fetchall()
    return [dict(zip(names, row, strict=True)) for row in rows]


def timeline_from_store(store_path: str | Path, run_id: str) -> Timeline | None:
    """The projected (redacted) timeline of a run, by id or unambiguous id prefix."""
    store = Store(store_path)
    try:
        migrate(store)
        row = store.db.execute("SELECT state FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            rows = store.db.execute(
                "SELECT state FROM runs WHERE substr(run_id, 1, ?) = ? LIMIT 2",
                (len(run_id), run_id),
            ).fetchall()
            row = rows[0] if len(rows) == 1 else None
        return timeline_from_dict(json.loads(row[0])) if row is not None else None
    finally:
        store.close()


def sla_from_store(
    store_path: str | Path,
    workflow: str | None = None,
    tenant: str | None = None,
    window: str = "1h",
    now_ms: int | None = None,
) -> list[SlaMetrics]:
    """SLA figures per (workflow, tenant, bucket of ``window``) from the store's runs."""
    store = Store(store_path)
    try:
        runs = _runs(store)
    finally:
        store.close()
    now = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    return sla_aggregates(runs, window, now_ms=now, workflow=workflow, tenant=tenant)


def checksum_store(store_path: str | Path) -> str:
    """An order-independent digest of the projection rows, like ``postgres.checksum``."""
    store = Store(store_path)
    try:
        migrate(store)
        digest = hashlib.sha256()
        for table in ("runs", "steps", "run_events"):
            hashes = sorted(
                hashlib.md5(repr(row).encode()).hexdigest()
                for row in store.db.execute(f"SELECT * FROM {table}")
            )
            digest.update(f"{table}:{len(hashes)}:{''.join(hashes)};".encode())
        return digest.hexdigest()
    finally:
        store.close()


def run_rows(store_path: str | Path) -> list[Mapping[str, Any]]:
    """Every ``runs`` row of the store (without the fold state)."""
    store = Store(store_path)
    try:
        return list(_runs(store))
    finally:
        store.close()
