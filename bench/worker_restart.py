"""Worker restart gap: how long tasks stall when a worker process is SIGKILLed and restarted.

One scenario on topics of its own (random prefix, deleted at the end): the orchestrator
in one ``serve`` process (``--no-router``, no tools), the no-op tool of
``bench/noop_tools.py`` in a worker-only ``serve`` (``--no-engine --no-router
--workers bench.noop_tools``) of its own. Triggers of ``one`` (a single task step) are
published open-loop at a steady rate (50 runs/s by default) for the whole measurement,
whatever the engine's or the worker's progress.

1. warm-up: the worker, without ``--instance-id`` (a dynamic member of the workers'
   consumer group, ``serve``'s default), completes tasks for ``--warm`` seconds.
2. dynamic: it is SIGKILLed and a fresh worker, again without an id, started at once.
   The group hands the task partitions over only when it gives up on the dead member
   (its session timeout, 10 s).
3. switch: that worker is stopped cleanly (it leaves the group) and one with
   ``--instance-id`` (static membership: ``serve`` gives the worker ``<id>-worker``)
   started; it completes tasks for ``--warm`` seconds, and at least a task timeout, so
   that what the switch delayed has settled.
4. static: it is SIGKILLed and a fresh worker started at once under the same id: the
   group should give it the dead member's partitions back at once.

For each kill, the gap runs from the SIGKILL to the record timestamp of the first task
result (a ``CompleteTask`` on the run inputs topic) written after it, which only the
restarted worker can write. In the window from the kill to a task timeout (and a little)
after that first result, the run events topic gives the tasks that timed out
(``TaskFailed`` with ``TASK_TIMEOUT``), the retries scheduled and the runs that failed.
All times are wall-clock milliseconds of this machine (record timestamps are the
producers' ``CreateTime``).

The replacement's interpreter is started, and has imported ``serve``, before the kill;
``serve`` itself (topics, spec follower, ledger, consumer group) starts right after it.
So the gap is the restart of ``serve``, not of Python, whose start and imports take
seconds on a loaded machine and would hide the session timeout in both gaps. With
``--cold`` the interpreter is started after the kill instead.

    python bench/worker_restart.py [--rate 50] [--partitions 4] [--task-timeout 5]
                                   [--warm 5] [--cold] [--keep-topics]

Prints a table, writes bench/results/worker_restart.json; ``run(...)`` does the same and
returns the figures (for ``python -m bench all``: ``worker_restart_gap_ms`` is the static
gap, ``worker_restart_gap_ms_dynamic`` the dynamic one). The processes' logs go to
.local/bench-worker-restart/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from aiokafka import AIOKafkaProducer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import TopicReader, infra_settings, sigkill, terminate  # noqa: E402
from engine.codec import decode, encode  # noqa: E402
from engine.core.commands import CompleteTask, FailTask  # noqa: E402
from engine.core.events import RetryScheduled, RunFailed, TaskDispatched, TaskFailed  # noqa: E402
from engine.core.policies import run_id_for  # noqa: E402
from engine.core.records import Trigger  # noqa: E402
from engine.core.spec import WorkflowSpec, load_spec  # noqa: E402
from engine.kafka.specs import publish_spec  # noqa: E402
from engine.kafka.topics import Topics, delete_topics, ensure_topics  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LOGS = ROOT / ".local" / "bench-worker-restart"
"""The serve processes' stderr (git ignores .local)."""
SESSION_TIMEOUT_MS = 10_000
"""aiokafka's default ``session_timeout_ms``, which the workers' consumer keeps: how long
the group waits for a dead dynamic member."""
FIRST_RESULT_WAIT_S = 90.0
"""A restarted worker that writes no result for this long is reported as such."""
SETTLE_S = 3.0
"""After the first result, the window waits one task timeout and this much more: a task
that was due before the restarted worker took over has timed out by then."""


def spec(task_timeout_s: float) -> WorkflowSpec:
    return load_spec(
        {
            "workflow": "one",
            "version": 1,
            "steps": [
                {"id": "work", "task": "bench.step", "timeout": f"{round(task_timeout_s * 1000)}ms"}
            ],
        }
    )


