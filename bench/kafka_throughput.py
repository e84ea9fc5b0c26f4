"""Throughput of Terranoha on Kafka against the ceiling of the same machine and broker.

1. ceiling: a bare aiokafka transactional consume -> produce loop, one transactional
   producer per input partition, the engine's batching, and per input the same number
   and size of output records the engine writes for one step (events, the recorded
   command, a state snapshot, a task command);
2. engine: N runs of a 5-step workflow (no-op tool), the orchestrator reading the
   co-partitioned triggers in one process, workers in another, triggers (keyed by run
   id, as the client sends them) published as fast as the broker takes them. With
   ``--topology router`` the triggers topic has another partition count, so the trigger
   router reads it, in the orchestrator's process (``router-apart``: in its own).

Prints steps/s for both and their ratio; the engine's CPU seconds and peak RSS per 1k
steps; and, for open-loop (Poisson) arrivals at 25/50/75/90% of the burst rate,
trigger -> first task command and step-transition latency p50/p95/p99 (from record
timestamps). Writes the figures to bench/results/kafka_throughput.json.

    python bench/kafka_throughput.py [--runs 2000] [--partitions 4] [--loads 0.25,0.5,0.75,0.9]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    InfraCpu,
    broker_pid,
    cpu_seconds,
    infra_settings,
    peak_rss_mb,
    percentiles,
)
from engine.codec import decode, encode  # noqa: E402
from engine.core.events import RunCompleted, TaskDispatched  # noqa: E402
from engine.core.records import Trigger  # noqa: E402
from engine.core.spec import load_spec  # noqa: E402
from engine.kafka._util import (  # noqa: E402
    Outcome,
    Record,
    run_transaction,
    transactional_producer,
)
from engine.kafka.specs import publish_spec  # noqa: E402
from engine.kafka.topics import Topics, delete_topics, ensure_topics  # noqa: E402

STEPS = 5
SPEC = load_spec(
    {
        "workflow": "bench5",
        "version": 1,
        "steps": [{"id": f"s{i}", "task": "bench.step", "timeout": "5m"} for i in range(STEPS)],
    }
)
# What the engine writes per step (measured on the log: 5 events of ~250 B, one recorded
# command, one state snapshot of ~800 B, one task command of ~300 B).
FANOUT = [250] * 6 + [800, 300]
INPUT_BYTES = 200


# ---------------------------------------------------------------------- ceiling


async def ceiling_loop(
    bootstrap: str, prefix: str, partitions: int, expected: int
) -> dict[str, Any]:
    """The bare loop. Runs in its own process, like the engine."""
    source, sink, group = f"{prefix}.ceil-in", f"{prefix}.ceil-out", f"{prefix}-ceil"
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        group_id=group,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 << 20,
    )
    producers: dict[int, AIOKafkaProducer] = {}
    for p in range(partitions):
        # The engine's producer settings.
        producers[p] = await transactional_producer(bootstrap, f"{prefix}-ceil-{p}")
    await consumer.start()
    payloads = [os.urandom(size) for size in FANOUT]
    done, started = 0, None
    broker, cpu_before, broker_before = broker_pid(), 0.0, 0.0
    try:
        while done < expected:
            fetched = await consumer.getmany(timeout_ms=20, max_records=1000)
            if started is None and fetched:
                started = time.perf_counter()
                cpu_before = time.process_time()
                broker_before = cpu_seconds(broker) if broker else 0.0

            async def transact(tp: TopicPartition, messages: list[Any]) -> int:
                records: list[Record] = [
                    (sink, tp.partition, message.key, payload, [])
                    for message in messages
                    for payload in payloads
                ]
                # The engine's batching and transaction routine, nothing else.
                outcome = await run_transaction(
                    producers[tp.partition], records, {tp: messages[-1].offset + 1}, group, 30.0
                )
                assert outcome is Outcome.COMMITTED, outcome
                return len(messages)

            # Partitions commit concurrently, as the engine's do.
            done += sum(
                await asyncio.gather(
                    *(transact(tp, messages) for tp, messages in fetched.items() if messages)
                )
            )
        elapsed = time.perf_counter() - (started or time.perf_counter())
        cpu = time.process_time() - cpu_before
        broker_cpu = cpu_seconds(broker) - broker_before if broker else float("nan")
    finally:
        await consumer.stop()
        for producer in producers.values():
            await producer.stop()
    return {
        "inputs": done,
        "seconds": elapsed,
        "inputs_per_s": done / elapsed,
        "cpu_s_per_1k_steps": cpu / done * 1000,
        "broker_cpu_s_per_1k_steps": broker_cpu / done * 1000,
    }


async def _prefill(bootstrap: str, topic: str, partitions: int, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        payload = os.urandom(INPUT_BYTES)
        for i in range(count):
            await producer.send(topic, payload, key=str(i).encode(), partition=i % partitions)
        await producer.flush()
    finally:
        await producer.stop()


CEILING_MIN_INPUTS = 50_000
"""The ceiling loop gets at least this many inputs: over a second of it."""


def bench_ceiling(bootstrap: str, partitions: int, inputs: int) -> dict[str, Any]:
    inputs = max(inputs, CEILING_MIN_INPUTS)
    prefix = f"b{uuid.uuid4().hex[:8]}"
    asyncio.run(
        ensure_topics(
            bootstrap,
            [
                NewTopic(f"{prefix}.ceil-in", partitions, 1),
                NewTopic(f"{prefix}.ceil-out", partitions, 1),
            ],
        )
    )
    try:
        asyncio.run(_prefill(bootstrap, f"{prefix}.ceil-in", partitions, inputs))
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "ceiling-loop",
                bootstrap,
                prefix,
                str(partitions),
                str(inputs),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    finally:
        asyncio.run(delete_topics(bootstrap, prefix))
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["steps_per_s"] = result["inputs_per_s"]  # one input per step, same fan-out
    result["codec_floor"] = codec_floor()
    return result


# ---------------------------------------------------------------------- codec floor


def codec_floor(runs: int = 400) -> dict[str, Any]:
    """CPU microseconds per step of the Avro work alone: decoding the step's input and
    encoding the records the engine writes for it (events, recorded command, state
    snapshot, task command), with the steps of ``runs`` real runs decided in-process.
    Whatever else an engine does, it does at least this beside the ceiling's work."""
    from engine.core.commands import CompleteTask
    from engine.runtime.processor import Input, Processor, StateCache
    from engine.runtime.specs import SpecRegistry

    specs = SpecRegistry()
    specs.add(SPEC)
    cache = StateCache()
    processor = Processor(specs, cache)
    inputs: list[bytes] = []
    written: list[object] = []
    now = 1_700_000_000_000
    pending = []
    for i in range(runs):
        payload = encode(Trigger(workflow="bench5", idempotency_key=f"floor-{i}"))
        batch = processor.process([Input("inputs", 0, i, payload)], now)
        cache.commit(batch.states)
        pending.extend(batch.tasks)
    offset = runs
    while pending:
        task = pending.pop()
        payload = encode(
            CompleteTask(
                command_id=f"r:{task.task_id}",
                run_id=task.run_id,
                tenant=task.tenant,
                correlation_id=task.correlation_id,
                task_id=task.task_id,
                step=task.step,
                result={"step": task.step},
            )
        )
        batch = processor.process([Input("inputs", 0, offset, payload)], now)
        offset += 1
        cache.commit(batch.states)
        pending.extend(batch.tasks)
        inputs.append(payload)
        written += [*batch.events, *batch.recorded, *batch.states.values(), *batch.tasks]
    steps = len(inputs)
    started = time.process_time()
    for payload in inputs:
        decode(payload)
    for record in written:
        encode(record)
    seconds = time.process_time() - started
    return {
        "steps": steps,
        "records_per_step": len(written) / steps,
        "us_per_step": seconds / steps * 1e6,
    }


