"""Schedules on the embedded store: the schedule core in one SQLite transaction.

``EmbeddedSchedules`` plays the Kafka schedule processor: it reads ``schedule_inputs``
in order from its stored position and, per batch, writes the events, the states, the
run commands they cause (``StartRun``, ``CancelRun``, into the run ``inputs``), dead
letters and its new position in ONE transaction. A state becomes the committed state
only after that commit. Its timers (the schedules' next ticks) are computed from the
committed states, so a process killed at any point re-arms them on start; a tick that
is due while nothing runs is decided when a process returns, per the catch-up window.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from engine.codec import DecodeError, decode, encode
from engine.core.commands import Command
from engine.core.outbox import Notification
from engine.core.schedule_records import (
    FireScheduleTick,
    ScheduleCommand,
    ScheduleEvent,
    ScheduleState,
)
from engine.core.schedules import alerts, decide, due_at, evolve, outputs, timers
from engine.embedded.engine import EmbeddedEngine
from engine.embedded.store import Store
from engine.runtime.clock import Clock, SystemClock
from engine.runtime.processor import dead_letter
from engine.runtime.schedule_service import ScheduleService, ScheduleView
from engine.runtime.schedule_spec import CronCalendar

SCHEDULER = "schedules"
"""The consumer name of the schedule processor's position in ``offsets``."""
SOURCE = "schedule_inputs"
REFIRE_AFTER_MS = 1000
"""A tick that changed nothing (the schedule was not due yet) is written again after this."""

log = logging.getLogger("terranoha.embedded.schedules")


@dataclass(slots=True)
class _Batch:
    states: dict[str, ScheduleState] = field(default_factory=dict)
    events: list[ScheduleEvent] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    notifications: list[Notification] = field(default_factory=list)
    dead: list[tuple[str, str, bytes]] = field(default_factory=list)
    """(reason, detail, payload) of each input that became a dead letter."""


class EmbeddedSchedules:
    """The schedule processor over one store file."""

    def __init__(
        self, path: str | Path, clock: Clock | None = None, batch_size: int = 256, poll_ms: int = 20
    ) -> None:
        self.store = Store(path)
        self.clock = clock or SystemClock()
        self.calendar = CronCalendar()
        self.batch_size = batch_size
        self.poll_ms = poll_ms
        self.states: dict[str, ScheduleState] = dict(load_states(self.store))
        self.offset = self.store.offset(SCHEDULER)
        self._timers: list[tuple[int, str, int]] = []
        self._refire: list[ScheduleState] = []
        for state in self.states.values():
            self._arm(state)

    def submit(self, *commands: ScheduleCommand) -> None:
        append(self.store, commands, self.clock.now_ms())

    def step(self) -> int:
        """Decide the next batch of inputs, then write the ticks that are due."""
        handled = 0
        rows = self.store.db.execute(
            "SELECT pos, payload FROM schedule_inputs WHERE pos > ? ORDER BY pos LIMIT ?",
            (self.offset, self.batch_size),
        ).fetchall()
        if rows:
            now = self.clock.now_ms()
            batch = _Batch()
            for pos, payload in rows:
                self._one(batch, pos, payload, now)
            self._write(batch, rows[-1][0], now)
            self.states.update(batch.states)
            for state in batch.states.values():
                self._arm(state)
            for state in self._refire:
                self._arm(state, not_before=now + REFIRE_AFTER_MS)
            self._refire.clear()
            self.offset = rows[-1][0]
            handled += len(rows)
        ticks = self.due(self.clock.now_ms())
        if ticks:
            append(self.store, ticks, self.clock.now_ms())
            handled += len(ticks)
        return handled

    def _one(self, batch: _Batch, pos: int, payload: bytes, now: int) -> None:
        try:
            command = decode(payload)
        except DecodeError as exc:
            batch.dead.append((exc.reason, str(exc), payload))
            return
        if not isinstance(command, ScheduleCommand):
            batch.dead.append(
                (
                    "unexpected_record",
                    f"{type(command).__name__} is not a schedule command",
                    payload,
                )
            )
            return
        key = command.schedule_id
        state = batch.states.get(key) or self.states.get(key)
        try:
            events = decide(state, command, now, self.calendar)
            for event in events:
                state = evolve(state, event)
        except Exception as exc:  # a defect in the core: keep the inputs moving
            detail = "".join(traceback.format_exception_only(exc)).strip()
            batch.dead.append(("engine_error", detail, payload))
            return
        if not events or state is None:
            if isinstance(command, FireScheduleTick) and state is not None:
                self._refire.append(state)  # not applied: ask again, as the state says
            return
        batch.states[key] = state
        batch.events.extend(events)
        for event in events:
            batch.commands.extend(outputs(event))
            batch.notifications.extend(alerts(event))

    def _write(self, batch: _Batch, last: int, now: int) -> None:
        with self.store.transaction() as db:
            db.executemany(
                "INSERT INTO schedule_events (schedule_id, type, at, payload) VALUES (?,?,?,?)",
                [(e.schedule_id, e.TYPE, e.at, encode(e)) for e in batch.events],
            )
            db.executemany(
                "INSERT OR REPLACE INTO schedule_states (schedule_id, payload) VALUES (?, ?)",
                [(key, encode(state)) for key, state in batch.states.items()],
            )
            db.executemany(
                "INSERT INTO inputs (run_id, payload, enqueued_at) VALUES (?, ?, ?)",
                [(c.run_id, encode(c), now) for c in batch.commands],
            )
            db.executemany(
                "INSERT INTO notifications (payload) VALUES (?)",
                [(encode(n),) for n in batch.notifications],
            )
            for reason, detail, payload in batch.dead:
                letter = dead_letter(SOURCE, 0, last, reason, detail, payload, now)
                log.warning("dead letter in %s: %s: %s", SOURCE, reason, detail)
                db.execute(
                    "INSERT INTO dead_letters (reason, payload) VALUES (?, ?)",
                    (reason, encode(letter)),
                )
            db.execute(
                "INSERT INTO offsets (consumer, pos) VALUES (?, ?) "
                "ON CONFLICT (consumer) DO UPDATE SET pos = excluded.pos",
                (SCHEDULER, last),
            )

    def _arm(self, state: ScheduleState, not_before: int = 0) -> None:
        due = due_at(state)
        if due is not None and state.next_nominal is not None:
            heapq.heappush(
                self._timers, (max(due, not_before), state.schedule_id, state.next_nominal)
            )

    def next_due(self) -> int | None:
        return self._timers[0][0] if self._timers else None

    def due(self, now: int) -> list[FireScheduleTick]:
        """The ticks due at ``now`` that their schedule still asks for."""
        out: dict[tuple[str, int], FireScheduleTick] = {}
        while self._timers and self._timers[0][0] <= now:
            _, key, nominal = heapq.heappop(self._timers)
            state = self.states.get(key)
            if state is None:
                continue
            for tick in timers(state):
                if tick.nominal == nominal:
                    out[(key, nominal)] = tick
        return list(out.values())

    def drain(self, max_rounds: int = 1000) -> int:
        total = 0
        for _ in range(max_rounds):
            handled = self.step()
            if not handled:
                break
            total += handled
        return total

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.step():
                await asyncio.sleep(0)
                continue
            wait = self.poll_ms / 1000
            next_due = self.next_due()
            if next_due is not None:
                wait = min(wait, max(0.0, (next_due - self.clock.now_ms()) / 1000))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    def close(self) -> None:
        self.store.close()


