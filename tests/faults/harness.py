"""Drive engine processes against the fault broker, generate load, and read back the log."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from engine.codec import decode, encode
from engine.core.commands import Command
from engine.core.correlation import PublishMessage, key_of
from engine.core.events import Event
from engine.core.evolve import fold
from engine.core.policies import run_id_for
from engine.core.records import DeadLetter, Trigger
from engine.core.spec import WorkflowSpec
from engine.core.state import RunState
from engine.kafka.specs import publish_spec
from engine.kafka.topics import Topics, ensure_topics
from projections.postgres import with_schema
from tests.embedded.durable_tools import DURABLE
from tests.faults.infra import ROOT, FaultInfra


@dataclass(frozen=True, slots=True)
class Logged:
    """One record of the events topic as a consumer saw it."""

    partition: int
    offset: int
    record: Any


@dataclass
class LogView:
    """The events and dead-letter topics read to their end under both isolation levels."""

    committed: list[Logged]
    uncommitted: list[Logged]
    dead: list[DeadLetter]

    @property
    def aborted(self) -> list[Logged]:
        """Records a read_uncommitted consumer sees and a read_committed one does not:
        writes of aborted (or fenced and settled) transactions."""
        seen = {(r.partition, r.offset) for r in self.committed}
        return [r for r in self.uncommitted if (r.partition, r.offset) not in seen]

    def events(self) -> dict[str, list[Logged]]:
        runs: dict[str, list[Logged]] = defaultdict(list)
        for logged in self.committed:
            if isinstance(logged.record, Event):
                runs[logged.record.run_id].append(logged)
        return dict(runs)

    def states(self) -> dict[str, RunState]:
        out: dict[str, RunState] = {}
        for run_id, logged in self.events().items():
            state = fold(sorted((e.record for e in logged), key=lambda e: e.seq))
            if state is not None:
                out[run_id] = state
        return out


@dataclass
class Sent:
    """What the load generator sent, and whether the broker acknowledged it."""

    triggers: dict[str, str] = field(default_factory=dict)
    """Acknowledged triggers: idempotency key -> run id."""
    unacknowledged: dict[str, str] = field(default_factory=dict)
    """Sends that failed or timed out: they may or may not have reached the log."""
    commands: list[Command] = field(default_factory=list)
    """Approvals, signals, cancellations and the like, sent to the run inputs topic."""
    copies: int = 0

    @property
    def run_ids(self) -> list[str]:
        return sorted(set(self.triggers.values()))


class Fleet:
    """One scenario's corner of the fault broker: its own topic prefix, app id, effects file
    and engine processes."""

    def __init__(self, infra: FaultInfra, tmp: Path, partitions: int = 4) -> None:
        self.infra = infra
        self.tmp = tmp
        self.slots: dict[int, int] = {}
        """The local state directory (its number) of each engine process, by pid."""
        self.partitions = partitions
        self.prefix = f"f{uuid.uuid4().hex[:10]}"
        self.topics = Topics(prefix=self.prefix, partitions=partitions)
        """Co-partitioned triggers, as deployed by default: the orchestrator reads them."""
        self.effects = tmp / "effects.db"
        self.clock_file = tmp / "clock-offset"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.projectors: list[subprocess.Popen[bytes]] = []
        """The PostgreSQL projector processes, newest last; checker 4 reads their schema."""
        self.signalled: set[int] = set()
        """Pids the scenario stopped on purpose; any other exit is a crash."""
        self.revived = 0
        self.sent = Sent()
        self._lock = threading.Lock()

    def setup(self, *specs: WorkflowSpec) -> None:
        """Topics and specs, and the PostgreSQL projector, which lives through the
        scenario's faults like the engine does."""

        async def go() -> None:
            await ensure_topics(self.infra.bootstrap, self.topics.core_topics())
            for spec in specs or (DURABLE,):
                await publish_spec(self.infra.bootstrap, self.topics, spec)

        asyncio.run(go())
        self.start_projector()

    # ------------------------------------------------------------------ projector

    @property
    def projection_dsn(self) -> str:
        """The schema the scenario's projector writes (named after the topic prefix)."""
        return with_schema(self.infra.postgres, self.prefix)

    def start_projector(self) -> subprocess.Popen[bytes]:
        """``python -m projections.postgres`` on the events topic, into its own schema."""
        args = [
            sys.executable,
            "-m",
            "projections.postgres",
            "--kafka",
            self.infra.bootstrap,
            "--postgres",
            self.infra.postgres,
            "--topic-prefix",
            self.prefix,
            "--schema",
            self.prefix,
            "--batch",
            "500",
        ]
        err = open(self.tmp / f"projector-{len(self.projectors)}.log", "wb")  # noqa: SIM115
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(args, env=env, stdout=err, stderr=subprocess.STDOUT, cwd=ROOT)
        err.close()
        self.projectors.append(proc)
        return proc

    def projector_exits(self) -> list[str]:
        """Projector processes that exited without being told to, with their last line."""
        return self._exits(self.projectors, "projector")

    def _exits(self, procs: list[subprocess.Popen[bytes]], name: str) -> list[str]:
        out = []
        for i, proc in enumerate(procs):
            if proc.poll() is not None and proc.pid not in self.signalled:
                lines = (self.tmp / f"{name}-{i}.log").read_text(errors="replace").splitlines()
                last = next((x for x in reversed(lines) if x and not x.startswith(" ")), "")
                out.append(f"{name}-{i} (pid {proc.pid}) exited {proc.returncode}: {last}")
        return out

    def revive_projector(self) -> bool:
        """Start a projector if none runs (a supervisor's job); True if one was started."""
        if any(p.poll() is None for p in self.projectors):
            return False
        self.start_projector()
        return True

    # ------------------------------------------------------------------ processes

    def start(
        self, *, commit_timeout: float = 15.0, worker: bool = True, wait: bool = True
    ) -> subprocess.Popen[bytes]:
        """An engine process (orchestrator, router, spec follower and a durable-tools
        worker); its stderr goes to a file in the scenario's directory."""
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TERRANOHA_TEST_EFFECTS": str(self.effects)}
        args = [
            sys.executable,
            "-m",
            "tests.faults.engine_main",
            "--kafka",
            self.infra.bootstrap,
            "--postgres",
            self.infra.postgres,
            "--prefix",
            self.prefix,
            "--partitions",
            str(self.partitions),
            "--commit-timeout",
            str(commit_timeout),
            "--clock-file",
            str(self.clock_file),
        ]
        if not worker:
            args.append("--no-worker")
        # Each live process has a local state directory of its own; a process started
        # after one died takes the lowest one free, as a restarted pod keeps its volume.
        taken = {self.slots[p.pid] for p in self.alive() if p.pid in self.slots}
        slot = next(i for i in range(len(self.procs) + 1) if i not in taken)
        args += ["--state-dir", str(self.tmp / f"state-{slot}")]
        err = open(self.tmp / f"engine-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=err, cwd=ROOT)
        err.close()
        self.procs.append(proc)
        self.slots[proc.pid] = slot
        if wait:
            wait_serving(proc)
        return proc

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def crashes(self) -> list[str]:
        """Engine processes that exited without being told to, with their last log line."""
        return self._exits(self.procs, "engine")

    def revive(self, **options: Any) -> None:
        """What a supervisor would do: start an engine if none is running."""
        if not self.alive():
            self.revived += 1
            self.start(**options)

    def stop_all(self) -> list[int | None]:
        """Stop every engine and projector process; the engines' exit codes."""
        for proc in self.projectors:
            self._terminate(proc, 30)
        codes = []
        for proc in self.procs:
            self._terminate(proc, 60)
            codes.append(proc.returncode)
            if proc.stdout is not None:
                proc.stdout.close()
        return codes

    def _terminate(self, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
        """SIGTERM (after SIGCONT, in case it was paused), SIGKILL if it outlasts
        ``timeout_s``."""
        if proc.poll() is not None:
            return
        self.signalled.add(proc.pid)
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Signal an engine process and wait for it to exit."""
        self.signalled.add(proc.pid)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()

    def stderr(self) -> str:
        """Everything the engine processes logged."""
        return "\n".join(
            (self.tmp / f"engine-{i}.log").read_text(errors="replace")
            for i in range(len(self.procs))
        )

    # ------------------------------------------------------------------ load

    def trigger(
        self,
        keys: list[str],
        workflow: str = "durable",
        copies: int = 1,
        timeout_s: float = 60.0,
        requested_by: str = "harness",
        input_of: Callable[[str], Any] | None = None,
    ) -> None:
        """Publish one trigger per key (``copies`` times each), recording what was acked.
        A run's input is ``input_of(key)``, by default ``{"n": len(key)}``."""

        async def go() -> None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.infra.bootstrap,
                acks="all",
                request_timeout_ms=int(timeout_s * 1000),
            )
            try:
                await producer.start()
                futures = []
                for _ in range(copies):
                    for i, key in enumerate(keys):
                        data = {"n": len(key)} if input_of is None else input_of(key)
                        trigger = Trigger(
                            workflow=workflow,
                            idempotency_key=key,
                            input=data,
                            requested_by=requested_by,
                        )
                        # Half keyed by run id (decided where they land), half by the
                        # idempotency key (mostly forwarded to their run's partition).
                        record_key = run_id_for("default", key) if i % 2 else key
                        futures.append(
                            (
                                key,
                                await producer.send(
                                    self.topics.triggers, encode(trigger), key=record_key.encode()
                                ),
                            )
                        )
                results = await asyncio.gather(*(f for _, f in futures), return_exceptions=True)
                with self._lock:
                    for (key, _), result in zip(futures, results, strict=True):
                        run_id = run_id_for("default", key)
                        if isinstance(result, BaseException):
                            self.sent.unacknowledged.setdefault(key, run_id)
                        else:
                            self.sent.triggers[key] = run_id
                    self.sent.copies += copies * len(keys)
            finally:
                await producer.stop()

        try:
            asyncio.run(asyncio.wait_for(go(), timeout_s + 30))
        except Exception:
            with self._lock:
                for key in keys:
                    if key not in self.sent.triggers:
                        self.sent.unacknowledged[key] = run_id_for("default", key)

    def send_commands(self, commands: list[Command]) -> None:
        """Commands straight to the run inputs topic (what the CLI's approve/signal/cancel
        do)."""

        async def go() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=self.infra.bootstrap, acks="all")
            try:
                await producer.start()
                for command in commands:
                    await producer.send(
                        self.topics.inputs,
                        encode(command),
                        key=command.run_id.encode(),
                        partition=self.topics.partition_of(command.run_id),
                    )
                await producer.flush()
            finally:
                await producer.stop()

        asyncio.run(go())
        self.sent.commands.extend(commands)

    def publish(self, messages: list[PublishMessage]) -> None:
        """Messages onto the messages topic, keyed by correlation key (what an outside
        producer does); acknowledged by the broker or the call fails."""

        async def go() -> None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.infra.bootstrap, acks="all", enable_idempotence=True
            )
            try:
                await producer.start()
                for message in messages:
                    await producer.send(
                        self.topics.messages, encode(message), key=key_of(message).encode()
                    )
                await producer.flush()
            finally:
                await producer.stop()

        asyncio.run(go())

    def allow_large(self, *topics: str, max_bytes: int = 4 << 20) -> None:
        """Raise ``max.message.bytes`` on ``topics`` (the broker default is about 1 MiB, the
        same as the engine's own input limit, so an oversize record could not arrive)."""

        async def go() -> None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.infra.bootstrap)
            await admin.start()
            try:
                await admin.alter_configs(
                    [
                        ConfigResource(
                            ConfigResourceType.TOPIC, topic, {"max.message.bytes": str(max_bytes)}
                        )
                        for topic in topics
                    ]
                )
            finally:
                await admin.close()

        asyncio.run(go())

    def send_raw(
        self, topic: str, payloads: list[tuple[bytes | None, bytes]], partition: int | None = None
    ) -> None:
        async def go() -> None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.infra.bootstrap, acks="all", max_request_size=8 << 20
            )
            try:
                await producer.start()
                for key, value in payloads:
                    await producer.send(topic, value, key=key, partition=partition)
                await producer.flush()
            finally:
                await producer.stop()

        asyncio.run(go())

    def load(self, seconds: float, rate: int, label: str = "k") -> LoadThread:
        """Publish ``rate`` triggers a second for ``seconds`` in a background thread."""
        thread = LoadThread(self, seconds, rate, label)
        thread.start()
        return thread

    # ------------------------------------------------------------------ reading

    def read(self, timeout_s: float = 60.0) -> LogView:
        return asyncio.run(asyncio.wait_for(read_log(self.infra.bootstrap, self.topics), timeout_s))

    def read_inputs(self) -> list[Logged]:
        """The committed run inputs (commands) that decode; poison is left out."""

        async def go() -> list[Logged]:
            parts = [TopicPartition(self.topics.inputs, p) for p in range(self.partitions)]
            out: list[Logged] = []
            for tp, message in await read_to_end(self.infra.bootstrap, parts, "read_committed"):
                try:
                    record = decode(message.value or b"")
                except Exception:
                    continue
                out.append(Logged(tp.partition, message.offset, record))
            return out

        return asyncio.run(asyncio.wait_for(go(), 60))

    def wait_settled(
        self,
        timeout_s: float,
        done: Callable[[LogView], bool] | None = None,
    ) -> tuple[LogView, float]:
        """Wait until every expected run is terminal (or ``done(view)`` holds) and the log
        stops growing; return the last view and the seconds waited."""
        started = time.monotonic()
        deadline = started + timeout_s
        expected = set(self.sent.run_ids)
        previous = -1
        while True:
            view = self.read()
            states = view.states()
            finished = (
                done(view)
                if done is not None
                else all(r in states and states[r].terminal for r in expected)
            )
            if (finished and len(view.uncommitted) == previous) or time.monotonic() > deadline:
                return view, time.monotonic() - started
            previous = len(view.uncommitted) if finished else -1
            time.sleep(1.0)


