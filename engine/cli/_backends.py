"""Where the commands read and write: the embedded store (``--db``) or Kafka
(``--kafka``). Both offer the same operations, so every command body is written once."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import sys
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psycopg
from aiokafka.errors import KafkaConnectionError, KafkaError

from engine.cli._shared import CliError, now_ms
from engine.core.commands import Command
from engine.core.correlation import CorrelationEvent, PublishMessage
from engine.core.events import Event
from engine.core.evolve import fold
from engine.core.policies import run_id_for
from engine.core.records import DeadLetter, Trigger
from engine.core.spec import WorkflowSpec
from engine.core.state import RunState, Waiting
from engine.embedded import EmbeddedEngine, Store
from engine.kafka.client import (
    START_HINT,
    BrokerUnavailableError,
    KafkaClient,
    KafkaClientError,
    RunLog,
    TopicStatus,
)
from engine.kafka.topics import Topics
from projections.query import event_index

T = TypeVar("T")

COMMAND_WAIT_S = 10.0
"""How long a command sent to Kafka waits for the orchestrator to process it."""

START_WAIT_S = 3.0
"""How long ``run`` (without ``--wait``) gives a running orchestrator to start the run, so
that a run that fails at once is reported as failed."""


@dataclass(frozen=True, slots=True)
class Started:
    """What ``Backend.start`` did: the run id, the run's state if known, and whether the
    run existed already (then nothing was submitted: the same key is the same run)."""

    run_id: str
    state: RunState | None
    existed: bool = False


class Backend(Protocol):
    """The operations the run commands need, on either backend."""

    def deploy(self, spec: WorkflowSpec) -> bool: ...

    def specs(self) -> list[WorkflowSpec]: ...

    def start(self, trigger: Trigger) -> Started:
        """Submit ``trigger`` unless its run exists already; say what happened."""
        ...

    def queued(self) -> str:
        """What to say about a submission whose outcome is not known yet."""
        ...

    def run(self, text: str) -> RunState:
        """The run ``text`` names; raises ``CliError`` saying where it looked."""
        ...

    def state(self, run_id: str) -> RunState | None: ...

    def submit(self, command: Command) -> tuple[list[Event] | None, RunState | None]:
        """Send ``command``; return the events it caused (None while it is queued) and
        the run's state after them."""
        ...

    def log(self, text: str) -> RunLog: ...

    def runs(self, status: str | None, limit: int) -> list[RunState]: ...

    def dead_letters(self) -> list[DeadLetter]: ...

    def publish(self, message: PublishMessage) -> None:
        """Publish a message for the waits that name its key (and process it, embedded)."""
        ...

    def message_events(self) -> list[CorrelationEvent]: ...

    def advance(self) -> None:
        """Let what is due happen, where this command is the one to do it (the embedded
        store with no server: process the inputs, fire the due timers)."""
        ...

    def stalled(self, state: RunState) -> str | None:
        """Why ``state`` will not move on by itself (its timers will not fire), or None."""
        ...

    def close(self) -> None: ...


@contextlib.contextmanager
def open_backend(args: argparse.Namespace) -> Iterator[Backend]:
    backend: Backend = KafkaBackend(args) if args.kafka else EmbeddedBackend(args)
    try:
        yield backend
    finally:
        backend.close()


# ---------------------------------------------------------------------- embedded


def db_path(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "db", None) or os.environ.get("TERRANOHA_DB") or "terranoha.db")


@contextlib.contextmanager
def processor_lock(db: Path, wait: bool) -> Iterator[bool]:
    """The embedded store has one processor at a time. Yields whether we hold the lock."""
    handle = open(f"{db}.lock", "a+")  # noqa: SIM115 - held for the block
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            held = True
        except BlockingIOError:
            held = False
        yield held
    finally:
        handle.close()


