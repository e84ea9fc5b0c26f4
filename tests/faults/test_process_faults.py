"""Engine processes killed, frozen, added and removed under load."""

from __future__ import annotations

import random
import signal
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


@pytest.mark.timeout(600)
def test_sigkill_engine_under_load(fleet: Fleet, rng: random.Random, fault_seconds: float) -> None:
    fleet.setup()
    proc = fleet.start()
    load = fleet.load(fault_seconds, rate=40)
    kills = 0
    end = time.monotonic() + fault_seconds
    while time.monotonic() < end or kills < 3:
        time.sleep(rng.uniform(0.3, 2.5))
        fleet.kill(proc, signal.SIGKILL)
        kills += 1
        proc = fleet.start()
    load.join()
    view, waited = fleet.wait_settled(240)
    print(
        f"drove {len(fleet.sent.triggers)} runs, {kills} SIGKILLs of the engine; "
        f"settled {waited:.1f}s after the load"
    )
    assert_checks(run_checks(fleet, view))


@pytest.mark.timeout(600)
def test_zombie_engine_is_fenced(fleet: Fleet, rng: random.Random, fault_seconds: float) -> None:
    """Two processes with the same app id, so the same transactional ids. The first is
    frozen past its session timeout (10 s), the second takes its partitions, then the first
    wakes up holding a batch: its producers are fenced and nothing is written twice."""
    fleet.setup()
    zombie = fleet.start()
    load = fleet.load(fault_seconds + 16, rate=40)
    time.sleep(rng.uniform(1.0, 3.0))
    zombie.send_signal(signal.SIGSTOP)
    heir = fleet.start()
    frozen = rng.uniform(14.0, 18.0)
    time.sleep(frozen)
    zombie.send_signal(signal.SIGCONT)
    load.join()
    view, waited = fleet.wait_settled(240)
    fleet.kill(zombie, signal.SIGTERM)
    zombie_log = (fleet.tmp / "engine-0.log").read_text(errors="replace")
    print(
        f"drove {len(fleet.sent.triggers)} runs; zombie frozen {frozen:.1f}s while "
        f"pid {heir.pid} took over; zombie logged {zombie_log.count('fenced')} fencings; "
        f"settled {waited:.1f}s after the load"
    )
    assert_checks(run_checks(fleet, view))


@pytest.mark.timeout(600)
def test_processes_join_and_leave(fleet: Fleet, rng: random.Random, fault_seconds: float) -> None:
    """Engine processes added and removed (cleanly and by SIGKILL) every few seconds."""
    fleet.setup()
    fleet.start()
    load = fleet.load(fault_seconds, rate=40)
    changes: list[str] = []
    end = time.monotonic() + fault_seconds
    while time.monotonic() < end or len(changes) < 4:
        time.sleep(rng.uniform(1.0, 3.0))
        alive = fleet.alive()
        if len(alive) < 2 or (len(alive) < 3 and rng.random() < 0.5):
            fleet.start()
            changes.append("+")
        else:
            sig = rng.choice([signal.SIGTERM, signal.SIGKILL])
            fleet.kill(rng.choice(alive), sig)
            changes.append("-kill" if sig == signal.SIGKILL else "-term")
    load.join()
    view, waited = fleet.wait_settled(240)
    print(
        f"drove {len(fleet.sent.triggers)} runs; membership changes {' '.join(changes)}; "
        f"settled {waited:.1f}s after the load"
    )
    assert_checks(run_checks(fleet, view))
