"""``python -m bench all``: every benchmark of the engine, its ceiling and its peers, in
one run, so the ratios compare figures taken on the same machine at the same time.

1. ceiling: a bare aiokafka transactional consume -> produce loop with the engine's
   batching and per-step fan-out (``bench/kafka_throughput.py``);
2. Terranoha on Kafka: N runs of a 5-step workflow, workers in another process; the
   burst rate, then open-loop arrivals at 25/50/75/90% of it with latency percentiles;
3. Terranoha embedded: the same workflow on SQLite (``bench/embedded.py``);
4. DBOS Transact on the same PostgreSQL (``bench/peers/dbos_bench.py``);
5. Restate, server from npm, Python SDK (``bench/peers/restate_bench.py``);
6. recovery with 100k runs' state in the changelog, timer lateness with 100k timers and
   the engine's memory with 100k active runs (``bench/recovery.py``);
7. worker restart: a worker process SIGKILLed and restarted at once under a steady
   50 runs/s, without and with ``--instance-id``: SIGKILL -> first task result
   (``worker_restart_gap_ms``, static membership; ``worker_restart_gap_ms_dynamic``)
   and the tasks that timed out meanwhile (``bench/worker_restart.py``);
8. efficiency: CPU seconds and peak RSS per 1k steps, for each engine;
9. memory with history: the run task's RSS after ``--state-small`` and after
   ``--state-large`` finished runs with 1k active, with its local store
   (``bench/state_memory.py``; ``rss_mb_<N>_finished``);
10. restart with history: ``--state-large`` finished runs in the state changelog, the
   engine's start -> first command from an empty disk, SIGKILL -> first command with its
   local state present, and ``status`` of a finished run without an index
   (``bench/state_restart.py``).
11. the HTTP API on Kafka: sustained ``POST /v1/runs`` requests/s and p50/p99, closed
   and open loop (``bench/api.py``).
12. flow control: fairness of the admission processor across tenants, grant latency with
   10,000 tenant keys active and the limiter's RSS (``bench/flow.py``).

It starts the local broker and PostgreSQL with ``deploy/local/infra.sh up`` and installs
the peers into ``.local/bench-peers/`` (never into the project's environment). Prints a
table and writes the figures, the machine, the versions and the settings to
``bench/results/latest.json``.

    python -m bench all [--runs 2000] [--recovery-runs 100000]
                        [--skip restate,recovery,worker_restart]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import kafka_throughput
from bench._common import ROOT, infra_settings

PARTS = (
    "ceiling",
    "kafka",
    "embedded",
    "dbos",
    "restate",
    "recovery",
    "worker_restart",
    "state_memory",
    "state_restart",
    "api",
    "flow",
)


def _machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        ),
        0,
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024**2, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def _versions(postgres: str) -> dict[str, str]:
    out = {
        name: importlib.metadata.version(name)
        for name in ("aiokafka", "fastavro", "psycopg", "pydantic")
    }
    version_file = ROOT / ".local" / "kafka" / "lib" / ".version"
    out["kafka"] = version_file.read_text().strip() if version_file.exists() else "?"
    try:
        import psycopg

        with psycopg.connect(postgres) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            out["postgresql"] = str(row[0]) if row else "?"
    except Exception as exc:  # a version is informative, not essential
        out["postgresql"] = f"? ({exc})"
    return out


def _json_child(args: list[str], timeout_s: float) -> dict[str, Any]:
    """Run a benchmark in a process of its own; its last stdout line is its JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env=env
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(args[:2])} exited {proc.returncode}:\n{tail}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _guarded(name: str, results: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
    print(f"== {name} ...", flush=True)
    started = time.monotonic()
    try:
        results[name] = fn()
    except Exception as exc:  # one failed part must not lose the others
        traceback.print_exc()
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    print(f"== {name}: {time.monotonic() - started:.0f}s", flush=True)


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    subprocess.run(["bash", str(ROOT / "deploy" / "local" / "infra.sh"), "up"], check=True)
    bootstrap, postgres = infra_settings()
    skip = {s for s in args.skip.split(",") if s}
    results: dict[str, Any] = {}
    steps = args.runs * kafka_throughput.STEPS
    if "ceiling" not in skip:
        _guarded(
            "ceiling",
            results,
            lambda: kafka_throughput.bench_ceiling(bootstrap, args.partitions, steps),
        )
    if "kafka" not in skip:
        _guarded(
            "kafka",
            results,
            lambda: kafka_throughput.bench_engine(bootstrap, postgres, args.partitions, args.runs),
        )
    if "embedded" not in skip:
        _guarded(
            "embedded",
            results,
            lambda: _json_child(
                [sys.executable, "bench/embedded.py", "--runs", str(args.runs)], 900
            ),
        )
    if {"dbos", "restate"} - skip:
        from bench.peers.venv import peer_python, restate_server

        if "dbos" not in skip:
            _guarded(
                "dbos",
                results,
                lambda: _json_child(
                    [
                        str(peer_python()),
                        "bench/peers/dbos_bench.py",
                        "--postgres",
                        postgres,
                        "--runs",
                        str(args.runs),
                    ],
                    1200,
                ),
            )
        if "restate" not in skip:
            _guarded(
                "restate",
                results,
                lambda: _json_child(
                    [
                        str(peer_python()),
                        "bench/peers/restate_bench.py",
                        "--server",
                        str(restate_server()),
                        "--runs",
                        str(args.runs),
                    ],
                    1200,
                ),
            )
    if "recovery" not in skip:
        from bench import recovery

        _guarded("recovery", results, lambda: recovery.run(args.recovery_runs, args.partitions))
    if "worker_restart" not in skip:
        from bench import worker_restart

        _guarded("worker_restart", results, lambda: worker_restart.run(partitions=args.partitions))
    if "flow" not in skip:
        _guarded("flow", results, lambda: _json_child([sys.executable, "bench/flow.py"], 900))
    if "state_memory" not in skip:
        _guarded(
            "state_memory",
            results,
            lambda: _json_child(
                [
                    sys.executable,
                    "-m",
                    "bench.state_memory",
                    "--small",
                    str(args.state_small),
                    "--large",
                    str(args.state_large),
                ],
                3600,
            ),
        )
    if "state_restart" not in skip:
        _guarded(
            "state_restart",
            results,
            lambda: _json_child(
                [
                    sys.executable,
                    "-m",
                    "bench.state_restart",
                    "--history",
                    str(args.state_large),
                    "--partitions",
                    str(args.partitions),
                ],
                3600,
            ),
        )
    if "api" not in skip:
        from bench import api

        _guarded("api", results, lambda: api.run())
    memory = results.get("state_memory", {})
    restarted = {
        key: value
        for key, value in results.get("state_restart", {}).items()
        if key.endswith("_ms") or "_ms_" in key
    }
    kafka = results.get("kafka", {}).get("burst", {})
    ratios = {
        "engine_over_ceiling": _ratio(
            kafka.get("steps_per_s"), results.get("ceiling", {}).get("steps_per_s")
        ),
        "terranoha_over_dbos": _ratio(
            kafka.get("runs_per_s"), results.get("dbos", {}).get("runs_per_s")
        ),
        "terranoha_over_restate": _ratio(
            kafka.get("runs_per_s"), results.get("restate", {}).get("runs_per_s")
        ),
        "embedded_over_dbos": _ratio(
            results.get("embedded", {}).get("runs_per_s"), results.get("dbos", {}).get("runs_per_s")
        ),
    }
    ratios["engine_over_ceiling_bound"] = _bound(results)
    flow = results.get("flow", {})
    ratios |= {
        key: flow.get(key)
        for key in ("flow_overhead_ratio", "fair_jain_index", "grant_latency_p99_ms")
    }
    restart = results.get("worker_restart", {})
    gaps = {
        key: restart.get(key) for key in ("worker_restart_gap_ms", "worker_restart_gap_ms_dynamic")
    }
    history = {
        f"rss_mb_{_k(memory.get(f'finished_{size}'))}_finished": memory.get(f"rss_mb_{size}")
        for size in ("small", "large")
        if memory
    }
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": _machine(),
        "versions": _versions(postgres),
        "settings": {
            "runs": args.runs,
            "steps_per_run": kafka_throughput.STEPS,
            "partitions": args.partitions,
            "recovery_runs": args.recovery_runs,
            "open_loop_loads": list(kafka_throughput.LOADS),
            "kafka": bootstrap,
            "skipped": sorted(skip),
        },
        **ratios,
        **gaps,
        **history,
        **restarted,
        "results": results,
    }