class EmbeddedBackend:
    """The SQLite store. Commands that change a run append to its inputs and, unless a
    ``terranoha serve`` holds the store, process them at once."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.db = db_path(args)

    @contextlib.contextmanager
    def _store(self, must_exist: bool = True) -> Iterator[Store]:
        if must_exist and not self.db.exists():
            raise CliError(f"no store at {self.db}; pass --db PATH (or run `terranoha demo` first)")
        store = Store(self.db)
        try:
            yield store
        finally:
            store.close()

    def deploy(self, spec: WorkflowSpec) -> bool:
        with self._store(must_exist=False) as store:
            return store.deploy(spec, now_ms())

    def specs(self) -> list[WorkflowSpec]:
        with self._store() as store:
            return store.specs()

    def start(self, trigger: Trigger) -> Started:
        run_id = run_id_for(trigger.tenant, trigger.idempotency_key)
        if self.db.exists():
            with self._store() as store:
                existing = store.state(run_id)
            if existing is not None:
                return Started(run_id, existing, existed=True)
        return Started(run_id, self._submit_and_settle([trigger], run_id))

    def queued(self) -> str:
        return f"queued in {self.db}"

    def run(self, text: str) -> RunState:
        with self._store() as store:
            run_id = store.find_run(text)
            state = store.state(run_id) if run_id is not None else None
        if state is None:
            raise CliError(f"no run matches {text!r} in {self.db}; list runs with `terranoha runs`")
        return state

    def state(self, run_id: str) -> RunState | None:
        with self._store() as store:
            return store.state(run_id)

    def submit(self, command: Command) -> tuple[list[Event] | None, RunState | None]:
        self._submit_and_settle([command], command.run_id)
        with self._store() as store:
            events = [
                e for e in store.events(command.run_id) if e.causation_id == command.command_id
            ]
            return events or None, store.state(command.run_id)

    def log(self, text: str) -> RunLog:
        run_id = self.run(text).run_id
        with self._store() as store:
            return RunLog(run_id, store.events(run_id), store.recorded_commands(run_id))

    def runs(self, status: str | None, limit: int) -> list[RunState]:
        with self._store() as store:
            return [s for r in store.run_ids(status, limit) if (s := store.state(r))]

    def dead_letters(self) -> list[DeadLetter]:
        with self._store() as store:
            return store.dead_letters()

    def publish(self, message: PublishMessage) -> None:
        self._submit_and_settle([message], "")

    def message_events(self) -> list[CorrelationEvent]:
        with self._store() as store:
            return store.message_events()

    def advance(self) -> None:
        with processor_lock(self.db, wait=False) as held:
            if held:
                engine = EmbeddedEngine(self.db)
                try:
                    engine.drain()
                finally:
                    engine.close()

    def stalled(self, state: RunState) -> str | None:
        current = state.current
        timed = current is not None and current.waiting in (Waiting.TIMER, Waiting.RETRY)
        overdue = any(t.due_at <= now_ms() for t in state.timers.values())
        if state.terminal or not (timed or overdue):
            return None
        with processor_lock(self.db, wait=False) as held:
            if not held:
                return None  # a server holds the store: it fires the timers
        return (
            f"no `terranoha serve` holds {self.db}: the run's timers (sleeps, retries, "
            "reminders, expiries, SLAs) fire only while one runs, or while a command "
            f"processes the store; start `terranoha serve --db {self.db}`"
        )

    def close(self) -> None:
        pass

    def _submit_and_settle(
        self, records: Sequence[Command | Trigger | PublishMessage], run_id: str
    ) -> RunState | None:
        """Append the records; process them here unless a server holds the store."""
        with self._store(must_exist=False) as store:
            store.append_inputs(records, now_ms())
        with processor_lock(self.db, wait=False) as held:
            if held:
                engine = EmbeddedEngine(self.db)
                try:
                    engine.drain()
                    return engine.cache.get(run_id)
                finally:
                    engine.close()
        # A server is processing: give it a moment to pick the records up.
        deadline = time.monotonic() + 3.0
        with self._store() as store:
            last = store.last_input()
            while time.monotonic() < deadline and store.offset() < last:
                time.sleep(0.05)
            return store.state(run_id)


# ---------------------------------------------------------------------- kafka


def kafka_topics(args: argparse.Namespace) -> Topics:
    return Topics(prefix=args.topic_prefix, partitions=args.partitions)


class KafkaBackend:
    """The Kafka topics, through ``KafkaClient`` on one event loop for the command."""

    def __init__(self, args: argparse.Namespace) -> None:
        # The client's errors say what went wrong; aiokafka's own log lines would repeat
        # them on stderr when no logging is configured.
        quiet = logging.getLogger("aiokafka")
        if not any(isinstance(h, logging.NullHandler) for h in quiet.handlers):
            quiet.addHandler(logging.NullHandler())
        self.bootstrap: str = args.kafka
        self.index: str | None = getattr(args, "index", None)
        """The PostgreSQL projections whose event index locates a run's records."""
        self._warned = False
        self.client = KafkaClient(self.bootstrap, kafka_topics(args), app=args.app)
        self._runner = asyncio.Runner()
        try:
            self._call(self.client.start())
        except BaseException:
            self.close()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return self._runner.run(coro)
        except KafkaConnectionError as exc:
            raise BrokerUnavailableError(
                f"lost Kafka at {self.bootstrap} ({exc}); {START_HINT}"
            ) from None
        except KafkaError as exc:
            raise KafkaClientError(f"Kafka at {self.bootstrap} failed: {exc!r}") from None

    @property
    def topics(self) -> Topics:
        return self.client.topics

    def close(self) -> None:
        try:
            self._runner.run(self.client.close())
        finally:
            self._runner.close()

    def create_topics(self, topics: Topics) -> list[TopicStatus]:
        return self._call(self.client.create_topics(topics))

    def deploy(self, spec: WorkflowSpec) -> bool:
        return self._call(self.client.deploy(spec))

    def specs(self) -> list[WorkflowSpec]:
        return self._call(self.client.specs())

    def start(self, trigger: Trigger) -> Started:
        run_id = run_id_for(trigger.tenant, trigger.idempotency_key)
        existing = self.state(run_id)
        if existing is not None:
            return Started(run_id, existing, existed=True)
        self._call(self.client.trigger(trigger))
        deadline = time.monotonic() + START_WAIT_S
        state = self.state(run_id)
        while state is None and time.monotonic() < deadline:
            time.sleep(0.2)
            state = self.state(run_id)
        return Started(run_id, state)

    def queued(self) -> str:
        return f"trigger published to {self.topics.triggers}"

    def run(self, text: str) -> RunState:
        state = self.state(text)
        if state is None:
            raise CliError(self._not_found(text, self.topics.state))
        return state

    def state(self, run_id: str) -> RunState | None:
        """With an index: the fold of the run's events, read at their offsets (a
        finished run's snapshot on the changelog is only its compact record). Without:
        the run's snapshot, scanning its changelog partition, and for a finished run the
        fold of its events, scanning its events partition (the compact record has no
        output, results or steps to show)."""
        log = self._indexed_log(run_id)
        if log is None:
            state = self._call(self.client.state(run_id))
            if state is None or state.outcome is None:
                return state
            events = self._call(self.client.run_log(run_id)).events
            return fold(events) if events else state
        return fold(log.events) if log.events else None

    def _indexed_log(self, run_id: str) -> RunLog | None:
        """The run's log read through the index; None when there is no index for the
        events topic (then say, once, that reading falls back to a partition scan)."""
        where = None
        if self.index:
            number = self.topics.partition_of(run_id)
            try:
                where = event_index(self.index, run_id, self.topics.events, number)
            except psycopg.Error as exc:
                raise CliError(
                    f"the index at --index cannot be read ({exc}); check the "
                    "DSN, or leave --index out to scan the partition"
                ) from None
            if where is None:
                self._fall_back(
                    f"the projections at --index do not follow "
                    f"{self.topics.events} (start `terranoha project --kafka "
                    f"{self.bootstrap} --postgres DSN`)"
                )
                return None
            return self._call(self.client.run_log_at(run_id, where.offsets, where.indexed_to))
        self._fall_back(
            "no index is configured (--index DSN or $TERRANOHA_INDEX: the PostgreSQL projections)"
        )
        return None

    def _fall_back(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            sys.stderr.write(
                f"note: {why}; reading the run's partition from its beginning, "
                "which slows down as history grows\n"
            )

    def submit(self, command: Command) -> tuple[list[Event] | None, RunState | None]:
        events = self._call(self.client.send_command(command, COMMAND_WAIT_S))
        return events, self.state(command.run_id)

    def log(self, text: str) -> RunLog:
        log = self._indexed_log(text) or self._call(self.client.run_log(text))
        if not log.events:
            raise CliError(self._not_found(text, self.topics.events))
        return log

    def runs(self, status: str | None, limit: int) -> list[RunState]:
        states = self._call(self.client.states())
        if status:
            states = [s for s in states if s.status.value == status]
        return sorted(states, key=lambda s: s.started_at, reverse=True)[:limit]

    def dead_letters(self) -> list[DeadLetter]:
        return self._call(self.client.dead_letters())

    def publish(self, message: PublishMessage) -> None:
        self._call(self.client.publish(message))

    def message_events(self) -> list[CorrelationEvent]:
        return self._call(self.client.message_events())

    def advance(self) -> None:
        pass  # the orchestrator fires timers

    def stalled(self, state: RunState) -> str | None:
        return None

    @staticmethod
    def _not_found(text: str, topic: str) -> str:
        return (
            f"no run {text} on topic {topic}; on Kafka give the full run id (finding a "
            "run by a prefix of its id needs an index), or check --topic-prefix"
        )
