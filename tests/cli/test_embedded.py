"""The command line on the embedded store: bad input is refused with a message that says
what to fix (exit 2), refused commands exit 1, ``run --wait`` waits."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.cli import build_parser
from engine.codec import decode, encode
from tests.cli.conftest import Cli

APPROVAL_ONLY = """\
workflow: sign-off
version: 1
input: {doc: string}
steps:
  - id: review
    approval: {approvers: [legal], exclude_requester: true}
"""

ONE_TASK = """\
workflow: one-task
version: 1
steps:
  - id: fetch
    task: nobody.listens
"""

INVALID = """\
workflow: broken
version: 1
steps:
  - id: fetch
    task: crm.get_order
    retry: {max_attempts: 3, initial: 1x}
"""

UNKNOWN_TARGET = """\
workflow: broken
version: 2
steps:
  - id: pay
    task: payments.commit
    on_business_error:
      AMOUNT_OVER_LIMIT: {goto: nowhere}
"""


@pytest.fixture
def specs(tmp_path: Path) -> Path:
    for name, body in (
        ("approval.yaml", APPROVAL_ONLY),
        ("task.yaml", ONE_TASK),
        ("invalid.yaml", INVALID),
        ("target.yaml", UNKNOWN_TARGET),
    ):
        (tmp_path / name).write_text(body)
    return tmp_path


def test_an_unknown_run_is_refused_with_where_it_looked(cli: Cli, specs: Path) -> None:
    db = str(specs / "t.db")
    assert cli("workflows", "deploy", str(specs / "approval.yaml"), "--db", db).code == 0

    for command in (
        ["status", "nope"],
        ["timeline", "nope"],
        ["replay", "nope"],
        ["approve", "nope", "review", "--as", "bob"],
        ["cancel", "nope"],
    ):
        result = cli(*command, "--db", db)
        assert result.code == 2, command
        assert f"no run matches 'nope' in {db}" in result.err


def test_a_missing_store_is_named(cli: Cli, tmp_path: Path) -> None:
    result = cli("status", "abc", "--db", str(tmp_path / "absent.db"))
    assert result.code == 2
    assert "no store at" in result.err and "absent.db" in result.err


def test_bad_json_is_refused_with_the_option_named(cli: Cli, specs: Path) -> None:
    db = str(specs / "t.db")
    result = cli("run", str(specs / "approval.yaml"), "--input", "{doc: 1", "--db", db)
    assert result.code == 2
    assert "--input is not valid JSON" in result.err

    started = cli("run", str(specs / "approval.yaml"), "--input", '{"doc": "x"}', "--db", db)
    run_id = started.out.splitlines()[0]
    result = cli("signal", run_id, "go", "--data", "[1,", "--db", db)
    assert result.code == 2
    assert "--data is not valid JSON" in result.err


def test_an_invalid_spec_is_refused_with_the_field_path(cli: Cli, specs: Path) -> None:
    db = str(specs / "t.db")
    for command in (
        ["workflows", "deploy", str(specs / "invalid.yaml")],
        ["run", str(specs / "invalid.yaml")],
    ):
        result = cli(*command, "--db", db)
        assert result.code == 2, command
        assert "workflow spec broken is invalid" in result.err
        assert "steps[0](fetch).retry.initial: bad duration '1x'" in result.err
    result = cli("workflows", "deploy", str(specs / "target.yaml"), "--db", db)
    assert result.code == 2
    assert (
        "steps[0](pay).on_business_error.AMOUNT_OVER_LIMIT.goto: unknown step "
        "'nowhere'" in result.err
    )


def test_an_undeployed_workflow_and_a_missing_spec_file_are_named(cli: Cli, specs: Path) -> None:
    db = str(specs / "t.db")
    assert cli("workflows", "deploy", str(specs / "approval.yaml"), "--db", db).code == 0
    result = cli("run", "no-such-workflow", "--db", db)
    assert result.code == 2
    assert "workflow 'no-such-workflow' is not deployed" in result.err
    result = cli("run", str(specs / "missing.yaml"), "--db", db)
    assert result.code == 2
    assert "no spec file" in result.err


def test_db_and_kafka_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["status", "r", "--db", "x.db", "--kafka", "h:1"])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_self_approval_is_refused_and_another_approver_completes(cli: Cli, specs: Path) -> None:
    db = str(specs / "t.db")
    started = cli(
        "run",
        str(specs / "approval.yaml"),
        "--input",
        '{"doc": "nda"}',
        "--key",
        "k1",
        "--as",
        "alice",
        "--wait",
        "5",
        "--db",
        db,
    )
    assert started.code == 0, started.err
    run_id = started.out.splitlines()[0]
    assert "Waiting at step review" in started.out

    refused = cli("approve", run_id[:8], "review", "--as", "alice", "--db", db)
    assert refused.code == 1
    assert refused.out.startswith("refused: self-approval: ")

    granted = cli("approve", run_id[:8], "review", "--as", "bob", "--db", db)
    assert granted.code == 0, granted.err
    assert "ApprovalGranted" in granted.out
    assert "Completed" in cli("status", run_id, "--db", db).out
    verified = cli("replay", run_id, "--verify", "--db", db)
    assert verified.code == 0 and "verify: OK" in verified.out


def test_run_wait_gives_up_with_exit_4(cli: Cli, specs: Path) -> None:
    db = str(specs / "t.db")
    result = cli("run", str(specs / "task.yaml"), "--wait", "0.3", "--db", db)
    assert result.code == 4
    assert "Running at step fetch" in result.out
    assert "is still Running after 0.3s" in result.err


def test_topics_create_needs_kafka(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["topics", "create"])
    assert exit_.value.code == 2
    assert "--kafka" in capsys.readouterr().err


def test_an_unreachable_broker_is_named_with_how_to_start_it(cli: Cli) -> None:
    result = cli("status", "r", "--kafka", "127.0.0.1:1")
    assert result.code == 2
    assert "cannot reach Kafka at 127.0.0.1:1" in result.err
    assert "bash deploy/local/infra.sh up" in result.err


def test_replay_shows_the_status_after_each_event(cli: Cli, specs: Path) -> None:
    db = str(specs / "t.db")
    started = cli(
        "run",
        str(specs / "approval.yaml"),
        "--input",
        '{"doc": "nda"}',
        "--as",
        "alice",
        "--db",
        db,
    )
    run_id = started.out.splitlines()[0]
    assert cli("approve", run_id, "review", "--as", "bob", "--db", db).code == 0

    lines = cli("replay", run_id, "--db", db).out.splitlines()
    status = {line.split()[1]: line.rsplit("-> ", 1)[1] for line in lines[:6]}
    assert status == {
        "RunStarted": "Pending",
        "StepStarted": "Running",
        "ApprovalRequested": "Waiting",
        "ApprovalGranted": "Running",
        "StepCompleted": "Running",
        "RunCompleted": "Completed",
    }, lines
    at = cli("replay", run_id, "--at", "5", "--db", db)
    assert at.out.splitlines()[0] == "state after seq 5 (StepCompleted):"
    assert f"{run_id}  sign-off v1  Running" in at.out


def test_a_run_that_fails_at_once_exits_1_with_and_without_wait(cli: Cli, specs: Path) -> None:
    db = str(specs / "t.db")
    spec = str(specs / "approval.yaml")
    for wait in ([], ["--wait", "5"]):
        failed = cli("run", spec, "--input", '{"doc": 7}', "--as", "alice", *wait, "--db", db)
        assert failed.code == 1, (wait, failed)
        assert "sign-off v1  Failed" in failed.out
        assert "error: INVALID_INPUT: input.doc: expected string, got int 7" in failed.out
        assert "is Failed" in failed.err
    extra = cli("run", spec, "--input", '{"doc": "x", "dco": 1}', "--as", "alice", "--db", db)
    assert extra.code == 1
    assert "input.dco: field 'dco' is not declared (did you mean 'doc'?)" in extra.out
    fine = cli("run", spec, "--input", '{"doc": "x"}', "--as", "alice", "--db", db)
    assert fine.code == 0 and "Waiting at step review" in fine.out


def test_the_same_key_with_another_input_is_a_conflict_exit_5(cli: Cli, specs: Path) -> None:
    db = str(specs / "t.db")
    spec = str(specs / "approval.yaml")
    first = cli("run", spec, "--input", '{"doc": 1}', "--key", "k", "--as", "al", "--db", db)
    assert first.code == 1  # failed at once: bad input
    run_id = first.out.splitlines()[0]

    again = cli("run", spec, "--input", '{"doc": 1}', "--key", "k", "--as", "al", "--db", db)
    assert (again.code, again.out.splitlines()[0]) == (1, run_id), "same input: same run"
    other = cli("run", spec, "--input", '{"doc": "fixed"}', "--key", "k", "--db", db)
    assert other.code == 5, other
    assert other.out.splitlines()[0] == run_id and "Failed" in other.out
    assert (
        f"error: run {run_id} already exists for key 'k' of tenant 'default' and was "
        "started with another input (it differs in input.doc)"
    ) in other.err
    assert "use another --key" in other.err
    events = cli("replay", run_id, "--json", "--db", db).out
    assert events.count('"type": "RunStarted"') == 1 and "CommandRejected" not in events


def test_runs_takes_a_status_in_any_case_and_refuses_an_unknown_one(
    cli: Cli, specs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(specs / "t.db")
    started = cli("run", str(specs / "approval.yaml"), "--input", '{"doc": "x"}', "--db", db)
    run_id = started.out.splitlines()[0]
    for spelling in ("Waiting", "waiting", " WAITING "):
        assert cli("runs", "--status", spelling, "--db", db).out.startswith(run_id), spelling
    assert cli("runs", "--status", "failed", "--db", db).out == ""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["runs", "--status", "Bogus"])
    assert exit_.value.code == 2
    assert (
        "argument --status: unknown status 'Bogus'; use one of Pending, Running, Waiting, "
        "Retry, Completed, Failed, Cancelled"
    ) in capsys.readouterr().err
    help_text = build_parser()._subparsers._group_actions[0].choices["runs"].format_help()  # type: ignore[union-attr]
    assert "Pending, Running, Waiting" in " ".join(help_text.split())


def test_runs_says_when_more_runs_exist(cli: Cli, specs: Path) -> None:
    db = str(specs / "t.db")
    for i in range(3):
        cli(
            "run",
            str(specs / "approval.yaml"),
            "--input",
            '{"doc": "x"}',
            "--key",
            f"k{i}",
            "--db",
            db,
        )
    listed = cli("runs", "--limit", "2", "--db", db)
    assert len(listed.out.splitlines()) == 2
    assert "more runs exist than the 2 most recent shown; pass --limit N" in listed.err
    everything = cli("runs", "--limit", "3", "--db", db)
    assert len(everything.out.splitlines()) == 3 and everything.err == ""


def test_a_closed_pipe_ends_the_command_quietly(specs: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    db = str(specs / "t.db")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "run",
            str(specs / "approval.yaml"),
            "--input",
            '{"doc": "x"}',
            "--db",
            db,
        ],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line: `| head -0`
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(60) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_status_names_the_task_phase_once(cli: Cli, specs: Path) -> None:
    db = str(specs / "t.db")
    started = cli("run", str(specs / "task.yaml"), "--db", db)
    assert "Running at step fetch (task attempt 1 dispatched)" in started.out


def test_every_run_option_has_help() -> None:
    run = build_parser()._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    missing = [a.dest for a in run._actions if not a.help]
    assert not missing, f"options without help: {missing}"


def _approved_run(cli: Cli, specs: Path, db: str) -> str:
    """A sign-off run by alice: her own approval refused, then bob's granted."""
    started = cli(
        "run",
        str(specs / "approval.yaml"),
        "--input",
        '{"doc": "nda"}',
        "--as",
        "alice",
        "--db",
        db,
    )
    run_id = started.out.splitlines()[0]
    assert cli("approve", run_id, "review", "--as", "alice", "--db", db).code == 1
    assert cli("approve", run_id, "nostep", "--as", "bob", "--db", db).code == 1
    assert cli("approve", run_id, "review", "--as", "bob", "--db", db).code == 0
    return run_id


