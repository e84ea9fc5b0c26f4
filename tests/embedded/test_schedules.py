"""The embedded schedule processor: ticks decided in one SQLite transaction with the runs
they start and the alerts they raise; restarted, it re-arms its timers from the stored
states and catches up what fell due meanwhile."""

from __future__ import annotations

from pathlib import Path

from engine.codec import decode
from engine.core.commands import StartRun
from engine.core.outbox import Notification
from engine.core.schedule_records import CreateSchedule, ScheduleTicksMissed
from engine.core.schedules import schedule_origin
from engine.embedded import Store
from engine.embedded.schedules import EmbeddedSchedules, load_states, schedule_events
from engine.runtime.clock import ManualClock
from engine.runtime.schedule_spec import load_schedule

T0 = 1_800_000_000_000
SECOND = 1000


def _starts(path: Path) -> list[int]:
    store = Store(path)
    try:
        rows = store.db.execute("SELECT payload FROM inputs ORDER BY pos").fetchall()
    finally:
        store.close()
    out = []
    for (payload,) in rows:
        record = decode(payload)
        if isinstance(record, StartRun) and (origin := schedule_origin(record.idempotency_key)):
            out.append(origin[1])
    return out


def test_a_restarted_processor_catches_up_each_time_once(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    clock = ManualClock(T0 + 1)
    first = EmbeddedSchedules(path, clock)
    spec = load_schedule({"id": "s", "workflow": "w", "interval": "1s", "overlap": "allow_all"})
    first.submit(CreateSchedule(command_id="c", schedule_id="s", spec=spec))
    first.drain()
    clock.advance(2 * SECOND)
    first.drain()
    first.close()
    clock.advance(3 * SECOND)  # down across three ticks
    again = EmbeddedSchedules(path, clock)
    again.drain()
    again.close()
    assert _starts(path) == [T0 + k * SECOND for k in range(1, 6)]


def test_times_outside_the_window_are_recorded_and_alerted(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    clock = ManualClock(T0 + 1)
    processor = EmbeddedSchedules(path, clock)
    spec = load_schedule({"id": "s", "workflow": "w", "interval": "1s", "catch_up_window": "0s"})
    processor.submit(CreateSchedule(command_id="c", schedule_id="s", spec=spec))
    processor.drain()
    clock.advance(5 * SECOND - 1)  # now the fifth nominal time: the four before it are late
    processor.drain()
    (missed,) = [
        e for _, e in schedule_events(processor.store, "s") if isinstance(e, ScheduleTicksMissed)
    ]
    assert (missed.first, missed.last, missed.count) == (T0 + SECOND, T0 + 4 * SECOND, 4)
    notes = [
        decode(p)
        for (p,) in processor.store.db.execute("SELECT payload FROM notifications").fetchall()
    ]
    assert [n.kind for n in notes if isinstance(n, Notification)] == ["schedule_missed"]
    processor.close()
    assert _starts(path) == [T0 + 5 * SECOND]


def test_an_input_that_is_not_a_schedule_command_is_a_dead_letter(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    processor = EmbeddedSchedules(path, ManualClock(T0))
    processor.store.db.execute(
        "INSERT INTO schedule_inputs (schedule_id, payload, enqueued_at) VALUES ('x', ?, 0)",
        (b"\x00garbage",),
    )
    spec = load_schedule({"id": "s", "workflow": "w", "interval": "1s"})
    processor.submit(CreateSchedule(command_id="c", schedule_id="s", spec=spec))
    processor.drain()
    (letter,) = processor.store.dead_letters()
    assert letter.source == "schedule_inputs" and letter.payload == b"\x00garbage"
    assert letter.reason and letter.detail
    assert [s.schedule_id for _, s in load_states(processor.store)] == ["s"]
    processor.close()
