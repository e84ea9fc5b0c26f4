"""DBOS Transact peer benchmark: the same workload as Terranoha's Kafka benchmark.

Workload: N runs of a DBOS workflow of 5 steps (``@DBOS.step()``), each step a no-op
returning ``{"step": name}``; the workflow returns the list of its step results. Every
workflow and step is durable in PostgreSQL, as DBOS does by default (one row per
workflow in ``dbos.workflow_status``, one per step in ``dbos.operation_outputs``).
The system database is our own, ``terranoha_bench_dbos`` (dropped and recreated at
start) on the given PostgreSQL server, so the project's tables are never touched.

Modes (``--mode``):

- ``queue`` (default): what a DBOS user does for a high-throughput backlog, and the
  analogue of Terranoha's triggers published to Kafka. All N workflows are enqueued
  durably on a DBOS queue as fast as DBOS takes them (from ``--enqueuers`` threads, as
  ``Queue.enqueue`` is one database round trip each); this process dequeues them with
  ``worker_concurrency=C`` and a queue polling interval of ``--poll`` seconds (DBOS's
  default of 1 s would cap the rate at C runs per second), then waits on every handle
  with ``handle.get_result()``.
- ``direct``: C threads call the workflow function directly (DBOS's fastest path: the
  workflow is recorded and runs in the calling thread, no queue).

A warm-up of ``--warmup`` runs in the same mode precedes the measurement and is not
counted. Every run's result is checked, from ``get_result`` and from the workflow's
stored status.

Figures: completed runs/s and steps/s (runs x 5 / s) over the wall time from the first
start to the last completion seen; per-workflow latency p50/p95/p99 from the stored
timestamps, start (``created_at``: enqueue or call) -> completion (``completed_at``), so in
queue mode it includes the wait in the queue behind the burst (``exec_latency_ms`` is
dequeue -> completion); CPU seconds of this process (``getrusage``, all threads, self and
children) and its peak RSS (``VmHWM``). ``postgres_cpu_seconds`` is, separately, the CPU
of the PostgreSQL backends serving this benchmark's database (from ``/proc``; null where
unreadable), the work DBOS delegates to the server: it is not in ``cpu_seconds``.

Run with the peers' interpreter (``python -m bench.peers.venv`` prints it), from the
repository root:

    .local/bench-peers/venv/bin/python bench/peers/dbos_bench.py \\
        --postgres postgresql://terranoha:terranoha@127.0.0.1:25432/terranoha \\
        --runs 2000 [--concurrency 16] [--mode queue|direct]

Human-readable lines go to stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import sqlalchemy as sa
from dbos import DBOS, DBOSConfig, SetWorkflowID

DATABASE = "terranoha_bench_dbos"
QUEUE = "bench"
STEPS = tuple(f"s{i}" for i in range(5))
EXPECTED = [{"step": name} for name in STEPS]


@DBOS.step()
def noop_step(name: str) -> dict[str, str]:
    return {"step": name}


@DBOS.workflow()
def bench_workflow() -> list[dict[str, str]]:
    return [noop_step(name) for name in STEPS]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the database


def recreate_database(dsn: str) -> str:
    """Drop and recreate DATABASE on the server of ``dsn``; return its URL."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{DATABASE}"')
    return sa.make_url(dsn).set(database=DATABASE).render_as_string(hide_password=False)


def server_settings(url: str) -> dict[str, str]:
    """The PostgreSQL settings that decide how durable (and how costly) a commit is."""
    with psycopg.connect(url) as conn:
        return {
            name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
            for name in ("server_version", "synchronous_commit", "fsync")
        }


def backend_cpu() -> dict[int, float] | None:
    """CPU seconds of each PostgreSQL backend connected to DATABASE, or None if /proc
    does not show them."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[int, float] = {}
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            if not cmdline.startswith("postgres:") or f" {DATABASE} " not in cmdline:
                continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            found[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        except (OSError, ValueError, IndexError):
            continue
    return found or None


# ------------------------------------------------------------------ measurements


def cpu_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentiles(values: list[float]) -> dict[str, float] | None:
    """Nearest-rank p50/p95/p99 (as bench/_common.percentile), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return {
        f"p{round(q * 100)}": ordered[min(len(ordered) - 1, int(q * len(ordered)))]
        for q in (0.5, 0.95, 0.99)
    }