def say(message: str) -> None:
    """Progress, on stderr: stdout is for the table."""
    print(f"[worker_restart {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- processes


# ``serve`` behind a gate: the interpreter starts and imports what serve needs, says
# "loaded", and runs serve when a line arrives on stdin. A replacement worker is loaded
# before the kill (unless --cold), so the gap measures the consumer group, not an
# interpreter start on a busy machine.
_SERVE = """
import sys
import engine.cli._commands, engine.kafka.serve  # not the tools: serve would run them
from engine.cli import main
print("loaded", flush=True)
sys.stdin.readline()
sys.exit(main(sys.argv[1:]))
"""


class ServeProcess:
    """One ``serve`` process behind the gate of ``_SERVE``; its stderr (INFO log lines)
    goes to ``log``."""

    def __init__(
        self, bootstrap: str, postgres: str, topics: Topics, flags: list[str], log: Path
    ) -> None:
        self.log = log
        self.flags = flags
        with log.open("wb") as err:
            self.spawned_at = time.time()
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _SERVE,
                    "serve",
                    "--kafka",
                    bootstrap,
                    "--topic-prefix",
                    topics.prefix,
                    "--app",
                    topics.prefix,
                    "--partitions",
                    str(topics.partitions),
                    "--postgres",
                    postgres,
                    "--log-level",
                    "info",
                    *flags,
                ],
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        self.pid = self.proc.pid
        self.loaded_at = self.started_at = 0.0
        self.said = ""
        """The last line awaited on stdout: "serving kafka ... (engine); tools: none"."""

    async def _line(self, expected: bytes, timeout_s: float) -> float:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout_s)
        if not line.startswith(expected):
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"serve {' '.join(self.flags)} did not start: {line!r}\n{tail}")
        self.said = line.decode(errors="replace").strip()
        return time.time()

    async def loaded(self, timeout_s: float = 120.0) -> float:
        """Wait until the interpreter has imported serve; return when (wall clock, s)."""
        self.loaded_at = await self._line(b"loaded", timeout_s)
        return self.loaded_at

    def go(self) -> float:
        """Open the gate: serve starts now (wall clock, s)."""
        assert self.proc.stdin is not None
        self.started_at = time.time()
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()
        return self.started_at

    async def serving(self, timeout_s: float = 120.0) -> float:
        """Wait for the "serving" line; return when it came (wall clock, s)."""
        at = await self._line(b"serving", timeout_s)
        assert self.proc.stdout is not None
        _drain(self.proc.stdout)
        return at

    def kill(self) -> float:
        """SIGKILL; return when it was sent (wall clock, s)."""
        return sigkill(self.proc)

    def stop(self) -> None:
        terminate(self.proc)


def _drain(stream: IO[bytes]) -> None:
    """Read ``stream`` to its end in a thread, so that the process never blocks on it."""

    def pump() -> None:
        for _ in stream:
            pass

    threading.Thread(target=pump, daemon=True).start()


# ---------------------------------------------------------------------- the log


class Watcher(TopicReader):
    """Reads the run inputs and run events topics from their beginning (the topics are
    this benchmark's own) and keeps the record timestamps the figures need, in order."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        super().__init__(bootstrap)
        self.topics = topics
        self.results: list[int] = []
        """CompleteTask and FailTask on the run inputs topic: what workers wrote."""
        self.dispatched: list[int] = []
        self.timed_out: list[int] = []
        self.retries: list[int] = []
        self.runs_failed: list[int] = []

    def partitions(self) -> list[TopicPartition]:
        return [
            TopicPartition(topic, p)
            for topic in (self.topics.inputs, self.topics.events)
            for p in range(self.topics.partitions)
        ]

    async def _read(self) -> None:
        wanted = (b"TaskDispatched", b"TaskFailed", b"RetryScheduled", b"RunFailed")
        while True:
            fetched = await self.consumer.getmany(timeout_ms=50, max_records=5000)
            for tp, messages in fetched.items():
                on_inputs = tp.topic == self.topics.inputs
                for message in messages:
                    # The workers' results carry no type header; events do.
                    if on_inputs or dict(message.headers or ()).get("type") in wanted:
                        self._take(decode(message.value), message.timestamp)

    def _take(self, record: Any, ts: int) -> None:
        if isinstance(record, CompleteTask | FailTask):
            _insert(self.results, ts)
        elif isinstance(record, TaskDispatched):
            _insert(self.dispatched, ts)
        elif isinstance(record, TaskFailed):
            if record.code == "TASK_TIMEOUT":
                _insert(self.timed_out, ts)
        elif isinstance(record, RetryScheduled):
            _insert(self.retries, ts)
        elif isinstance(record, RunFailed):
            _insert(self.runs_failed, ts)

    def first_result_after(self, ms: float) -> int | None:
        at = bisect_right(self.results, ms)
        return self.results[at] if at < len(self.results) else None

    async def result_after(self, ms: float, timeout_s: float) -> int | None:
        """The record timestamp of the first result written after ``ms``; None if none
        comes within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (first := self.first_result_after(ms)) is None:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.05)
        return first


