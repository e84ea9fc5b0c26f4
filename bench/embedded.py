"""Terranoha on the embedded backend (one SQLite file): the Kafka benchmark's workload.

N runs of the same 5-step workflow with the same no-op tool; the engine loop and the
worker loop (``EmbeddedWorker``, 64 tasks at once) in one process, as ``terranoha serve
--db`` runs them. Every trigger is submitted up front (a burst); the figure is completed
runs/s and steps/s until the last run completes, plus CPU seconds and peak RSS of the
process per 1k steps.

    python bench/embedded.py [--runs 2000]

Prints a line and, last on stdout, the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import peak_rss_mb  # noqa: E402
from bench.kafka_throughput import SPEC, STEPS  # noqa: E402
from engine.core.events import Event, RunCompleted  # noqa: E402
from engine.core.records import Trigger  # noqa: E402
from engine.embedded import EmbeddedEngine  # noqa: E402
from engine.embedded.engine import EmbeddedWorker  # noqa: E402
from engine.worker import load_worker_modules  # noqa: E402


async def _run(db: Path, runs: int, concurrency: int) -> dict[str, Any]:
    engine = EmbeddedEngine(db)
    engine.store.deploy(SPEC, engine.clock.now_ms())
    engine.specs.add(SPEC)
    worker = EmbeddedWorker(db, load_worker_modules(["bench.noop_tools"]), concurrency=concurrency)
    completed = 0
    done = asyncio.Event()

    def observe(events: Sequence[Event]) -> None:
        nonlocal completed
        completed += sum(1 for e in events if isinstance(e, RunCompleted))
        if completed >= runs:
            done.set()

    engine.on_committed = observe
    engine.submit(*(Trigger(workflow=SPEC.workflow, idempotency_key=f"e{i}") for i in range(runs)))
    stop = asyncio.Event()
    cpu = time.process_time()
    began = time.perf_counter()
    loops = [asyncio.create_task(engine.run(stop)), asyncio.create_task(worker.run(stop))]
    try:
        await asyncio.wait_for(done.wait(), 900)
    finally:
        elapsed = time.perf_counter() - began
        cpu = time.process_time() - cpu
        stop.set()
        await asyncio.gather(*loops)
        worker.close()
        engine.close()
    steps = completed * STEPS
    return {
        "engine": "terranoha-embedded",
        "runs": runs,
        "completed": completed,
        "seconds": elapsed,
        "runs_per_s": completed / elapsed,
        "steps_per_s": steps / elapsed,
        "cpu_seconds": cpu,
        "cpu_s_per_1k_steps": cpu / steps * 1000 if steps else float("nan"),
        "peak_rss_mb": peak_rss_mb(os.getpid()),
        "settings": {
            "worker_concurrency": concurrency,
            "batch": engine.batch_size,
            "store": "SQLite (WAL), one transaction per batch",
        },
    }


def run(runs: int, concurrency: int = 64) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="terranoha-bench-") as tmp:
        return asyncio.run(_run(Path(tmp) / "bench.db", runs, concurrency))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    with contextlib.suppress(ValueError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    result = run(args.runs, args.concurrency)
    print(
        f"embedded: {result['completed']}/{result['runs']} runs in {result['seconds']:.1f}s:"
        f" {result['runs_per_s']:,.0f} runs/s, {result['steps_per_s']:,.0f} steps/s, "
        f"{result['cpu_s_per_1k_steps']:.2f} CPU s per 1k steps, peak RSS "
        f"{result['peak_rss_mb']:.0f} MB",
        file=sys.stderr,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
