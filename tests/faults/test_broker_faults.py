"""The broker frozen and killed, and PostgreSQL crashed, under load."""

from __future__ import annotations

import random
import time

import pytest

from tests.faults.checkers import assert_checks, run_checks
from tests.faults.harness import Fleet

pytestmark = [
    pytest.mark.faults,
    pytest.mark.kafka,
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.chaos,
]


def _count(text: str, needle: str) -> int:
    return text.count(needle)


@pytest.mark.timeout(600)
def test_broker_paused_during_commits(
    fleet: Fleet, rng: random.Random, fault_seconds: float
) -> None:
    """SIGSTOP the broker for 5-30 s (bounded by --seconds) while transactions are in flight:
    commits time out after 3 s, so their outcome is unknown and each partition recreates its
    producer and restores instead of aborting."""
    fleet.setup()
    fleet.start(commit_timeout=3.0)
    load = fleet.load(fault_seconds + 10, rate=100)
    pauses = []
    for _ in range(max(2, int(fault_seconds // 8))):
        time.sleep(rng.uniform(1.0, 3.0))
        pause = rng.uniform(5.0, max(5.0, min(30.0, fault_seconds)))
        fleet.infra.pause_broker()
        time.sleep(pause)
        fleet.infra.resume_broker()
        pauses.append(round(pause, 1))
    load.join()
    fleet.revive(commit_timeout=3.0)
    view, waited = fleet.wait_settled(240)
    log = fleet.stderr()
    print(
        f"drove {len(fleet.sent.triggers)} runs; broker paused {pauses} s; engine logged "
        f"{_count(log, 'transaction outcome unknown')} unknown transaction outcomes, "
        f"{_count(log, 'recreating its producer')} producer recreations, "
        f"{_count(log, 'producer fenced')} fencings; settled {waited:.1f}s after the load"
    )
    assert_checks(run_checks(fleet, view))


@pytest.mark.timeout(600)
@pytest.mark.xfail(
    strict=False,
    reason="known exactly-once defect, issue 12: after a broker restart a changelog "
    "partition can read as far shorter than what was committed (seen: end offset 5 for a "
    "local store checkpointed at 64); the restore then takes a stale state and re-decides "
    "inputs with seqs already written. The checkers report it; the fix is open.",
)
def test_broker_killed_and_restarted(
    fleet: Fleet, rng: random.Random, fault_seconds: float
) -> None:
    fleet.setup()
    fleet.start(commit_timeout=3.0)
    load = fleet.load(fault_seconds + 10, rate=100)
    restarts = []
    for _ in range(max(1, int(fault_seconds // 10))):
        time.sleep(rng.uniform(1.0, 4.0))
        fleet.infra.kill_broker()
        time.sleep(rng.uniform(0.5, 3.0))
        restarts.append(round(fleet.infra.start(), 1))
    load.join()
    fleet.revive(commit_timeout=3.0)
    view, waited = fleet.wait_settled(300)
    log = fleet.stderr()
    discarded = _count(log, "discarded: its checkpoint")
    if discarded:
        print(f"local stores discarded for a checkpoint beyond the changelog's end: {discarded}")
    print(
        f"drove {len(fleet.sent.triggers)} runs "
        f"({len(fleet.sent.unacknowledged)} sends unacknowledged); broker SIGKILLed "
        f"{len(restarts)} times, restarts took {restarts} s; engine logged "
        f"{_count(log, 'transaction outcome unknown')} unknown transaction outcomes; "
        f"settled {waited:.1f}s after the load"
    )
    assert_checks(run_checks(fleet, view))


@pytest.mark.timeout(600)
def test_postgres_crash_under_load(fleet: Fleet, rng: random.Random, fault_seconds: float) -> None:
    """The workers' idempotency ledger goes away (``pg_ctl stop -m immediate``) and comes
    back: tool calls may repeat, effects may not."""
    fleet.setup()
    fleet.start()
    load = fleet.load(fault_seconds + 6, rate=40)
    downtimes = []
    for _ in range(2):
        time.sleep(rng.uniform(1.0, 3.0))
        fleet.infra.crash_postgres()
        down = rng.uniform(1.0, 4.0)
        time.sleep(down)
        downtimes.append(round(down + fleet.infra.start(), 1))
    load.join()
    fleet.revive()
    view, waited = fleet.wait_settled(240)
    print(
        f"drove {len(fleet.sent.triggers)} runs; PostgreSQL crashed twice, down for "
        f"{downtimes} s; settled {waited:.1f}s after the load"
    )
    assert_checks(run_checks(fleet, view))
