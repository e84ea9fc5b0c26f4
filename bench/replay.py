"""Replay benchmarks: how fast run state is rebuilt from recorded events.

Part 1, ``bench_pure_fold``: the pure core only. A large log is recorded by driving many
runs of a realistic five-step workflow through ``decide.process`` (a task that fails once
and is retried, a classification, a choice, a prepare/commit with an approval, a
notification); then every run's events are folded back with ``evolve.fold``, timed.

    .venv/bin/python bench/replay.py [--runs N] [--rounds R] [--profile]

Figures go to stdout. Nothing here is a timed test.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from engine.core import commands as cmd
from engine.core import events as ev
from engine.core.decide import process
from engine.core.evolve import fold
from engine.core.spec import WorkflowSpec, load_spec
from engine.core.state import RunState, RunStatus
from engine.embedded import Store
from engine.runtime.processor import Batch

T0 = 1_700_000_000_000

REFUND_WORKFLOW: dict[str, Any] = {
    "workflow": "refund-agent",
    "version": 1,
    "sla": "4h",
    "input": {"order_id": "string", "amount": "number"},
    "steps": [
        {
            "id": "lookup",
            "task": "crm.get_order",
            "timeout": "30s",
            "retry": {"max_attempts": 5, "initial": "1s", "max": "1m"},
        },
        {
            "id": "classify",
            "task": "llm.classify_refund",
            "input": {"order": "steps.lookup.result", "amount": "input.amount"},
            "review_if": "result.confidence < `0.8`",
            "review": {"approvers": ["refund-experts"]},
        },
        {
            "id": "route",
            "choice": [{"when": "steps.classify.result.label == 'reject'", "goto": "notify"}],
        },
        {
            "id": "refund",
            "prepare_commit": {
                "prepare": "payments.prepare_refund",
                "commit": "payments.commit_refund",
            },
            "approval": {"approvers": ["finance"], "remind_every": "30m", "expires_after": "24h"},
        },
        {"id": "notify", "task": "mail.send", "input": {"order": "input.order_id"}},
    ],
}


class _Driver:
    """Plays the worker, the approver and the timer service for one run."""

    def __init__(self, spec: WorkflowSpec, run_id: str) -> None:
        self.spec = spec
        self.run_id = run_id
        self.state: RunState | None = None
        self.now = T0
        self.events: list[ev.Event] = []
        self.n = 0

    def send(self, command_type: type[cmd.Command], **fields: Any) -> None:
        self.n += 1
        command = command_type(command_id=f"{self.run_id}/c{self.n}", run_id=self.run_id, **fields)
        decision = process(self.state, command, self.spec, self.now)
        self.state = decision.state
        self.events += decision.events
        self.now += 250

    def task_id(self) -> str:
        assert self.state is not None and self.state.current is not None
        return self.state.current.task_id

    def complete(self, step: str, result: Any, cost: float = 0.001) -> None:
        self.send(cmd.CompleteTask, step=step, task_id=self.task_id(), result=result, cost=cost)

    def fire(self, kind: str) -> None:
        assert self.state is not None
        timer = next(t for t in self.state.timers.values() if t.kind == kind)
        self.now = max(self.now, timer.due_at)
        self.send(cmd.FireTimer, timer_id=timer.timer_id)


def record_run(spec: WorkflowSpec, i: int) -> list[ev.Event]:
    """The events of one complete run of ``REFUND_WORKFLOW``."""
    run = _Driver(spec, f"run-{i:07d}")
    order = f"o-{i}"
    run.send(
        cmd.StartRun,
        workflow=spec.workflow,
        version=spec.version,
        input={"order_id": order, "amount": 40 + i % 60},
        idempotency_key=order,
        requested_by="alice",
    )
    run.send(
        cmd.FailTask,
        step="lookup",
        task_id=run.task_id(),
        error_class="transient",
        code="UNAVAILABLE",
        message="crm returned 503",
    )
    run.fire("retry")
    run.complete("lookup", {"order_id": order, "items": 2, "customer": f"cust-{i % 97}"})
    run.complete("classify", {"label": "refund", "confidence": 0.93}, cost=0.004)
    run.complete("refund", {"refund": 40 + i % 60, "account": f"A-{i % 13}"})
    run.send(cmd.DecideApproval, step="refund", approver="bob", roles=("finance",))
    run.complete("refund", {"refunded": True})
    run.complete("notify", {"sent": True})
    assert run.state is not None and run.state.status is RunStatus.COMPLETED, run.state
    return run.events


def record_log(n_runs: int) -> list[list[ev.Event]]:
    spec = load_spec(REFUND_WORKFLOW)
    return [record_run(spec, i) for i in range(n_runs)]


def _fold_all(runs: list[list[ev.Event]]) -> list[RunState | None]:
    return [fold(events) for events in runs]


def bench_pure_fold(
    n_runs: int = 5_000, rounds: int = 3, runs: list[list[ev.Event]] | None = None
) -> dict[str, Any]:
    """Record ``n_runs`` runs (unless given), then fold each run's events ``rounds`` times.

    Returns the event count and the median events per second over the rounds.
    """
    record_s: float | None = None
    if runs is None:
        started = time.perf_counter()
        runs = record_log(n_runs)
        record_s = time.perf_counter() - started
    n_events = sum(len(events) for events in runs)
    timings = []
    for _ in range(rounds):
        t = time.perf_counter()
        states = _fold_all(runs)
        timings.append(time.perf_counter() - t)
    assert all(s is not None and s.status is RunStatus.COMPLETED for s in states)
    median = statistics.median(timings)
    return {
        "benchmark": "pure_fold",
        "runs": len(runs),
        "events": n_events,
        "events_per_run": n_events / len(runs),
        "rounds": rounds,
        "seconds": timings,
        "median_s": median,
        "events_per_s": n_events / median,
        "record_s": record_s,
        "recorded_events_per_s": n_events / record_s if record_s else None,
    }


def bench_embedded_replay(runs: list[list[ev.Event]], rounds: int = 3) -> dict[str, Any]:
    """Write the recorded runs into an embedded store, then replay every run from it:
    read its events from SQLite, decode the Avro records, fold them.

    The ratio to the pure fold (same log, same process) is what the store costs.
    """
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "replay.db")
        batch = Batch()
        for events in runs:
            batch.events.extend(events)
            if len(batch.events) >= 20_000:
                store.write_batch(batch)
                batch = Batch()
        store.write_batch(batch)
        run_ids = [events[0].run_id for events in runs]
        n_events = sum(len(events) for events in runs)
        timings = []
        for _ in range(rounds):
            t = time.perf_counter()
            states = [fold(store.events(run_id)) for run_id in run_ids]
            timings.append(time.perf_counter() - t)
        store.close()
    assert all(s is not None and s.status is RunStatus.COMPLETED for s in states)
    median = statistics.median(timings)
    return {
        "benchmark": "embedded_replay",
        "runs": len(runs),
        "events": n_events,
        "rounds": rounds,
        "seconds": timings,
        "median_s": median,
        "events_per_s": n_events / median,
    }


def profile_fold(runs: list[list[ev.Event]], top: int = 15) -> str:
    """cProfile of one fold of ``runs``, the ``top`` functions by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    _fold_all(runs)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one fold")
    args = parser.parse_args(argv)

    result = bench_pure_fold(args.runs, args.rounds)
    print(f"python {platform.python_version()} on {platform.machine()}, one core")
    print(
        f"pure fold: {result['runs']} runs, {result['events']} events "
        f"({result['events_per_run']:.0f} per run)"
    )
    print(
        f"  fold  {result['events_per_s']:>12,.0f} events/s  "
        f"(median of {result['rounds']}: {result['median_s'] * 1000:.1f} ms; "
        f"rounds {', '.join(f'{s * 1000:.1f}' for s in result['seconds'])} ms)"
    )
    print(f"  recording (decide + evolve) ran at {result['recorded_events_per_s']:,.0f} events/s")
    stored = bench_embedded_replay(record_log(args.runs), args.rounds)
    print("embedded store replay (SQLite read + Avro decode + fold), same log:")
    print(
        f"  replay {stored['events_per_s']:>12,.0f} events/s  "
        f"(median of {stored['rounds']}: {stored['median_s'] * 1000:.1f} ms)  "
        f"= {stored['events_per_s'] / result['events_per_s']:.2f} x the pure fold"
    )
    if args.profile:
        print(profile_fold(record_log(min(args.runs, 1_000))))


if __name__ == "__main__":
    main(sys.argv[1:])