def test_replay_verify_reports_the_first_event_that_differs_with_exit_3(
    cli: Cli, specs: Path
) -> None:
    db = str(specs / "t.db")
    run_id = _approved_run(cli, specs, db)
    assert cli("replay", run_id, "--verify", "--db", db).code == 0

    store = sqlite3.connect(db)
    seq, payload = store.execute(
        "SELECT seq, payload FROM events WHERE run_id = ? AND type = 'ApprovalGranted'", (run_id,)
    ).fetchone()
    granted = decode(payload)
    store.execute(
        "UPDATE events SET payload = ? WHERE run_id = ? AND seq = ?",
        (encode(dataclasses.replace(granted, approvers=["mallory"])), run_id, seq),
    )
    store.commit()
    store.close()

    diverged = cli("replay", run_id, "--verify", "--db", db)
    assert diverged.code == 3, diverged
    report = diverged.out.split("verify: DIVERGED\n", 1)[1]
    assert report.startswith(f"first divergence at seq {seq}, command DecideApproval ")
    assert "recorded: ApprovalGranted(" in report and "approvers=['mallory']" in report
    assert "replayed: ApprovalGranted(" in report and "approvers=['bob']" in report
    doc = json.loads(cli("replay", run_id, "--verify", "--json", "--db", db).out)
    assert doc["verify"]["ok"] is False and doc["verify"]["divergence"]["seq"] == seq


