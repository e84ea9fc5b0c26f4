"""The Kafka backend under SIGKILL and rebalances, against the real broker and PostgreSQL.

Invariants checked at the end: every trigger became exactly one run and that run
completed; per run, sequence numbers are contiguous and no event is in the committed log
twice; every write was applied under one idempotency key exactly once.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.infra import kafka_bootstrap, postgres_dsn
from tests.integration.kafka_harness import (
    Cluster,
    check_log,
    effects_per_write,
    stop_process,
    wait_ready,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow, pytest.mark.chaos]


def _wait_done(cluster: Cluster, run_ids: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = cluster.states()
        if all(r in states and states[r].terminal for r in run_ids):
            return
        time.sleep(1.0)


def _check(cluster: Cluster, run_ids: list[str]) -> None:
    states = check_log(cluster, run_ids)
    unfinished = {r: s.status.value for r, s in states.items() if s.status.value != "Completed"}
    assert not unfinished, (
        f"{len(unfinished)} runs did not complete: {list(unfinished.items())[:5]}"
    )
    per_write, calls = effects_per_write(cluster)
    assert len(per_write) == 2 * len(run_ids), "one commit and one notify effect per run"
    doubled = {w: n for w, n in per_write.items() if n != 1}
    assert not doubled, f"writes applied under several keys: {doubled}"
    print(f"{len(run_ids)} runs completed; {calls} tool calls for {len(per_write)} effects")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(kafka_bootstrap(), postgres_dsn(), tmp_path)
    yield cluster
    cluster.delete_topics()


def _kill_under_load(cluster: Cluster, runs: int, kills: int, *serve_args: str) -> None:
    """``runs`` triggers; ``kills`` times start ``serve`` and SIGKILL it at a random moment;
    then a last one to finish the work, stopped cleanly; then every check."""
    seed = int(os.environ.get("TERRANOHA_SEED", random.randrange(1 << 30)))
    print(f"seed {seed}")
    rng = random.Random(seed)
    cluster.setup()
    run_ids = cluster.trigger(runs)
    for _ in range(kills):
        proc = cluster.serve(*serve_args)
        wait_ready(proc)
        time.sleep(rng.uniform(0.5, 4.0))
        stop_process(proc, signal.SIGKILL)
    proc = cluster.serve(*serve_args)
    wait_ready(proc)
    try:
        _wait_done(cluster, run_ids, 240)
    finally:
        err = stop_process(proc)
    assert proc.returncode == 0, err[-3000:]
    print(f"{kills} kills")
    _check(cluster, run_ids)


@pytest.mark.timeout(420)
def test_sigkill_under_load(cluster: Cluster) -> None:
    _kill_under_load(cluster, 300, 4)


@pytest.mark.timeout(420)
def test_two_processes_share_partitions_and_rebalance(cluster: Cluster) -> None:
    cluster.setup()
    first = cluster.serve()
    wait_ready(first)
    second = cluster.serve()
    wait_ready(second)
    run_ids = cluster.trigger(200, duplicates=2)
    time.sleep(3.0)
    err = stop_process(second)  # a clean stop: its partitions move to the first process
    assert second.returncode == 0, err[-3000:]
    try:
        _wait_done(cluster, run_ids, 240)
    finally:
        err = stop_process(first)
    assert first.returncode == 0, err[-3000:]
    _check(cluster, run_ids)


@pytest.mark.timeout(420)
def test_sigkill_and_restart_under_the_same_instance_id(cluster: Cluster) -> None:
    """Static membership (``--instance-id``): the restarted process takes the dead one's
    place in the group (no wait for its session to expire), with the same guarantees. A
    clean stop at the end still exits 0 (static members do not leave the group)."""
    _kill_under_load(cluster, 200, 2, "--instance-id", "node-a")
