"""Deployed limits documents and paused keys in the embedded store.

| table        | plays                                                         |
|--------------|---------------------------------------------------------------|
| limits       | the ``doc:<version>`` records of the compacted limits topic    |
| limit_pauses | its ``pause:<key>`` records                                    |

A deploy whose rules equal the latest version's is not a new version; any other deploy
is the next version, in the same transaction that reads the latest, and gives every key
a rule names by itself its new limits (a ``Configure`` of the admission core). A pause is
recorded with the ``Pause`` it causes, in one transaction too.
"""

from __future__ import annotations

import json

from engine.core import admission as ad
from engine.core.flow import FlowLimits
from engine.core.limits import LimitsDocument, check_key, limits_body, load_limits, resolve
from engine.embedded.admission import AdmissionStore, apply_in
from engine.embedded.store import Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS limits (
    version INTEGER PRIMARY KEY,
    body TEXT NOT NULL,
    deployed_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS limit_pauses (
    key TEXT PRIMARY KEY,
    paused_at INTEGER NOT NULL,
    by TEXT NOT NULL
);
"""


class LimitsStore:
    """The limits tables of one store file."""

    def __init__(self, store: Store) -> None:
        self.store = store
        store.db.executescript(SCHEMA)
        self.admission = AdmissionStore(store)

    def deploy(self, document: LimitsDocument, now: int) -> tuple[int, bool]:
        """Store ``document``; return its version and whether it is a new one."""
        body = limits_body(document)
        with self.store.transaction() as db:
            row = db.execute(
                "SELECT version, body FROM limits ORDER BY version DESC LIMIT 1"
            ).fetchone()
            if row is not None and row[1] == body:
                return int(row[0]), False
            version = (int(row[0]) if row is not None else 0) + 1
            db.execute(
                "INSERT INTO limits (version, body, deployed_at) VALUES (?, ?, ?)",
                (version, body, now),
            )
            before = load_limits(json.loads(row[1])) if row is not None else None
            named = sorted(
                {r.key for r in document.rules if not r.wildcard}
                | {r.key for r in (before.rules if before else []) if not r.wildcard}
            )
            apply_in(db, [ad.Configure(k, resolve(document, k), version) for k in named], now)
        return version, True

    def latest(self) -> tuple[int, LimitsDocument | None]:
        """The version in force (0 and None before the first deploy)."""
        row = self.store.db.execute(
            "SELECT version, body FROM limits ORDER BY version DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return 0, None
        return int(row[0]), load_limits(json.loads(row[1]))

    def pause(self, key: str, by: str, now: int) -> bool:
        """Hold every request on ``key``; False if it was paused already."""
        check_key(key)
        with self.store.transaction() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO limit_pauses (key, paused_at, by) VALUES (?, ?, ?)",
                (key, now, by),
            )
            if cur.rowcount == 0:
                return False
            apply_in(db, [ad.Pause(key)], now)
        return True

    def resume(self, key: str, now: int) -> bool:
        """Let ``key``'s requests through again; False if it was not paused."""
        check_key(key)
        with self.store.transaction() as db:
            cur = db.execute("DELETE FROM limit_pauses WHERE key = ?", (key,))
            if cur.rowcount == 0:
                return False
            apply_in(db, [ad.Resume(key)], now)
        return True

    def paused(self) -> dict[str, int]:
        """Paused keys and when they were paused."""
        rows = self.store.db.execute("SELECT key, paused_at FROM limit_pauses ORDER BY key")
        return {key: int(at) for key, at in rows}


def latest_flow(store: Store) -> FlowLimits | None:
    """The limits document in force for the run engine; None if none was ever deployed
    (nothing is created: a store that never used flow control stays as it was)."""
    db = store.db
    if (
        db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'limits'"
        ).fetchone()
        is None
    ):
        return None
    row = db.execute("SELECT version, body FROM limits ORDER BY version DESC LIMIT 1").fetchone()
    return None if row is None else FlowLimits(load_limits(json.loads(row[1])), int(row[0]))