def test_refusals_show_who_and_why_in_timeline_and_replay(cli: Cli, specs: Path) -> None:
    db = str(specs / "t.db")
    run_id = _approved_run(cli, specs, db)

    timeline = cli("timeline", run_id, "--db", db).out
    refused = timeline.split("refused (kept in the run log, no effect):\n", 1)[1].splitlines()
    assert (
        "DecideApproval by alice at step review: self-approval: alice requested this run"
        in refused[0]
    )
    assert (
        "DecideApproval by bob at step nostep: unknown step: sign-off v1 has no step "
        "'nostep'; step 'review' is waiting for approval" in refused[1]
    )

    doc = json.loads(cli("timeline", run_id, "--json", "--db", db).out)
    assert [(r["command"], r["by"], r["step"], r["reason"]) for r in doc["rejections"]] == [
        ("DecideApproval", "alice", "review", "self-approval"),
        ("DecideApproval", "bob", "nostep", "unknown step"),
    ]
    assert doc["rejected_commands"] == 2
    assert "redacted" not in doc and all("_wait_from" not in s for s in doc["steps"])
    assert doc["steps"][0]["duration_ms"] is not None

    replay = cli("replay", run_id, "--db", db).out.splitlines()
    rejected = [line for line in replay if "  CommandRejected  " in line]
    assert len(rejected) == 2
    assert rejected[0].endswith(
        "DecideApproval by alice refused: self-approval: alice "
        "requested this run and may not approve it; ask another "
        "approver"
    )
    events = json.loads(cli("replay", run_id, "--json", "--db", db).out)["events"]
    assert [e.get("by") for e in events if e["type"] == "CommandRejected"] == ["alice", "bob"]


