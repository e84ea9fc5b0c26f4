"""Where the API reads and writes: the embedded store or the Kafka topics.

The API is a client of the same backends as the CLI, never a way around them: a start is
a ``Trigger`` on the triggers input, a decision a ``DecideApproval`` on the run inputs, and
the engine decides as it does for every other source. An operation returns only once its
record is durable (the SQLite commit; on Kafka ``acks=all`` from an idempotent producer).

Both backends are async: the embedded one runs its SQLite work in a worker thread (one at
a time: a store connection is not shared across threads); the Kafka one keeps a follower
of the run-state changelog, so reading a run, listing runs and the approval inbox read
memory instead of the topic, and streams wake up when a run's state changes.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import fcntl
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError

from engine.codec import DecodeError, decode
from engine.core.commands import Command
from engine.core.correlation import PublishMessage
from engine.core.errors import SpecError, TerranohaError
from engine.core.events import Event
from engine.core.evolve import fold
from engine.core.policies import run_id_for
from engine.core.records import DeadLetter, RecordedCommand, Trigger
from engine.core.spec import WorkflowSpec, load_deployed_spec
from engine.core.state import RunState
from engine.embedded import EmbeddedEngine, Store
from engine.kafka.client import BrokerUnavailableError, KafkaClient, KafkaClientError
from engine.kafka.specs import spec_key
from engine.kafka.topics import Topics

log = logging.getLogger("terranoha.api")

T = TypeVar("T")

FINISHED_KEPT = 10_000
"""How many finished runs' full states (folds of their events) the Kafka backend keeps."""

COMMAND_WAIT_S = 10.0
"""How long a decision, signal or cancel waits for the engine's answer before the API
answers 202 (accepted, queued)."""


class BackendUnavailableError(TerranohaError):
    """The backend does not answer; the API says 503 and the request may be retried."""

    retriable = True


@dataclass(frozen=True, slots=True)
class Submitted:
    """What happened to a command: the events it caused (None while it is queued)."""

    events: list[Event] | None
    state: RunState | None


