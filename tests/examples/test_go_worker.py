"""The Go worker of ``examples/go-worker`` (franz-go, hamba/avro) as one tool of a real
workflow on the real broker: the engine dispatches to it, a Python tool reads its result,
and the run completes; a business error it reports fails the run with its code. Then
what the README's task protocol says about a result sent again, on the run's partition
and on another one."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from engine.cli import main
from engine.codec import decode, encode
from engine.core.commands import CompleteTask
from engine.core.outbox import TaskCommand
from engine.kafka.topics import delete_topics, key_partition
from tests.infra import kafka_bootstrap, postgres_dsn

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "examples" / "go-worker"

SPEC = """\
workflow: go-words
version: 1
input: {text: string}
steps:
  - id: count
    task: text.count                 # served by the Go worker
    input: {text: input.text}
    timeout: 30s
  - id: summarize
    task: py.summarize               # served by terranoha serve --workers
    input: {words: steps.count.result.words, upper: steps.count.result.upper}
"""

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def go_worker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The worker, built from source (the Go module proxy supplies its modules)."""
    go = shutil.which("go") or (
        "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None
    )
    if go is None:
        pytest.fail(
            "the Go toolchain is needed to build examples/go-worker: install Go "
            "(https://go.dev/doc/install) and put `go` on PATH",
            pytrace=False,
        )
    binary = tmp_path_factory.mktemp("go") / "go-worker"
    built = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=WORKER,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert built.returncode == 0, built.stderr
    return binary


@pytest.fixture
def kafka() -> Iterator[list[str]]:
    bootstrap = kafka_bootstrap()
    prefix = f"g{uuid.uuid4().hex[:10]}"
    yield ["--kafka", bootstrap, "--topic-prefix", prefix]
    asyncio.run(delete_topics(bootstrap, prefix))


def _cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def _start(argv: list[str], first_line: bytes, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(first_line):
        proc.kill()
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"{argv[0]} did not start: {line!r}\n{err.decode(errors='replace')}")
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM, and what the process logged; a process that does not stop by itself
    within a minute is killed and said so."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return f"{err.decode(errors='replace')}\n(exit code {proc.returncode})"


def _wait_for_end(run_id: str, kafka: list[str]) -> dict[str, object]:
    deadline = time.monotonic() + 90
    while True:
        code, out = _cli("status", run_id, "--json", *kafka)
        status = json.loads(out) if code == 0 else {}
        if (
            status.get("status") in ("Completed", "Failed", "Cancelled")
            or time.monotonic() > deadline
        ):
            return status
        time.sleep(0.3)


def _wait_for(read: Callable[[], str], until: Callable[[str], bool]) -> str:
    deadline = time.monotonic() + 60
    text = read()
    while not until(text) and time.monotonic() < deadline:
        time.sleep(0.3)
        text = read()
    return text


async def _first_task(bootstrap: str, topic: str, partitions: int = 3) -> TaskCommand:
    """The first task on ``topic``, read as any worker reads it (read_committed)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        for _ in range(100):
            for messages in (await consumer.getmany(timeout_ms=300)).values():
                for message in messages:
                    task = decode(message.value)
                    if isinstance(task, TaskCommand):
                        return task
        raise AssertionError(f"no task on {topic}")
    finally:
        await consumer.stop()


async def _send_again(bootstrap: str, prefix: str, task: TaskCommand) -> int:
    """The task's result, again: on its run's partition and on the next one; returns
    that other partition."""
    result = CompleteTask(
        command_id=f"result:{task.task_id}",
        run_id=task.run_id,
        tenant=task.tenant,
        correlation_id=task.correlation_id,
        step=task.step,
        task_id=task.task_id,
        result={"words": 0},
    )
    topic = f"{prefix}.run-inputs"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        count = len(await producer.partitions_for(topic))
        right = key_partition(task.run_id.encode(), count)
        wrong = (right + 1) % count
        for partition in (right, wrong):
            await producer.send_and_wait(
                topic, encode(result), key=task.run_id.encode(), partition=partition
            )
    finally:
        await producer.stop()
    return wrong


def test_a_go_worker_serves_one_step_of_a_workflow(
    go_worker: Path, kafka: list[str], tmp_path: Path
) -> None:
    spec = tmp_path / "go-words.yaml"
    spec.write_text(SPEC)
    prefix = kafka[-1]
    assert _cli("topics", "create", *kafka, "--partitions", "3")[0] == 0
    # Deploying creates the task topics the Go worker subscribes to.
    assert _cli("workflows", "deploy", str(spec), *kafka)[0] == 0
    worker = _start(
        [
            str(go_worker),
            "--kafka",
            kafka[1],
            "--topic-prefix",
            prefix,
            "--schemas",
            str(ROOT / "schemas"),
        ],
        b"go worker on",
    )
    server = _start(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "serve",
            *kafka,
            "--app",
            prefix,
            "--partitions",
            "3",
            "--workers",
            "tests.examples.words_tools",
            "--postgres",
            postgres_dsn(),
        ],
        b"serving",
    )
    try:
        code, out = _cli(
            "run", "go-words", "--input", '{"text": "ship it  today"}', "--key", "words-1", *kafka
        )
        done = _wait_for_end(out.splitlines()[0], kafka) if code == 0 else {}
        code, out = _cli(
            "run", "go-words", "--input", '{"text": "   "}', "--key", "words-2", *kafka
        )
        failed = _wait_for_end(out.splitlines()[0], kafka) if code == 0 else {}
        dead_letters = _cli("dead-letters", *kafka)[1]
        # The README's promises about results sent again: on the run's partition, a
        # result for a run that has ended is refused and recorded; on another partition
        # (kcat's default partitioner) it goes to the dead letters as wrong_partition.
        task = asyncio.run(_first_task(kafka[1], f"{prefix}.tasks.text.count"))
        astray = asyncio.run(_send_again(kafka[1], prefix, task))
        refused = _wait_for(
            lambda: _cli("timeline", task.run_id, *kafka)[1], lambda text: "run ended" in text
        )
        letters = _wait_for(
            lambda: _cli("dead-letters", *kafka)[1], lambda text: "wrong_partition" in text
        )
    finally:
        server_log, worker_log = _stop(server), _stop(worker)
    logs = f"serve:\n{server_log}\ngo worker:\n{worker_log}"
    assert done.get("status") == "Completed", (done, logs)
    assert done["output"] == "3 words: SHIP IT  TODAY"
    # A business error the Go tool reports fails the run with its code (no handler).
    assert failed.get("status") == "Failed", (failed, logs)
    assert "EMPTY_TEXT" in json.dumps(failed["error"])
    # Every result landed on its run's partition: none went to the dead letters.
    assert dead_letters == "", dead_letters
    assert "run ended" in refused, refused
    assert f"{prefix}.run-inputs/{astray}/" in letters and "wrong_partition" in letters, letters
    assert "panic" not in logs and "Traceback" not in logs, logs
    # Both stop cleanly on SIGTERM: the Go worker leaves its group and exits 0.
    assert server_log.endswith("(exit code 0)") and worker_log.endswith("(exit code 0)"), logs