# ---------------------------------------------------------------------- engine


def _serve(bootstrap: str, postgres: str, topics: Topics, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "serve",
            "--kafka",
            bootstrap,
            "--topic-prefix",
            topics.prefix,
            "--app",
            topics.prefix,
            "--partitions",
            str(topics.partitions),
            "--postgres",
            postgres,
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(b"serving"):
        raise RuntimeError(f"serve did not start: {line!r}")
    return proc


async def _drive(
    bootstrap: str, topics: Topics, runs: int, rate: float | None, tag: str
) -> dict[str, Any]:
    """Publish ``runs`` triggers (as fast as possible, or open-loop: Poisson arrivals at
    ``rate`` per second, whatever the engine's progress) and watch the run log until every
    run completed."""
    events_tps = [TopicPartition(topics.events, p) for p in range(topics.partitions)]
    watcher = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 << 20,
    )
    await watcher.start()
    watcher.assign(events_tps)
    await watcher.seek_to_end(*events_tps)
    for tp in events_tps:
        await watcher.position(tp)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=1)
    await producer.start()
    sent_at: dict[str, float] = {}
    first_cmd: dict[str, float] = {}
    completed: set[str] = set()
    first_dispatch_latency: list[float] = []
    step_latency: list[float] = []
    last_dispatch: dict[str, float] = {}
    from engine.core.policies import run_id_for

    arrivals = random.Random(f"{tag}-{runs}-{rate}")

    async def publish() -> None:
        due = time.monotonic()
        for i in range(runs):
            if rate is not None:
                due += arrivals.expovariate(rate)
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            key = f"{tag}-{i}"
            run_id = run_id_for("default", key)
            sent_at[run_id] = time.time() * 1000
            # Keyed by run id, as the client does: each lands on its run's partition.
            await producer.send(
                topics.triggers,
                encode(Trigger(workflow="bench5", idempotency_key=key)),
                key=run_id.encode(),
            )
        await producer.flush()

    began = time.perf_counter()
    publisher = asyncio.create_task(publish())
    deadline = time.monotonic() + 600
    while len(completed) < runs and time.monotonic() < deadline:
        fetched = await watcher.getmany(timeout_ms=100, max_records=20_000)
        for messages in fetched.values():
            for message in messages:
                # Decode only what is measured: the watcher must not take the CPU the
                # engine needs on a 2-core machine.
                kind = dict(message.headers or ()).get("type")
                if kind not in (b"TaskDispatched", b"RunCompleted"):
                    continue
                record = decode(message.value)
                if isinstance(record, TaskDispatched):
                    run_id = record.run_id
                    if run_id not in sent_at:
                        continue
                    ts = float(message.timestamp)
                    if record.step == "s0" and record.attempt == 1 and run_id not in first_cmd:
                        first_cmd[run_id] = ts
                        first_dispatch_latency.append(ts - sent_at[run_id])
                    elif run_id in last_dispatch:
                        step_latency.append(ts - last_dispatch[run_id])
                    last_dispatch[run_id] = ts
                elif isinstance(record, RunCompleted) and record.run_id in sent_at:
                    completed.add(record.run_id)
    elapsed = time.perf_counter() - began
    await publisher
    await producer.stop()
    await watcher.stop()
    return {
        "runs": runs,
        "completed": len(completed),
        "seconds": elapsed,
        "runs_per_s": len(completed) / elapsed,
        "steps_per_s": len(completed) * STEPS / elapsed,
        "offered_rate": rate,
        "trigger_to_first_command_ms": percentiles(first_dispatch_latency),
        "step_transition_ms": percentiles(step_latency),
    }