class ApiBackend(abc.ABC):
    """The operations the API needs, on either backend."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def deploy(self, spec: WorkflowSpec) -> bool:
        """Deploy ``spec``: True if new, False if the same spec was deployed already."""

    @abc.abstractmethod
    async def specs(self) -> list[WorkflowSpec]: ...

    @abc.abstractmethod
    async def trigger(self, trigger: Trigger) -> str:
        """Make ``trigger`` durable on the trigger input; return its run id."""

    @abc.abstractmethod
    async def state(self, run_id: str) -> RunState | None: ...

    @abc.abstractmethod
    async def states(self) -> list[RunState]:
        """Every run's latest state."""

    @abc.abstractmethod
    async def events(self, run_id: str) -> list[Event]: ...

    @abc.abstractmethod
    async def submit(self, command: Command) -> Submitted: ...

    @abc.abstractmethod
    async def dead_letters(self) -> list[DeadLetter]: ...

    @abc.abstractmethod
    async def publish(self, message: PublishMessage) -> None:
        """Make a correlated message durable on the messages input."""

    async def wait_change(self, run_id: str, seq: int, timeout_s: float) -> RunState | None:
        """The run's state once its sequence number passes ``seq``, or as it is after
        ``timeout_s``. The embedded store is polled; Kafka's follower wakes it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        state = await self.state(run_id)
        while (state is None or state.seq <= seq) and loop.time() < deadline:
            await asyncio.sleep(0.2)
            state = await self.state(run_id)
        return state


# ---------------------------------------------------------------------- embedded


@contextlib.contextmanager
def _processor_lock(db: Path) -> Iterator[bool]:
    """The store's processor lock, if free (the same lock ``terranoha serve`` holds)."""
    handle = open(f"{db}.lock", "a+")  # noqa: SIM115 - held for the block
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            held = False
        yield held
    finally:
        handle.close()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class EmbeddedApiBackend(ApiBackend):
    """The SQLite store. Records are appended in one SQLite transaction; when no
    ``terranoha serve`` holds the store the API processes them itself, as the CLI does,
    so a lone ``terranoha api --db`` answers with the outcome."""

    def __init__(self, db: str | Path) -> None:
        self.db = Path(db)
        self._store: Store | None = None
        self._lock = threading.Lock()

    async def _run(self, fn: Callable[[Store], T]) -> T:
        def call() -> T:
            with self._lock:
                if self._store is None:
                    self._store = Store(self.db)
                return fn(self._store)

        return await asyncio.to_thread(call)

    async def start(self) -> None:
        await self._run(lambda store: None)

    async def close(self) -> None:
        def shut(store: Store) -> None:
            store.close()
            self._store = None

        if self._store is not None:
            await self._run(shut)

    async def deploy(self, spec: WorkflowSpec) -> bool:
        return await self._run(lambda s: s.deploy(spec, _now_ms()))

    async def specs(self) -> list[WorkflowSpec]:
        return await self._run(lambda s: s.specs())

    async def trigger(self, trigger: Trigger) -> str:
        run_id = run_id_for(trigger.tenant, trigger.idempotency_key)
        await self._append_and_settle(trigger)
        return run_id

    async def state(self, run_id: str) -> RunState | None:
        return await self._run(lambda s: s.state(run_id))

    async def states(self) -> list[RunState]:
        return await self._run(
            lambda s: [st for r in s.run_ids(None, 1 << 62) if (st := s.state(r)) is not None]
        )

    async def events(self, run_id: str) -> list[Event]:
        return await self._run(lambda s: s.events(run_id))

    async def submit(self, command: Command) -> Submitted:
        settled = await self._append_and_settle(command)

        def outcome(store: Store) -> Submitted:
            caused = [
                e for e in store.events(command.run_id) if e.causation_id == command.command_id
            ]
            return Submitted(caused if settled else None, store.state(command.run_id))

        return await self._run(outcome)

    async def dead_letters(self) -> list[DeadLetter]:
        return await self._run(lambda s: s.dead_letters())

    async def publish(self, message: PublishMessage) -> None:
        await self._append_and_settle(message)

    async def _append_and_settle(self, record: Command | Trigger | PublishMessage) -> bool:
        """Append ``record`` (committed on return) and process it here unless a server
        holds the store; then wait for it to be processed. True once it has been."""
        [position] = await self._run(lambda s: s.append_inputs([record], _now_ms()))

        def drain_if_free(store: Store) -> bool:
            with _processor_lock(self.db) as held:
                if held:
                    engine = EmbeddedEngine(self.db)
                    try:
                        engine.drain()
                    finally:
                        engine.close()
            return store.offset() >= position

        loop = asyncio.get_running_loop()
        deadline = loop.time() + COMMAND_WAIT_S
        while not await self._run(drain_if_free):
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True


# ---------------------------------------------------------------------- kafka


@dataclass
class _Pending:
    """A command sent from here: the events seen so far, done once it is recorded."""

    done: asyncio.Future[list[Event]]
    events: list[Event] = field(default_factory=list)


