"""Drive ``terranoha serve --kafka`` processes from tests and check what they left behind."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from engine.codec import decode, encode
from engine.core.events import Event, RunStarted
from engine.core.evolve import fold
from engine.core.policies import run_id_for
from engine.core.records import DeadLetter, Trigger
from engine.core.spec import WorkflowSpec
from engine.core.state import RunState
from engine.kafka.specs import publish_spec
from engine.kafka.topics import Topics, delete_topics, ensure_topics
from tests.embedded.durable_tools import DURABLE

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Cluster:
    """One test's corner of the broker: its own topic prefix, app id and effects file."""

    bootstrap: str
    postgres: str
    tmp: Path
    partitions: int = 4
    prefix: str = field(default_factory=lambda: f"i{uuid.uuid4().hex[:10]}")

    @property
    def topics(self) -> Topics:
        return Topics(prefix=self.prefix, partitions=self.partitions, trigger_partitions=2)

    @property
    def effects(self) -> Path:
        return self.tmp / "effects.db"

    def setup(self, spec: WorkflowSpec = DURABLE) -> None:
        async def go() -> None:
            await ensure_topics(self.bootstrap, self.topics.core_topics())
            await publish_spec(self.bootstrap, self.topics, spec)

        asyncio.run(go())

    def delete_topics(self) -> None:
        """Remove this corner's topics: a broker holding the partitions of every past test
        spends more on each request (it walks all its logs) and the tests after slow down."""
        asyncio.run(delete_topics(self.bootstrap, self.prefix))

    def serve(self, *extra: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TERRANOHA_TEST_EFFECTS": str(self.effects)}
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine.cli",
                "serve",
                "--kafka",
                self.bootstrap,
                "--postgres",
                self.postgres,
                "--topic-prefix",
                self.prefix,
                "--app",
                self.prefix,
                "--partitions",
                str(self.partitions),
                "--workers",
                "tests.embedded.durable_tools",
                "--concurrency",
                "8",
                *extra,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def trigger(self, n: int, duplicates: int = 1) -> list[str]:
        """Publish ``n`` keyed triggers (each ``duplicates`` times); return the run ids."""
        keys = [f"{self.prefix}-{i}" for i in range(n)]

        async def go() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
            await producer.start()
            try:
                for _ in range(duplicates):
                    for i, key in enumerate(keys):
                        trigger = Trigger(workflow="durable", idempotency_key=key, input={"n": i})
                        await producer.send(self.topics.triggers, encode(trigger), key=key.encode())
                await producer.flush()
            finally:
                await producer.stop()

        asyncio.run(go())
        return [run_id_for("default", key) for key in keys]

    def read_log(
        self,
    ) -> tuple[dict[str, list[Event]], list[tuple[str, int, int]], list[DeadLetter]]:
        """Every committed event by run, every (run, seq, offset), and the dead letters."""
        t = self.topics

        async def go() -> tuple[
            dict[str, list[Event]], list[tuple[str, int, int]], list[DeadLetter]
        ]:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                isolation_level="read_committed",
                enable_auto_commit=False,
            )
            await consumer.start()
            runs: dict[str, list[Event]] = defaultdict(list)
            positions: list[tuple[str, int, int]] = []
            dead: list[DeadLetter] = []
            try:
                parts = [TopicPartition(t.events, p) for p in range(t.partitions)]
                parts += [TopicPartition(t.dead_letters, p) for p in range(t.partitions)]
                consumer.assign(parts)
                await consumer.seek_to_beginning(*parts)
                ends = await consumer.end_offsets(parts)
                while [tp for tp in parts if await consumer.position(tp) < ends[tp]]:
                    fetched = await consumer.getmany(timeout_ms=200, max_records=20_000)
                    for messages in fetched.values():
                        for message in messages:
                            record = decode(message.value)
                            if isinstance(record, Event):
                                runs[record.run_id].append(record)
                                positions.append((record.run_id, record.seq, message.offset))
                            elif isinstance(record, DeadLetter):
                                dead.append(record)
            finally:
                await consumer.stop()
            return dict(runs), positions, dead

        return asyncio.run(go())

    def states(self) -> dict[str, RunState]:
        runs, _, _ = self.read_log()
        out = {}
        for run_id, events in runs.items():
            state = fold(sorted(events, key=lambda e: e.seq))
            if state is not None:
                out[run_id] = state
        return out


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> str:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return err.decode(errors="replace")


def wait_ready(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith(b"serving"), f"the server did not start: {line!r}"


def check_log(cluster: Cluster, run_ids: list[str]) -> dict[str, RunState]:
    """The run-log invariants; returns the final states."""
    runs, positions, _ = cluster.read_log()
    assert set(run_ids) <= set(runs), f"{len(set(run_ids) - set(runs))} runs never started"
    duplicated = [k for k, n in Counter((r, s) for r, s, _ in positions).items() if n > 1]
    assert not duplicated, f"events written twice (run, seq): {duplicated[:5]}"
    states: dict[str, RunState] = {}
    for run_id in run_ids:
        events = sorted(runs[run_id], key=lambda e: e.seq)
        seqs = [e.seq for e in events]
        assert seqs == list(range(1, len(seqs) + 1)), f"{run_id}: gaps in {seqs}"
        assert sum(isinstance(e, RunStarted) for e in events) == 1, f"{run_id} started twice"
        state = fold(events)
        assert state is not None
        states[run_id] = state
    return states


def effects_per_write(cluster: Cluster) -> tuple[dict[str, int], int]:
    db = sqlite3.connect(cluster.effects)
    try:
        per_write = dict(
            db.execute("SELECT run_id || '/' || step, COUNT(*) FROM effects GROUP BY 1")
        )
        calls = db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    finally:
        db.close()
    return per_write, calls
