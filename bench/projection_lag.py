"""Projection lag and rebuild speed, on the real broker and PostgreSQL.

1. lag: ``python -m projections.postgres`` runs in its own process; this process
   publishes the events of a realistic workflow (``bench.replay``'s refund runs) at a
   steady rate, one transaction every ``--tick`` ms, and polls ``projector_offsets``
   (written in the same transaction as the rows) to see when each transaction's events
   are visible. Lag = commit returned -> rows visible; p50/p99/max over transactions.
2. rebuild: ``projections.postgres.rebuild`` of the whole topic into a fresh schema,
   events/s (in this process, with the decode, fold, redaction and upserts).
3. SQLite: the same events in an embedded store, ``project_store`` from scratch, events/s.

    python bench/projection_lag.py [--rate 2000] [--seconds 20] [--partitions 4]

Figures go to stdout. Nothing here is a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaProducer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import infra_settings, percentile  # noqa: E402
from bench.replay import REFUND_WORKFLOW, record_run  # noqa: E402
from engine.codec import encode  # noqa: E402
from engine.core import events as ev  # noqa: E402
from engine.core.spec import load_spec  # noqa: E402
from engine.embedded import Store  # noqa: E402
from engine.kafka.specs import publish_spec  # noqa: E402
from engine.kafka.topics import Topics, delete_topics, ensure_topics  # noqa: E402
from engine.runtime.processor import Batch  # noqa: E402
from engine.runtime.specs import SpecRegistry  # noqa: E402
from projections.postgres import create_schema, rebuild  # noqa: E402
from projections.sqlite import project_store  # noqa: E402

SPEC = load_spec(REFUND_WORKFLOW)


def events_in_log_order(n_runs: int) -> list[ev.Event]:
    """The runs' events interleaved like a live log: runs overlap, each in order."""
    runs = [record_run(SPEC, i) for i in range(n_runs)]
    out: list[ev.Event] = []
    width = 50  # runs in flight at once
    for start in range(0, n_runs, width):
        group = [list(r) for r in runs[start : start + width]]
        while any(group):
            for run in group:
                if run:
                    out.append(run.pop(0))
    return out