def _k(count: Any) -> str:
    """100000 -> "100k", 2000000 -> "2m": the figure names the bench reports."""
    n = int(count or 0)
    return f"{n // 1_000_000}m" if n % 1_000_000 == 0 and n else f"{n // 1000}k"


def _bound(results: dict[str, Any]) -> dict[str, Any] | None:
    """The most engine/ceiling could be on this machine for this workload, from CPU
    seconds per step measured in this run. Every step costs the cores at least:

    * the engine at its floor: the ceiling loop's own CPU (consume, produce, commit the
      step's records) plus the Avro work on them (``codec_floor``), with decide and
      evolve costing nothing;
    * the broker, as much as under the ceiling's loop (it stores the same records);
    * the worker: as measured in the burst, or (``with_a_bare_worker``) as cheap as
      one more bare consume -> produce hop;
    * PostgreSQL: the workers' idempotency ledger, as measured in the burst.
    """
    ceiling = results.get("ceiling", {})
    eff = results.get("kafka", {}).get("burst", {}).get("efficiency", {})
    floor = ceiling.get("codec_floor", {}).get("us_per_step")
    needed = (
        ceiling.get("steps_per_s"),
        ceiling.get("cpu_s_per_1k_steps"),
        ceiling.get("broker_cpu_s_per_1k_steps"),
        floor,
        eff.get("worker_cpu_s_per_1k_steps"),
        eff.get("postgresql_cpu_s_per_1k_steps"),
    )
    if not all(isinstance(v, int | float) and v == v for v in needed):  # v == v: not NaN
        return None
    cores = os.cpu_count() or 1
    hop_us = (ceiling["cpu_s_per_1k_steps"] + ceiling["broker_cpu_s_per_1k_steps"]) * 1000
    costs = {  # CPU microseconds per step
        "engine_floor": ceiling["cpu_s_per_1k_steps"] * 1000 + floor,
        "broker": ceiling["broker_cpu_s_per_1k_steps"] * 1000,
        "worker": eff["worker_cpu_s_per_1k_steps"] * 1000,
        "postgresql": eff["postgresql_cpu_s_per_1k_steps"] * 1000,
    }
    bare = {**costs, "worker": hop_us}

    def limit(per_step: dict[str, float]) -> dict[str, float]:
        steps_per_s = cores * 1e6 / sum(per_step.values())
        return {
            "steps_per_s": steps_per_s,
            "engine_over_ceiling": steps_per_s / ceiling["steps_per_s"],
        }

    return {
        "cores": cores,
        "us_per_step": costs,
        "bare_worker_us_per_step": hop_us,
        "with_this_worker": limit(costs),
        "with_a_bare_worker": limit(bare),
    }