def _insert(into: list[int], ts: int) -> None:
    """Keep ``into`` sorted: partitions are read interleaved."""
    if not into or ts >= into[-1]:
        into.append(ts)
    else:
        into.insert(bisect_right(into, ts), ts)


def _between(values: list[int], start_ms: float, end_ms: float) -> int:
    return bisect_left(values, end_ms) - bisect_left(values, start_ms)


class Driver:
    """Open-loop arrivals: one trigger every 1/rate s, whatever the engine's progress."""

    def __init__(self, bootstrap: str, topics: Topics, rate: float) -> None:
        self.topics = topics
        self.rate = rate
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        self.sent = 0
        self.late_s = 0.0
        """The most the publisher fell behind its schedule."""
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.producer.start()
        self._task = asyncio.get_running_loop().create_task(self._publish())

    async def _publish(self) -> None:
        due = time.monotonic()
        while True:
            due += 1 / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.late_s = max(self.late_s, -delay)
            key = f"one-{self.sent}"
            run_id = run_id_for("default", key)
            # Keyed by run id, as the client does: each lands on its run's partition.
            await self.producer.send(
                self.topics.triggers,
                encode(Trigger(workflow="one", idempotency_key=key)),
                key=run_id.encode(),
            )
            self.sent += 1

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.producer.stop()


# ---------------------------------------------------------------------- the scenario


@dataclass
class Restart:
    """One SIGKILL of a worker and the restart beside it, and what the log showed."""

    label: str
    instance_id: str | None
    killed_at: float = 0.0
    replacement: ServeProcess | None = None
    serving_at: float = 0.0
    first_result_ts: int | None = None
    window_end_ms: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        assert self.replacement is not None
        kill_ms = self.killed_at * 1000
        first = self.first_result_ts
        fresh = self.replacement
        return {
            "instance_id": self.instance_id,
            "gap_ms": None if first is None else round(first - kill_ms),
            "kill_to_serving_ms": round(self.serving_at * 1000 - kill_ms),
            "serving_to_first_result_ms": (
                None if first is None else round(first - self.serving_at * 1000)
            ),
            "replacement_load_ms": round((fresh.loaded_at - fresh.spawned_at) * 1000),
            "replacement_loaded_before_kill": fresh.loaded_at < self.killed_at,
            "window_ms": round(self.window_end_ms - kill_ms),
            **self.counts,
        }


