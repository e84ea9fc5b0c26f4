"""Armed timers, waiting to become ``FireTimer`` commands.

Timers live in run state; this service only knows when to look. It is rebuilt from
state on restore. A firing is a command written to the run inputs like any other, so
it is decided (and de-duplicated) by the core: a timer that already fired, or was
cleared, is rejected there. Firings whose command was lost are sent again after
``refire_after_ms`` while the timer is still armed in committed state.

An entry outlives its timer when the timer is cleared before it is due (a task that
completed before its timeout, a run that finished): it is dropped when it falls due,
or earlier, when the stale entries would make the heap grow with history instead of
with the armed timers (``prune``).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from engine.core.commands import FireTimer
from engine.core.state import RunState

PRUNE_FLOOR = 4096
"""The heap is never pruned below this many entries."""


class TimerService:
    def __init__(
        self,
        is_armed: Callable[[str, str], bool],
        refire_after_ms: int = 10_000,
    ) -> None:
        self._heap: list[tuple[int, str, str]] = []
        self._is_armed = is_armed
        self.refire_after_ms = refire_after_ms
        self._prune_at = PRUNE_FLOOR

    def arm(self, run_id: str, timer_id: str, due_at: int) -> None:
        heapq.heappush(self._heap, (due_at, run_id, timer_id))
        if len(self._heap) >= self._prune_at:
            self.prune()

    def prune(self) -> None:
        """Drop the entries of timers no longer armed. Runs each time the heap doubled
        since the last prune, so it costs O(1) per timer armed, and the heap stays
        within twice the armed timers (plus ``PRUNE_FLOOR``)."""
        self._heap = [entry for entry in self._heap if self._is_armed(entry[1], entry[2])]
        heapq.heapify(self._heap)
        self._prune_at = max(2 * len(self._heap), PRUNE_FLOOR)

    def restore(self, state: RunState) -> None:
        for timer in state.timers.values():
            self.arm(state.run_id, timer.timer_id, timer.due_at)

    def next_due(self) -> int | None:
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)

    def due(self, now: int, limit: int = 1000) -> list[FireTimer]:
        """Commands for the timers due at ``now``; never one that is not due yet."""
        fired: list[FireTimer] = []
        while self._heap and self._heap[0][0] <= now and len(fired) < limit:
            _, run_id, timer_id = heapq.heappop(self._heap)
            if not self._is_armed(run_id, timer_id):
                continue
            fired.append(
                FireTimer(
                    command_id=f"timer:{run_id}:{timer_id}:{now}", run_id=run_id, timer_id=timer_id
                )
            )
            heapq.heappush(self._heap, (now + self.refire_after_ms, run_id, timer_id))
        return fired