def _fmt(value: Any, spec: str = ",.0f") -> str:
    return format(value, spec) if isinstance(value, int | float) else "-"


def render(report: dict[str, Any]) -> str:
    """The table ``python -m bench all`` prints."""
    r = report["results"]
    lines = [
        f"{report['date']}: {report['machine']['cpu']}, {report['machine']['cores']} "
        f"cores, Python {report['machine']['python']}, Kafka {report['versions']['kafka']}"
        f", PostgreSQL {report['versions']['postgresql']}",
        "",
    ]
    lines.append(
        f"{'workload':<34}{'runs/s':>9}{'steps/s':>10}{'CPU s/1k steps':>16}{'peak RSS MB':>13}"
    )

    def row(label: str, res: dict[str, Any] | None, cpu: Any = None, rss: Any = None) -> None:
        if not res:
            return
        if "error" in res:
            lines.append(f"{label:<34}failed: {res['error'][:80]}")
            return
        lines.append(
            f"{label:<34}{_fmt(res.get('runs_per_s')):>9}"
            f"{_fmt(res.get('steps_per_s')):>10}"
            f"{_fmt(cpu if cpu is not None else res.get('cpu_s_per_1k_steps'), '.2f'):>16}"
            f"{_fmt(rss if rss is not None else res.get('peak_rss_mb')):>13}"
        )

    row("ceiling (bare txn loop)", r.get("ceiling"))
    burst = r.get("kafka", {}).get("burst")
    if burst:
        eff = burst.get("efficiency", {})
        row(
            "Terranoha on Kafka (burst)",
            burst,
            eff.get("engine_cpu_s_per_1k_steps"),
            eff.get("engine_peak_rss_mb"),
        )
        if eff.get("topology"):
            lines.append(f"  ({eff['topology']})")
    elif "kafka" in r:
        row("Terranoha on Kafka", r["kafka"])
    row("Terranoha embedded (SQLite)", r.get("embedded"))
    row("DBOS Transact", r.get("dbos"))
    row("Restate", r.get("restate"))
    lines.append("")
    for key in (
        "engine_over_ceiling",
        "terranoha_over_dbos",
        "terranoha_over_restate",
        "embedded_over_dbos",
    ):
        lines.append(f"{key:<26}{_fmt(report.get(key), '.2f')}")
    bound = report.get("engine_over_ceiling_bound")
    if bound:
        us = bound["us_per_step"]
        mine, bare = bound["with_this_worker"], bound["with_a_bare_worker"]
        lines += [
            "",
            "bound (CPU us per step, the engine at its floor of Kafka I/O and Avro with free "
            "decide/evolve):",
            "  " + ", ".join(f"{name} {cost:.0f}" for name, cost in us.items()),
            f"  on {bound['cores']} cores: at most {_fmt(mine['steps_per_s'])} steps/s, "
            f"engine/ceiling <= {mine['engine_over_ceiling']:.2f}; with a worker as cheap "
            f"as a bare hop ({bound['bare_worker_us_per_step']:.0f} us): "
            f"{_fmt(bare['steps_per_s'])} steps/s, <= {bare['engine_over_ceiling']:.2f}",
        ]
    open_loop = r.get("kafka", {}).get("open_loop", {})
    if open_loop:
        lines.append("")
        lines.append("Terranoha on Kafka, open-loop arrivals (latency p50/p95/p99 ms):")
        for label, res in open_loop.items():
            lines.append(kafka_throughput.latency_line(label, res))
    rec = r.get("recovery")
    if rec:
        lines.append("")
        lines += _recovery_lines(rec)
    restart = r.get("worker_restart")
    if restart:
        lines.append("")
        lines += _worker_restart_lines(restart)
    flow = r.get("flow")
    if flow:
        lines.append("")
        lines += _flow_lines(flow)
    return "\n".join(lines)


