"""The embedded backend's storage: one SQLite file plays every Kafka topic.

| table          | plays                                                  |
|----------------|--------------------------------------------------------|
| inputs         | the run inputs topic (commands, triggers, timer firings)|
| events         | the run events topic (the immutable run log)           |
| commands       | recorded commands, next to the events they produced,   |
|                | with the position of the input each was read from      |
| states         | the run state changelog (latest snapshot per run)      |
| tasks          | the task topics, one queue column per worker queue      |
| notifications  | the notifications topic                                |
| dead_letters   | the dead-letter topic                                  |
| offsets        | committed consumer positions (the processor's, the notifier's) |
| specs          | the compacted specs topic                              |
| ledger         | the workers' idempotency ledger                        |
| notify_deliveries | the notifier's delivery ledger (made by ``engine.notify``) |
| correlations   | the message-correlation state changelog (per correlation key) |
| message_events | the message-events topic (published, correlated, expired)   |
| schedule_inputs | the schedules' inputs topic (schedule commands, ticks, run ends) |
| schedule_events | the schedules' events topic                            |
| schedule_states | the schedules' state changelog                         |

Every record is stored as the same Avro bytes the Kafka backend sends. A processed
batch (events, commands, states, tasks, notifications, dead letters, the message
correlation it caused and the input position) is written in one SQLite transaction:
after a crash, either all of it is there or none of it is, and processing resumes from
the stored position.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine.codec import decode, encode
from engine.core.commands import Command
from engine.core.correlation import (
    CORRELATION_EVENTS,
    CorrelationEvent,
    CorrelationState,
    ExpireMessages,
    PublishMessage,
    is_empty,
    timer,
)
from engine.core.errors import TerranohaError
from engine.core.events import Event
from engine.core.outbox import TaskCommand
from engine.core.records import DeadLetter, RecordedCommand, Trigger
from engine.core.spec import WorkflowSpec, load_deployed_spec, spec_to_data
from engine.core.state import RunState
from engine.runtime.correlator import CorrelationBatch
from engine.runtime.processor import Batch, Input
from engine.runtime.schedule_reports import schedule_reports
from engine.worker.sdk import LedgerEntry

INPUTS = "inputs"
PROCESSOR = "processor"

SCHEMA = """
CREATE TABLE IF NOT EXISTS inputs (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL DEFAULT '',
    payload BLOB NOT NULL,
    enqueued_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    ts INTEGER NOT NULL,
    payload BLOB NOT NULL,
    UNIQUE (run_id, seq)
);
CREATE TABLE IF NOT EXISTS commands (
    input_pos INTEGER NOT NULL,
    run_id TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (run_id, first_seq)
);
CREATE TABLE IF NOT EXISTS states (
    run_id TEXT PRIMARY KEY,
    workflow TEXT NOT NULL,
    version INTEGER NOT NULL,
    status TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS states_status ON states (status);
CREATE TABLE IF NOT EXISTS tasks (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    task_id TEXT NOT NULL UNIQUE,
    payload BLOB NOT NULL,
    lease_until INTEGER NOT NULL DEFAULT 0,
    deliveries INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tasks_ready ON tasks (queue, done, lease_until);
CREATE TABLE IF NOT EXISTS notifications (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    reason TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS offsets (
    consumer TEXT PRIMARY KEY,
    pos INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS specs (
    workflow TEXT NOT NULL,
    version INTEGER NOT NULL,
    body TEXT NOT NULL,
    deployed_at INTEGER NOT NULL,
    PRIMARY KEY (workflow, version)
);
CREATE TABLE IF NOT EXISTS correlations (
    key TEXT PRIMARY KEY,
    due_at INTEGER,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS correlations_due ON correlations (due_at);
CREATE TABLE IF NOT EXISTS message_events (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,
    ts INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS schedule_inputs (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    schedule_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    enqueued_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS schedule_events (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    schedule_id TEXT NOT NULL,
    type TEXT NOT NULL,
    at INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS schedule_events_by_id ON schedule_events (schedule_id, pos);
CREATE TABLE IF NOT EXISTS schedule_states (
    schedule_id TEXT PRIMARY KEY,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    idempotency_key TEXT PRIMARY KEY,
    result TEXT NOT NULL,
    cost REAL NOT NULL,
    confidence REAL,
    recorded_at INTEGER NOT NULL
);
"""


class StoreError(TerranohaError):
    pass


class SpecConflictError(StoreError):
    """A different spec is already deployed under the same (workflow, version)."""


class Store:
    """A connection to one embedded store file. One per thread/process."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.db = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=30000")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; rolled back on any exception."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------------ inputs

    def append_inputs(
        self, records: Iterable[Command | Trigger | PublishMessage], now: int
    ) -> list[int]:
        rows = [(getattr(r, "run_id", ""), encode(r), now) for r in records]
        return self.append_raw_inputs(rows)

    def append_raw_inputs(self, rows: list[tuple[str, bytes, int]]) -> list[int]:
        positions = []
        with self.transaction() as db:
            for row in rows:
                cur = db.execute(
                    "INSERT INTO inputs (run_id, payload, enqueued_at) VALUES (?, ?, ?)", row
                )
                positions.append(int(cur.lastrowid or 0))
        return positions

    def read_inputs(self, after: int, limit: int) -> list[Input]:
        rows = self.db.execute(
            "SELECT pos, payload FROM inputs WHERE pos > ? ORDER BY pos LIMIT ?", (after, limit)
        ).fetchall()
        return [Input(INPUTS, 0, pos, payload) for pos, payload in rows]

    def last_input(self) -> int:
        row = self.db.execute("SELECT COALESCE(MAX(pos), 0) FROM inputs").fetchone()
        return int(row[0])

    def offset(self, consumer: str = PROCESSOR) -> int:
        row = self.db.execute("SELECT pos FROM offsets WHERE consumer = ?", (consumer,)).fetchone()
        return int(row[0]) if row else 0

    # ------------------------------------------------------------------ batches

    def write_batch(
        self,
        batch: Batch,
        consumer: str = PROCESSOR,
        correlation: CorrelationBatch | None = None,
        also: Callable[[sqlite3.Connection], object] | None = None,
        now: int = 0,
    ) -> None:
        """Everything a batch produced, the correlation it caused, and the input position,
        in one transaction; ``also`` writes more in it (the admission core's decisions)."""
        with self.transaction() as db:
            if correlation is not None:
                self._write_correlation(db, correlation)
            if also is not None:
                also(db)
            db.executemany(
                "INSERT INTO events (run_id, seq, type, ts, payload) VALUES (?, ?, ?, ?, ?)",
                [(e.run_id, e.seq, e.TYPE, e.ts, encode(e)) for e in batch.events],
            )
            db.executemany(
                "INSERT INTO commands (input_pos, run_id, first_seq, last_seq, payload) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (pos, r.run_id, r.first_seq, r.last_seq, encode(r))
                    for r, pos in zip(batch.recorded, batch.recorded_offsets, strict=True)
                ],
            )
            db.executemany(
                "INSERT OR REPLACE INTO states (run_id, workflow, version, status, updated_at,"
                " payload) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        s.run_id,
                        s.workflow,
                        s.version,
                        s.status.value,
                        s.ended_at or s.started_at,
                        encode(s),
                    )
                    for s in batch.states.values()
                ],
            )
            db.executemany(
                "INSERT OR IGNORE INTO tasks (queue, task_id, payload) VALUES (?, ?, ?)",
                [(t.queue, t.task_id, encode(t)) for t in batch.tasks],
            )
            db.executemany(
                "INSERT INTO notifications (payload) VALUES (?)",
                [(encode(n),) for n in batch.notifications],
            )
            db.executemany(
                "INSERT INTO dead_letters (reason, payload) VALUES (?, ?)",
                [(d.reason, encode(d)) for d in batch.dead_letters],
            )
            # Runs started by a schedule tell it when they end (its overlap policy).
            db.executemany(
                "INSERT INTO schedule_inputs (schedule_id, payload, enqueued_at) VALUES (?, ?, ?)",
                [(r.schedule_id, encode(r), now) for r in schedule_reports(batch)],
            )
            if batch.last is not None:
                db.execute(
                    "INSERT INTO offsets (consumer, pos) VALUES (?, ?) "
                    "ON CONFLICT (consumer) DO UPDATE SET pos = excluded.pos",
                    (consumer, batch.last.offset),
                )

    @staticmethod
    def _write_correlation(db: sqlite3.Connection, correlation: CorrelationBatch) -> None:
        for key, state in correlation.states.items():
            if is_empty(state):
                db.execute("DELETE FROM correlations WHERE key = ?", (key,))
                continue
            armed = timer(state)
            db.execute(
                "INSERT OR REPLACE INTO correlations (key, due_at, payload) VALUES (?, ?, ?)",
                (key, armed[0] if armed else None, encode(state)),
            )
        db.executemany(
            "INSERT INTO message_events (type, ts, payload) VALUES (?, ?, ?)",
            [(e.TYPE, e.ts, encode(e)) for e in correlation.events],
        )
        db.executemany(
            "INSERT INTO inputs (run_id, payload, enqueued_at) VALUES (?, ?, ?)",
            [(d.run_id, encode(d), correlation.now) for d in correlation.deliveries],
        )

    def correlation_state(self, key: str) -> CorrelationState | None:
        row = self.db.execute("SELECT payload FROM correlations WHERE key = ?", (key,)).fetchone()
        return self._decode(row[0], CorrelationState) if row else None

    def due_correlations(self, now: int, limit: int = 1000) -> list[ExpireMessages]:
        """The timers of correlation keys due at ``now``."""
        rows = self.db.execute(
            "SELECT payload FROM correlations WHERE due_at IS NOT NULL AND due_at <= ? "
            "ORDER BY due_at LIMIT ?",
            (now, limit),
        ).fetchall()
        due = []
        for (payload,) in rows:
            armed = timer(self._decode(payload, CorrelationState))
            if armed is not None:
                due.append(armed[1])
        return due

    def message_events(self) -> list[CorrelationEvent]:
        rows = self.db.execute("SELECT payload FROM message_events ORDER BY pos").fetchall()
        return [self._decode(p, CORRELATION_EVENTS) for (p,) in rows]

    # ------------------------------------------------------------------ reading

    def state(self, run_id: str) -> RunState | None:
        row = self.db.execute("SELECT payload FROM states WHERE run_id = ?", (run_id,)).fetchone()
        return self._decode(row[0], RunState) if row else None

    def active_states(self) -> Iterator[RunState]:
        for (payload,) in self.db.execute(
            "SELECT payload FROM states WHERE status NOT IN ('Completed', 'Failed', 'Cancelled')"
        ):
            yield self._decode(payload, RunState)

    def events(self, run_id: str) -> list[Event]:
        rows = self.db.execute(
            "SELECT payload FROM events WHERE run_id = ? ORDER BY seq", (run_id,)
        ).fetchall()
        return [self._decode(p, Event) for (p,) in rows]

    def recorded_commands(self, run_id: str) -> list[RecordedCommand]:
        rows = self.db.execute(
            "SELECT payload FROM commands WHERE run_id = ? ORDER BY first_seq", (run_id,)
        ).fetchall()
        return [self._decode(p, RecordedCommand) for (p,) in rows]

    def run_ids(self, status: str | None = None, limit: int = 100) -> list[str]:
        if status:
            rows = self.db.execute(
                "SELECT run_id FROM states WHERE status = ? ORDER BY updated_at DESC LIMIT ?",
                (status, limit),
            ).fetchall()
        else:
            rows = self.db.execute(
                "SELECT run_id FROM states ORDER BY updated_at DESC LIMIT ?", (limit,)
            ).fetchall()
        return [r[0] for r in rows]

    def find_run(self, prefix: str) -> str | None:
        """Resolve a run id or an unambiguous prefix of one."""
        rows = self.db.execute(
            "SELECT run_id FROM states WHERE run_id LIKE ? || '%' LIMIT 2", (prefix,)
        ).fetchall()
        return rows[0][0] if len(rows) == 1 else None

    def dead_letters(self) -> list[DeadLetter]:
        rows = self.db.execute("SELECT payload FROM dead_letters ORDER BY pos").fetchall()
        return [self._decode(p, DeadLetter) for (p,) in rows]

    def notifications(self) -> list[Any]:
        rows = self.db.execute("SELECT payload FROM notifications ORDER BY pos").fetchall()
        return [decode(p) for (p,) in rows]

    def read_notifications(self, after: int, limit: int) -> list[Input]:
        """The notification records after position ``after``, undecoded."""
        rows = self.db.execute(
            "SELECT pos, payload FROM notifications WHERE pos > ? ORDER BY pos LIMIT ?",
            (after, limit),
        ).fetchall()
        return [Input("notifications", 0, pos, payload) for pos, payload in rows]

    def add_dead_letter(self, dead: DeadLetter) -> None:
        """A dead letter from outside a processed batch (the notifier's)."""
        self.db.execute(
            "INSERT INTO dead_letters (reason, payload) VALUES (?, ?)", (dead.reason, encode(dead))
        )

    def set_offset(self, consumer: str, pos: int) -> None:
        """Store the position of a consumer other than the processor (the notifier)."""
        self.db.execute(
            "INSERT INTO offsets (consumer, pos) VALUES (?, ?) "
            "ON CONFLICT (consumer) DO UPDATE SET pos = excluded.pos",
            (consumer, pos),
        )

    @staticmethod
    def _decode(payload: bytes, expected: type[Any] | tuple[type, ...]) -> Any:
        record = decode(payload)
        if not isinstance(record, expected):
            wanted = getattr(expected, "__name__", "correlation event")
            raise StoreError(f"expected a {wanted}, found {type(record).__name__}")
        return record

    # ------------------------------------------------------------------ tasks and ledger

    def claim_tasks(
        self, queues: list[str], now: int, lease_ms: int, limit: int = 16
    ) -> list[tuple[int, TaskCommand]]:
        """Lease up to ``limit`` ready tasks of ``queues``. A lease that runs out makes the
        task ready again: delivery is at-least-once."""
        if not queues:
            return []
        marks = ",".join("?" * len(queues))
        with self.transaction() as db:
            rows = db.execute(
                f"SELECT pos, payload FROM tasks WHERE done = 0 AND queue IN ({marks}) "
                "AND lease_until <= ? ORDER BY pos LIMIT ?",
                (*queues, now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE tasks SET lease_until = ?, deliveries = deliveries + 1 WHERE pos = ?",
                [(now + lease_ms, pos) for pos, _ in rows],
            )
        return [(pos, self._decode(p, TaskCommand)) for pos, p in rows]

    def finish_task(
        self, pos: int, report: Command | None, entry: LedgerEntry | None, now: int
    ) -> None:
        """Record the result command, the ledger entry and the task's end together."""
        with self.transaction() as db:
            if entry is not None:
                db.execute(
                    "INSERT OR IGNORE INTO ledger (idempotency_key, result, cost, confidence,"
                    " recorded_at) VALUES (?, ?, ?, ?, ?)",
                    (
                        entry.idempotency_key,
                        json.dumps(entry.result),
                        entry.cost,
                        entry.confidence,
                        now,
                    ),
                )
            if report is not None:
                db.execute(
                    "INSERT INTO inputs (run_id, payload, enqueued_at) VALUES (?, ?, ?)",
                    (report.run_id, encode(report), now),
                )
            db.execute("UPDATE tasks SET done = 1 WHERE pos = ?", (pos,))

    def lookup(self, idempotency_key: str) -> LedgerEntry | None:
        row = self.db.execute(
            "SELECT result, cost, confidence FROM ledger WHERE idempotency_key = ?",
            (idempotency_key,),
        ).fetchone()
        if row is None:
            return None
        return LedgerEntry(idempotency_key, json.loads(row[0]), row[1], row[2])

    # ------------------------------------------------------------------ specs

    def deploy(self, spec: WorkflowSpec, now: int) -> bool:
        """Store ``spec``; True if new, False if this exact spec was deployed already.
        A different spec under an existing (workflow, version) is refused."""
        body = json.dumps(spec_to_data(spec), sort_keys=True)
        with self.transaction() as db:
            row = db.execute(
                "SELECT body FROM specs WHERE workflow = ? AND version = ?", spec.key
            ).fetchone()
            if row is not None:
                if row[0] != body:
                    raise SpecConflictError(
                        f"{spec.workflow} version {spec.version} is already deployed with a "
                        "different definition; deployed versions never change, bump version"
                    )
                return False
            db.execute(
                "INSERT INTO specs (workflow, version, body, deployed_at) VALUES (?, ?, ?, ?)",
                (*spec.key, body, now),
            )
        return True

    def specs(self) -> list[WorkflowSpec]:
        rows = self.db.execute("SELECT body FROM specs ORDER BY workflow, version").fetchall()
        return [load_deployed_spec(json.loads(body)) for (body,) in rows]
