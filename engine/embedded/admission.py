"""The admission core in the embedded store: the same decide/evolve as the admission
processor on Kafka, each batch of commands in one SQLite transaction.

| table            | plays                                                        |
|------------------|--------------------------------------------------------------|
| admission_states | the admission changelog (latest state per limit key)          |
| admission_events | the admission events topic                                    |
| alerts           | the alerts topic (one row per alert id)                       |

``due_at`` is the key's next timer (``admission.next_due``): ``tick`` applies a ``Tick``
to every key that is due, which is how a lease expires when its release never comes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import TYPE_CHECKING

from engine.codec import decode, encode
from engine.core import admission as ad
from engine.core.alerts import Alert, alerts_of
from engine.core.errors import TerranohaError
from engine.core.flow import answer

if TYPE_CHECKING:
    from engine.embedded.store import Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS admission_states (
    key TEXT PRIMARY KEY,
    due_at INTEGER,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS admission_due ON admission_states (due_at);
CREATE TABLE IF NOT EXISTS alerts (
    alert_id TEXT PRIMARY KEY,
    at INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS admission_events (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    at INTEGER NOT NULL,
    payload BLOB NOT NULL
);
"""


class AdmissionStore:
    """The admission tables of one store file."""

    def __init__(self, store: Store) -> None:
        self.store = store
        store.db.executescript(SCHEMA)

    def apply(self, commands: Iterable[ad.AdmissionCommand], now: int) -> list[ad.AdmissionEvent]:
        """Decide ``commands`` in order and store their events and states atomically."""
        with self.store.transaction() as db:
            return apply_in(db, commands, now)

    def tick(self, now: int) -> list[ad.AdmissionEvent]:
        """Let time pass on every key whose timer is due."""
        if not has_admission(self.store.db):
            return []
        with self.store.transaction() as db:
            keys = [
                k
                for (k,) in db.execute(
                    "SELECT key FROM admission_states WHERE due_at <= ? ORDER BY key", (now,)
                )
            ]
            return apply_in(db, [ad.Tick(k, now) for k in keys], now)

    def state(self, key: str) -> ad.AdmissionState | None:
        return _load(self.store.db, key)

    def states(self) -> dict[str, ad.AdmissionState]:
        rows = self.store.db.execute("SELECT key, payload FROM admission_states ORDER BY key")
        return {key: _decode_state(payload) for key, payload in rows}

    def alerts(self) -> list[Alert]:
        rows = self.store.db.execute("SELECT payload FROM alerts ORDER BY at, alert_id")
        return [a for (p,) in rows if isinstance(a := decode(p), Alert)]

    def events(self, key: str | None = None) -> list[ad.AdmissionEvent]:
        if key is None:
            rows = self.store.db.execute("SELECT payload FROM admission_events ORDER BY pos")
        else:
            rows = self.store.db.execute(
                "SELECT payload FROM admission_events WHERE key = ? ORDER BY pos", (key,)
            )
        return [_decode_event(p) for (p,) in rows]


def has_admission(db: sqlite3.Connection) -> bool:
    """Whether this store ever used flow control (its admission tables exist)."""
    return (
        db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'admission_states'"
        ).fetchone()
        is not None
    )


def apply_in(
    db: sqlite3.Connection, commands: Iterable[ad.AdmissionCommand], now: int
) -> list[ad.AdmissionEvent]:
    """``AdmissionStore.apply`` inside a transaction the caller holds, so a change made
    with it (a pause recorded with the ``Pause`` it causes) commits together. Each grant
    or refusal is appended to the run inputs as the ``GrantSlot`` or ``RefuseSlot`` of
    the run that asked, in the same transaction."""
    if not has_admission(db):
        for statement in SCHEMA.split(";"):  # execute, not executescript: it would commit
            if statement.strip():
                db.execute(statement)
    states: dict[str, ad.AdmissionState | None] = {}
    changed: set[str] = set()
    out: list[ad.AdmissionEvent] = []
    for command in commands:
        if command.key not in states:
            states[command.key] = _load(db, command.key)
        state = states[command.key]
        events = ad.decide(state, command, now)
        for event in events:
            state = ad.evolve(state, event)
        if events:
            states[command.key] = state
            changed.add(command.key)
        out.extend(events)
    db.executemany(
        "INSERT INTO admission_events (key, at, payload) VALUES (?, ?, ?)",
        [(e.key, e.at, encode(e)) for e in out],
    )
    told = [c for e in out if (c := answer(e)) is not None]
    db.executemany(
        "INSERT INTO inputs (run_id, payload, enqueued_at) VALUES (?, ?, ?)",
        [(c.run_id, encode(c), now) for c in told],
    )
    db.executemany(
        "INSERT OR IGNORE INTO alerts (alert_id, at, payload) VALUES (?, ?, ?)",
        [(a.alert_id, a.at, encode(a)) for e in out for a in alerts_of(e)],
    )
    db.executemany(
        "INSERT INTO admission_states (key, due_at, payload) VALUES (?, ?, ?) "
        "ON CONFLICT (key) DO UPDATE SET due_at = excluded.due_at, payload = excluded.payload",
        [
            (key, ad.next_due(s), encode(s))
            for key in sorted(changed)
            if (s := states[key]) is not None
        ],
    )
    return out


def _load(db: sqlite3.Connection, key: str) -> ad.AdmissionState | None:
    row = db.execute("SELECT payload FROM admission_states WHERE key = ?", (key,)).fetchone()
    return _decode_state(row[0]) if row else None


def _decode_state(payload: bytes) -> ad.AdmissionState:
    record = decode(payload)
    if not isinstance(record, ad.AdmissionState):
        raise TerranohaError(f"expected an AdmissionState, found {type(record).__name__}")
    return record


def _decode_event(payload: bytes) -> ad.AdmissionEvent:
    record = decode(payload)
    if not isinstance(record, ad.EVENT_TYPES):
        raise TerranohaError(f"expected an admission event, found {type(record).__name__}")
    return record  # type: ignore[return-value]
