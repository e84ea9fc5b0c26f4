"""Schedule benchmarks: what the schedule core and the embedded schedule processor cost.

1. ``cron``: nominal times computed per second by the cron calendar (cronsim with a
   ``zoneinfo`` zone), the cost under every cron tick;
2. ``catch_up``: a per-second schedule whose engine was down for an hour, caught up
   within its one-hour window: nominal times decided per second by the pure core;
3. ``embedded``: N cron schedules due at the same minute on the embedded store, a manual
   clock moved past it: ticks decided (with their ``StartRun`` written, one SQLite
   transaction per batch) per second, from the first tick to the last ``StartRun``.

    .venv/bin/python bench/schedules.py [--schedules 2000]

Figures go to stdout. Nothing here is a timed test.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from engine.core.schedule_records import CreateSchedule, ScheduleEvent, ScheduleState
from engine.core.schedules import decide, evolve, timers
from engine.embedded import Store
from engine.embedded.schedules import EmbeddedSchedules
from engine.runtime.clock import ManualClock
from engine.runtime.schedule_spec import CronCalendar, load_schedule

T0 = 1_800_000_000_000 - 1_800_000_000_000 % 3_600_000


def bench_cron(count: int = 20_000) -> float:
    calendar = CronCalendar()
    at = T0
    started = time.perf_counter()
    for _ in range(count):
        nxt = calendar.next_cron("*/5 * * * *", "Europe/Berlin", at)
        assert nxt is not None
        at = nxt
    return count / (time.perf_counter() - started)


def bench_catch_up() -> tuple[int, float]:
    calendar = CronCalendar()
    spec = load_schedule(
        {
            "id": "s",
            "workflow": "w",
            "interval": "1s",
            "overlap": "allow_all",
            "catch_up_window": "1h",
        }
    )
    state: ScheduleState | None = None
    for event in decide(
        None, CreateSchedule(command_id="c", schedule_id="s", spec=spec), T0, calendar
    ):
        state = evolve(state, event)
    assert state is not None
    now = T0 + 3_600_000
    decided = 0
    started = time.perf_counter()
    while True:
        ticks = timers(state)
        events: list[ScheduleEvent] = decide(state, ticks[0], now, calendar) if ticks else []
        if not events:
            break
        for event in events:
            state = evolve(state, event)
        decided += sum(1 for e in events if e.TYPE == "ScheduledRunStarted")
    return decided, decided / (time.perf_counter() - started)


def bench_embedded(schedules: int) -> tuple[int, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        Store(path).close()
        clock = ManualClock(T0 + 1)
        processor = EmbeddedSchedules(path, clock, batch_size=512)
        processor.submit(
            *(
                CreateSchedule(
                    command_id=f"c{i}",
                    schedule_id=f"s{i}",
                    spec=load_schedule(
                        {
                            "id": f"s{i}",
                            "workflow": "w",
                            "cron": "0 * * * *",
                            "timezone": "Europe/Berlin",
                        }
                    ),
                )
                for i in range(schedules)
            )
        )
        processor.drain(max_rounds=100_000)
        clock.set(T0 + 3_600_000)
        started = time.perf_counter()
        processor.drain(max_rounds=100_000)
        elapsed = time.perf_counter() - started
        starts = processor.store.db.execute("SELECT COUNT(*) FROM inputs").fetchone()[0]
        processor.close()
    return int(starts), int(starts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--schedules", type=int, default=2000)
    args = parser.parse_args()
    print(f"cron: {bench_cron():,.0f} nominal times/s (*/5 * * * * in Europe/Berlin)")
    decided, rate = bench_catch_up()
    print(
        f"catch_up: {decided} nominal times of a 1 s schedule down 1 h decided, "
        f"{rate:,.0f}/s (pure core)"
    )
    starts, rate = bench_embedded(args.schedules)
    print(
        f"embedded: {starts} schedules due at one minute, {rate:,.0f} ticks/s decided with "
        "their StartRun written (SQLite)"
    )


if __name__ == "__main__":
    main()
