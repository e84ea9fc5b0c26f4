"""The timer heap follows the armed timers, not every timer ever armed."""

from __future__ import annotations

from engine.runtime.timers import PRUNE_FLOOR, TimerService


def test_entries_of_cleared_timers_do_not_accumulate() -> None:
    armed: set[tuple[str, str]] = set()
    timers = TimerService(lambda run_id, timer_id: (run_id, timer_id) in armed)
    for i in range(20 * PRUNE_FLOOR):
        run = f"run-{i}"
        armed.add((run, "t"))
        timers.arm(run, "t", 1_000_000 + i)
        if i % 100:  # all but one run in a hundred finish before their timer is due
            armed.discard((run, "t"))
        assert len(timers) <= 2 * len(armed) + PRUNE_FLOOR
    fired = timers.due(2_000_000, limit=10**6)
    assert {(c.run_id, c.timer_id) for c in fired} == armed


def test_pruning_keeps_every_armed_timer_in_due_order() -> None:
    armed = {(f"run-{i}", "t") for i in range(0, 3 * PRUNE_FLOOR, 3)}
    timers = TimerService(lambda run_id, timer_id: (run_id, timer_id) in armed)
    for i in range(3 * PRUNE_FLOOR):
        timers.arm(f"run-{i}", "t", 5_000 - i)
    timers.prune()
    assert len(timers) == len(armed)
    fired = timers.due(10_000, limit=10**6)
    assert [c.run_id for c in fired] == [
        f"run-{i}" for i in sorted((int(r.split("-")[1]) for r, _ in armed), reverse=True)
    ]