SLEEPER = """\
workflow: nap
version: 1
steps:
  - id: nap
    sleep: 300ms
  - id: sign
    approval: {approvers: [ops], exclude_requester: false}
"""


def test_on_the_store_run_wait_fires_due_timers_and_status_says_when_none_will(
    cli: Cli, tmp_path: Path
) -> None:
    db = str(tmp_path / "t.db")
    (tmp_path / "nap.yaml").write_text(SLEEPER)
    started = cli("run", str(tmp_path / "nap.yaml"), "--db", db)
    run_id = started.out.splitlines()[0]
    assert "Waiting at step nap" in started.out
    time.sleep(0.4)
    stuck = cli("status", run_id, "--db", db)
    assert "Waiting at step nap" in stuck.out
    assert f"note: no `terranoha serve` holds {db}: the run's timers" in stuck.err

    waited = cli("run", str(tmp_path / "nap.yaml"), "--key", "k2", "--wait", "10", "--db", db)
    assert waited.code == 0, waited
    assert "Waiting at step sign (waiting for approval by ops" in waited.out
    assert cli("status", waited.out.splitlines()[0], "--db", db).err == ""


KEYED = """\
workflow: keyed
version: 1
input: {order: string}
steps:
  - id: pay
    wait_event: {name: payment, key: input.order, timeout: 1h}
"""


def test_publish_completes_only_the_wait_of_its_key_and_messages_lists_it(
    cli: Cli, tmp_path: Path
) -> None:
    db = str(tmp_path / "t.db")
    (tmp_path / "keyed.yaml").write_text(KEYED)
    mine = cli(
        "run", str(tmp_path / "keyed.yaml"), "--input", '{"order": "o-1"}', "--key", "a", "--db", db
    ).out.splitlines()[0]
    other = cli(
        "run", "keyed", "--input", '{"order": "o-2"}', "--key", "b", "--db", db
    ).out.splitlines()[0]
    assert "waiting for message 'payment' with key 'o-1'" in cli("status", mine, "--db", db).out
    published = cli(
        "publish", "payment", "--key", "o-1", "--data", '{"paid": 5}', "--id", "tx-1", "--db", db
    )
    assert published.code == 0, published.err
    assert cli("publish", "payment", "--key", "o-1", "--id", "tx-1", "--db", db).code == 0
    assert "Completed" in cli("status", mine, "--db", db).out
    assert "Waiting" in cli("status", other, "--db", db).out
    assert (
        cli("publish", "payment", "--key", "nobody", "--ttl", "0", "--id", "lost", "--db", db).code
        == 0
    )
    listed = cli("messages", "--db", db).out.splitlines()
    assert [line.split("\t")[1:] for line in listed] == [
        ["tx-1", "payment", "o-1", "buffered", mine],
        ["lost", "payment", "nobody", "unmatched", "-"],
    ]
    assert cli("messages", "--status", "unmatched", "--json", "--db", db).out.count("\n") == 1


def test_publish_refuses_bad_input_naming_the_option(cli: Cli, tmp_path: Path) -> None:
    db = str(tmp_path / "t.db")
    for args, word in (
        (["--key", "k", "--ttl", "soon"], "--ttl"),
        (["--key", " "], "key"),
        (["--key", "k", "--data", "{"], "--data"),
    ):
        refused = cli("publish", "payment", *args, "--db", db)
        assert refused.code == 2 and word in refused.err, (args, refused)