class Scenario:
    def __init__(
        self,
        bootstrap: str,
        postgres: str,
        topics: Topics,
        warm_s: float,
        task_timeout_s: float,
        cold: bool,
    ) -> None:
        self.bootstrap, self.postgres, self.topics = bootstrap, postgres, topics
        self.warm_s, self.task_timeout_s, self.cold = warm_s, task_timeout_s, cold
        self.watcher = Watcher(bootstrap, topics)
        self.processes: list[ServeProcess] = []

    def spawn_worker(self, instance_id: str | None) -> ServeProcess:
        flags = [
            "--no-engine",
            "--no-router",
            "--workers",
            "bench.noop_tools",
            "--concurrency",
            "16",
        ]
        if instance_id:
            flags += ["--instance-id", instance_id]
        number = sum(1 for p in self.processes if "--no-engine" in p.flags) + 1
        self.processes.append(
            ServeProcess(
                self.bootstrap, self.postgres, self.topics, flags, LOGS / f"worker-{number}.log"
            )
        )
        return self.processes[-1]

    async def working(self, worker: ServeProcess, what: str) -> None:
        """Start ``worker``; wait until it has written results for ``warm_s`` (and at
        least a task timeout and ``SETTLE_S``, so that what its start delayed has
        settled)."""
        await worker.loaded()
        worker.go()
        await worker.serving()
        first = await self.watcher.result_after(worker.started_at * 1000, FIRST_RESULT_WAIT_S)
        if first is None:
            raise TimeoutError(
                f"{what}: no task result {FIRST_RESULT_WAIT_S:.0f}s after "
                f"the worker started (see {LOGS})"
            )
        steady_s = max(self.warm_s, self.task_timeout_s + SETTLE_S)
        await asyncio.sleep(max(0.0, first / 1000 + steady_s - time.time()))

    async def restart(
        self, worker: ServeProcess, label: str, instance_id: str | None
    ) -> tuple[Restart, ServeProcess]:
        """SIGKILL ``worker``, start its replacement at once, wait out the window."""
        restart = Restart(label, instance_id)
        if self.cold:
            restart.killed_at = worker.kill()
            fresh = self.spawn_worker(instance_id)
            await fresh.loaded()
        else:
            fresh = self.spawn_worker(instance_id)
            await fresh.loaded()
            restart.killed_at = worker.kill()
        fresh.go()
        restart.replacement = fresh
        restart.serving_at = await fresh.serving()
        kill_ms = restart.killed_at * 1000
        restart.first_result_ts = await self.watcher.result_after(kill_ms, FIRST_RESULT_WAIT_S)
        if restart.first_result_ts is None:
            say(f"{label}: no task result {FIRST_RESULT_WAIT_S:.0f}s after the kill")
            end_ms = time.time() * 1000
        else:
            say(
                f"{label} membership: first result "
                f"{restart.first_result_ts - kill_ms:,.0f} ms after the kill"
            )
            end_ms = restart.first_result_ts + (self.task_timeout_s + SETTLE_S) * 1000
            await asyncio.sleep(max(0.0, end_ms / 1000 - time.time()))
        await asyncio.sleep(1.0)  # the watcher reads the window's last records
        restart.window_end_ms = end_ms
        w = self.watcher
        gap_end = restart.first_result_ts or end_ms
        restart.counts = {
            "tasks_timed_out": _between(w.timed_out, kill_ms, end_ms),
            "retries_scheduled": _between(w.retries, kill_ms, end_ms),
            "runs_failed": _between(w.runs_failed, kill_ms, end_ms),
            "tasks_dispatched_in_gap": _between(w.dispatched, kill_ms, gap_end),
        }
        return restart, fresh

    async def measure(self) -> dict[str, Restart]:
        engine = ServeProcess(
            self.bootstrap, self.postgres, self.topics, ["--no-router"], LOGS / "engine.log"
        )
        self.processes.append(engine)
        await engine.loaded()
        engine.go()
        await engine.serving()
        if "worker" in engine.said:  # a worker in its process would join the group measured
            raise RuntimeError(f"the engine process runs a worker: {engine.said}")
        worker = self.spawn_worker(None)
        say("warm-up: a worker without an instance id")
        await self.working(worker, "warm-up")
        dynamic, worker = await self.restart(worker, "dynamic", None)

        instance_id = f"{self.topics.prefix}-w"
        say(f"switch: a worker with --instance-id {instance_id}")
        await asyncio.to_thread(worker.stop)  # a clean stop: it leaves the group
        worker = self.spawn_worker(instance_id)
        await self.working(worker, "switch")
        static, worker = await self.restart(worker, "static", instance_id)
        return {"dynamic": dynamic, "static": static}


async def _scenario(
    bootstrap: str,
    postgres: str,
    rate: float,
    partitions: int,
    task_timeout_s: float,
    warm_s: float,
    cold: bool,
    keep_topics: bool,
) -> dict[str, Any]:
    topics = Topics(prefix=f"wr{uuid.uuid4().hex[:8]}", partitions=partitions)
    await ensure_topics(bootstrap, topics.core_topics())
    await publish_spec(bootstrap, topics, spec(task_timeout_s))
    LOGS.mkdir(parents=True, exist_ok=True)
    scenario = Scenario(bootstrap, postgres, topics, warm_s, task_timeout_s, cold)
    driver = Driver(bootstrap, topics, rate)
    began = time.time()
    try:
        await scenario.watcher.start()
        await driver.start()
        restarts = await scenario.measure()
    finally:
        await driver.stop()
        for process in reversed(scenario.processes):
            process.stop()
        await scenario.watcher.stop()
        if not keep_topics:
            await _cleanup(bootstrap, postgres, topics)
    dynamic, static = restarts["dynamic"].figures(), restarts["static"].figures()
    w = scenario.watcher
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "partitions": partitions,
        "rate_runs_per_s": rate,
        "task_timeout_ms": round(task_timeout_s * 1000),
        "session_timeout_ms": SESSION_TIMEOUT_MS,
        "replacement": "cold" if cold else "preloaded",
        "worker_restart_gap_ms": static["gap_ms"],
        "worker_restart_gap_ms_dynamic": dynamic["gap_ms"],
        "static": static,
        "dynamic": dynamic,
        "runs_sent": driver.sent,
        "publisher_late_max_ms": round(driver.late_s * 1000),
        "results_seen": len(w.results),
        "seconds": round(time.time() - began, 1),
    }