def _flow_lines(res: dict[str, Any]) -> list[str]:
    if "error" in res:
        return [f"flow control: failed: {res['error'][:200]}"]
    waits = res.get("light_p99_wait_ms") or {}
    return [
        "flow control (admission processor):",
        f"  fair_jain_index {_fmt(res.get('fair_jain_index'), '.3f')} "
        f"(grants while all waited: {res.get('fair_shares')})",
        f"  light tenants' p99 wait {_fmt(waits.get('alone'))} ms alone, "
        f"{_fmt(waits.get('beside_a_10x_tenant'))} ms beside a 10x tenant "
        f"(x{_fmt(res.get('light_wait_ratio'), '.2f')})",
        f"  grant_latency_p99_ms {_fmt(res.get('grant_latency_p99_ms'))} "
        f"(p50 {_fmt(res.get('grant_latency_p50_ms'))}) with {_fmt(res.get('active_keys'))} "
        f"keys active; burst {_fmt(res.get('burst_grants_per_s'))} grants/s; limiter RSS "
        f"{_fmt(res.get('limiter_rss_mb'))} MB",
        f"  flow_overhead_ratio: {res.get('flow_overhead_note', '-')}",
    ]


def _recovery_lines(rec: dict[str, Any]) -> list[str]:
    if "error" in rec:
        return [f"recovery: failed: {rec['error'][:200]}"]
    runs = rec.get("runs")
    out = [f"recovery, timers and memory with {_fmt(runs)} runs in the changelog:"]
    for key, label in (
        ("recovery_with_instance_id", "with --instance-id"),
        ("recovery", "without an instance id"),
    ):
        got = rec.get(key) or {}
        out.append(
            f"  SIGKILL -> first command {label}: "
            f"{_fmt(got.get('kill_to_first_command_ms'))} ms (restore "
            f"{_fmt(got.get('restore_ms'))} ms)"
        )
    out.append(
        f"  engine RSS with all runs active: {_fmt(rec.get('engine_peak_rss_mb'))} MB peak;"
        f" after a restore {_fmt(rec.get('restored_rss_mb'))} MB"
    )
    timers = rec.get("timers") or {}
    late = timers.get("lateness_ms") or {}
    out.append(
        f"  timers: {_fmt(timers.get('fired'))} of {_fmt(timers.get('armed'))} fired, "
        f"{_fmt(timers.get('duplicates'))} twice, {_fmt(timers.get('early'))} early; "
        f"lateness p50 {_fmt(late.get('p50'))} ms, p99 {_fmt(late.get('p99'))} ms"
    )
    return out


def _worker_restart_lines(res: dict[str, Any]) -> list[str]:
    if "error" in res:
        return [f"worker restart: failed: {res['error'][:200]}"]
    out = [
        f"worker restart, {_fmt(res.get('rate_runs_per_s'))} runs/s of a one-task workflow "
        f"(task timeout {_fmt(res.get('task_timeout_ms'))} ms):"
    ]
    for key, label in (("static", "with --instance-id"), ("dynamic", "without an instance id")):
        got = res.get(key) or {}
        out.append(
            f"  SIGKILL -> first task result {label}: {_fmt(got.get('gap_ms'))} ms; "
            f"{_fmt(got.get('tasks_timed_out'))} tasks timed out, "
            f"{_fmt(got.get('runs_failed'))} runs failed"
        )
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="all", choices=["all"])
    parser.add_argument("--runs", type=int, default=2000, help="runs per throughput workload")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--recovery-runs", type=int, default=100_000)
    parser.add_argument(
        "--state-small",
        type=int,
        default=100_000,
        help="finished runs for the first memory-with-history figure",
    )
    parser.add_argument(
        "--state-large",
        type=int,
        default=2_000_000,
        help="finished runs for the second (about 18 min on 2 shared cores)",
    )
    parser.add_argument("--skip", default="", help=f"comma-separated parts of {PARTS} to skip")
    args = parser.parse_args(argv)
    report = run_all(args)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    print(render(report))
    print(f"\nwritten to {out / 'latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
