"""Sustained ``POST /v1/runs`` on the Kafka backend: requests/s and latency.

A ``terranoha api --kafka`` process (uvicorn, one worker) over topics of its own; the
client is in this process (httpx, asyncio) on the same cores. Each request starts a new
run (its own ``Idempotency-Key``) and is answered once the trigger is on the topic with
``acks=all``. Two phases, after a warm-up:

1. closed loop: ``--concurrency`` requests in flight for ``--seconds``: the most the API
   sustains here (requests/s), with p50/p99;
2. open loop: Poisson arrivals at ``--rate`` requests/s (default: 500, or 80% of the
   closed-loop rate if that is lower) for ``--seconds``: latency p50/p99 at that load.

No orchestrator runs: this measures the front door, not the engine behind it. The same
closed loop straight into an idempotent ``acks=all`` producer is the baseline
(``api_over_producer``); the machine's load average is recorded beside the figures.

    python bench/api.py [--seconds 15] [--concurrency 16] [--rate R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import cpu_seconds, infra_settings, percentile  # noqa: E402
from engine.api.identity import KeyStore, now_ms  # noqa: E402
from engine.kafka.client import KafkaClient  # noqa: E402
from engine.kafka.topics import Topics, delete_topics  # noqa: E402

SPEC = """\
workflow: bench-api
version: 1
input: {n: integer}
steps:
  - id: hold
    wait_event: {name: go, timeout: 1h}
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _closed(client: httpx.AsyncClient, seconds: float, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            started = time.perf_counter()
            answer = await client.post(
                "/v1/runs",
                json={"workflow": "bench-api", "tenant": "bench", "input": {"n": 1}},
                headers={"Idempotency-Key": uuid.uuid4().hex},
            )
            if answer.status_code == 201:
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                errors += 1
                statuses.add(f"{answer.status_code} {answer.text[:200]}")

    statuses: set[str] = set()
    began = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.monotonic() - began
    return {
        "requests_per_s": len(latencies) / elapsed,
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
        "concurrency": concurrency,
        "error_answers": sorted(statuses)[:5],
    }


async def _open(client: httpx.AsyncClient, seconds: float, rate: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    rng = random.Random(7)

    async def one() -> None:
        nonlocal errors
        started = time.perf_counter()
        answer = await client.post(
            "/v1/runs",
            json={"workflow": "bench-api", "tenant": "bench", "input": {"n": 1}},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        )
        if answer.status_code == 201:
            latencies.append((time.perf_counter() - started) * 1000)
        else:
            errors += 1

    tasks: list[asyncio.Task[None]] = []
    began = time.perf_counter()
    due = began
    while due - began < seconds:
        due += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return {
        "rate": rate,
        "requests": len(latencies),
        "errors": errors,
        "achieved_per_s": len(latencies) / (time.perf_counter() - began),
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
    }


async def _measure(
    url: str, key: str, seconds: float, concurrency: int, rate: float | None
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30.0, limits=limits
    ) as client:
        deployed = await client.post("/v1/workflows", json={"spec": SPEC})
        assert deployed.status_code in (200, 201), deployed.text
        await _closed(client, 3.0, concurrency)  # warm-up: connections, spec cache
        closed = await _closed(client, seconds, concurrency)
        if not closed["requests"]:
            raise RuntimeError(f"no request succeeded: {closed['error_answers']}")
        target = rate or min(500.0, 0.8 * closed["requests_per_s"])
        opened = await _open(client, seconds, target)
    return {"closed_loop": closed, "open_loop": opened}


async def _producer(bootstrap: str, topic: str, seconds: float, concurrency: int) -> dict[str, Any]:
    """The same closed loop straight into an idempotent ``acks=all`` producer (what a
    client that publishes triggers itself does): the baseline the API is compared to."""
    from aiokafka import AIOKafkaProducer

    from engine.codec import encode
    from engine.core.records import Trigger

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    async def loop() -> None:
        while time.monotonic() < deadline:
            key = uuid.uuid4().hex
            record = encode(
                Trigger(
                    workflow="bench-api",
                    version=1,
                    tenant="bench",
                    idempotency_key=key,
                    input={"n": 1},
                    requested_by="b",
                )
            )
            started = time.perf_counter()
            await producer.send_and_wait(topic, record, key=key.encode())
            latencies.append((time.perf_counter() - started) * 1000)

    try:
        began = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.monotonic() - began
    finally:
        await producer.stop()
    return {
        "requests_per_s": len(latencies) / elapsed,
        "requests": len(latencies),
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
        "concurrency": concurrency,
    }


def run(seconds: float = 15.0, concurrency: int = 16, rate: float | None = None) -> dict[str, Any]:
    bootstrap, _ = infra_settings()
    prefix = f"bapi{uuid.uuid4().hex[:8]}"
    topics = Topics(prefix=prefix, partitions=4)

    async def create() -> None:
        async with KafkaClient(bootstrap, topics, app=prefix) as client:
            await client.create_topics(topics)

    asyncio.run(create())
    with tempfile.TemporaryDirectory() as tmp:
        keys = KeyStore(Path(tmp) / "keys.db")
        key, _ = keys.create("bench", ["*"], ["admin"], now_ms())
        keys.close()
        port = _free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine.cli",
                "api",
                "--kafka",
                bootstrap,
                "--topic-prefix",
                prefix,
                "--app",
                prefix,
                "--keys",
                str(Path(tmp) / "keys.db"),
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    _, err = server.communicate(timeout=10)
                    raise RuntimeError(f"the API did not start: {err.decode()[-2000:]}")
                time.sleep(0.2)
            cpu_before = cpu_seconds(server.pid)
            began = time.monotonic()
            figures = asyncio.run(_measure(url, key, seconds, concurrency, rate))
            served = figures["closed_loop"]["requests"] + figures["open_loop"]["requests"]
            figures["api_cpu_ms_per_request"] = (
                (cpu_seconds(server.pid) - cpu_before) * 1000 / max(1, served)
            )
            figures["wall_s"] = time.monotonic() - began
            figures["producer"] = asyncio.run(
                _producer(bootstrap, topics.triggers, seconds, concurrency)
            )
            figures["api_over_producer"] = (
                figures["closed_loop"]["requests_per_s"] / figures["producer"]["requests_per_s"]
            )
            figures["load_average"] = os.getloadavg()[0]
        finally:
            server.terminate()
            server.communicate(timeout=30)
            asyncio.run(delete_topics(bootstrap, prefix))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rate", type=float)
    args = parser.parse_args()
    figures = run(args.seconds, args.concurrency, args.rate)
    out = ROOT / "bench" / "results" / "api.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
