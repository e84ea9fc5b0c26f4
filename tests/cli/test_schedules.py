"""``terranoha schedules`` on the embedded store: create from a file or options, list,
show with what was missed, pause and resume, trigger, backfill, delete; bad documents
are refused naming each field."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.core.policies import run_id_for
from engine.core.schedules import idempotency_key
from engine.embedded import Store
from engine.runtime.schedule_spec import parse_time
from tests.cli.conftest import Cli

HOLD = """\
workflow: hold
version: 1
steps:
  - id: wait
    wait_event: {name: never, timeout: 1h}
"""

SCHEDULE = """\
id: nightly-report
workflow: hold
cron: "30 2 * * *"
timezone: Europe/Berlin
input: {region: eu}
overlap: skip
catch_up_window: 2h
"""


@pytest.fixture
def db(tmp_path: Path, cli: Cli) -> str:
    (tmp_path / "hold.yaml").write_text(HOLD)
    (tmp_path / "nightly.yaml").write_text(SCHEDULE)
    path = str(tmp_path / "s.db")
    assert cli("workflows", "deploy", str(tmp_path / "hold.yaml"), "--db", path).code == 0
    return path


def test_a_schedule_from_a_file_is_listed_and_shown(cli: Cli, db: str, tmp_path: Path) -> None:
    created = cli("schedules", "create", str(tmp_path / "nightly.yaml"), "--db", db)
    assert created.code == 0, created.err
    assert "schedule nightly-report created" in created.out
    assert "02:30:00+0" in created.out  # the next nominal time, in Berlin time
    again = cli("schedules", "create", str(tmp_path / "nightly.yaml"), "--db", db)
    assert "exists already (unchanged)" in again.out
    listed = cli("schedules", "list", "--db", db)
    assert "nightly-report" in listed.out and "30 2 * * *" in listed.out
    shown = cli("schedules", "show", "nightly-report", "--db", db)
    assert "timezone: Europe/Berlin" in shown.out and "overlap: skip" in shown.out


def test_trigger_starts_a_run_and_the_overlap_policy_then_skips(cli: Cli, db: str) -> None:
    assert (
        cli(
            "schedules",
            "create",
            "--id",
            "hourly",
            "--workflow",
            "hold",
            "--every",
            "1h",
            "--db",
            db,
        ).code
        == 0
    )
    first = cli("schedules", "trigger", "hourly", "--db", db)
    assert first.code == 0 and "started run" in first.out
    run_id = first.out.split("started run ")[1].split()[0]
    assert cli("status", run_id, "--db", db).code == 0
    second = cli("schedules", "trigger", "hourly", "--db", db)
    assert "skipped" in second.out and "(overlap)" in second.out


def test_backfill_starts_the_range_and_a_repeat_addresses_the_same_runs(cli: Cli, db: str) -> None:
    assert (
        cli(
            "schedules",
            "create",
            "--id",
            "daily",
            "--workflow",
            "hold",
            "--cron",
            "0 6 * * *",
            "--timezone",
            "America/New_York",
            "--db",
            db,
        ).code
        == 0
    )
    result = cli(
        "schedules",
        "backfill",
        "daily",
        "--from",
        "2026-03-07T00:00:00-05:00",
        "--to",
        "2026-03-09T23:00:00-04:00",
        "--db",
        db,
    )
    assert result.code == 0, result.err
    assert result.out.count("started run") == 3
    march_8 = parse_time("2026-03-08T06:00:00-04:00")  # the morning after spring forward
    expected = run_id_for("default", idempotency_key("daily", march_8))
    assert expected in result.out
    assert "for 2026-03-08T06:00:00-04:00" in result.out
    assert cli("status", expected, "--db", db).code == 0
    cli(
        "schedules",
        "backfill",
        "daily",
        "--from",
        "2026-03-08T00:00:00-05:00",
        "--to",
        "2026-03-08T12:00:00-04:00",
        "--db",
        db,
    )
    store = Store(db)
    try:
        events = store.events(expected)
        assert [e.TYPE for e in events].count("RunStarted") == 1
        assert any(getattr(e, "reason", "") == "duplicate start" for e in events), (
            "the repeated start was refused"
        )
    finally:
        store.close()


def test_a_paused_schedule_records_the_times_it_did_not_run(cli: Cli, db: str) -> None:
    assert (
        cli(
            "schedules", "create", "--id", "fast", "--workflow", "hold", "--every", "1s", "--db", db
        ).code
        == 0
    )
    assert "paused" in cli("schedules", "pause", "fast", "--db", db).out
    time.sleep(2.2)
    resumed = cli("schedules", "resume", "fast", "--db", db)
    assert resumed.code == 0 and "MISSED" in resumed.out and "(paused)" in resumed.out
    shown = cli("schedules", "show", "fast", "--db", db)
    assert "MISSED" in shown.out and "missed 0" not in shown.out
    assert cli("schedules", "delete", "fast", "--db", db).code == 0
    assert "fast" not in cli("schedules", "list", "--db", db).out
    gone = cli("schedules", "pause", "fast", "--db", db)
    assert gone.code == 2 and "no schedule 'fast'" in gone.err


def test_a_bad_schedule_is_refused_naming_each_field(cli: Cli, db: str, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "id: x\nworkflow: hold\ncron: '0 25 * * *'\ntimezone: Europe/Berlln\n"
        "overlap: sometimes\nfrequency: daily\n"
    )
    result = cli("schedules", "create", str(tmp_path / "bad.yaml"), "--db", db)
    assert result.code == 2
    for field in ("cron:", "timezone:", "overlap:", "frequency:"):
        assert field in result.err, field
    both = cli("schedules", "create", "--id", "y", "--workflow", "hold", "--db", db)
    assert both.code == 2 and "give a cron expression" in both.err
    backwards = cli(
        "schedules", "backfill", "nope", "--from", "yesterday", "--to", "now", "--db", db
    )
    assert backwards.code == 2 and "--from/--to" in backwards.err