TOPOLOGIES = {
    "direct": "the orchestrator reads the co-partitioned triggers",
    "router": "a triggers topic of another partition count, the router in the engine's process",
    "router-apart": "a triggers topic of another partition count, the router in a "
    "process of its own",
}

LOADS = (0.25, 0.5, 0.75, 0.9)
"""Open-loop loads, as fractions of the burst (maximum sustained) rate."""


def bench_engine(
    bootstrap: str,
    postgres: str,
    partitions: int,
    runs: int,
    loads: tuple[float, ...] = LOADS,
    topology: str = "direct",
) -> dict[str, Any]:
    """The burst (the maximum sustained rate: triggers as fast as the broker takes them),
    the engine's CPU and peak RSS over it, then open-loop runs at ``loads``.

    ``topology`` (see ``TOPOLOGIES``): by default the orchestrator reads the triggers
    itself. The router topologies give the triggers topic one partition more than the
    run inputs, so ``serve`` runs the trigger router: in the orchestrator's process, or
    in a process of its own (``serve --no-engine`` beside ``serve --no-router``); the
    engine's CPU figure counts both processes."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology {topology!r}: choose one of {', '.join(TOPOLOGIES)}")
    topics = Topics(
        prefix=f"b{uuid.uuid4().hex[:8]}",
        partitions=partitions,
        trigger_partitions=None if topology == "direct" else partitions + 1,
    )

    async def setup() -> None:
        await ensure_topics(bootstrap, topics.core_topics())
        await publish_spec(bootstrap, topics, SPEC)

    asyncio.run(setup())
    router_apart = topology == "router-apart"
    engine = _serve(bootstrap, postgres, topics, *(["--no-router"] if router_apart else []))
    router = _serve(bootstrap, postgres, topics, "--no-engine") if router_apart else None
    worker = _serve(
        bootstrap,
        postgres,
        topics,
        "--no-engine",
        "--no-router",
        "--workers",
        "bench.noop_tools",
        "--concurrency",
        "64",
    )
    procs = [p for p in (engine, router, worker) if p is not None]
    try:
        asyncio.run(_drive(bootstrap, topics, min(100, runs), None, "warm"))
        infra = InfraCpu()
        cpu_before = {p.pid: cpu_seconds(p.pid) for p in procs}
        infra.start()
        burst = asyncio.run(_drive(bootstrap, topics, runs, None, "burst"))
        infra_cpu = infra.stop()
        steps = burst["completed"] * STEPS

        def per_1k(proc: subprocess.Popen[bytes] | None) -> float:
            if proc is None:
                return 0.0
            return (cpu_seconds(proc.pid) - cpu_before[proc.pid]) / steps * 1000

        burst["efficiency"] = {
            "topology": TOPOLOGIES[topology],
            "engine_cpu_s_per_1k_steps": per_1k(engine) + per_1k(router),
            "router_cpu_s_per_1k_steps": per_1k(router),
            "worker_cpu_s_per_1k_steps": per_1k(worker),
            **{f"{name}_cpu_s_per_1k_steps": cpu / steps * 1000 for name, cpu in infra_cpu.items()},
            "engine_peak_rss_mb": peak_rss_mb(engine.pid),
            "router_peak_rss_mb": peak_rss_mb(router.pid) if router else 0.0,
            "worker_peak_rss_mb": peak_rss_mb(worker.pid),
        }
        open_loop = {}
        for load in loads:
            rate = burst["runs_per_s"] * load
            # About 15 s of arrivals per load, at least 100 runs.
            count = max(100, min(runs, int(rate * 15)))
            open_loop[f"{round(load * 100)}%"] = asyncio.run(
                _drive(bootstrap, topics, count, rate, f"load{load}")
            )
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
        asyncio.run(delete_topics(bootstrap, topics.prefix))
    return {"burst": burst, "open_loop": open_loop}


def main(argv: list[str]) -> None:
    if argv and argv[0] == "ceiling-loop":
        bootstrap, prefix, partitions, expected = argv[1], argv[2], int(argv[3]), int(argv[4])
        print(json.dumps(asyncio.run(ceiling_loop(bootstrap, prefix, partitions, expected))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--loads",
        default=",".join(str(x) for x in LOADS),
        help="open-loop loads, fractions of the burst rate",
    )
    parser.add_argument(
        "--topology",
        choices=list(TOPOLOGIES),
        default="direct",
        help="who reads the triggers: " + "; ".join(f"{k}: {v}" for k, v in TOPOLOGIES.items()),
    )
    args = parser.parse_args(argv)
    loads = tuple(float(x) for x in args.loads.split(",") if x)
    bootstrap, postgres = infra_settings()
    ceiling = bench_ceiling(bootstrap, args.partitions, args.runs * STEPS)
    engine = bench_engine(
        bootstrap, postgres, args.partitions, args.runs, loads, topology=args.topology
    )
    ratio = engine["burst"]["steps_per_s"] / ceiling["steps_per_s"]
    burst = engine["burst"]
    print(
        f"python {platform.python_version()}, {os.cpu_count()} cores, "
        f"{args.partitions} partitions, {args.runs} runs x {STEPS} steps"
    )
    print(f"ceiling (bare transactional consume->produce): {ceiling['steps_per_s']:>9,.0f} steps/s")
    print(
        f"engine  (5-step workflow, workers apart):      {burst['steps_per_s']:>9,.0f} steps/s"
        f"  ({burst['runs_per_s']:,.0f} runs/s)"
    )
    print(f"engine / ceiling: {ratio:.2f}")
    eff = burst["efficiency"]
    print(f"{eff['topology']}")
    print(
        f"engine: {eff['engine_cpu_s_per_1k_steps']:.2f} CPU s per 1k steps, peak RSS "
        f"{eff['engine_peak_rss_mb']:.0f} MB; worker {eff['worker_cpu_s_per_1k_steps']:.2f} "
        "CPU s per 1k steps"
    )
    for label, result in (("burst", burst), *engine["open_loop"].items()):
        print(latency_line(label, result))
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "kafka_throughput.json").write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "python": platform.python_version(),
                "cores": os.cpu_count(),
                "partitions": args.partitions,
                "runs": args.runs,
                "ceiling": ceiling,
                "engine": engine,
                "engine_over_ceiling": ratio,
            },
            indent=2,
        )
    )


def latency_line(label: str, result: dict[str, Any]) -> str:
    t, s = result["trigger_to_first_command_ms"], result["step_transition_ms"]
    offered = result.get("offered_rate")
    rate = f" at {offered:,.0f} runs/s" if offered else ""
    return (
        f"{label:>6}{rate}: trigger->first command p50/p95/p99 "
        f"{t['p50']:.0f}/{t['p95']:.0f}/{t['p99']:.0f} ms; step transition "
        f"{s['p50']:.0f}/{s['p95']:.0f}/{s['p99']:.0f} ms"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
