"""Schedules while the engine process is SIGKILLed around ticks, sometimes staying down
across several: every nominal time from the first to the last has exactly one run, none
twice, none missed inside the catch-up window, and every run has a decision behind it."""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import time
from collections import Counter
from collections.abc import Callable

import pytest
from aiokafka import TopicPartition

from engine.codec import decode, encode
from engine.core.events import RunStarted
from engine.core.schedule_records import (
    CreateSchedule,
    DeleteSchedule,
    ScheduleCommand,
    ScheduleDeleted,
    ScheduledRunStarted,
    ScheduleSpec,
    ScheduleTicksMissed,
)
from engine.core.schedules import run_id_of, schedule_origin
from engine.kafka.schedules import schedule_topics
from engine.kafka.topics import key_partition
from engine.runtime.schedule_spec import load_schedule
from tests.faults.checkers import Check, assert_checks, run_checks
from tests.faults.harness import Fleet, LogView, read_to_end
from tests.kafka.helpers import produce

pytestmark = [
    pytest.mark.faults,
    pytest.mark.kafka,
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.chaos,
]

SECOND = 1000


def _send(fleet: Fleet, command: ScheduleCommand) -> None:
    keyed = schedule_topics(fleet.topics)
    key = command.schedule_id.encode()
    asyncio.run(
        produce(
            fleet.infra.bootstrap,
            keyed.inputs,
            [(encode(command), key, key_partition(key, keyed.partitions))],
        )
    )


def _schedule_log(fleet: Fleet) -> list[object]:
    keyed = schedule_topics(fleet.topics)
    parts = [TopicPartition(keyed.events, p) for p in range(keyed.partitions)]
    records = asyncio.run(read_to_end(fleet.infra.bootstrap, parts, "read_committed"))
    return [decode(m.value) for _, m in records]


def check_schedule(
    spec: ScheduleSpec, log: list[object], view: LogView, first_kill_ms: int, last_restart_ms: int
) -> Check:
    check = Check("S each nominal time exactly one run")
    decided = Counter(e.nominal for e in log if isinstance(e, ScheduledRunStarted))
    for nominal, n in decided.items():
        if n != 1:
            check.fail(f"nominal {nominal} started {n} times by the schedule")
    for missed in (e for e in log if isinstance(e, ScheduleTicksMissed)):
        check.fail(
            f"{missed.count} nominal times {missed.first}..{missed.last} missed "
            "inside a one-hour catch-up window"
        )
    ordered = sorted(decided)
    for a, b in itertools.pairwise(ordered):
        if b - a != SECOND:
            check.fail(f"no run for the nominal times between {a} and {b}")
    if not ordered or ordered[0] > first_kill_ms:
        check.fail(
            f"the schedule started after the first kill ({first_kill_ms}): first "
            f"nominal {ordered[0] if ordered else None}"
        )
    if not ordered or ordered[-1] < last_restart_ms:
        check.fail(
            f"the schedule stopped before the last restart ({last_restart_ms}): "
            f"last nominal {ordered[-1] if ordered else None}"
        )
    runs = Counter(e.record.run_id for e in view.committed if isinstance(e.record, RunStarted))
    for nominal in ordered:
        run_id = run_id_of(spec, nominal)
        if runs[run_id] != 1:
            check.fail(f"nominal {nominal}: {runs[run_id]} RunStarted for run {run_id}")
    scheduled = {run_id_of(spec, n) for n in ordered}
    for logged in view.committed:
        record = logged.record
        if (
            isinstance(record, RunStarted)
            and schedule_origin(record.idempotency_key)
            and record.run_id not in scheduled
        ):
            check.fail(
                f"run {record.run_id} ({record.idempotency_key}) has no decision in "
                "the schedule's log"
            )
    check.found.append(
        f"{len(ordered)} nominal times, {sum(runs[r] for r in scheduled)} runs started"
    )
    print(check.report())
    return check


def _wait_for(
    fleet: Fleet, done: Callable[[list[object]], bool], timeout_s: float = 120.0
) -> list[object]:
    deadline = time.monotonic() + timeout_s
    log = _schedule_log(fleet)
    while not done(log) and time.monotonic() < deadline:
        time.sleep(0.5)
        log = _schedule_log(fleet)
    return log


@pytest.mark.timeout(600)
def test_engine_killed_around_ticks(fleet: Fleet, rng: random.Random, fault_seconds: float) -> None:
    fleet.setup()
    proc = fleet.start()
    spec = load_schedule(
        {
            "id": f"{fleet.prefix}-every-second",
            "workflow": "durable",
            "input": {"n": 1},
            "interval": "1s",
            "overlap": "allow_all",
            "catch_up_window": "1h",
        }
    )
    _send(fleet, CreateSchedule(command_id="create", schedule_id=spec.schedule_id, spec=spec))
    _wait_for(fleet, lambda log: any(isinstance(e, ScheduledRunStarted) for e in log))
    kills, downs = 0, []
    first_kill = last_restart = 0
    end = time.monotonic() + fault_seconds
    while time.monotonic() < end or kills < 3:
        time.sleep(rng.uniform(0.3, 2.5))
        fleet.kill(proc, signal.SIGKILL)
        first_kill = first_kill or int(time.time() * 1000)
        kills += 1
        down = rng.choice([0.0, rng.uniform(1.0, 4.0)])  # within a tick, or across several
        downs.append(down)
        time.sleep(down)
        proc = fleet.start()
        last_restart = int(time.time() * 1000)
    # Let the last engine take its partitions over and catch up, then end the schedule.
    _wait_for(
        fleet,
        lambda log: any(
            isinstance(e, ScheduledRunStarted) and e.nominal >= last_restart for e in log
        ),
    )
    _send(fleet, DeleteSchedule(command_id="delete", schedule_id=spec.schedule_id))
    log = _wait_for(fleet, lambda log: any(isinstance(e, ScheduleDeleted) for e in log))
    scheduled = [run_id_of(spec, e.nominal) for e in log if isinstance(e, ScheduledRunStarted)]
    view, waited = fleet.wait_settled(
        240, done=lambda v: all(r in v.states() and v.states()[r].terminal for r in scheduled)
    )
    print(
        f"{kills} SIGKILLs of the engine, down {', '.join(f'{d:.1f}s' for d in downs)}; "
        f"{len(scheduled)} scheduled runs settled {waited:.1f}s after the delete"
    )
    assert_checks(
        [
            *run_checks(fleet, view, extra_runs=scheduled),
            check_schedule(spec, log, view, first_kill, last_restart),
        ]
    )