# ------------------------------------------------------------------ the runs


def run_queue(ids: list[str], enqueuers: int) -> list[Any]:
    """Enqueue one workflow per id, then wait for each; return their results."""
    queue = DBOS.retrieve_queue(QUEUE)
    assert queue is not None

    def enqueue(workflow_id: str) -> Any:
        with SetWorkflowID(workflow_id):
            return queue.enqueue(bench_workflow)

    with ThreadPoolExecutor(enqueuers, thread_name_prefix="enqueue") as pool:
        handles = list(pool.map(enqueue, ids))
    return [handle.get_result(polling_interval_sec=0.01) for handle in handles]


def run_direct(ids: list[str], concurrency: int) -> list[Any]:
    """Call the workflow once per id from ``concurrency`` threads; return the results."""

    def call(workflow_id: str) -> Any:
        with SetWorkflowID(workflow_id):
            return bench_workflow()

    with ThreadPoolExecutor(concurrency, thread_name_prefix="caller") as pool:
        return list(pool.map(call, ids))


def ids_for(prefix: str, count: int) -> list[str]:
    stamp = time.time_ns()
    return [f"{prefix}-{stamp}-{i}" for i in range(count)]


def stored_statuses(ids: list[str]) -> list[Any]:
    statuses: list[Any] = []
    for start in range(0, len(ids), 1000):
        statuses += DBOS.list_workflows(workflow_ids=ids[start : start + 1000], load_input=False)
    return statuses


def measure(run: Callable[[list[str]], list[Any]], ids: list[str]) -> dict[str, Any]:
    """Run the workload over ``ids`` and check every result; the figures of one round."""
    pg_before = backend_cpu()
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    results = run(ids)
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_before
    pg_after = backend_cpu()
    statuses = stored_statuses(ids)
    good = {s.workflow_id for s in statuses if s.status == "SUCCESS" and s.output == EXPECTED}
    completed = sum(
        1 for wid, result in zip(ids, results, strict=True) if result == EXPECTED and wid in good
    )
    pg_cpu = None
    if pg_after is not None:
        pg_cpu = sum(used - (pg_before or {}).get(pid, 0.0) for pid, used in pg_after.items())

    def spans(start_field: str) -> list[float]:
        return [
            float(s.completed_at - getattr(s, start_field))
            for s in statuses
            if s.completed_at is not None and getattr(s, start_field) is not None
        ]

    return {
        "completed": completed,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "postgres_cpu_seconds": pg_cpu,
        "latency_ms": percentiles(spans("created_at")),
        "exec_latency_ms": percentiles(spans("dequeued_at")),
    }


# ------------------------------------------------------------------ main


