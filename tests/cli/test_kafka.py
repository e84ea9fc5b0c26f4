"""The command line against the real broker: every run command with ``--kafka`` behaves as
with ``--db``, with a ``terranoha serve --kafka`` process doing the work."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from engine.api.backends import KafkaApiBackend
from engine.kafka.topics import Topics, delete_topics
from tests.api.server import serve_api
from tests.cli.conftest import Cli, Result
from tests.infra import kafka_bootstrap, postgres_dsn

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = "3"

SPEC = """\
workflow: cli-refund
version: 1
input: {n: integer}
steps:
  - id: fetch
    task: test.fetch
    input: {n: input.n}
    retry: {max_attempts: 5, initial: 50ms, max: 200ms}
  - id: pay
    prepare_commit: {prepare: test.prepare, commit: test.commit}
    input: {n: input.n}
    approval: {approvers: [finance], exclude_requester: true}
  - id: notify
    task: test.notify
"""


@pytest.fixture
def kafka(tmp_path: Path) -> Iterator[list[str]]:
    """``--kafka`` and a ``--topic-prefix`` of this test's own; its topics are deleted
    afterwards."""
    bootstrap = kafka_bootstrap()
    prefix = f"c{uuid.uuid4().hex[:10]}"
    yield ["--kafka", bootstrap, "--topic-prefix", prefix]
    asyncio.run(delete_topics(bootstrap, prefix))


def _api_backend(kafka: list[str]) -> KafkaApiBackend:
    prefix = kafka[kafka.index("--topic-prefix") + 1]
    return KafkaApiBackend(
        kafka[kafka.index("--kafka") + 1],
        Topics(prefix=prefix, partitions=int(PARTITIONS)),
        app=prefix,
    )


def _eventually(
    check: Callable[[], Result], until: Callable[[Result], bool], timeout_s: float = 60.0
) -> Result:
    deadline = time.monotonic() + timeout_s
    result = check()
    while not until(result) and time.monotonic() < deadline:
        time.sleep(0.3)
        result = check()
    return result


def _serve(kafka: list[str], tmp_path: Path) -> subprocess.Popen[bytes]:
    prefix = kafka[kafka.index("--topic-prefix") + 1]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TERRANOHA_TEST_EFFECTS": str(tmp_path / "effects.db"),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "serve",
            *kafka,
            "--app",
            prefix,
            "--partitions",
            PARTITIONS,
            "--workers",
            "tests.embedded.durable_tools",
            "--postgres",
            postgres_dsn(),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(b"serving"):
        proc.kill()
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"serve did not start: {line!r}\n{err.decode(errors='replace')}")
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


async def _publish_garbage(bootstrap: str, topic: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"not a trigger", key=b"garbage")
    finally:
        await producer.stop()


@pytest.mark.kafka
def test_topics_create_is_idempotent(cli: Cli, kafka: list[str]) -> None:
    prefix = kafka[-1]
    first = cli("topics", "create", *kafka, "--partitions", PARTITIONS)
    assert first.code == 0, first.err
    lines = first.out.splitlines()
    assert len(lines) == 10 and all(line.startswith("created") for line in lines)
    assert f"created  {prefix}.run-inputs (3 partitions)" in lines
    assert f"created  {prefix}.messages (3 partitions)" in lines
    assert f"created  {prefix}.specs (1 partition)" in lines

    again = cli("topics", "create", *kafka, "--partitions", PARTITIONS)
    assert again.code == 0, again.err
    assert [line.split()[0] for line in again.out.splitlines()] == ["exists"] * 10


@pytest.mark.kafka
def test_run_commands_say_what_is_missing(cli: Cli, kafka: list[str]) -> None:
    prefix = kafka[-1]
    missing = cli("status", "some-run", *kafka)
    assert missing.code == 2
    assert f"topic {prefix}.run-state does not exist" in missing.err
    assert "terranoha topics create" in missing.err

    assert cli("topics", "create", *kafka, "--partitions", PARTITIONS).code == 0
    impersonating = cli("approve", "some-run", "pay", "--as", "x", *kafka)
    assert impersonating.code == 2 and "goes through the API" in impersonating.err
    for command in (["status", "some-run"],):
        result = cli(*command, *kafka)
        assert result.code == 2, command
        assert f"no run some-run on topic {prefix}.run-state" in result.err
        assert "full run id" in result.err
    for command in (["timeline", "some-run"], ["replay", "some-run", "--verify"]):
        result = cli(*command, *kafka)
        assert result.code == 2, command
        assert f"no run some-run on topic {prefix}.run-events" in result.err
    result = cli("run", "not-deployed", *kafka)
    assert result.code == 2
    assert "workflow 'not-deployed' is not deployed" in result.err


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
def test_a_run_driven_from_the_command_line(
    cli: Cli, kafka: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = tmp_path / "refund.yaml"
    spec.write_text(SPEC)
    assert cli("topics", "create", *kafka, "--partitions", PARTITIONS).code == 0

    deployed = cli("workflows", "deploy", str(spec), *kafka)
    assert (deployed.code, deployed.out) == (0, "cli-refund version 1 deployed\n")
    again = cli("workflows", "deploy", str(spec), *kafka)
    assert again.out == "cli-refund version 1 already deployed (unchanged)\n"
    assert cli("workflows", "list", *kafka).out == "cli-refund\tv1\t3 steps\n"

    # Before any server runs: the triggers wait on the topic. Same key, same run.
    first = cli(
        "run", str(spec), "--input", '{"n": 4}', "--key", "order-4", "--as", "alice", *kafka
    )
    assert first.code == 0, first.err
    run_id = first.out.splitlines()[0]
    assert first.out.splitlines()[1] == f"trigger published to {kafka[-1]}.triggers"
    second = cli(
        "run", "cli-refund", "--input", '{"n": 4}', "--key", "order-4", "--as", "alice", *kafka
    )
    assert second.out.splitlines()[0] == run_id

    server = _serve(kafka, tmp_path)
    try:
        waiting = _eventually(lambda: cli("status", run_id, *kafka), lambda r: "Waiting" in r.out)
        assert (
            f"{run_id}  cli-refund v1  Waiting at step pay (waiting for approval by "
            "finance; 0/1 approvals)" in waiting.out
        ), waiting

        # Decisions go through the API: the approver is the key's subject.
        assert cli("approve", run_id, "pay", "--as", "carol", *kafka).code == 2
        with serve_api(_api_backend(kafka), tmp_path / "keys.db") as api:
            monkeypatch.setenv(
                "TERRANOHA_API_KEY", api.key("alice", ["default"], ["approve:finance"])
            )
            refused = cli("approve", run_id, "pay", "--api", api.url, *kafka)
            assert refused.code == 1, refused
            assert refused.out.startswith("refused: self-approval: alice requested this run")
            as_other = cli("approve", run_id, "pay", "--api", api.url, "--as", "carol", *kafka)
            assert as_other.code == 2 and "drop --as" in as_other.err

            monkeypatch.setenv(
                "TERRANOHA_API_KEY", api.key("carol", ["default"], ["approve:finance"])
            )
            granted = cli("approve", run_id, "pay", "--api", api.url, *kafka)
            assert granted.code == 0, granted
            assert granted.out.startswith("ApprovalGranted")

        done = _eventually(lambda: cli("status", run_id, *kafka), lambda r: "Completed" in r.out)
        assert done.out == f"{run_id}  cli-refund v1  Completed\n", done
        status = json.loads(cli("status", run_id, "--json", *kafka).out)
        assert status["status"] == "Completed" and status["requested_by"] == "alice"

        timeline = cli("timeline", run_id, *kafka)
        assert timeline.code == 0
        assert "approved by carol" in timeline.out and "status Completed" in timeline.out

        replay = cli("replay", run_id, "--verify", *kafka)
        assert replay.code == 0, replay
        assert "verify: OK" in replay.out
        doc = json.loads(cli("replay", run_id, "--verify", "--json", *kafka).out)
        assert doc["verify"]["ok"] is True
        types = [e["type"] for e in doc["events"]]
        assert types.count("RunStarted") == 1 and types[-1] == "RunCompleted"
        at = cli("replay", run_id, "--at", "1", *kafka)
        assert at.out.startswith("state after seq 1 (RunStarted):")

        runs = cli("runs", *kafka)
        assert runs.out.splitlines() == [f"{run_id}  cli-refund v1  Completed"]

        assert cli("dead-letters", *kafka).out == ""
        asyncio.run(_publish_garbage(kafka[1], f"{kafka[-1]}.triggers"))
        dead = _eventually(lambda: cli("dead-letters", *kafka), lambda r: r.out != "")
        assert dead.out.startswith(f"{kafka[-1]}.triggers/"), dead
        assert "\tbad_magic\t" in dead.out

        # --wait returns once the run needs someone: here, an approver.
        other = cli(
            "run",
            "cli-refund",
            "--input",
            '{"n": 5}',
            "--key",
            "order-5",
            "--as",
            "alice",
            "--wait",
            "60",
            *kafka,
        )
        assert other.code == 0, other
        assert "Waiting at step pay" in other.out
        cancelled = cli("cancel", other.out.splitlines()[0], *kafka)
        assert cancelled.code == 0, cancelled
        assert "RunCancelled" in cancelled.out and "Cancelled" in cancelled.out

        # A run that fails at once exits 1, with or without --wait; the same key with
        # another input is a conflict (exit 5); --status takes any case.
        bad = cli(
            "run",
            "cli-refund",
            "--input",
            '{"n": "four"}',
            "--key",
            "order-6",
            "--as",
            "alice",
            *kafka,
        )
        assert bad.code == 1, bad
        assert "Failed" in bad.out and "INVALID_INPUT: input.n: expected integer" in bad.out
        waited = cli(
            "run",
            "cli-refund",
            "--input",
            '{"n": 7, "m": 1}',
            "--key",
            "order-7",
            "--as",
            "alice",
            "--wait",
            "30",
            *kafka,
        )
        assert waited.code == 1, waited
        assert "input.m: field 'm' is not declared" in waited.out
        conflict = cli("run", "cli-refund", "--input", '{"n": 6}', "--key", "order-6", *kafka)
        assert conflict.code == 5, conflict
        assert "was started with another input (it differs in input.n)" in conflict.err
        failed = cli("runs", "--status", "FAILED", *kafka)
        assert sorted(
            line.split()[0] for line in failed.out.splitlines() if not line.startswith("error:")
        ) == sorted([bad.out.splitlines()[0], waited.out.splitlines()[0]])
        assert cli("runs", "--status", "cancelled", *kafka).out.startswith(
            other.out.splitlines()[0]
        )
    finally:
        _stop(server)


KEYED = """\
workflow: cli-keyed
version: 1
input: {order: string}
steps:
  - id: pay
    wait_event: {name: payment, key: input.order, timeout: 1h}
