"""The processor loop and the worker loop over the SQLite store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from engine.core.commands import Command
from engine.core.correlation import PublishMessage
from engine.core.events import Event
from engine.core.flow import FlowLimits
from engine.core.outbox import TaskCommand
from engine.core.records import Trigger
from engine.embedded.admission import AdmissionStore, apply_in
from engine.embedded.limits import latest_flow
from engine.embedded.store import Store
from engine.runtime.clock import Clock, SystemClock
from engine.runtime.correlator import correlate
from engine.runtime.processor import Batch, Processor, StateCache
from engine.runtime.specs import SpecRegistry
from engine.runtime.timers import TimerService
from engine.worker.sdk import ToolRegistry, execute
from engine.worker.spans import run_tool_in_span

log = logging.getLogger("terranoha.embedded")


class EmbeddedEngine:
    """Reads inputs in order, processes them in batches, fires due timers.

    On start it resumes from the stored input position and re-arms the timers of every
    active run, so a process killed at any point loses nothing.
    """

    def __init__(
        self, path: str | Path, clock: Clock | None = None, batch_size: int = 256, poll_ms: int = 10
    ) -> None:
        self.store = Store(path)
        self.clock = clock or SystemClock()
        self.batch_size = batch_size
        self.poll_ms = poll_ms
        self.specs = SpecRegistry(self.store.specs(), loader=self.store.specs)
        self.cache = StateCache(loader=self.store.state)
        self._flow: FlowLimits | None = None
        self.processor = Processor(
            self.specs, self.cache, accepts_messages=True, flow=lambda: self._flow
        )
        self.timers = TimerService(self._is_armed)
        self.offset = self.store.offset()
        self.on_committed: Callable[[Sequence[Event]], None] | None = None
        """Called with the events of each committed batch (telemetry); must not raise."""
        for state in self.store.active_states():
            self.timers.restore(state)

    def _is_armed(self, run_id: str, timer_id: str) -> bool:
        state = self.cache.get(run_id)
        return state is not None and timer_id in state.timers

    def submit(self, *records: Command | Trigger | PublishMessage) -> None:
        self.store.append_inputs(records, self.clock.now_ms())

    def step(self) -> int:
        """One round: process the next batch of inputs, then send due timer firings.
        Returns how many records it handled (0 when idle)."""
        handled = 0
        inputs = self.store.read_inputs(self.offset, self.batch_size)
        now = self.clock.now_ms()
        # Message correlation runs in the batch's transaction: the subscriptions its waits
        # open and close, the messages it read, the keys whose TTL timers are due.
        expiring = self.store.due_correlations(now)
        if inputs or expiring:
            self._flow = latest_flow(self.store)
            batch = self.processor.process(inputs, now) if inputs else Batch()
            correlation = correlate(
                [*batch.correlation, *expiring], self.store.correlation_state, now
            )
            admission = batch.admission
            self.store.write_batch(
                batch,
                correlation=correlation,
                now=now,
                also=((lambda db: apply_in(db, admission, now)) if admission else None),
            )
            handled += len(expiring)
        if inputs:
            # Only now, with the batch durable, does its state become the committed state.
            self.cache.commit(batch.states)
            if self.on_committed is not None:
                self.on_committed(batch.events)
            self.offset = inputs[-1].offset
            for run_id, timer in batch.timers:
                self.timers.arm(run_id, timer.timer_id, timer.due_at)
            for dead in batch.dead_letters:
                log.warning(
                    "dead letter at %s/%s: %s: %s",
                    dead.source,
                    dead.offset,
                    dead.reason,
                    dead.detail,
                )
            handled += len(inputs)
        now = self.clock.now_ms()
        if self._flow is not None:
            handled += len(AdmissionStore(self.store).tick(now))  # leases, rates, windows
        fired = self.timers.due(now)
        if fired:
            self.store.append_inputs(fired, now)
            handled += len(fired)
        return handled

    def drain(self, max_rounds: int = 10_000) -> int:
        """Process until there is nothing left to do right now."""
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
            next_due = self.timers.next_due()
            if next_due is not None:
                wait = min(wait, max(0.0, (next_due - self.clock.now_ms()) / 1000))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    def close(self) -> None:
        self.store.close()


class EmbeddedWorker:
    """Leases tasks of the registry's queues, runs the tools, reports results.

    The result command, the ledger entry and the task's completion are written in one
    transaction. A task past its deadline is dropped unrun: the engine's timeout has
    already decided what happens next.
    """

    def __init__(
        self,
        path: str | Path,
        registry: ToolRegistry,
        clock: Clock | None = None,
        concurrency: int = 8,
        lease_ms: int = 30_000,
        poll_ms: int = 10,
    ) -> None:
        self.store = Store(path)
        self.registry = registry
        self.clock = clock or SystemClock()
        self.concurrency = concurrency
        self.lease_ms = lease_ms
        self.poll_ms = poll_ms
        self.calls = 0

    async def work_once(self) -> int:
        now = self.clock.now_ms()
        claimed = self.store.claim_tasks(self.registry.queues, now, self.lease_ms, self.concurrency)
        if claimed:
            await asyncio.gather(*(self._run(pos, task) for pos, task in claimed))
        return len(claimed)

    async def _run(self, pos: int, task: TaskCommand) -> None:
        if task.deadline <= self.clock.now_ms():
            self.store.finish_task(pos, None, None, self.clock.now_ms())
            return
        outcome = await run_tool_in_span(
            task, None, lambda: execute(task, self.registry, self.store, self.clock.now_ms)
        )
        self.calls += int(outcome.called)
        self.store.finish_task(pos, outcome.command, outcome.entry, self.clock.now_ms())

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if await self.work_once():
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_ms / 1000)

    def close(self) -> None:
        self.store.close()
