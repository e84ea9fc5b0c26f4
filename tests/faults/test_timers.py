"""Timers: many falling due while the engine is down, and clock jumps."""

from __future__ import annotations

import random
import signal
import time
from collections import Counter

import pytest

from engine.core.events import TimerArmed, TimerFired
from engine.core.state import RunStatus
from tests.faults.checkers import Check, assert_checks, run_checks
from tests.faults.harness import Fleet, LogView
from tests.faults.workflows import HOUR, NAP

pytestmark = [
    pytest.mark.faults,
    pytest.mark.kafka,
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.chaos,
]


def _timers_fired_once(view: LogView) -> Check:
    check = Check("timers fire once")
    fired = Counter(
        (e.record.run_id, e.record.timer_id)
        for e in view.committed
        if isinstance(e.record, TimerFired)
    )
    armed = {
        (e.record.run_id, e.record.timer_id)
        for e in view.committed
        if isinstance(e.record, TimerArmed)
    }
    for (run_id, timer_id), n in fired.items():
        if n != 1:
            check.fail(f"{run_id}: timer {timer_id} fired {n} times")
        if (run_id, timer_id) not in armed:
            check.fail(f"{run_id}: timer {timer_id} fired but was never armed")
    check.found.append(f"{len(armed)} timers armed, {len(fired)} fired")
    print(check.report())
    return check


def _waiting_on_timer(fleet: Fleet, run_ids: list[str]) -> bool:
    states = fleet.read().states()
    return all(r in states and states[r].status is RunStatus.WAITING for r in run_ids)


@pytest.mark.timeout(600)
def test_timers_due_while_engine_down(
    fleet: Fleet, rng: random.Random, fault_seconds: float
) -> None:
    fleet.setup(NAP)
    proc = fleet.start()
    count = int(60 * fault_seconds)
    fleet.trigger([f"{fleet.prefix}-t-{i}" for i in range(count)], workflow="nap")
    deadline = time.monotonic() + 120
    while not _waiting_on_timer(fleet, fleet.sent.run_ids) and time.monotonic() < deadline:
        time.sleep(0.5)
    fleet.kill(proc, signal.SIGKILL)
    down = rng.uniform(4.0, 4.0 + fault_seconds)
    time.sleep(down)
    started = time.monotonic()
    fleet.start()
    view, _ = fleet.wait_settled(240)
    drain = time.monotonic() - started
    print(
        f"drove {count} runs sleeping 3 s; engine SIGKILLed once all were waiting, down "
        f"{down:.1f}s; {count} due timers drained {drain:.1f}s after the restart "
        f"(including the engine's start)"
    )
    checks = [*run_checks(fleet, view, writes=("notify",)), _timers_fired_once(view)]
    assert_checks(checks)


@pytest.mark.timeout(600)
def test_clock_jumps(fleet: Fleet, rng: random.Random, fault_seconds: float) -> None:
    """The engine's clock (an OffsetClock following a file) jumps an hour forward, which
    makes hour-long timers due, then back, which must neither fire them again nor stop new
    short timers from firing once their (absolute) due time is reached."""
    fleet.setup(NAP, HOUR)
    fleet.clock_file.write_text("0")
    fleet.start()
    hour = [f"{fleet.prefix}-h-{i}" for i in range(int(10 * fault_seconds))]
    fleet.trigger(hour, workflow="hour")
    deadline = time.monotonic() + 120
    while not _waiting_on_timer(fleet, fleet.sent.run_ids) and time.monotonic() < deadline:
        time.sleep(0.5)
    fleet.clock_file.write_text(str(3600_000 + 5_000))
    view, forward = fleet.wait_settled(120)
    fleet.clock_file.write_text("0")
    time.sleep(1.0)
    naps = [f"{fleet.prefix}-n-{i}" for i in range(int(10 * fault_seconds))]
    fleet.trigger(naps, workflow="nap")
    back_jump = rng.uniform(-15_000, -3_000)
    time.sleep(1.0)
    fleet.clock_file.write_text(str(int(back_jump)))
    view, back = fleet.wait_settled(120)
    print(
        f"drove {len(hour)} hour-long sleeps, completed {forward:.1f}s after a +1h jump; "
        f"then {len(naps)} 3 s sleeps with the clock jumping back to {back_jump / 1000:.1f}s: "
        f"settled in {back:.1f}s"
    )
    checks = [*run_checks(fleet, view, writes=("notify",)), _timers_fired_once(view)]
    assert_checks(checks)
