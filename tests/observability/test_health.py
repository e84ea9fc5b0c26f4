"""``/healthz``, ``/readyz`` and ``/metrics``: on the real ``serve`` and ``project``
processes against the real broker and PostgreSQL, and the server itself when its event
loop stops answering."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.kafka.processor import KafkaEngine
from engine.kafka.readiness import stream_check
from engine.kafka.topics import Topics
from engine.observability.health import HealthServer, Readiness, new_registry
from engine.runtime.specs import SpecRegistry
from tests.cli.conftest import Cli
from tests.infra import postgres_dsn
from tests.projections.kafka_log import drop_schema, new_schema

ROOT = Path(__file__).resolve().parents[2]
SPEC = """\
workflow: health-flow
version: 1
steps:
  - id: summarize
    task: py.summarize
    input: {words: "`2`", upper: "'TWO WORDS'"}
  - id: wait
    wait_event: {name: go}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""  # not listening yet


def _until(
    check: Callable[[], tuple[int, str]],
    wanted: Callable[[int, str], bool],
    timeout_s: float = 60.0,
) -> tuple[int, str]:
    deadline = time.monotonic() + timeout_s
    got = check()
    while not wanted(*got) and time.monotonic() < deadline:
        time.sleep(0.2)
        got = check()
    return got


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*argv: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", *argv],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
def test_serve_answers_health_readiness_and_metrics(
    cli: Cli, kafka: list[str], tmp_path: Path, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    prefix = kafka[kafka.index("--topic-prefix") + 1]
    assert cli("topics", "create", *kafka, "--partitions", "2").code == 0
    port = _free_port()
    proc = spawn(
        "serve",
        *kafka,
        "--app",
        prefix,
        "--partitions",
        "2",
        "--health-port",
        str(port),
        "--workers",
        "tests.examples.words_tools",
        "--postgres",
        postgres_dsn(),
    )

    alive = _until(lambda: _get(port, "/healthz"), lambda code, _: code != 0)
    assert alive == (200, "ok\n"), alive
    status, body = _until(lambda: _get(port, "/readyz"), lambda code, _: code == 200)
    assert status == 200, body
    assert json.loads(body) == {"ready": True, "checks": {"engine": "ready", "worker": "ready"}}

    spec = tmp_path / "health.yaml"
    spec.write_text(SPEC)
    started = cli("run", str(spec), "--input", "{}", "--key", "h-1", *kafka)
    assert started.code == 0, started

    def runs_started() -> tuple[int, str]:
        return _get(port, "/metrics")

    status, metrics = _until(
        runs_started,
        lambda code, text: 'workflow="health-flow"' in text and 'outcome="called"} 1.0' in text,
    )
    assert status == 200
    tasks = [
        line for line in metrics.splitlines() if line.startswith("terranoha_worker_tasks_total{")
    ]
    assert any('outcome="called"' in line and line.endswith(" 1.0") for line in tasks), tasks
    line = next(
        line for line in metrics.splitlines() if line.startswith("terranoha_runs_started_total{")
    )
    assert 'workflow="health-flow"' in line and line.endswith(" 1.0"), line
    assert "process_resident_memory_bytes" in metrics
    assert _get(port, "/nowhere")[0] == 404
    assert proc.poll() is None


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
def test_project_is_ready_once_both_projectors_read(
    cli: Cli,
    kafka: list[str],
    tmp_path: Path,
    request: pytest.FixtureRequest,
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    prefix = kafka[kafka.index("--topic-prefix") + 1]
    assert cli("topics", "create", *kafka, "--partitions", "2").code == 0
    spec = tmp_path / "health.yaml"
    spec.write_text(SPEC)
    assert cli("workflows", "deploy", str(spec), *kafka).code == 0
    dsn = postgres_dsn()
    schema, scoped = new_schema(dsn)
    request.addfinalizer(lambda: drop_schema(dsn, schema))
    port = _free_port()
    spawn("serve", *kafka, "--app", prefix, "--partitions", "2")
    spawn("project", *kafka, "--app", prefix, "--postgres", scoped, "--health-port", str(port))
    status, body = _until(lambda: _get(port, "/readyz"), lambda code, _: code == 200)
    assert status == 200, body
    assert json.loads(body)["checks"] == {"postgres": "ready", "topics": "ready"}

    assert cli("run", "health-flow", "--input", "{}", "--key", "p-1", *kafka).code == 0
    status, metrics = _until(
        lambda: _get(port, "/metrics"),
        lambda code, text: (
            'projector="postgres"} 0.0' not in text and "terranoha_projector_events_total{" in text
        ),
    )
    events = {
        line.split('projector="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("terranoha_projector_events_total{")
    }
    assert events["postgres"] >= 1 and set(events) == {"postgres", "topics"}, metrics


def test_a_stuck_event_loop_is_reported_dead_and_a_failing_check_not_ready() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    readiness = Readiness()
    readiness.started = True
    engine = KafkaEngine("127.0.0.1:1", Topics(prefix="never"), SpecRegistry())
    readiness.add("engine", stream_check(engine))
    server = HealthServer(loop, readiness, new_registry(), "127.0.0.1", 0, alive_timeout_s=1)
    server.start()
    try:
        assert _get(server.port, "/healthz") == (200, "ok\n")
        status, body = _get(server.port, "/readyz")
        assert status == 503
        assert json.loads(body) == {"ready": False, "checks": {"engine": "starting"}}

        blocked = threading.Event()
        loop.call_soon_threadsafe(lambda: (blocked.set(), time.sleep(3)))
        assert blocked.wait(5)
        assert _get(server.port, "/healthz") == (503, "event loop not answering\n")
        status, body = _get(server.port, "/readyz")
        assert status == 503 and "event loop not answering" in body
    finally:
        server.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_the_endpoints_listen_on_loopback_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Metrics name workflows and tenants: by default only this machine can read them."""
    from engine.cli import build_parser
    from engine.cli._process import health_of
    from engine.cli._shared import CliError

    monkeypatch.delenv("TERRANOHA_HEALTH_HOST", raising=False)
    monkeypatch.delenv("TERRANOHA_HEALTH_PORT", raising=False)
    parser = build_parser()
    for command in (["serve", "--kafka", "k:9092"], ["project", "--kafka", "k:9092"]):
        assert health_of(parser.parse_args(command)) is None  # no port, no endpoints
        health = health_of(parser.parse_args([*command, "--health-port", "0"]))
        assert health is not None and health.host == "127.0.0.1"

    async def bound() -> tuple[str, int]:
        assert health is not None
        health.start()
        try:
            assert health.server is not None
            return health.server.host, health.server.port
        finally:
            health.stop()

    host, port = asyncio.run(bound())
    assert host == "127.0.0.1" and port > 0
    with pytest.raises(CliError, match="--health-port 70000 is not a port"):
        health_of(parser.parse_args(["serve", "--kafka", "k:9092", "--health-port", "70000"]))
