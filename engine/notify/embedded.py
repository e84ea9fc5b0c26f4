"""The notifier on the embedded store: the ``notifications`` table, in order, from a
stored position (consumer ``notifier`` in ``offsets``); the delivery ledger is the
``notify_deliveries`` table and given-up deliveries go to ``dead_letters``, all in the
same SQLite file. One notifier per store: a second one is refused."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from engine.codec import DecodeError, decode
from engine.core.errors import TerranohaError
from engine.core.outbox import Notification
from engine.core.records import DeadLetter
from engine.embedded.store import Store
from engine.notify._positions import Positions
from engine.notify.channel import Delivery
from engine.notify.deliver import UNDELIVERABLE, Deliverer, NotifierStats, open_deliverer
from engine.notify.ledger import DeliveryLedger, Outcome
from engine.notify.routing import ChannelKind, Target
from engine.notify.settings import DeliverySettings
from engine.runtime.clock import Clock, SystemClock
from engine.runtime.processor import Input, dead_letter

log = logging.getLogger("terranoha.notify.embedded")

CONSUMER = "notifier"

SCHEMA = """
CREATE TABLE IF NOT EXISTS notify_deliveries (
    notification_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    detail TEXT NOT NULL,
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (notification_id, channel, target)
)
"""


class NotifierBusyError(TerranohaError):
    """Another notifier holds this store."""


class SqliteDeliveryLedger(DeliveryLedger):
    """The delivery ledger in the embedded store's file."""

    def __init__(self, store: Store, clock: Clock | None = None) -> None:
        self.store = store
        self.clock = clock or SystemClock()
        store.db.execute(SCHEMA)

    async def outcomes(self, notification_id: str) -> dict[Target, Outcome]:
        rows = self.store.db.execute(
            "SELECT channel, target, outcome FROM notify_deliveries WHERE notification_id = ?",
            (notification_id,),
        ).fetchall()
        return {
            Target(ChannelKind(channel), target): Outcome(outcome)
            for channel, target, outcome in rows
        }

    async def record(
        self,
        notification_id: str,
        target: Target,
        outcome: Outcome,
        attempts: int,
        detail: str = "",
    ) -> bool:
        cur = self.store.db.execute(
            "INSERT OR IGNORE INTO notify_deliveries (notification_id, channel, target, "
            "outcome, attempts, detail, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                notification_id,
                target.channel.value,
                target.name,
                outcome.value,
                attempts,
                detail,
                self.clock.now_ms(),
            ),
        )
        return cur.rowcount == 1


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[IO[str]]:
    handle = open(f"{path}.notify.lock", "a+")  # noqa: SIM115 - held for the block
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NotifierBusyError(
                f"another notifier is already delivering from {path}; run one per store"
            ) from None
        yield handle
    finally:
        handle.close()


class EmbeddedNotifier:
    """Delivers the embedded store's notifications, ``concurrency`` at a time."""

    def __init__(
        self,
        path: str | Path,
        settings: DeliverySettings,
        clock: Clock | None = None,
        *,
        concurrency: int = 8,
        poll_ms: int = 50,
        drain_s: float = 10.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.path = Path(path)
        self.settings = settings
        self.clock = clock or SystemClock()
        self.concurrency = concurrency
        self.poll_ms = poll_ms
        self.drain_s = drain_s
        self.stats = NotifierStats()
        self.undecodable = 0
        """Records in the notifications table that are not notifications (dead-lettered)."""

    async def run(self, stop: asyncio.Event, *, once: bool = False) -> None:
        """Deliver until ``stop`` is set (or, with ``once``, until every notification
        present has been handled); then finish the deliveries in hand for up to
        ``drain_s`` and store the position."""
        with _exclusive(self.path):
            store = Store(self.path)
            try:
                ledger = SqliteDeliveryLedger(store, self.clock)
                async with open_deliverer(
                    self.settings, ledger, self.clock, self.stats
                ) as deliverer:
                    await self._loop(store, deliverer, stop, once)
            finally:
                store.close()

    async def _loop(
        self, store: Store, deliverer: Deliverer, stop: asyncio.Event, once: bool
    ) -> None:
        read = store.offset(CONSUMER)
        positions: Positions[int] = Positions()
        running: set[asyncio.Task[None]] = set()

        def spawn(row: Input) -> None:
            positions.begin(0, row.offset)
            task = asyncio.get_running_loop().create_task(self._handle(store, deliverer, row))
            running.add(task)

            def finished(done: asyncio.Task[None]) -> None:
                running.discard(done)
                if done.cancelled():
                    return  # delivered again from the stored position
                error = done.exception()
                if error is not None:
                    # The position stays before it: the notification is tried again when
                    # the notifier restarts, never skipped.
                    log.error(
                        "notification at position %d failed in the notifier: %r", row.offset, error
                    )
                    return
                positions.finish(0, row.offset)

            task.add_done_callback(finished)

        def store_position() -> None:
            moved = positions.unstored()
            if moved:
                store.set_offset(CONSUMER, moved[0] - 1)
                positions.stored(moved)

        try:
            while not stop.is_set():
                room = self.concurrency - len(running)
                rows = store.read_notifications(read, room) if room > 0 else []
                for row in rows:
                    spawn(row)
                    read = row.offset
                if not rows and once and not running:
                    break
                if running and not rows:
                    await asyncio.wait(
                        running, timeout=self.poll_ms / 1000, return_when=asyncio.FIRST_COMPLETED
                    )
                elif not rows:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.poll_ms / 1000)
                else:
                    await asyncio.sleep(0)
                store_position()
            if running:
                await asyncio.wait(running, timeout=self.drain_s)
        finally:
            for task in list(running):
                task.cancel()
            if running:
                await asyncio.wait(running)
            store_position()

    async def _handle(self, store: Store, deliverer: Deliverer, row: Input) -> None:
        try:
            note = decode(row.payload)
        except DecodeError as exc:
            self.undecodable += 1
            store.add_dead_letter(self._dead(row, exc.reason, str(exc)))
            return
        if not isinstance(note, Notification):
            self.undecodable += 1
            store.add_dead_letter(
                self._dead(
                    row,
                    "unexpected_record",
                    f"a {type(note).__name__} in the notifications "
                    "table; only Notification records belong there",
                )
            )
            return

        async def sink(delivery: Delivery, detail: str) -> None:
            store.add_dead_letter(self._dead(row, UNDELIVERABLE, detail, note.run_id))

        await deliverer.deliver(note, sink)

    def _dead(self, row: Input, reason: str, detail: str, run_id: str = "") -> DeadLetter:
        return dead_letter(
            row.source,
            row.partition,
            row.offset,
            reason,
            detail,
            row.payload,
            self.clock.now_ms(),
            run_id,
        )
