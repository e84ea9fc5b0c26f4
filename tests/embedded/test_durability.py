"""SIGKILL the embedded engine at random moments: every run still completes, and every
side effect is applied exactly once."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.core.records import Trigger
from engine.embedded import Store
from engine.runtime.replay import verify
from engine.runtime.specs import SpecRegistry
from tests.embedded.durable_tools import DURABLE

ROOT = Path(__file__).resolve().parents[2]
SPEC = DURABLE
RUNS = 40


def _serve(db: Path, effects: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERRANOHA_TEST_EFFECTS": str(effects)}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "serve",
            "--db",
            str(db),
            "--workers",
            "tests.embedded.durable_tools",
            "--concurrency",
            "4",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _done(db: Path) -> int:
    store = Store(db)
    try:
        return sum(1 for r in store.run_ids("Completed", limit=10_000))
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.timeout(300)
def test_sigkill_at_random_points_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("TERRANOHA_SEED", random.randrange(1 << 30)))
    print(f"seed {seed}")
    rng = random.Random(seed)
    db, effects = tmp_path / "engine.db", tmp_path / "effects.db"
    store = Store(db)
    store.deploy(SPEC, 0)
    store.append_inputs(
        [Trigger(workflow="durable", idempotency_key=f"k{i}", input={"n": i}) for i in range(RUNS)],
        int(time.time() * 1000),
    )
    store.close()

    kills = 0
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and kills < 5:
        proc = _serve(db, effects)
        time.sleep(rng.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        kills += 1
    proc = _serve(db, effects)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith(b"serving"), "the server did not start"
    try:
        while time.monotonic() < deadline and _done(db) < RUNS:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()

    store = Store(db)
    specs = SpecRegistry([SPEC])
    run_ids = store.run_ids(limit=10_000)
    assert len(run_ids) == RUNS, "every trigger became exactly one run"
    for run_id in run_ids:
        state = store.state(run_id)
        assert state is not None and state.status.value == "Completed", (run_id, state)
        events = store.events(run_id)
        assert [e.seq for e in events] == list(range(1, len(events) + 1)), run_id
        report = verify(run_id, events, store.recorded_commands(run_id), specs)
        assert report.ok, report.divergence
    store.close()

    fx = sqlite3.connect(effects)
    # The service applies each idempotency key once (as payment APIs do). What the engine
    # must guarantee is that one logical write never gets two different keys, whatever
    # was retried or redelivered: exactly one applied effect per (run, step).
    per_write = dict(fx.execute("SELECT run_id || '/' || step, COUNT(*) FROM effects GROUP BY 1"))
    calls = fx.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    fx.close()
    assert len(per_write) == 2 * RUNS, "one commit and one notify effect per run"
    duplicated = {write: n for write, n in per_write.items() if n != 1}
    assert not duplicated, f"writes applied under several keys: {duplicated}"
    # Calls repeat only for tasks in flight at a kill (at most the worker's concurrency).
    assert calls - 2 * RUNS <= kills * 4, f"{calls} calls for {2 * RUNS} effects"
    print(f"{kills} kills, {calls} tool calls for {len(per_write)} effects")
