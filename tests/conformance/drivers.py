"""Backends behind one small interface, so the same scenarios run on each.

A driver runs the engine, the trigger path and the workers of a ``ToolRegistry`` in a
background thread with its own event loop, on the real clock (scenarios use short
durations), and lets a synchronous test submit records and wait for run states.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from engine.core.commands import Command
from engine.core.correlation import CORRELATION_EVENTS, CorrelationEvent, PublishMessage
from engine.core.events import Event
from engine.core.records import DeadLetter, Trigger
from engine.core.spec import WorkflowSpec
from engine.core.state import RunState, finished_record
from engine.embedded import EmbeddedEngine, EmbeddedWorker, Store
from engine.runtime.schedule_service import ScheduleService
from engine.worker import ToolRegistry


class Driver:
    name = "driver"
    schedules: ScheduleService | None = None
    """With ``start(..., schedules=True)``: the schedules of the backend, their processor
    running beside the engine."""

    def start(
        self, specs: list[WorkflowSpec], registry: ToolRegistry, schedules: bool = False
    ) -> None:
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

    def publish(self, message: PublishMessage) -> None:
        raise NotImplementedError

    def message_events(self) -> list[CorrelationEvent]:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def wait(
        self,
        run_id: str,
        until: Callable[[RunState], bool],
        timeout_s: float = 30.0,
        what: str = "the expected state",
    ) -> RunState:
        deadline = time.monotonic() + timeout_s
        state = None
        while time.monotonic() < deadline:
            state = self.state(run_id)
            if state is not None and until(state):
                return state
            time.sleep(0.02)
        raise AssertionError(
            f"run {run_id} did not reach {what} within {timeout_s}s; "
            f"last state: {state.status.value if state else None} "
            f"at {state.current if state else None}"
        )

    def wait_status(self, run_id: str, *statuses: str, timeout_s: float = 30.0) -> RunState:
        return self.wait(
            run_id,
            lambda s: s.status.value in statuses,
            timeout_s,
            f"status {' or '.join(statuses)}",
        )


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

    def close_runners(self) -> None:
        """Set the stop event and wait for every spawned runner to return."""
        if self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        for task in self.tasks:
            task.result(60)
        self.tasks.clear()

    def shutdown(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def close(self) -> None:
        self.close_runners()
        self.shutdown()


class EmbeddedDriver(Driver):
    name = "embedded"

    def __init__(self, tmp: Path) -> None:
        self.path = tmp / "conformance.db"
        self.store = Store(self.path)
        self.threads: _LoopThread | None = None

    def start(
        self, specs: list[WorkflowSpec], registry: ToolRegistry, schedules: bool = False
    ) -> None:
        for spec in specs:
            self.store.deploy(spec, 0)
        engine = EmbeddedEngine(self.path)
        worker = EmbeddedWorker(self.path, registry, concurrency=8)
        self.threads = _LoopThread()
        self.threads.spawn(engine.run)
        self.threads.spawn(worker.run)
        self._closers = [engine.close, worker.close]
        if schedules:
            from engine.embedded.schedules import EmbeddedSchedules, EmbeddedScheduleService

            processor = EmbeddedSchedules(self.path)
            self.threads.spawn(processor.run)
            self.schedules = EmbeddedScheduleService(self.path, process=False)
            self._closers += [processor.close, self.schedules.close]

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

    def publish(self, message: PublishMessage) -> None:
        self.store.append_inputs([message], int(time.time() * 1000))

    def message_events(self) -> list[CorrelationEvent]:
        return self.store.message_events()

    def stop(self) -> None:
        if self.threads is not None:
            self.threads.close()
        for close in getattr(self, "_closers", []):
            close()
        self.store.close()


class KafkaDriver(Driver):
    """The orchestrator (reading the co-partitioned triggers itself, as deployed by
    default), a worker (PostgreSQL ledger) and the spec follower on the real broker,
    under a fresh topic prefix and app name."""

    name = "kafka"

    def __init__(self, bootstrap: str, dsn: str, partitions: int = 3) -> None:
        from engine.kafka.topics import Topics

        prefix = f"c{uuid.uuid4().hex[:10]}"
        self.bootstrap = bootstrap
        self.dsn = dsn
        self.topics = Topics(prefix=prefix, partitions=partitions)
        self.app = prefix
        self.threads = _LoopThread()
        self._events: dict[str, list[Event]] = {}
        self._dead: list[DeadLetter] = []
        self._messages: list[CorrelationEvent] = []

    def start(
        self, specs: list[WorkflowSpec], registry: ToolRegistry, schedules: bool = False
    ) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        from engine.kafka.correlation import CorrelationProcessor
        from engine.kafka.ledger import PostgresLedger
        from engine.kafka.processor import KafkaEngine
        from engine.kafka.specs import SpecFollower, publish_spec
        from engine.kafka.topics import ensure_topics
        from engine.kafka.worker import KafkaWorker

        t, call = self.topics, self.threads.call
        call(ensure_topics(self.bootstrap, t.core_topics()))
        for spec in specs:
            call(publish_spec(self.bootstrap, t, spec))
        follower = SpecFollower(self.bootstrap, t)
        call(follower.start())
        self.follower = follower
        self.state_dir = Path(tempfile.mkdtemp(prefix=f"{self.app}-state-"))
        self.engine = KafkaEngine(
            self.bootstrap,
            t,
            follower.registry,
            app=self.app,
            refresh_specs=follower.catch_up,
            state_dir=self.state_dir,
        )
        ledger = PostgresLedger(self.dsn, namespace=t.deployment(self.app))
        call(ledger.open())
        self._ledger = ledger
        self.worker = KafkaWorker(self.bootstrap, t, registry, ledger, app=self.app)
        self.correlation = CorrelationProcessor(self.bootstrap, t, app=self.app)
        for runner in (self.engine.run, self.worker.run, follower.follow, self.correlation.run):
            self.threads.spawn(runner)
        if schedules:
            from engine.kafka.schedules import (
                KafkaScheduleService,
                ScheduleProcessor,
                schedule_new_topics,
            )

            call(ensure_topics(self.bootstrap, schedule_new_topics(t)))
            self.scheduler = ScheduleProcessor(self.bootstrap, t, app=self.app)
            self.threads.spawn(self.scheduler.run)
            self.schedules = KafkaScheduleService(self.bootstrap, t, app=self.app)

        async def clients() -> None:
            self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
            await self.producer.start()
            self.reader = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                isolation_level="read_committed",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            await self.reader.start()
            from aiokafka import TopicPartition

            parts = [TopicPartition(t.events, p) for p in range(t.partitions)]
            parts += [TopicPartition(t.dead_letters, p) for p in range(t.partitions)]
            parts += [TopicPartition(t.message_events, p) for p in range(t.partitions)]
            self.reader.assign(parts)
            await self.reader.seek_to_beginning(*parts)

        call(clients())
        deadline = time.monotonic() + 60
        while (
            len(self.engine.parts) < t.partitions or len(self.correlation.parts) < t.partitions
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.engine.parts) == t.partitions, "the engine never got its partitions"
        assert len(self.correlation.parts) == t.partitions, (
            "message correlation never got its partitions"
        )

    def submit(self, *records: Command | Trigger) -> None:
        from engine.codec import encode

        async def send() -> None:
            for record in records:
                if isinstance(record, Trigger):
                    key = record.idempotency_key.encode() or None
                    await self.producer.send_and_wait(self.topics.triggers, encode(record), key=key)
                else:
                    await self.producer.send_and_wait(
                        self.topics.inputs,
                        encode(record),
                        key=record.run_id.encode(),
                        partition=self.topics.partition_of(record.run_id),
                    )

        self.threads.call(send())

    def submit_raw(self, payload: bytes) -> None:
        self.threads.call(self.producer.send_and_wait(self.topics.inputs, payload, partition=0))

    def state(self, run_id: str) -> RunState | None:
        """The engine's committed state; for a finished run, which the engine keeps as a
        compact record, the fold of its events (checked against that record)."""
        from engine.core.evolve import fold

        state = self.engine.state(run_id)
        if state is None or not state.terminal:
            return state
        events = self.events(run_id)
        deadline = time.monotonic() + 30
        while (
            not events or max(e.seq for e in events) < state.seq
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
            events = self.events(run_id)
        full = fold(sorted(events, key=lambda e: e.seq)[: state.seq])
        assert finished_record(full) == state, "the compact record is not the run's fold"
        return full

    def _read(self) -> None:
        from engine.codec import decode

        async def read() -> None:
            parts = list(self.reader.assignment())
            ends = await self.reader.end_offsets(parts)
            while [tp for tp in parts if await self.reader.position(tp) < ends[tp]]:
                fetched = await self.reader.getmany(timeout_ms=100, max_records=10_000)
                for tp, messages in fetched.items():
                    for message in messages:
                        record = decode(message.value)
                        if tp.topic == self.topics.dead_letters:
                            assert isinstance(record, DeadLetter)
                            self._dead.append(record)
                        elif isinstance(record, CORRELATION_EVENTS):
                            self._messages.append(record)  # type: ignore[arg-type]
                        elif isinstance(record, Event):
                            self._events.setdefault(record.run_id, []).append(record)

        self.threads.call(read())

    def events(self, run_id: str) -> list[Event]:
        self._read()
        return list(self._events.get(run_id, []))

    def dead_letters(self) -> list[DeadLetter]:
        self._read()
        return list(self._dead)

    def publish(self, message: PublishMessage) -> None:
        from engine.kafka.correlation import message_record

        topic, key, value = message_record(self.topics, message)
        self.threads.call(self.producer.send_and_wait(topic, value, key=key))

    def message_events(self) -> list[CorrelationEvent]:
        self._read()
        return list(self._messages)

    def stop(self) -> None:
        from engine.kafka._util import stop_quietly

        async def close_clients() -> None:
            await stop_quietly(self.producer)
            await stop_quietly(self.reader)

        if hasattr(self, "producer"):
            self.threads.call(close_clients())
        if self.schedules is not None:
            self.schedules.close()
        self.threads.close_runners()
        if hasattr(self, "state_dir"):
            shutil.rmtree(self.state_dir, ignore_errors=True)
        if hasattr(self, "follower"):
            self.threads.call(self.follower.stop())
        if hasattr(self, "_ledger"):
            self.threads.call(self._ledger.close())
        self.threads.shutdown()
        from engine.kafka.topics import delete_topics

        # A broker holding every past test's partitions slows the tests after this one.
        asyncio.run(delete_topics(self.bootstrap, self.topics.prefix))
