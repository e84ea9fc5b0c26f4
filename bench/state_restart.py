"""Restart with history: the engine's time to its first command when the state changelog
holds N finished runs, from an empty disk and with its local state present.

1. history: the state changelog of a fresh deployment gets N finished runs' compact
   records (what the compacted changelog holds after N runs finished) and 1k active
   runs, written in transactions as the engine writes them;
2. empty disk: ``terranoha serve --kafka`` starts with an empty ``--state-dir``; a probe
   run is started; figure: process start -> the probe's ``RunStarted`` (record time),
   and the restore time the engine logs (``restore_ms_<N>_history_empty_disk``);
3. local state present: the engine is SIGKILLed and restarted at once (same
   ``--instance-id`` and ``--state-dir``); a second probe; figure: SIGKILL -> its
   ``RunStarted`` (``restart_first_command_ms_<N>_history``), and the restore time;
4. ``terranoha status`` of a finished run of the history, without an index (the scan of
   its compacted changelog partition): ``status_ms_<N>_history_scan``.

    python -m bench.state_restart [--history 2000000] [--partitions 4]

Prints one JSON line. Nothing here is a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench._common import ROOT, infra_settings, sigkill, terminate
from engine.codec import encode
from engine.core.commands import DeliverSignal, StartRun
from engine.core.decide import process
from engine.core.spec import load_spec
from engine.core.state import RunState, finished_record, replace
from engine.kafka.specs import publish_spec
from engine.kafka.topics import Topics, delete_topics, ensure_topics

SPEC = load_spec(
    {
        "workflow": "hold",
        "version": 1,
        "steps": [{"id": "wait", "wait_event": {"name": "go", "timeout": "1h"}}],
    }
)
ACTIVE = 1000
T0 = 1_700_000_000_000


def _states() -> tuple[RunState, RunState]:
    """A finished run's compact record and an active run's state, as the core makes them."""
    start = StartRun(
        command_id="s",
        run_id="r",
        workflow="hold",
        version=1,
        idempotency_key="k",
        input={"order_id": "ord-1", "note": "x" * 200},
    )
    waiting = process(None, start, SPEC, T0).state
    assert waiting is not None
    done = process(
        waiting, DeliverSignal(command_id="g", run_id="r", name="go"), SPEC, T0 + 1000
    ).state
    assert done is not None and done.terminal
    return finished_record(done), waiting


async def _history(bootstrap: str, topics: Topics, history: int) -> list[str]:
    finished, waiting = _states()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        transactional_id=f"{topics.prefix}-h",
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
        max_batch_size=1 << 20,
    )
    await producer.start()
    names = []
    try:
        for first in range(0, history + ACTIVE, 5000):
            async with producer.transaction():
                for i in range(first, min(first + 5000, history + ACTIVE)):
                    run_id = f"hist-{i}" if i < history else f"active-{i}"
                    template = finished if i < history else waiting
                    state = replace(
                        template, run_id=run_id, correlation_id=run_id, idempotency_key=run_id
                    )
                    await producer.send(
                        topics.state,
                        encode(state),
                        key=run_id.encode(),
                        partition=topics.partition_of(run_id),
                    )
                    if i < 3:
                        names.append(run_id)
    finally:
        await producer.stop()
    return names


def _serve(bootstrap: str, topics: Topics, state_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "serve",
            "--kafka",
            bootstrap,
            "--topic-prefix",
            topics.prefix,
            "--partitions",
            str(topics.partitions),
            "--app",
            topics.prefix,
            "--state-dir",
            str(state_dir),
            "--instance-id",
            "bench-restart",
            "--log-level",
            "info",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )


async def _first_command(
    bootstrap: str, topics: Topics, run_id: str, timeout_s: float = 600
) -> float:
    """Publish a probe StartRun; return the record time (s) of its RunStarted."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    tp = TopicPartition(topics.events, topics.partition_of(run_id))
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        await producer.send_and_wait(
            topics.inputs,
            encode(
                StartRun(
                    command_id=f"probe-{run_id}",
                    run_id=run_id,
                    workflow="hold",
                    version=1,
                    idempotency_key=run_id,
                )
            ),
            key=run_id.encode(),
            partition=topics.partition_of(run_id),
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            fetched = await consumer.getmany(tp, timeout_ms=200)
            for message in fetched.get(tp, []):
                if message.key == run_id.encode():
                    return float(message.timestamp) / 1000
        raise RuntimeError(f"no first command for {run_id} within {timeout_s}s")
    finally:
        await producer.stop()
        await consumer.stop()


def _restore_ms(log: Path, after: int) -> list[int]:
    """The restore times the engine logged since byte ``after`` of its log."""
    text = log.read_bytes()[after:].decode(errors="replace")
    return [
        int(m)
        for m in re.findall(
            r"engine task \d+ acquired: \d+ entries restored in "
            r"(\d+) ms",
            text,
        )
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--history", type=int, default=2_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args(argv)
    bootstrap, _ = infra_settings()
    topics = Topics(prefix=f"br{uuid.uuid4().hex[:8]}", partitions=args.partitions)
    work = Path(tempfile.mkdtemp(prefix="terranoha-restart-bench-"))
    state_dir, log = work / "state", work / "serve.log"
    n = args.history
    label = f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k"
    figures: dict[str, Any] = {"history": n, "active": ACTIVE, "partitions": args.partitions}
    asyncio.run(ensure_topics(bootstrap, topics.core_topics()))
    proc = None
    try:
        asyncio.run(publish_spec(bootstrap, topics, SPEC))
        began = time.perf_counter()
        history = asyncio.run(_history(bootstrap, topics, n))
        figures["history_write_s"] = round(time.perf_counter() - began, 1)

        started = time.time()
        proc = _serve(bootstrap, topics, state_dir, log)
        first = asyncio.run(_first_command(bootstrap, topics, "probe-empty-disk"))
        figures[f"start_first_command_ms_{label}_history_empty_disk"] = round(
            (first - started) * 1000
        )
        figures[f"restore_ms_{label}_history_empty_disk"] = max(_restore_ms(log, 0), default=None)

        size = log.stat().st_size
        killed = sigkill(proc)
        proc = _serve(bootstrap, topics, state_dir, log)
        first = asyncio.run(_first_command(bootstrap, topics, "probe-local-state"))
        figures[f"restart_first_command_ms_{label}_history"] = round((first - killed) * 1000)
        figures[f"restore_ms_{label}_history_local_state"] = max(
            _restore_ms(log, size), default=None
        )

        began = time.perf_counter()
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "engine.cli",
                "status",
                history[0],
                "--kafka",
                bootstrap,
                "--topic-prefix",
                topics.prefix,
                "--partitions",
                str(topics.partitions),
                "--app",
                topics.prefix,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        figures[f"status_ms_{label}_history_scan"] = round((time.perf_counter() - began) * 1000)
        figures["status_ok"] = status.returncode == 0 and "Completed" in status.stdout
    finally:
        if proc is not None:
            terminate(proc)
        asyncio.run(delete_topics(bootstrap, topics.prefix))
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