def append(store: Store, commands: Iterable[ScheduleCommand], now: int) -> int:
    """Append schedule commands to the inputs; return the last position."""
    last = 0
    with store.transaction() as db:
        for command in commands:
            cur = db.execute(
                "INSERT INTO schedule_inputs (schedule_id, payload, enqueued_at) VALUES (?, ?, ?)",
                (command.schedule_id, encode(command), now),
            )
            last = int(cur.lastrowid or 0)
    return last


def load_states(store: Store) -> Iterable[tuple[str, ScheduleState]]:
    for key, payload in store.db.execute("SELECT schedule_id, payload FROM schedule_states"):
        state = decode(payload)
        if isinstance(state, ScheduleState):
            yield key, state


def schedule_events(
    store: Store, schedule_id: str, after: int = 0
) -> list[tuple[int, ScheduleEvent]]:
    rows = store.db.execute(
        "SELECT pos, payload FROM schedule_events WHERE schedule_id = ? AND pos > ? ORDER BY pos",
        (schedule_id, after),
    ).fetchall()
    return [(pos, e) for pos, payload in rows if isinstance(e := decode(payload), ScheduleEvent)]


class EmbeddedScheduleService(ScheduleService):
    """Schedules in a store file. A command is appended; when no server holds the store
    (``process`` says whether to), it is decided here at once, with the runs it starts."""

    def __init__(self, path: str | Path, process: bool, clock: Clock | None = None) -> None:
        self.path = Path(path)
        self.process = process
        self.clock = clock or SystemClock()
        self.store = Store(self.path)

    def send(self, command: ScheduleCommand) -> list[ScheduleEvent]:
        seen = self.store.db.execute(
            "SELECT COALESCE(MAX(pos), 0) FROM schedule_events"
        ).fetchone()[0]
        position = append(self.store, [command], self.clock.now_ms())
        if self.process:
            schedules = EmbeddedSchedules(self.path, self.clock)
            engine = EmbeddedEngine(self.path, self.clock)
            try:
                schedules.drain()
                engine.drain()
            finally:
                schedules.close()
                engine.close()
        else:
            self._wait_for(position)
        return [
            e
            for _, e in schedule_events(self.store, command.schedule_id, seen)
            if e.causation_id == command.command_id
        ]

    def _wait_for(self, position: int, timeout_s: float = 3.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.store.offset(SCHEDULER) < position:
            time.sleep(0.05)

    def get(self, schedule_id: str) -> ScheduleView | None:
        row = self.store.db.execute(
            "SELECT payload FROM schedule_states WHERE schedule_id = ?", (schedule_id,)
        ).fetchone()
        if row is None:
            return None
        state = decode(row[0])
        assert isinstance(state, ScheduleState)
        return ScheduleView(state, [e for _, e in schedule_events(self.store, schedule_id)])

    def list_schedules(self) -> list[ScheduleState]:
        return sorted(
            (s for _, s in load_states(self.store) if not s.deleted), key=lambda s: s.schedule_id
        )

    def close(self) -> None:
        self.store.close()