class KafkaApiBackend(ApiBackend):
    """The Kafka topics through ``KafkaClient``, plus a follower of the state changelog
    and the specs topic.

    ``KafkaClient`` keeps one consumer that it assigns and seeks per operation, so the
    operations that use it (timelines, dead letters) take turns (a lock); reads of run
    state and specs do not need it, nor do commands, whose outcomes the follower reads
    from the run events topic.
    Triggers this process accepted are remembered until the engine's state shows the run,
    so a client that starts a run and reads it at once sees it (as Pending)."""

    def __init__(self, bootstrap: str, topics: Topics, app: str = "terranoha") -> None:
        self.bootstrap = bootstrap
        self.client = KafkaClient(bootstrap, topics, app=app)
        self._turn = asyncio.Lock()
        self._states: dict[str, RunState] = {}
        self._specs: dict[bytes, WorkflowSpec] = {}
        self._finished: OrderedDict[str, RunState] = OrderedDict()
        self._waiting: dict[bytes, dict[str, _Pending]] = {}
        self._accepted: dict[str, RunState] = {}
        self._changed = asyncio.Condition()
        self._follower: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._caught_up = asyncio.Event()
        self._failure: BaseException | None = None

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except KafkaConnectionError as exc:
            raise BackendUnavailableError(
                f"Kafka at {self.bootstrap} does not answer ({exc})"
            ) from None
        except BrokerUnavailableError as exc:
            raise BackendUnavailableError(str(exc)) from None
        except KafkaError as exc:
            raise BackendUnavailableError(f"Kafka at {self.bootstrap} failed: {exc!r}") from None

    async def start(self) -> None:
        await self._call(self.client.start())
        topics = self.client.topics
        self.client._need(topics.state)
        self.client._need(topics.specs)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await self._call(consumer.start())
        self._consumer = consumer
        self.client._need(topics.events)
        tps = [TopicPartition(topics.state, p) for p in range(topics.partitions)]
        tps.append(TopicPartition(topics.specs, 0))
        events = [TopicPartition(topics.events, p) for p in range(topics.partitions)]
        consumer.assign([*tps, *events])
        await consumer.seek_to_beginning(*tps)
        await consumer.seek_to_end(*events)  # only outcomes of commands sent from now on
        end = await consumer.end_offsets(tps)
        self._caught_up.clear()
        self._follower = asyncio.create_task(self._follow(consumer, end))
        await asyncio.wait_for(self._caught_up.wait(), self.client.timeout_s)

    async def _follow(self, consumer: AIOKafkaConsumer, end: dict[TopicPartition, int]) -> None:
        """Keep the latest state of every run and every deployed spec in memory."""
        pending = {tp for tp, offset in end.items() if offset > 0}
        if not pending:
            self._caught_up.set()
        while True:
            try:
                fetched = await consumer.getmany(timeout_ms=500, max_records=5000)
            except KafkaError as exc:
                log.warning("following the run-state changelog failed: %r", exc)
                await asyncio.sleep(1.0)
                continue
            changed = False
            for tp, messages in fetched.items():
                for message in messages:
                    if tp.topic == self.client.topics.events:
                        self._outcome(message.key, message.value)
                    elif tp.topic == self.client.topics.specs:
                        self._apply_spec(message.key, message.value)
                    else:
                        self._apply(message.key, message.value)
                        changed = True
                if tp in pending and await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
            if not pending:
                self._caught_up.set()
            if changed:
                async with self._changed:
                    self._changed.notify_all()

    def _outcome(self, key: bytes | None, value: bytes | None) -> None:
        """Collect the events of the commands this process waits for: only records of
        runs with such a command are decoded. The orchestrator writes a command's events
        and then its recorded command in one transaction: the recorded command ends it."""
        waiting = self._waiting.get(key) if key is not None else None
        if not waiting or value is None:
            return
        try:
            record = decode(value)
        except DecodeError:
            return
        if isinstance(record, Event):
            pending = waiting.get(record.causation_id)
            if pending is not None:
                pending.events.append(record)
        elif isinstance(record, RecordedCommand):
            pending = waiting.get(record.command.command_id)
            if pending is not None and not pending.done.done():
                pending.done.set_result(sorted(pending.events, key=lambda e: e.seq))

    def _apply_spec(self, key: bytes | None, value: bytes | None) -> None:
        """A spec record, as the engine's spec follower reads it: the first body of a
        (workflow, version) counts, and one that does not validate is skipped."""
        if key is None or value is None or key in self._specs:
            return
        try:
            spec = load_deployed_spec(json.loads(value))
        except (ValueError, SpecError) as exc:
            log.warning(
                "spec record %s is not a valid spec, skipped: %s", key.decode(errors="replace"), exc
            )
            return
        if spec_key(*spec.key) == key:
            self._specs[key] = spec

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        run_id = key.decode(errors="replace")
        if value is None:
            self._states.pop(run_id, None)
            return
        try:
            record = decode(value)
        except DecodeError as exc:
            log.warning("state record of %s does not decode, skipped: %s", run_id, exc)
            return
        if isinstance(record, RunState):
            self._states[run_id] = record
            self._accepted.pop(run_id, None)

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        if self._consumer is not None:
            with contextlib.suppress(KafkaError, OSError):
                await self._consumer.stop()
        self._follower = self._consumer = None
        await self.client.close()

    async def deploy(self, spec: WorkflowSpec) -> bool:
        async with self._turn:
            result: bool = await self._call(self.client.deploy(spec))
        self._specs.setdefault(spec_key(*spec.key), spec)
        return result

    async def specs(self) -> list[WorkflowSpec]:
        return sorted(self._specs.values(), key=lambda s: s.key)

    async def trigger(self, trigger: Trigger) -> str:
        run_id: str = await self._call(self.client.trigger(trigger))
        if run_id not in self._states:
            self._accepted[run_id] = RunState(
                run_id=run_id,
                tenant=trigger.tenant,
                correlation_id=trigger.correlation_id,
                workflow=trigger.workflow,
                version=trigger.version,
                idempotency_key=trigger.idempotency_key,
                requested_by=trigger.requested_by,
                priority=trigger.priority,
                input=trigger.input,
            )
        return run_id

    async def state(self, run_id: str) -> RunState | None:
        """The run's latest state. A finished run's snapshot on the changelog is only its
        compact record (``finished_record``: no input, results or output), so a finished
        run is the fold of its events, read once and kept (it does not change again)."""
        state = self._states.get(run_id) or self._accepted.get(run_id)
        if state is None or not state.terminal:
            return state
        full = self._finished.get(run_id)
        if full is None or full.seq < state.seq:
            async with self._turn:
                log_ = await self._call(self.client.run_log(run_id))
            if not log_.events:
                return state
            full = fold(log_.events)
            if full is None:
                return state
            self._finished[run_id] = full
            while len(self._finished) > FINISHED_KEPT:
                self._finished.popitem(last=False)
        self._finished.move_to_end(run_id)
        return full

    async def states(self) -> list[RunState]:
        return [
            *self._states.values(),
            *(s for r, s in self._accepted.items() if r not in self._states),
        ]

    async def events(self, run_id: str) -> list[Event]:
        async with self._turn:
            log_ = await self._call(self.client.run_log(run_id))
            events: list[Event] = log_.events
            return events

    async def submit(self, command: Command) -> Submitted:
        """Publish ``command`` and wait for the events it causes, which the follower
        collects; commands to any runs are in flight at once."""
        key = command.run_id.encode()
        pending = _Pending(asyncio.get_running_loop().create_future())
        self._waiting.setdefault(key, {})[command.command_id] = pending
        try:
            await self._call(self.client.publish_command(command))
            try:
                events: list[Event] | None = await asyncio.wait_for(
                    asyncio.shield(pending.done), COMMAND_WAIT_S
                )
            except TimeoutError:
                events = None
        finally:
            waiting = self._waiting.get(key, {})
            waiting.pop(command.command_id, None)
            if not waiting:
                self._waiting.pop(key, None)
        if events is not None:
            # The events are committed; give the follower a moment to show their state.
            last = max((e.seq for e in events), default=0)
            await self.wait_change(command.run_id, last - 1, 2.0)
        return Submitted(events, await self.state(command.run_id))

    async def dead_letters(self) -> list[DeadLetter]:
        async with self._turn:
            result: list[DeadLetter] = await self._call(self.client.dead_letters())
            return result

    async def publish(self, message: PublishMessage) -> None:
        await self._call(self.client.publish(message))

    async def wait_change(self, run_id: str, seq: int, timeout_s: float) -> RunState | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s

        def moved() -> bool:
            state = self._states.get(run_id)
            return state is not None and state.seq > seq

        async with self._changed:
            while not moved():
                left = deadline - loop.time()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)
        return await self.state(run_id)


__all__ = [
    "ApiBackend",
    "BackendUnavailableError",
    "EmbeddedApiBackend",
    "KafkaApiBackend",
    "KafkaClientError",
    "Submitted",
]
