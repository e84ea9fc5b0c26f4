"""Recovery time, timer lateness and memory of the Kafka engine with many active runs.

One scenario on topics of its own (random prefix), the orchestrator and the trigger
router in one ``serve`` process, no workers (the figures only need commands):

1. warm-up: one run of ``probe`` (one task step) waits out the group's first assignment;
   then N/20 runs (200 to 2,000) of ``warm`` (one 6-hour sleep, like ``hold``) measure
   how fast the engine arms them. That rate sizes the sleep of ``hold`` so that all N
   runs are armed, and the engine killed and restarted twice, before the first falls due.
2. load: N runs of ``hold``, whose only step sleeps. Each arms one timer, so the state
   changelog holds N active runs and the engine N armed timers. The events topic is
   watched until N ``TimerArmed`` of ``hold`` are in: the start rate (runs/s into
   Waiting). The engine's RSS is read before and after.
3. crash, twice: the engine's peak RSS (``VmHWM`` in /proc/<pid>/status) is read, then
   it is SIGKILLed; a fresh process is started at once and a ``probe`` trigger
   published. The recovery time runs from the SIGKILL (and, separately, from the
   restart) to the record timestamp of the probe's ``TaskDispatched``: its first
   command. The first engine is a dynamic member of its consumer groups (``serve``'s
   default), so its replacement waits until the group gives up on it; the replacement
   runs with ``--instance-id`` (static membership), so the second kill measures a
   restart that takes the partitions back at once. The restarted engines' logs (INFO,
   through a logging set-up in this script, not in the engine) give when the partitions
   were assigned and how long the restore from the changelog took.
4. timers: the N sleeps fall due on the last engine, which re-armed them from the
   changelog. Lateness of a timer = record timestamp of its ``TimerFired`` - ``due_at`` of
   its ``TimerArmed``; each must fire exactly once and never early.

All times are wall-clock milliseconds of this machine (record timestamps are the
producer's ``CreateTime``, set by the engine process).

    python bench/recovery.py [--runs 100000] [--partitions 4] [--keep-topics]
                             [--py-spy] [--tracemalloc]

Prints a table, writes bench/results/recovery.json; ``run(runs, partitions)`` does the
same and returns the figures (for ``python -m bench all``). Diagnostics (not for the
figures: they slow the engine): ``--py-spy`` samples the engine while it starts the runs,
while it restores, and while the timers fire (collapsed stacks in
.local/bench-recovery/pyspy-*.txt); ``--tracemalloc`` traces the engine's allocations
and writes the top lines with all runs active and after the restore
(.local/bench-recovery/tracemalloc-*.txt).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from aiokafka import AIOKafkaProducer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    TopicReader,
    infra_settings,
    memory_mb,
    percentile,
    sigkill,
    terminate,
)
from engine.codec import decode, encode  # noqa: E402
from engine.core.events import CommandRejected, TaskDispatched, TimerArmed, TimerFired  # noqa: E402
from engine.core.policies import run_id_for  # noqa: E402
from engine.core.records import Trigger  # noqa: E402
from engine.core.spec import WorkflowSpec, load_spec  # noqa: E402
from engine.kafka.specs import publish_spec  # noqa: E402
from engine.kafka.topics import Topics, delete_topics, ensure_topics  # noqa: E402

PROBE = load_spec(
    {
        "workflow": "probe",
        "version": 1,
        # No worker runs: the task stays dispatched. Its timeout must not fire meanwhile.
        "steps": [{"id": "work", "task": "bench.step", "timeout": "6h"}],
    }
)
WARM = load_spec(
    {
        "workflow": "warm",
        "version": 1,
        "steps": [{"id": "doze", "sleep": "6h"}],  # armed like hold; never due meanwhile
    }
)
SLEEP_MARGIN = 1.6
"""The sleep is this many times the time the warm-up rate needs to arm N timers..."""
RESTART_ALLOWANCE_S = 60
"""...plus this much for the two kills, restarts and restores."""
STALL_S = 90.0
"""A wait fails when nothing it counts moves for this long (past any due time)."""

RESULTS = ROOT / "bench" / "results"
DIAGNOSTICS = ROOT / ".local" / "bench-recovery"
"""Where the engines' logs, and what --py-spy and --tracemalloc find, are written (git
ignores .local)."""

# The engine's own ``serve``, with its INFO log lines (timestamped by the engine's clock)
# on stderr: that is where the restore time is written. With --tracemalloc, SIGUSR1
# writes the top allocation sites to TRACEMALLOC_OUT.<pid>.
_SERVE = """
import logging, os, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                    format="%(created).3f %(name)s %(levelname)s %(message)s")
logging.getLogger("terranoha").setLevel(logging.INFO)
if os.environ.get("TRACEMALLOC_OUT"):
    import signal, tracemalloc
    tracemalloc.start(1)
    def dump(*_):
        stats = tracemalloc.take_snapshot().statistics("lineno")
        path = f"{os.environ['TRACEMALLOC_OUT']}.{os.getpid()}"
        with open(path + ".tmp", "w") as out:
            out.write(f"traced {sum(s.size for s in stats) / 2**20:.1f} MiB\\n")
            out.writelines(f"{s}\\n" for s in stats[:40])
        os.replace(path + ".tmp", path)
    signal.signal(signal.SIGUSR1, dump)
