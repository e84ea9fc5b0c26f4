"""Memory with history: the engine's run task after many finished runs, 1k active.

Drives the real ``RunTask`` (decide, evolve, encode, the compact record of finished
runs, the local store's writes after each "commit") batch by batch, without the broker:
what grows with history is the task's memory, and that is what this isolates. RSS is
read after ``--small`` and after ``--large`` finished runs; with bounded memory the two
are close (the issue's target: the second at most 1.2x the first). ``rss_anon`` leaves
out the pages of the store's memory map, which the kernel reclaims at will.

    python -m bench.state_memory [--small 100000] [--large 2000000] [--no-store]

Prints one JSON line. Nothing here is a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition

from engine.codec import encode
from engine.core.commands import DeliverSignal, StartRun
from engine.core.spec import load_spec
from engine.kafka.localstore import LocalStore, StoreIdentity
from engine.kafka.processor import KafkaEngine, RunTask
from engine.kafka.stream import StreamProcessor
from engine.kafka.topics import Topics
from engine.runtime.processor import Input
from engine.runtime.specs import SpecRegistry

SPEC = load_spec(
    {
        "workflow": "hold",
        "version": 1,
        "steps": [{"id": "wait", "wait_event": {"name": "go", "timeout": "1h"}}],
    }
)
BATCH = 500
ACTIVE = 1000


def _rss() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--large", type=int, default=2_000_000)
    parser.add_argument(
        "--no-store",
        action="store_true",
        help="no local store: finished runs stay in memory (compact)",
    )
    args = parser.parse_args(argv)
    topics = Topics(prefix="bench", partitions=1)
    specs = SpecRegistry()
    specs.add(SPEC)
    engine = KafkaEngine("127.0.0.1:1", topics, specs)
    task = RunTask(engine, 0)
    directory = Path(tempfile.mkdtemp(prefix="terranoha-state-bench-"))
    if not args.no_store:
        task.store = LocalStore(directory, StoreIdentity("bench", topics.state, 0))
    tp = TopicPartition(topics.state, 0)
    offset = 0
    now = 1_700_000_000_000

    loop = asyncio.new_event_loop()

    def commit(inputs: list[Input]) -> None:
        """One batch as the stream processor runs it after a committed transaction; the
        changelog offsets advance as the broker's would (records, then the marker)."""
        nonlocal offset
        step = loop.run_until_complete(task.process(inputs, now))
        step.commit()
        offset += sum(1 for r in step.records if r[0] == topics.state) + 1
        StreamProcessor._store_committed(task, step, {tp: offset})

    def start(i: int) -> Input:
        return Input(
            topics.inputs,
            0,
            i,
            encode(
                StartRun(
                    command_id=f"s{i}",
                    run_id=f"run-{i}",
                    workflow="hold",
                    version=1,
                    idempotency_key=f"k{i}",
                    input={"order_id": f"ord-{i}", "note": "x" * 200},
                )
            ),
        )

    def finish(i: int) -> Input:
        return Input(
            topics.inputs,
            0,
            i,
            encode(
                DeliverSignal(command_id=f"g{i}", run_id=f"run-{i}", name="go", data={"ok": True})
            ),
        )

    commit([start(i) for i in range(ACTIVE)])  # these stay active
    figures: dict[str, Any] = {"store": not args.no_store, "active": ACTIVE}
    finished = 0
    started = time.perf_counter()
    for target, name in ((args.small, "small"), (args.large, "large")):
        while finished < target:
            ids = range(ACTIVE + finished, ACTIVE + min(finished + BATCH, target))
            commit([start(i) for i in ids])
            commit([finish(i) for i in ids])
            finished += len(ids)
        rss = _rss()
        figures[f"finished_{name}"] = finished
        figures[f"rss_mb_{name}"] = round(rss["VmRSS"], 1)
        figures[f"rss_anon_mb_{name}"] = round(rss["RssAnon"], 1)
        figures[f"in_memory_{name}"] = len(task.cache)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    figures["rss_ratio"] = round(figures["rss_mb_large"] / figures["rss_mb_small"], 3)
    figures["rss_anon_ratio"] = round(
        figures["rss_anon_mb_large"] / figures["rss_anon_mb_small"], 3
    )
    if task.store is not None:
        figures["store_entries"] = task.store.counts()
        task.store.close()
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