async def _cleanup(bootstrap: str, postgres: str, topics: Topics) -> None:
    """Delete the topics and the workers' ledger entries (keyed ``<deployment>/...``)."""
    try:
        await delete_topics(bootstrap, topics.prefix)
    except Exception as exc:  # cleanup only: the figures are taken
        say(f"could not delete topics {topics.prefix}.*: {exc!r}")
    try:
        import psycopg

        async with await psycopg.AsyncConnection.connect(postgres) as conn:
            await conn.execute(
                "DELETE FROM terranoha_worker_ledger WHERE idempotency_key LIKE %s",
                (f"{topics.deployment(topics.prefix)}/%",),
            )
    except Exception as exc:
        say(f"could not delete the ledger entries of {topics.prefix}: {exc!r}")


# ---------------------------------------------------------------------- output


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def table(r: dict[str, Any]) -> str:
    dyn, sta = r["dynamic"], r["static"]

    def both(key: str, show: Any = _ms) -> str:
        return f"{show(dyn[key]):>12}  {show(sta[key]):>12}"

    count = "{:,}".format
    load = "after the kill" if r["replacement"] == "cold" else "before the kill"
    rows = [
        (
            "open-loop arrivals (one-task runs)",
            f"{r['rate_runs_per_s']:,.0f} runs/s ({r['runs_sent']:,} sent; publisher at most "
            f"{r['publisher_late_max_ms']:,} ms behind)",
        ),
        (
            "partitions / task timeout / session timeout",
            f"{r['partitions']} / {r['task_timeout_ms']:,} ms / {r['session_timeout_ms']:,} ms",
        ),
        (
            "worker group membership",
            f"{'dynamic':>12}  {'static':>12}  (static: serve --instance-id)",
        ),
        ("  SIGKILL -> first task result (record ts)", both("gap_ms")),
        ("  SIGKILL -> new worker serving", both("kill_to_serving_ms")),
        ("  serving -> first task result (group join)", both("serving_to_first_result_ms")),
        (f"  interpreter start + imports ({load})", both("replacement_load_ms")),
        ("  tasks dispatched in the gap", both("tasks_dispatched_in_gap", count)),
        ("  tasks timed out in the window", both("tasks_timed_out", count)),
        ("  retries scheduled in the window", both("retries_scheduled", count)),
        ("  runs failed in the window", both("runs_failed", count)),
        ("  window (SIGKILL -> first result + timeout)", both("window_ms")),
    ]
    width = max(len(name) for name, _ in rows)
    head = f"python {r['python']}, {r['cores']} cores, {r['date']}, {r['seconds']:.0f} s"
    return "\n".join([head, *(f"{name:<{width}}  {value}" for name, value in rows)])


def run(
    rate: float = 50.0,
    partitions: int = 4,
    task_timeout_s: float = 5.0,
    warm_s: float = 5.0,
    cold: bool = False,
    keep_topics: bool = False,
) -> dict[str, Any]:
    """Run the scenario; print the table; write and return the figures."""
    bootstrap, postgres = infra_settings()
    RESULTS.mkdir(exist_ok=True)
    result = asyncio.run(
        _scenario(bootstrap, postgres, rate, partitions, task_timeout_s, warm_s, cold, keep_topics)
    )
    print(table(result), flush=True)
    (RESULTS / "worker_restart.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0, help="runs started per second")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--task-timeout", type=float, default=5.0, help="the task step's timeout, seconds"
    )
    parser.add_argument(
        "--warm", type=float, default=5.0, help="seconds of results before each kill"
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="start the replacement's interpreter after the kill (the gap "
        "then includes the interpreter start and imports)",
    )
    parser.add_argument(
        "--keep-topics",
        action="store_true",
        help="leave the benchmark's topics on the broker (to inspect them)",
    )
    args = parser.parse_args(argv)
    run(args.rate, args.partitions, args.task_timeout, args.warm, args.cold, args.keep_topics)


if __name__ == "__main__":
    main()