async def read_log(bootstrap: str, topics: Topics) -> LogView:
    """The events and dead-letter topics of ``topics``, read to their end under both
    isolation levels."""
    parts = [TopicPartition(topics.events, p) for p in range(topics.partitions)]
    parts += [TopicPartition(topics.dead_letters, p) for p in range(topics.partitions)]
    logs: dict[str, list[Logged]] = {}
    dead: list[DeadLetter] = []
    for isolation in ("read_committed", "read_uncommitted"):
        logs[isolation] = []
        for tp, message in await read_to_end(bootstrap, parts, isolation):
            record = decode(message.value)
            if tp.topic == topics.events:
                logs[isolation].append(Logged(tp.partition, message.offset, record))
            elif isolation == "read_committed" and isinstance(record, DeadLetter):
                dead.append(record)
    return LogView(logs["read_committed"], logs["read_uncommitted"], dead)


async def read_to_end(
    bootstrap: str,
    parts: list[TopicPartition],
    isolation: str,
) -> list[tuple[TopicPartition, Any]]:
    """Every record of ``parts`` from the beginning to the current end."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level=isolation,
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 << 20,
    )
    await consumer.start()
    out: list[tuple[TopicPartition, Any]] = []
    try:
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        while [tp for tp in parts if await consumer.position(tp) < ends[tp]]:
            fetched = await consumer.getmany(timeout_ms=200, max_records=50_000)
            out.extend((tp, m) for tp, messages in fetched.items() for m in messages)
    finally:
        await consumer.stop()
    return out


class LoadThread(threading.Thread):
    def __init__(self, fleet: Fleet, seconds: float, rate: int, label: str) -> None:
        super().__init__(daemon=True)
        self.fleet = fleet
        self.seconds = seconds
        self.rate = rate
        self.label = label
        self.batches = 0

    def run(self) -> None:
        end = time.monotonic() + self.seconds
        i = 0
        while time.monotonic() < end:
            step = max(1, self.rate // 5)
            keys = [f"{self.fleet.prefix}-{self.label}-{i + j}" for j in range(step)]
            i += step
            self.fleet.trigger(keys, timeout_s=45.0)
            self.batches += 1
            time.sleep(0.2)


def wait_serving(proc: subprocess.Popen[bytes], timeout_s: float = 90.0) -> None:
    assert proc.stdout is not None
    box: list[bytes] = []
    reader = threading.Thread(
        target=lambda: box.append(proc.stdout.readline()),  # type: ignore[union-attr]
        daemon=True,
    )
    reader.start()
    reader.join(timeout_s)
    line = box[0] if box else b""
    assert line.startswith(b"serving"), f"the engine did not start: {line!r}"