def exit_when_threads_gone(code: int, timeout: float = 10.0) -> None:
    """Exit with ``code`` once the non-daemon threads DBOS started are gone; if one is
    still there after ``timeout``, say so and leave anyway."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    left = [
        t.name
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.daemon and t.is_alive()
    ]
    if left:
        log(f"warning: threads still alive after DBOS.destroy(): {left}; exiting anyway")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def watchdog(seconds: float) -> threading.Timer:
    def expire() -> None:
        log(f"error: the benchmark did not finish within {seconds:.0f} s; giving up")
        sys.stderr.flush()
        os._exit(3)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--postgres",
        required=True,
        help="DSN of a database on the server "
        f"(used only to create {DATABASE}); its role must create databases",
    )
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="workflows running at once (queue worker_concurrency, or threads)",
    )
    parser.add_argument("--mode", choices=("queue", "direct"), default="queue")
    parser.add_argument(
        "--poll",
        type=float,
        default=0.01,
        help="queue polling interval in seconds (DBOS's default is 1.0)",
    )
    parser.add_argument(
        "--enqueuers", type=int, default=4, help="threads enqueuing the burst in queue mode"
    )
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument(
        "--timeout",
        type=float,
        default=900,
        help="seconds after which the benchmark gives up (exit 3)",
    )
    args = parser.parse_args()
    timer = watchdog(args.timeout)

    url = recreate_database(args.postgres)
    server = server_settings(url)
    version = importlib.metadata.version("dbos")
    pool_size = args.concurrency + 10  # the workers, the enqueuers, the queue thread
    config: DBOSConfig = {
        "name": "terranoha-bench",
        "system_database_url": url,
        "sys_db_pool_size": pool_size,
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()
    code = 1
    try:
        if args.mode == "queue":
            DBOS.register_queue(
                QUEUE, worker_concurrency=args.concurrency, polling_interval_sec=args.poll
            )

            def run(ids: list[str]) -> list[Any]:
                return run_queue(ids, args.enqueuers)
        else:

            def run(ids: list[str]) -> list[Any]:
                return run_direct(ids, args.concurrency)

        log(
            f"dbos {version}, python {platform.python_version()}, {os.cpu_count()} cores, "
            f"postgres {server['server_version']} (synchronous_commit="
            f"{server['synchronous_commit']}, fsync={server['fsync']})"
        )
        log(f"mode {args.mode}, concurrency {args.concurrency}, database {DATABASE}")
        warm = measure(run, ids_for("warmup", args.warmup))
        if warm["completed"] != args.warmup:
            log(f"warm-up: only {warm['completed']}/{args.warmup} runs correct")
        figures = measure(run, ids_for("run", args.runs))
        code = 0 if figures["completed"] == args.runs else 1
    finally:
        DBOS.destroy()
        timer.cancel()

    seconds = figures["seconds"]
    steps = figures["completed"] * len(STEPS)
    report = {
        "engine": "dbos",
        "version": version,
        "runs": args.runs,
        "completed": figures["completed"],
        "seconds": round(seconds, 3),
        "runs_per_s": round(figures["completed"] / seconds, 1),
        "steps_per_s": round(steps / seconds, 1),
        "cpu_seconds": round(figures["cpu_seconds"], 3),
        "cpu_s_per_1k_steps": round(figures["cpu_seconds"] / steps * 1000, 4) if steps else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "postgres_cpu_seconds": (
            None
            if figures["postgres_cpu_seconds"] is None
            else round(figures["postgres_cpu_seconds"], 3)
        ),
        "latency_ms": figures["latency_ms"],
        "settings": {
            "concurrency": args.concurrency,
            "mode": args.mode,
            "database": DATABASE,
            "steps_per_run": len(STEPS),
            "warmup": args.warmup,
            "sys_db_pool_size": pool_size,
            **(
                {"queue_polling_interval_s": args.poll, "enqueuers": args.enqueuers}
                if args.mode == "queue"
                else {}
            ),
            "postgres": server,
            "python": platform.python_version(),
            "cores": os.cpu_count(),
        },
    }
    if args.mode == "queue":
        report["exec_latency_ms"] = figures["exec_latency_ms"]
    log(
        f"completed {report['completed']}/{args.runs} runs in {seconds:.2f} s: "
        f"{report['runs_per_s']:,.0f} runs/s, {report['steps_per_s']:,.0f} steps/s"
    )
    if report["latency_ms"]:
        lat = report["latency_ms"]
        log(
            f"start -> completion p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms, "
            f"p99 {lat['p99']:.0f} ms"
        )
    if report.get("exec_latency_ms"):
        lat = report["exec_latency_ms"]
        log(
            f"dequeue -> completion p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms, "
            f"p99 {lat['p99']:.0f} ms"
        )
    pg = report["postgres_cpu_seconds"]
    log(
        f"cpu {report['cpu_seconds']:.2f} s ({report['cpu_s_per_1k_steps']} s per 1k steps), "
        f"peak rss {report['peak_rss_mb']:.0f} MB; postgres backends cpu "
        + ("n/a" if pg is None else f"{pg:.2f} s")
    )
    print(json.dumps(report), flush=True)
    return code


if __name__ == "__main__":
    exit_when_threads_gone(main())
