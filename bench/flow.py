"""Flow control: the admission processor of a ``terranoha serve --kafka`` process, driven
by Acquire/Release records as the run engine will write them.

* ``fair_jain_index``: three equal-weight tenants on one tool limited to 4 slots, one
  with 10x the others' requests queued; each grant is "executed" for ``SERVICE_MS`` and
  released. Jain's index of the grants each tenant got while all three still waited
  (1.0 is perfectly fair).
* ``light_wait_ratio``: two light tenants' requests arriving at ``LIGHT_RATE`` each, with a
  third tenant arriving at 10x that (more than the tool serves) and without it: the light
  tenants' p99 queue wait beside the heavy one over their p99 wait alone.
* ``grant_latency_p99_ms``: with 10,000 tenant keys active (a request holding a slot on
  each, granted in one burst: ``burst_grants_per_s``), 300 more requests on them at
  100/s, from the Acquire's send to its grant read back; the limiter's RSS after it.
* ``flow_overhead_ratio`` (runs/s with limits deployed but not binding over runs/s
  without, in the same run) is not measured here yet: reported as None.

    PYTHONPATH=. python bench/flow.py [--keys 10000]   # prints one JSON line
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench._common import ROOT, infra_settings, memory_mb, percentile, terminate
from engine.codec import decode, encode
from engine.core import admission as ad
from engine.core.limits import load_limits_yaml, resolve
from engine.kafka.admission import AdmissionTopics
from engine.kafka.limits import publish_limits
from engine.kafka.topics import Topics, delete_topics, ensure_topics, key_partition

PARTITIONS = 4
TOOL = "tool:llm.bench"
SLOTS = 4
SERVICE_MS = 20
LIGHT_RATE = 4.0
"""Requests per second of a light tenant in the open-loop part; the heavy one offers 10x,
more than the tool's 4 slots serve, so its queue grows."""
OPEN_LOOP_S = 10.0
DOC = f"""limits: v1
rules:
  - key: {TOOL}
    concurrency: {SLOTS}
  - key: tenant:*
    concurrency: 5
"""


def _serve(topics: Topics, bootstrap: str) -> subprocess.Popen[bytes]:
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
            str(PARTITIONS),
            "--no-engine",
            "--instance-id",
            "bench-admission",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    if not proc.stdout.readline().startswith(b"serving"):
        proc.kill()
        raise RuntimeError("terranoha serve did not start")
    return proc


class Client:
    """Sends admission commands and reads the grants back (all partitions, in order)."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        self.admission = AdmissionTopics(topics)
        self.producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, linger_ms=2, acks="all", enable_idempotence=True
        )
        self.grants = AIOKafkaConsumer(
            self.admission.grants,
            bootstrap_servers=bootstrap,
            isolation_level="read_committed",
            auto_offset_reset="latest",
            enable_auto_commit=False,
            group_id=f"{topics.prefix}-bench-{uuid.uuid4().hex[:6]}",
        )

    async def start(self) -> None:
        await self.producer.start()
        await self.grants.start()
        while not self.grants.assignment():
            await self.grants.getmany(timeout_ms=100)
        for tp in self.grants.assignment():
            await self.grants.seek_to_end(tp)
            await self.grants.position(tp)

    async def stop(self) -> None:
        await self.grants.stop()
        await self.producer.stop()

    async def send(self, commands: list[ad.AdmissionCommand]) -> None:
        futures = [
            await self.producer.send(
                self.admission.keyed.inputs,
                encode(c),
                key=c.key.encode(),
                partition=key_partition(c.key.encode(), PARTITIONS),
            )
            for c in commands
        ]
        await asyncio.gather(*futures)

    async def granted(self, timeout_ms: int = 200) -> list[tuple[float, ad.Granted]]:
        fetched = await self.grants.getmany(timeout_ms=timeout_ms, max_records=5000)
        now = time.monotonic()
        return [
            (now, g)
            for batch in fetched.values()
            for m in batch
            if isinstance(g := decode(m.value), ad.Granted)
        ]


async def _fairness(client: Client, tenants: dict[str, int]) -> dict[str, Any]:
    """Offer ``tenants``' requests at once on TOOL; execute each grant for SERVICE_MS."""
    limits = resolve(load_limits_yaml(DOC), TOOL)
    run = uuid.uuid4().hex[:6]
    waiting = Counter(tenants)
    await client.send(
        [
            ad.Acquire(
                TOOL, f"{run}-{t}-{i}", tenant=t, limits=limits, version=1, reply_to=f"run-{t}-{i}"
            )
            for i in range(max(tenants.values()))
            for t in tenants
            if i < tenants[t]
        ]
    )
    shares: Counter[str] = Counter()
    waits: dict[str, list[float]] = {t: [] for t in tenants}
    pending: set[asyncio.Task[None]] = set()

    async def execute(g: ad.Granted) -> None:
        await asyncio.sleep(SERVICE_MS / 1000)
        await client.send([ad.Release(TOOL, g.request_id, ad.Outcome.OK, latency_ms=SERVICE_MS)])

    done = 0
    deadline = time.monotonic() + 300
    while done < sum(tenants.values()) and time.monotonic() < deadline:
        for _, g in await client.granted():
            done += 1
            if all(waiting[t] > 0 for t in tenants):
                shares[g.tenant] += 1
            waiting[g.tenant] -= 1
            waits[g.tenant].append(g.waited_ms)
            task = asyncio.create_task(execute(g))
            pending.add(task)
            task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    return {
        "shares": dict(shares),
        "p99_wait_ms": {t: percentile(w, 0.99) for t, w in waits.items()},
    }