from engine.cli import main
sys.exit(main(sys.argv[1:]))
"""
_ACQUIRED = re.compile(
    r"^(\d+\.\d+) terranoha\.kafka\.engine INFO partition (\d+) acquired: "
    r"(\d+) runs restored in (\d+) ms, (\d+) timers armed"
)


def hold_spec(sleep_s: int) -> WorkflowSpec:
    return load_spec(
        {"workflow": "hold", "version": 1, "steps": [{"id": "nap", "sleep": f"{sleep_s}s"}]}
    )


def say(message: str) -> None:
    """Progress, on stderr: stdout is for the table."""
    print(f"[recovery {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- the engine


class EngineProcess:
    """One ``serve`` process (orchestrator and trigger router), its log and its memory."""

    def __init__(
        self,
        bootstrap: str,
        postgres: str,
        topics: Topics,
        instance_id: str | None,
        tracemalloc_out: Path | None = None,
    ) -> None:
        self.log: list[str] = []
        self.instance_id = instance_id
        extra = ["--instance-id", instance_id] if instance_id else []
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if tracemalloc_out is not None:
            env["TRACEMALLOC_OUT"] = str(tracemalloc_out)
        self.tracemalloc_out = tracemalloc_out
        self.started_at = time.time()
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
                *extra,
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        self.serving_at: float | None = None
        assert self.proc.stderr is not None
        self._drain(self.proc.stderr, self.log)

    @staticmethod
    def _drain(stream: IO[bytes], into: list[str]) -> None:
        def pump() -> None:
            for raw in stream:
                into.append(raw.decode(errors="replace").rstrip())

        threading.Thread(target=pump, daemon=True).start()

    async def serving(self, timeout_s: float = 180.0) -> float:
        """Wait for the "serving" line; return when it came (wall clock, s)."""
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout_s)
        if not line.startswith(b"serving"):
            tail = "\n".join(self.log[-20:])
            raise RuntimeError(f"serve did not start: {line!r}\n{tail}")
        self.serving_at = time.time()
        self._drain(self.proc.stdout, [])
        return self.serving_at

    def memory_mb(self) -> dict[str, float]:
        """Resident set now (VmRSS) and its peak so far (VmHWM), in MiB."""
        return memory_mb(self.pid)

    def save_log(self, path: Path) -> None:
        path.write_text("\n".join([*self.log, ""]))

    async def dump_allocations(self, label: str) -> None:
        """With --tracemalloc: the engine's top allocation sites, to DIAGNOSTICS."""
        if self.tracemalloc_out is None:
            return
        written = Path(f"{self.tracemalloc_out}.{self.pid}")
        written.unlink(missing_ok=True)
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 300
        while not written.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if written.exists():
            written.replace(DIAGNOSTICS / f"tracemalloc-{label}.txt")

    def kill(self) -> float:
        """SIGKILL; return when it was sent (wall clock, s)."""
        return sigkill(self.proc)

    def stop(self) -> None:
        terminate(self.proc)

    def acquisitions(self) -> list[dict[str, float]]:
        """The engine's "partition acquired" log lines: when, runs restored, restore ms."""
        found = []
        for line in self.log:
            match = _ACQUIRED.match(line)
            if match:
                at, part, runs, ms, timers = match.groups()
                found.append(
                    {
                        "at": float(at),
                        "partition": int(part),
                        "restored": int(runs),
                        "restore_ms": int(ms),
                        "timers": int(timers),
                    }
                )
        return found


