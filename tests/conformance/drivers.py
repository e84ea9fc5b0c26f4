"""Backends behind one small interface, so the same scenarios run on each.

A driver runs the engine, the trigger path and the workers of a ``ToolRegistry`` in a
background thread with its own event loop, on the real clock (scenarios use short
durations), and lets a synchronous test submit records and wait for run states.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from engine.core.commands import Command
from engine.core.events import Event
from engine.core.records import DeadLetter, Trigger
from engine.core.spec import WorkflowSpec
from engine.core.state import RunState
from engine.embedded import EmbeddedEngine, EmbeddedWorker, Store
from engine.worker import ToolRegistry


class Driver:
    name = "driver"

    def start(self, specs: list[WorkflowSpec], registry: ToolRegistry) -> None:
        raise NotImplementedError

    def submit(self, *records: Command | Trigger) -> None:
        raise NotImplementedError

    def submit_raw(self, payload: bytes) -> None:
        raise NotImplementedError

    def state(self, run_id: str) -> RunState | None:
        raise NotImplementedError

    def events(self, run_id: str) -> list[Event]:
        raise NotImplementedError

    def dead_letters(self) -> list[DeadLetter]:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def wait(self, run_id: str, until: Callable[[RunState], bool], timeout_s: float = 30.0,
             what: str = "the expected state") -> RunState:
        deadline = time.monotonic() + timeout_s
        state = None
        while time.monotonic() < deadline:
            state = self.state(run_id)
            if state is not None and until(state):
                return state
            time.sleep(0.02)
        raise AssertionError(f"run {run_id} did not reach {what} within {timeout_s}s; "
                             f"last state: {state.status.value if state else None} "
                             f"at {state.current if state else None}")

    def wait_status(self, run_id: str, *statuses: str, timeout_s: float = 30.0) -> RunState:
        return self.wait(run_id, lambda s: s.status.value in statuses, timeout_s,
                         f"status {' or '.join(statuses)}")


class _LoopThread:
    """An event loop in a thread, running coroutines until ``stop``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tasks: list[Any] = []

    def call(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def spawn(self, factory: Callable[[asyncio.Event], Coroutine[Any, Any, Any]]) -> None:
        async def make_stop() -> asyncio.Event:
            if self.stop_event is None:
                self.stop_event = asyncio.Event()
            return self.stop_event

        stop = self.call(make_stop())
        self.tasks.append(asyncio.run_coroutine_threadsafe(factory(stop), self.loop))

    def close(self) -> None:
        if self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        for task in self.tasks:
            task.result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class EmbeddedDriver(Driver):
    name = "embedded"

    def __init__(self, tmp: Path) -> None:
        self.path = tmp / "conformance.db"
        self.store = Store(self.path)
        self.threads: _LoopThread | None = None

    def start(self, specs: list[WorkflowSpec], registry: ToolRegistry) -> None:
        for spec in specs:
            self.store.deploy(spec, 0)
        engine = EmbeddedEngine(self.path)
        worker = EmbeddedWorker(self.path, registry, concurrency=8)
        self.threads = _LoopThread()
        self.threads.spawn(engine.run)
        self.threads.spawn(worker.run)
        self._closers = [engine.close, worker.close]

    def submit(self, *records: Command | Trigger) -> None:
        self.store.append_inputs(records, int(time.time() * 1000))

    def submit_raw(self, payload: bytes) -> None:
        self.store.append_raw_inputs([("", payload, 0)])

    def state(self, run_id: str) -> RunState | None:
        return self.store.state(run_id)

    def events(self, run_id: str) -> list[Event]:
        return self.store.events(run_id)

    def dead_letters(self) -> list[DeadLetter]:
        return self.store.dead_letters()

    def stop(self) -> None:
        if self.threads is not None:
            self.threads.close()
        for close in getattr(self, "_closers", []):
            close()
        self.store.close()