async def _open_loop(
    client: Client, rates: dict[str, float], seconds: float
) -> dict[str, list[float]]:
    """Requests of each tenant arriving at its rate (per second) for ``seconds``; each
    grant executed for SERVICE_MS and released. By tenant, the wait of each request from
    its send to its grant read back (the round trip through the broker included)."""
    limits = resolve(load_limits_yaml(DOC), TOOL)
    run = uuid.uuid4().hex[:6]
    waits: dict[str, list[float]] = {t: [] for t in rates}
    expected = {t: int(rate * seconds) for t, rate in rates.items()}
    pending: set[asyncio.Task[None]] = set()

    async def execute(g: ad.Granted) -> None:
        await asyncio.sleep(SERVICE_MS / 1000)
        await client.send([ad.Release(TOOL, g.request_id, ad.Outcome.OK, latency_ms=SERVICE_MS)])

    sent: dict[str, float] = {}

    async def arrivals(tenant: str) -> None:
        for i in range(expected[tenant]):
            sent[f"{run}-{tenant}-{i}"] = time.monotonic()
            await client.send(
                [
                    ad.Acquire(
                        TOOL,
                        f"{run}-{tenant}-{i}",
                        tenant=tenant,
                        limits=limits,
                        version=1,
                        reply_to=f"r-{i}",
                    )
                ]
            )
            await asyncio.sleep(1 / rates[tenant])

    senders = [asyncio.create_task(arrivals(t)) for t in rates]
    deadline = time.monotonic() + seconds + 120
    while sum(map(len, waits.values())) < sum(expected.values()) and time.monotonic() < deadline:
        for now, g in await client.granted():
            if g.request_id in sent:
                waits[g.tenant].append((now - sent[g.request_id]) * 1000)
                task = asyncio.create_task(execute(g))
                pending.add(task)
                task.add_done_callback(pending.discard)
    await asyncio.gather(*senders, *pending)
    return waits


def _jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if values else 0.0


