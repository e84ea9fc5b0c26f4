"""A concurrency limit under SIGKILL: clients ask the admission processor (a real
``terranoha serve`` process) for slots, call a side-effect HTTP server that counts the
calls in flight at once, and release. The serving process is SIGKILLed twice while
grants are being made and restarted each time.

Checker: the server never saw more calls in flight than the limit; every request was
served exactly once (nothing lost, nothing doubled); at the end no slot is held and
nothing waits (nothing leaked)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from engine.codec import decode, encode
from engine.core import admission as ad
from engine.core.limits import load_limits_yaml, resolve
from engine.kafka.admission import AdmissionTopics, read_admission_states
from engine.kafka.limits import publish_limits
from engine.kafka.topics import Topics, delete_topics, ensure_topics, key_partition
from tests.infra import kafka_bootstrap

ROOT = Path(__file__).resolve().parents[2]
KEY = "tool:payments.charge"
LIMIT = 3
REQUESTS = 40
DOC = f"limits: v1\nrules:\n  - key: {KEY}\n    concurrency: {LIMIT}\n    lease: 2m\n"


class EffectServer:
    """Counts calls in flight at once and calls per request id."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.calls: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request_id = self.path.strip("/")
                with server.lock:
                    server.in_flight += 1
                    server.peak = max(server.peak, server.in_flight)
                    server.calls[request_id] = server.calls.get(request_id, 0) + 1
                time.sleep(0.15)
                with server.lock:
                    server.in_flight -= 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def __enter__(self) -> EffectServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def topics() -> Iterator[Topics]:
    bootstrap = kafka_bootstrap()
    t = Topics(prefix=f"f{uuid.uuid4().hex[:8]}", partitions=3)
    asyncio.run(ensure_topics(bootstrap, t.core_topics()))
    yield t
    asyncio.run(delete_topics(bootstrap, t.prefix))


def _serve(topics: Topics) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "serve",
            "--kafka",
            kafka_bootstrap(),
            "--topic-prefix",
            topics.prefix,
            "--app",
            topics.prefix,
            "--partitions",
            "3",
            "--no-engine",
            "--instance-id",
            "admission-1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(b"serving"):
        proc.kill()
        pytest.fail(f"serve did not start: {line!r}")
    return proc


def _close(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdout is not None:
        proc.stdout.close()


def test_the_limit_holds_and_nothing_leaks_when_the_admission_process_is_killed(
    topics: Topics,
) -> None:
    bootstrap = kafka_bootstrap()
    admission = AdmissionTopics(topics)
    document = load_limits_yaml(DOC)
    limits = resolve(document, KEY)
    asyncio.run(publish_limits(bootstrap, topics, document, app=topics.prefix))
    served: set[str] = set()
    served_at_kills: list[int] = []

    async def main(server: EffectServer) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, enable_idempotence=True, acks="all"
        )
        grants = AIOKafkaConsumer(
            admission.grants,
            bootstrap_servers=bootstrap,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=f"{topics.prefix}-checker",
        )
        await producer.start()
        await grants.start()
        partition = key_partition(KEY.encode(), topics.partitions)

        async def send(command: ad.AdmissionCommand) -> None:
            await producer.send_and_wait(
                admission.keyed.inputs, encode(command), key=KEY.encode(), partition=partition
            )

        async def work(request_id: str, http: httpx.AsyncClient) -> None:
            await http.post(f"{server.url}/{request_id}")
            served.add(request_id)
            await send(ad.Release(KEY, request_id, ad.Outcome.OK, latency_ms=150))

        try:
            for i in range(REQUESTS):
                await send(
                    ad.Acquire(
                        KEY,
                        f"req-{i}",
                        tenant=f"t{i % 3}",
                        limits=limits,
                        version=1,
                        reply_to=f"run-{i}",
                    )
                )
            granted: set[str] = set()
            doubled: list[str] = []
            async with httpx.AsyncClient(timeout=30) as http:
                jobs: list[asyncio.Task[None]] = []
                deadline = time.monotonic() + 150
                while len(served) < REQUESTS and time.monotonic() < deadline:
                    fetched = await grants.getmany(timeout_ms=200)
                    for messages in fetched.values():
                        for m in messages:
                            event = decode(m.value)
                            if not isinstance(event, ad.Granted):
                                continue
                            if event.request_id in granted:
                                doubled.append(event.request_id)
                                continue
                            granted.add(event.request_id)
                            jobs.append(asyncio.create_task(work(event.request_id, http)))
                await asyncio.gather(*jobs)
            assert not doubled, f"granted twice: {doubled}"
            assert len(served) == REQUESTS, f"never served: {REQUESTS - len(served)}"
        finally:
            await grants.stop()
            await producer.stop()

    def killer(stop: threading.Event) -> None:
        nonlocal proc
        for threshold in (5, 20):  # kill while grants are being made, twice
            while len(served) < threshold:
                if stop.wait(0.05):
                    return
            served_at_kills.append(len(served))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            _close(proc)
            proc = _serve(topics)

    proc = _serve(topics)
    stop = threading.Event()
    chaos = threading.Thread(target=killer, args=(stop,))
    try:
        with EffectServer() as server:
            chaos.start()
            asyncio.run(main(server))
            stop.set()
            chaos.join()
            assert any(0 < n < REQUESTS for n in served_at_kills), (
                f"no kill came while grants were being made: {served_at_kills}"
            )
            assert server.peak <= LIMIT, f"{server.peak} calls in flight, limit {LIMIT}"
            assert server.peak == LIMIT, "the limit was never reached: the test proves nothing"
            assert all(n == 1 for n in server.calls.values()), "an effect was doubled"

        # Everything drains: the last releases reach the key, and no slot stays held.
        state = None
        for _ in range(100):
            state = asyncio.run(read_admission_states(bootstrap, topics)).get(KEY)
            if state is not None and state.executing == 0 and not state.queue:
                break
            time.sleep(0.3)
        assert state is not None and state.executing == 0 and not state.queue, state
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _close(proc)