class Profile:
    """With --py-spy: sample a process until stopped, as collapsed stacks."""

    def __init__(self, enabled: bool, pid: int, label: str) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if enabled and not Path(py_spy).exists():
            say(
                "--py-spy: py-spy is not installed (`.venv/bin/pip install py-spy`); "
                "no profile taken"
            )
            enabled = False
        if enabled:
            self.proc = subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    "100",
                    "--format",
                    "raw",
                    "--output",
                    str(DIAGNOSTICS / f"pyspy-{label}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output and exits
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------- the run log


class Watcher(TopicReader):
    """Reads the events topic from its beginning (the topics are this benchmark's own)
    and keeps what the figures need. Only the records measured are decoded: the watcher
    shares two cores with the broker and the engine."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        self.topics = topics
        super().__init__(bootstrap, max_partition_fetch_bytes=8 << 20)
        self.armed: dict[tuple[str, str], tuple[int, int]] = {}
        """(run id, timer id) of a hold sleep -> (due_at, record timestamp of TimerArmed)."""
        self.warm_armed: list[int] = []
        """Record timestamps of the warm-up's TimerArmed."""
        self.fired: dict[tuple[str, str], list[tuple[int, int]]] = {}
        """(run id, timer id) of a sleep -> [(record timestamp, event ts)] of TimerFired."""
        self.dispatched: dict[str, tuple[int, float]] = {}
        """run id -> (record timestamp, wall clock seen) of its first TaskDispatched."""
        self.rejected_firings = 0

    def partitions(self) -> list[TopicPartition]:
        return [TopicPartition(self.topics.events, p) for p in range(self.topics.partitions)]

    async def _read(self) -> None:
        wanted = (b"TimerArmed", b"TimerFired", b"TaskDispatched", b"CommandRejected")
        while True:
            fetched = await self.consumer.getmany(timeout_ms=50, max_records=20_000)
            seen = time.time()
            for messages in fetched.values():
                for message in messages:
                    if dict(message.headers or ()).get("type") in wanted:
                        self._take(decode(message.value), message.timestamp, seen)

    def _take(self, event: Any, ts: int, seen: float) -> None:
        if isinstance(event, TimerArmed):
            if event.step == "nap":
                self.armed[event.run_id, event.timer_id] = (event.due_at, ts)
            elif event.step == "doze":
                self.warm_armed.append(ts)
        elif isinstance(event, TimerFired):
            if event.kind == "sleep":
                self.fired.setdefault((event.run_id, event.timer_id), []).append((ts, event.ts))
        elif isinstance(event, TaskDispatched):
            self.dispatched.setdefault(event.run_id, (ts, seen))
        elif isinstance(event, CommandRejected) and event.command_type == "FireTimer":
            self.rejected_firings += 1

    async def wait(
        self,
        count: Callable[[], int],
        target: int,
        what: str,
        not_before_ms: float = 0.0,
        give_up_ms: float | None = None,
    ) -> bool:
        """Until ``count()`` reaches ``target``; fail if it stops moving for ``STALL_S``
        (not counting the time before ``not_before_ms``, e.g. the last due time). Past
        ``give_up_ms`` (wall clock), return False instead of waiting on."""
        last, moved = -1, time.monotonic()
        while (value := count()) < target:
            if give_up_ms is not None and time.time() * 1000 > give_up_ms:
                say(f"{what}: giving up at {value:,} of {target:,}")
                return False
            if value != last or time.time() * 1000 < not_before_ms:
                last, moved = value, time.monotonic()
            elif time.monotonic() - moved > STALL_S:
                raise TimeoutError(f"{what}: stuck at {value} of {target} for {STALL_S:.0f}s")
            await asyncio.sleep(0.05)
        return True


async def publish(
    producer: AIOKafkaProducer, topics: Topics, workflow: str, keys: Iterable[str]
) -> None:
    for key in keys:  # keyed by run id, as the client does: the trigger's own partition
        await producer.send(
            topics.triggers,
            encode(Trigger(workflow=workflow, idempotency_key=key)),
            key=run_of(key).encode(),
        )
    await producer.flush()


def run_of(key: str) -> str:
    return run_id_for("default", key)


# ---------------------------------------------------------------------- the scenario


@dataclass(frozen=True)
class Diagnostics:
    py_spy: bool = False
    tracemalloc: bool = False


async def _scenario(
    bootstrap: str,
    postgres: str,
    runs: int,
    partitions: int,
    keep_topics: bool,
    diagnostics: Diagnostics,
) -> dict[str, Any]:
    topics = Topics(prefix=f"rec{uuid.uuid4().hex[:8]}", partitions=partitions)
    await ensure_topics(bootstrap, topics.core_topics())
    for spec in (PROBE, WARM):
        await publish_spec(bootstrap, topics, spec)
    watcher = Watcher(bootstrap, topics)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    engines: list[EngineProcess] = []
    profiles: list[Profile] = []
    DIAGNOSTICS.mkdir(parents=True, exist_ok=True)
    try:
        await watcher.start()
        await producer.start()
        return await _measure(
            bootstrap, postgres, topics, runs, watcher, producer, engines, profiles, diagnostics
        )
    finally:
        for profile in profiles:
            profile.stop()
        for number, engine in enumerate(engines, 1):
            engine.stop()
            engine.save_log(DIAGNOSTICS / f"engine-{number}.log")
        await producer.stop()
        await watcher.stop()
        if not keep_topics:
            await _delete_topics(bootstrap, topics)


async def _measure(
    bootstrap: str,
    postgres: str,
    topics: Topics,
    runs: int,
    watcher: Watcher,
    producer: AIOKafkaProducer,
    engines: list[EngineProcess],
    profiles: list[Profile],
    diagnostics: Diagnostics,
) -> dict[str, Any]:
    traced = DIAGNOSTICS / "tracemalloc" if diagnostics.tracemalloc else None

    def start_engine(instance_id: str | None) -> EngineProcess:
        engines.append(EngineProcess(bootstrap, postgres, topics, instance_id, traced))
        return engines[-1]

    def profile(engine: EngineProcess, label: str) -> Profile:
        profiles.append(Profile(diagnostics.py_spy, engine.pid, label))
        return profiles[-1]

    engine = start_engine(None)
    await engine.serving()
    dispatched = watcher.dispatched

    # 1. Warm-up: the first probe waits out the group's first assignment; then runs that
    # arm a timer as hold's do (but never fall due) measure the rate the sleep is sized by.
    await publish(producer, topics, "probe", ["probe-0"])
    await watcher.wait(lambda: int(run_of("probe-0") in dispatched), 1, "first probe")
    warm = min(2000, max(200, runs // 20))
    await publish(producer, topics, "warm", (f"warm-{i}" for i in range(warm)))
    await watcher.wait(lambda: len(watcher.warm_armed), warm, "warm-up")
    # A throughput, not a latency: from the first timer armed to the last.
    span_s = (max(watcher.warm_armed) - min(watcher.warm_armed)) / 1000
    warm_rate = (warm - 1) / max(0.001, span_s)
    sleep_s = math.ceil(runs / warm_rate * SLEEP_MARGIN + RESTART_ALLOWANCE_S)
    say(f"warm-up: {warm:,} runs armed at {warm_rate:,.0f} runs/s; hold sleeps {sleep_s}s")
    await publish_spec(bootstrap, topics, hold_spec(sleep_s))
    baseline = engine.memory_mb()

    # 2. Load: N runs into Waiting, each with one armed timer.
    say(f"starting {runs:,} runs of hold")
    loading = profile(engine, "load")
    began = time.time()
    await publish(producer, topics, "hold", (f"hold-{i}" for i in range(runs)))
    published_s = time.time() - began
    await watcher.wait(lambda: len(watcher.armed), runs, "arming")
    loading.stop()
    arm_ts = [ts for _, ts in watcher.armed.values()]
    load_s = (max(arm_ts) - began * 1000) / 1000
    first_due = min(due for due, _ in watcher.armed.values())
    last_due = max(due for due, _ in watcher.armed.values())
    say(
        f"{runs:,} runs waiting after {load_s:.1f}s ({runs / load_s:,.0f} runs/s); "
        f"first timer due in {(first_due / 1000 - time.time()):.0f}s"
    )
    await asyncio.sleep(2.0)  # let the last commits settle
    await engine.dump_allocations("loaded")

    # 3. Two crashes. The first engine is a dynamic group member (serve's default): its
    # replacement waits for the group to notice it died. The replacement runs with an
    # --instance-id (static membership), so the second crash measures a restart that
    # takes the partitions back at once.
    instance = f"{topics.prefix}-engine"
    crashes: dict[str, Crash] = {}
    for label, instance_id in (("dynamic", instance), ("static", instance)):
        crash = Crash(
            label,
            killed=engine,
            fired_before_kill=len(watcher.fired),
            memory_before_kill=engine.memory_mb(),
        )
        crash.killed_at = engine.kill()
        engine = start_engine(instance_id)
        probe = f"probe-after-{label}-restart"
        await publish(producer, topics, "probe", [probe])
        crash.serving_at = await engine.serving()
        restoring = profile(engine, f"restart-{label}")  # the restore comes after "serving"
        probe_run = run_of(probe)
        await watcher.wait(
            lambda: int(probe_run in dispatched),  # noqa: B023
            1,
            f"probe ({label})",
        )
        restoring.stop()
        crash.restarted = engine
        crash.first_command_ts, crash.first_command_seen = dispatched[probe_run]
        crash.memory_restored = engine.memory_mb()
        crashes[label] = crash
        say(
            f"{label} membership: first command "
            f"{crash.first_command_ts - crash.killed_at * 1000:,.0f} ms after the kill"
        )
        await asyncio.sleep(2.0)
    await engine.dump_allocations("restored")

    # 4. Timers, on the last engine; given up (and reported) if they are not all in well
    # after the last falls due.
    give_up_ms = last_due + 1000 * max(180.0, 3 * load_s)
    await watcher.wait(lambda: len(watcher.fired), 1, "first timer", first_due, give_up_ms)
    firing = profile(engine, "timers")
    complete = await watcher.wait(lambda: len(watcher.fired), runs, "timers", last_due, give_up_ms)
    firing.stop()
    await asyncio.sleep(3.0)  # a duplicate firing would come right behind
    finished = engine.memory_mb()

    dynamic, static = crashes["dynamic"], crashes["static"]
    loaded = dynamic.memory_before_kill
    mb = runs / (1024 * 1024)
    return {
        "runs": runs,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "partitions": topics.partitions,
        "diagnostics_on": diagnostics.py_spy or diagnostics.tracemalloc,
        "warm_up_runs": warm,
        "warm_up_runs_per_s": round(warm_rate, 1),
        "sleep_s": sleep_s,
        "publish_s": round(published_s, 2),
        "start_rate_runs_per_s": round(runs / load_s, 1),
        "start_s": round(load_s, 2),
        "arming_span_s": round((max(arm_ts) - min(arm_ts)) / 1000, 2),
        "recovery": dynamic.figures(),
        "recovery_with_instance_id": static.figures(),
        "engine_baseline_rss_mb": round(baseline["rss_mb"], 1),
        "engine_rss_mb": round(loaded["rss_mb"], 1),
        "engine_peak_rss_mb": round(loaded["peak_rss_mb"], 1),
        "rss_bytes_per_run": round((loaded["rss_mb"] - baseline["rss_mb"]) / mb),
        "restored_rss_mb": round(dynamic.memory_restored["rss_mb"], 1),
        "restored_peak_rss_mb": round(dynamic.memory_restored["peak_rss_mb"], 1),
        "after_timers_rss_mb": round(finished["rss_mb"], 1),
        "after_timers_peak_rss_mb": round(finished["peak_rss_mb"], 1),
        "timers": _timer_figures(
            watcher,
            complete,
            static.first_command_ts,
            static.killed_at,
            first_due,
            last_due,
            static.fired_before_kill,
        ),
    }


@dataclass
class Crash:
    """One SIGKILL and restart, and what was seen of it."""

    label: str
    killed: EngineProcess
    fired_before_kill: int
    memory_before_kill: dict[str, float]
    killed_at: float = 0.0
    restarted: EngineProcess | None = None
    serving_at: float = 0.0
    first_command_ts: int = 0
    first_command_seen: float = 0.0
    memory_restored: dict[str, float] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        assert self.restarted is not None
        kill_ms = self.killed_at * 1000
        acquisitions = self.restarted.acquisitions()
        first: dict[float, dict[str, float]] = {}
        for acquisition in acquisitions:  # the recovery; any later one is a rebalance
            first.setdefault(acquisition["partition"], acquisition)
        acquired = list(first.values())
        # The restores of a process run concurrently, inside the assignment callback:
        # the earliest began (about) when the group assigned the partitions.
        assigned_ms = (
            min(a["at"] * 1000 - a["restore_ms"] for a in acquired) - kill_ms if acquired else None
        )
        return {
            "instance_id": self.restarted.instance_id,
            "kill_to_first_command_ms": round(self.first_command_ts - kill_ms),
            "restart_to_first_command_ms": round(
                self.first_command_ts - self.restarted.started_at * 1000
            ),
            "kill_to_first_command_seen_ms": round(self.first_command_seen * 1000 - kill_ms),
            "kill_to_serving_ms": round(self.serving_at * 1000 - kill_ms),
            "kill_to_assigned_ms": None if assigned_ms is None else round(assigned_ms),
            "restore_ms": max((a["restore_ms"] for a in acquired), default=None),
            "restore_ms_sum": sum(a["restore_ms"] for a in acquired),
            "restored_runs": sum(a["restored"] for a in acquired),
            "restored_timers": sum(a["timers"] for a in acquired),
            "partitions": acquired_summary(acquired, kill_ms),
            "partitions_restored_again": len(acquisitions) - len(acquired),
            "restore_log": (
                acquired_summary(acquisitions, kill_ms) if len(acquisitions) > len(acquired) else []
            ),
            "killed_rss_mb": round(self.memory_before_kill["rss_mb"], 1),
            "killed_peak_rss_mb": round(self.memory_before_kill["peak_rss_mb"], 1),
            "restored_rss_mb": round(self.memory_restored["rss_mb"], 1),
            "restored_peak_rss_mb": round(self.memory_restored["peak_rss_mb"], 1),
        }


def _timer_figures(
    watcher: Watcher,
    complete: bool,
    recovered_ms: float,
    killed_at: float,
    first_due: int,
    last_due: int,
    fired_before_kill: int,
) -> dict[str, Any]:
    lateness: list[float] = []
    lateness_after_recovery: list[float] = []
    early = duplicates = 0
    for key, (due_at, _) in watcher.armed.items():
        firings = watcher.fired.get(key, [])
        duplicates += max(0, len(firings) - 1)
        early += sum(1 for ts, event_ts in firings if ts < due_at or event_ts < due_at)
        if firings:
            late = firings[0][0] - due_at
            lateness.append(late)
            if due_at >= recovered_ms:
                lateness_after_recovery.append(late)
    return {
        "complete": complete,
        "armed": len(watcher.armed),
        "fired": sum(1 for key in watcher.armed if key in watcher.fired),
        "missing": sum(1 for key in watcher.armed if key not in watcher.fired),
        "duplicates": duplicates,
        "stray": sum(1 for key in watcher.fired if key not in watcher.armed),
        "early": early,
        "fired_before_kill": fired_before_kill,
        "due_before_recovery": sum(1 for due, _ in watcher.armed.values() if due < recovered_ms),
        "refirings_rejected": watcher.rejected_firings,
        "first_due_after_kill_s": round(first_due / 1000 - killed_at, 1),
        "due_span_s": round((last_due - first_due) / 1000, 2),
        "lateness_ms": _quantiles(lateness),
        "lateness_due_after_recovery_ms": _quantiles(lateness_after_recovery),
    }


def acquired_summary(acquired: list[dict[str, float]], kill_ms: float) -> list[dict[str, Any]]:
    return [
        {
            "partition": int(a["partition"]),
            "restored": int(a["restored"]),
            "restore_ms": int(a["restore_ms"]),
            "ready_after_kill_ms": round(a["at"] * 1000 - kill_ms),
        }
        for a in acquired
    ]


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None, "count": 0}
    return {
        "p50": percentile(values, 0.5),
        "p99": percentile(values, 0.99),
        "max": max(values),
        "count": len(values),
    }


async def _delete_topics(bootstrap: str, topics: Topics) -> None:
    try:
        await delete_topics(bootstrap, topics.prefix)
    except Exception as exc:  # cleanup only: the figures are taken
        say(f"could not delete topics {topics.prefix}.*: {exc!r}")


# ---------------------------------------------------------------------- output


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def table(r: dict[str, Any]) -> str:
    dyn, sta, tim = r["recovery"], r["recovery_with_instance_id"], r["timers"]
    late, late_after = tim["lateness_ms"], tim["lateness_due_after_recovery_ms"]
    verdict = "yes" if r["engine_peak_rss_mb"] < 500 else "NO"

    def both(key: str, show: Callable[[Any], str] = _ms) -> str:
        return f"{show(dyn[key]):>12}  {show(sta[key]):>12}"

    rows = [
        ("runs (active, each with one armed sleep timer)", f"{r['runs']:,}"),
        ("partitions", str(r["partitions"])),
        (
            "start rate (trigger published -> TimerArmed)",
            f"{r['start_rate_runs_per_s']:,.0f} runs/s ({r['start_s']:.1f} s; warm-up "
            f"{r['warm_up_runs_per_s']:,.0f} runs/s armed)",
        ),
        (
            "recovery, group membership of the killed engine",
            f"{'dynamic':>12}  {'static':>12}  (static: serve --instance-id)",
        ),
        ("  SIGKILL -> first command (record ts)", both("kill_to_first_command_ms")),
        ("  restart -> first command (record ts)", both("restart_to_first_command_ms")),
        ("  SIGKILL -> new process serving", both("kill_to_serving_ms")),
        ("  SIGKILL -> partitions assigned (about)", both("kill_to_assigned_ms")),
        ("  restore, longest partition (concurrent)", both("restore_ms")),
        ("  runs restored", both("restored_runs", lambda v: f"{v:,}")),
        (
            "  partitions restored again (rebalances)",
            both("partitions_restored_again", lambda v: f"{v:,}"),
        ),
        (
            "  RSS of the new process after restore",
            both("restored_rss_mb", lambda v: f"{v:,.0f} MB"),
        ),
        ("engine RSS before the load", f"{r['engine_baseline_rss_mb']:,.0f} MB"),
        (
            "engine RSS / peak (VmHWM) with all runs active",
            f"{r['engine_rss_mb']:,.0f} / {r['engine_peak_rss_mb']:,.0f} MB "
            f"(< 500 MB: {verdict}; ~{r['rss_bytes_per_run']:,} B per run)",
        ),
        (
            "restarted engine RSS / peak after restore",
            f"{r['restored_rss_mb']:,.0f} / {r['restored_peak_rss_mb']:,.0f} MB",
        ),
        (
            "last engine RSS / peak after the timers",
            f"{r['after_timers_rss_mb']:,.0f} / {r['after_timers_peak_rss_mb']:,.0f} MB",
        ),
        (
            "timers armed / fired / missing",
            f"{tim['armed']:,} / {tim['fired']:,} / "
            f"{tim['missing']:,}" + ("" if tim["complete"] else " (gave up)"),
        ),
        (
            "timers fired twice / early / before the kill",
            f"{tim['duplicates']:,} / {tim['early']:,} / {tim['fired_before_kill']:,}",
        ),
        (
            "timer lateness p50 / p99 / max",
            f"{_ms(late['p50'])} / {_ms(late['p99'])} / {_ms(late['max'])}",
        ),
        (
            "  of timers due after the last recovery",
            f"{_ms(late_after['p50'])} / {_ms(late_after['p99'])} / {_ms(late_after['max'])}"
            f" ({late_after['count']:,} timers; {tim['due_before_recovery']:,} due before)",
        ),
        ("timers fell due over", f"{tim['due_span_s']:.1f} s (sleep {r['sleep_s']} s)"),
        ("repeated firings rejected by the core", f"{tim['refirings_rejected']:,}"),
    ]
    width = max(len(name) for name, _ in rows)
    head = f"python {r['python']}, {r['cores']} cores, {r['date']}"
    if r["diagnostics_on"]:
        head += " -- py-spy/tracemalloc on: the figures are slowed by them"
    return "\n".join([head, *(f"{name:<{width}}  {value}" for name, value in rows)])


def run(
    runs: int = 100_000,
    partitions: int = 4,
    keep_topics: bool = False,
    diagnostics: Diagnostics | None = None,
) -> dict[str, Any]:
    """Run the scenario; print the table; write and return the figures."""
    bootstrap, postgres = infra_settings()
    RESULTS.mkdir(exist_ok=True)
    result = asyncio.run(
        _scenario(bootstrap, postgres, runs, partitions, keep_topics, diagnostics or Diagnostics())
    )
    print(table(result), flush=True)
    (RESULTS / "recovery.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--keep-topics",
        action="store_true",
        help="leave the benchmark's topics on the broker (to inspect them)",
    )
    parser.add_argument(
        "--py-spy", action="store_true", help="sample the engine with py-spy (diagnostic: slows it)"
    )
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="trace the engine's allocations (diagnostic: slows it)",
    )
    args = parser.parse_args(argv)
    run(
        args.runs,
        args.partitions,
        args.keep_topics,
        Diagnostics(py_spy=args.py_spy, tracemalloc=args.tracemalloc),
    )


if __name__ == "__main__":
    main()