async def _latency(
    client: Client, keys: int, paced: int = 300, rate_per_s: float = 100.0
) -> dict[str, Any]:
    """Make ``keys`` tenant keys active (a burst, timed as a whole), then time ``paced``
    more requests on them sent at ``rate_per_s``: send to grant read back."""
    limits = resolve(load_limits_yaml(DOC), "tenant:t")
    run = uuid.uuid4().hex[:6]
    wanted: set[str] = set()
    started = time.monotonic()
    for start in range(0, keys, 500):
        commands: list[ad.AdmissionCommand] = [
            ad.Acquire(
                f"tenant:t{i}",
                f"{run}-{i}",
                tenant=f"t{i}",
                limits=limits,
                version=1,
                reply_to=f"run-{i}",
            )
            for i in range(start, min(keys, start + 500))
        ]
        wanted.update(f"{run}-{i}" for i in range(start, min(keys, start + 500)))
        await client.send(commands)
    deadline = time.monotonic() + 300
    while wanted and time.monotonic() < deadline:
        for _, g in await client.granted():
            wanted.discard(g.request_id)
    burst_s = time.monotonic() - started
    sent: dict[str, float] = {}
    latencies: list[float] = []

    async def collect(until: float) -> None:
        while time.monotonic() < until and len(latencies) < paced:
            for now, g in await client.granted(timeout_ms=5):
                if g.request_id in sent:
                    latencies.append((now - sent[g.request_id]) * 1000)

    for n in range(paced):
        i = (n * 7919) % keys  # spread over the active keys
        command = ad.Acquire(
            f"tenant:t{i}",
            f"{run}-p{n}",
            tenant=f"t{i}",
            limits=limits,
            version=1,
            reply_to=f"run-p{n}",
        )
        sent[command.request_id] = time.monotonic()
        await client.send([command])
        await collect(sent[command.request_id] + 1 / rate_per_s)
    await collect(time.monotonic() + 30)
    return {
        "keys": keys,
        "burst_grants_per_s": (keys - len(wanted)) / burst_s,
        "paced": paced,
        "granted": len(latencies),
        "grant_latency_ms": {"p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99)},
    }


async def main(keys: int) -> dict[str, Any]:
    bootstrap, _ = infra_settings()
    topics = Topics(prefix=f"bflow{uuid.uuid4().hex[:6]}", partitions=PARTITIONS)
    await ensure_topics(bootstrap, topics.core_topics())
    await publish_limits(bootstrap, topics, load_limits_yaml(DOC), app=topics.prefix)
    proc = _serve(topics, bootstrap)
    client = Client(bootstrap, topics)
    try:
        await client.start()
        mixed = await _fairness(client, {"heavy": 300, "light_a": 30, "light_b": 30})
        alone = await _open_loop(
            client, {"light_a": LIGHT_RATE, "light_b": LIGHT_RATE}, OPEN_LOOP_S
        )
        beside = await _open_loop(
            client,
            {"light_a": LIGHT_RATE, "light_b": LIGHT_RATE, "heavy": 10 * LIGHT_RATE},
            OPEN_LOOP_S,
        )
        latency = await _latency(client, keys)
        rss = memory_mb(proc.pid)
    finally:
        await client.stop()
        terminate(proc)
        if proc.stdout is not None:
            proc.stdout.close()
        await delete_topics(bootstrap, topics.prefix)
    light_alone = percentile(alone["light_a"] + alone["light_b"], 0.99)
    light_mixed = percentile(beside["light_a"] + beside["light_b"], 0.99)
    heavy_p99 = percentile(beside["heavy"], 0.99)
    return {
        "fair_jain_index": _jain([float(v) for v in mixed["shares"].values()]),
        "fair_shares": mixed["shares"],
        "light_p99_wait_ms": {"alone": light_alone, "beside_a_10x_tenant": light_mixed},
        "heavy_p99_wait_ms": heavy_p99,
        "light_wait_ratio": light_mixed / light_alone if light_alone else None,
        "grant_latency_p99_ms": latency["grant_latency_ms"]["p99"],
        "grant_latency_p50_ms": latency["grant_latency_ms"]["p50"],
        "active_keys": latency["keys"],
        "burst_grants_per_s": latency["burst_grants_per_s"],
        "latency_requests": latency["paced"],
        "latency_granted": latency["granted"],
        "limiter_rss_mb": rss["rss_mb"],
        "limiter_peak_rss_mb": rss["peak_rss_mb"],
        "flow_overhead_ratio": None,
        "flow_overhead_note": "not measured yet",
        "settings": {
            "slots": SLOTS,
            "service_ms": SERVICE_MS,
            "partitions": PARTITIONS,
            "light_rate_per_s": LIGHT_RATE,
            "open_loop_s": OPEN_LOOP_S,
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--keys", type=int, default=10_000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.keys))))