class Visibility(threading.Thread):
    """Polls the stored offsets; records when each published transaction is visible."""

    def __init__(self, dsn: str, topic: str, poll_s: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.dsn, self.topic, self.poll_s = dsn, topic, poll_s
        self.pending: list[tuple[float, dict[int, int]]] = []
        self.lags: list[float] = []
        self.lock = threading.Lock()
        self.done = threading.Event()

    def expect(self, committed_at: float, offsets: dict[int, int]) -> None:
        with self.lock:
            self.pending.append((committed_at, offsets))

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.done.is_set() or self.pending:
                rows = conn.execute(
                    'SELECT "partition", "offset" FROM projector_offsets WHERE topic = %s',
                    (self.topic,),
                ).fetchall()
                now = time.perf_counter()
                stored = {int(p): int(o) for p, o in rows}
                with self.lock:
                    while self.pending and all(
                        stored.get(p, -1) >= o for p, o in self.pending[0][1].items()
                    ):
                        committed_at, _ = self.pending.pop(0)
                        self.lags.append(now - committed_at)
                time.sleep(self.poll_s)


async def publish_steadily(
    bootstrap: str,
    topics: Topics,
    events: list[ev.Event],
    rate: int,
    tick_ms: int,
    seconds: float,
    seen: Visibility,
) -> tuple[int, float]:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=1,
        enable_idempotence=True,
        transactional_id=f"{topics.prefix}-bench-writer",
    )
    await producer.start()
    per_tick = max(1, rate * tick_ms // 1000)
    sent, started = 0, time.perf_counter()
    try:
        while sent < len(events) and time.perf_counter() - started < seconds:
            tick_start = time.perf_counter()
            chunk = events[sent : sent + per_tick]
            async with producer.transaction():
                futures = [
                    await producer.send(
                        topics.events,
                        encode(e),
                        key=e.run_id.encode(),
                        partition=topics.partition_of(e.run_id),
                    )
                    for e in chunk
                ]
            committed_at = time.perf_counter()
            offsets: dict[int, int] = {}
            for future in futures:
                meta = await future
                offsets[meta.partition] = max(offsets.get(meta.partition, -1), meta.offset)
            seen.expect(committed_at, offsets)
            sent += len(chunk)
            await asyncio.sleep(max(0.0, tick_ms / 1000 - (time.perf_counter() - tick_start)))
    finally:
        await producer.stop()
    return sent, time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=2000, help="events per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--tick", type=int, default=50, help="ms between transactions")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2000, help="projector batch size")
    args = parser.parse_args(argv)
    bootstrap, base_dsn = infra_settings()
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    topics = Topics(prefix=prefix, partitions=args.partitions)
    live_schema, fresh_schema = f"{prefix}_live", f"{prefix}_fresh"
    live, fresh = create_schema(base_dsn, live_schema), create_schema(base_dsn, fresh_schema)
    per_run = len(record_run(SPEC, 0))
    events = events_in_log_order(int(args.rate * args.seconds) // per_run + 50)
    asyncio.run(ensure_topics(bootstrap, topics.core_topics()))
    asyncio.run(publish_spec(bootstrap, topics, SPEC))
    projector = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "projections.postgres",
            "--kafka",
            bootstrap,
            "--postgres",
            live,
            "--topic-prefix",
            prefix,
            "--batch",
            str(args.batch),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
    )
    result: dict[str, Any] = {}
    try:
        assert projector.stdout is not None
        line = projector.stdout.readline()
        assert line.startswith(b"projecting"), line
        seen = Visibility(live, topics.events)
        seen.start()
        sent, elapsed = asyncio.run(
            publish_steadily(bootstrap, topics, events, args.rate, args.tick, args.seconds, seen)
        )
        seen.done.set()
        seen.join(timeout=60)
        lags_ms = [lag * 1000 for lag in seen.lags]
        result["lag"] = {
            "events": sent,
            "seconds": elapsed,
            "events_per_s": sent / elapsed,
            "transactions": len(lags_ms),
            "p50_ms": percentile(lags_ms, 0.50),
            "p99_ms": percentile(lags_ms, 0.99),
            "max_ms": max(lags_ms),
            "mean_ms": statistics.fmean(lags_ms),
        }
    finally:
        projector.terminate()
        projector.wait(timeout=30)

    stats = asyncio.run(rebuild(bootstrap, topics, fresh, specs=SpecRegistry([SPEC]), batch=5000))
    result["rebuild"] = {
        "events": stats.events,
        "seconds": stats.seconds,
        "events_per_s": stats.events_per_s,
    }

    published = events[: result["lag"]["events"]]
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.db")
        store.deploy(SPEC, 0)
        store.write_batch(Batch(events=published))
        store.close()
        started = time.perf_counter()
        projected = project_store(Path(tmp) / "bench.db", batch=5000)
        seconds = time.perf_counter() - started
        result["sqlite"] = {
            "events": projected,
            "seconds": seconds,
            "events_per_s": projected / seconds,
        }

    with psycopg.connect(base_dsn, autocommit=True) as conn:
        for schema in (live_schema, fresh_schema):
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    asyncio.run(delete_topics(bootstrap, prefix))

    lag, rb, lite = result["lag"], result["rebuild"], result["sqlite"]
    print(
        f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores; "
        f"{args.partitions} partitions, one local broker, local PostgreSQL"
    )
    print(
        f"steady load: {lag['events']} events in {lag['seconds']:.1f}s "
        f"({lag['events_per_s']:,.0f} events/s, {lag['transactions']} transactions of "
        f"{args.tick} ms)"
    )
    print(
        f"  lag commit -> row visible: p50 {lag['p50_ms']:.1f} ms  p99 {lag['p99_ms']:.1f} ms"
        f"  max {lag['max_ms']:.1f} ms  mean {lag['mean_ms']:.1f} ms"
    )
    print(
        f"rebuild (PostgreSQL): {rb['events']} events in {rb['seconds']:.1f}s = "
        f"{rb['events_per_s']:,.0f} events/s"
    )
    print(
        f"catch-up (SQLite store): {lite['events']} events in {lite['seconds']:.1f}s = "
        f"{lite['events_per_s']:,.0f} events/s"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