"""


@pytest.mark.kafka
def test_publish_reaches_the_wait_of_its_key_through_serve(
    cli: Cli, kafka: list[str], tmp_path: Path
) -> None:
    """``serve --kafka`` runs message correlation: a message published from the command
    line completes the run waiting for its key, and leaves the other waiting."""
    spec = tmp_path / "keyed.yaml"
    spec.write_text(KEYED)
    assert cli("topics", "create", *kafka, "--partitions", PARTITIONS).code == 0
    assert cli("workflows", "deploy", str(spec), *kafka).code == 0
    mine = cli("run", "cli-keyed", "--input", '{"order": "o-1"}', "--key", "a", *kafka)
    other = cli("run", "cli-keyed", "--input", '{"order": "o-2"}', "--key", "b", *kafka)
    mine_id, other_id = mine.out.splitlines()[0], other.out.splitlines()[0]
    server = _serve(kafka, tmp_path)
    try:
        waiting = _eventually(lambda: cli("status", mine_id, *kafka), lambda r: "Waiting" in r.out)
        assert "waiting for message 'payment' with key 'o-1'" in waiting.out, waiting
        _eventually(lambda: cli("status", other_id, *kafka), lambda r: "Waiting" in r.out)
        published = cli(
            "publish",
            "payment",
            "--key",
            "o-1",
            "--data",
            '{"paid": 5}',
            "--id",
            "tx-1",
            "--ttl",
            "0",
            *kafka,
        )
        assert published.code == 0, published
        assert published.out == "published message tx-1 (payment, key 'o-1', ttl 0ms)\n"
        _eventually(lambda: cli("status", mine_id, *kafka), lambda r: "Completed" in r.out)
        listed = _eventually(
            lambda: cli("messages", "--json", *kafka), lambda r: '"delivered"' in r.out
        )
        rows = [json.loads(line) for line in listed.out.splitlines()]
        assert [(r["message_id"], r["status"], r["runs"]) for r in rows] == [
            ("tx-1", "delivered", [mine_id])
        ]
        assert "Waiting" in cli("status", other_id, *kafka).out
    finally:
        _stop(server)
