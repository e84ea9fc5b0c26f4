"""What the benchmarks share: where the local infrastructure is, and percentiles."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {
    "TERRANOHA_KAFKA": "127.0.0.1:29092",
    "TERRANOHA_POSTGRES": "postgresql://terranoha:terranoha@127.0.0.1:25432/terranoha",
}


def infra_settings() -> tuple[str, str]:
    """(Kafka bootstrap, PostgreSQL DSN): the environment, else ``.local/infra.env``
    (written by ``deploy/local/infra.sh up``), else the local defaults."""
    values = dict(DEFAULTS)
    env_file = ROOT / ".local" / "infra.env"
    if env_file.exists():
        for line in env_file.read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            values[key.strip()] = value.strip()
    for key in DEFAULTS:
        values[key] = os.environ.get(key, values[key])
    return values["TERRANOHA_KAFKA"], values["TERRANOHA_POSTGRES"]


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile; NaN for no values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (utime is [11])."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used (``/proc/PID/stat``)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> dict[str, float]:
    """A live process's resident set now (``VmRSS``) and its peak so far (``VmHWM``), in
    MiB, as ``{"rss_mb": ..., "peak_rss_mb": ...}``."""
    figures = {"VmRSS": float("nan"), "VmHWM": float("nan")}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in figures:
            figures[name] = int(value.split()[0]) / 1024  # kB
    return {"rss_mb": figures["VmRSS"], "peak_rss_mb": figures["VmHWM"]}


def peak_rss_mb(pid: int) -> float:
    """The peak resident set size of a live process (``VmHWM``), in MiB."""
    return memory_mb(pid)["peak_rss_mb"]


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p95 and p99 of ``values`` (NaN for none)."""
    return {
        "p50": percentile(values, 0.5),
        "p95": percentile(values, 0.95),
        "p99": percentile(values, 0.99),
    }


def broker_pid() -> int | None:
    """The local broker's pid (``deploy/local/infra.sh`` writes it), if it is running."""
    try:
        pid = int((ROOT / ".local" / "kafka" / "kafka.pid").read_text().strip())
        _stat(pid)
    except (OSError, ValueError):
        return None
    return pid


def postgres_pid() -> int | None:
    """The local PostgreSQL postmaster's pid (first line of ``postmaster.pid``)."""
    for pidfile in (ROOT / ".local").glob("pg*/data/postmaster.pid"):
        try:
            pid = int(pidfile.read_text().splitlines()[0])
            _stat(pid)
        except (OSError, ValueError, IndexError):
            continue
        return pid
    return None


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a server and every process it forked, live or ended (PostgreSQL
    serves each connection from a process of its own)."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = _stat(pid)
    total = sum(int(f) for f in fields[11:15])  # utime, stime, children's utime and stime
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            child = _stat(int(entry.name))
        except OSError:
            continue
        if child[1] == str(pid):  # its parent
            total += int(child[11]) + int(child[12])
    return total / tick


class InfraCpu:
    """CPU seconds the broker and PostgreSQL spend between ``start()`` and ``stop()``:
    a benchmark's records cost the broker as much as the processes that write them."""

    def __init__(self) -> None:
        self.pids = {"broker": broker_pid(), "postgresql": postgres_pid()}
        self.before: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {name: tree_cpu_seconds(pid) for name, pid in self.pids.items() if pid}

    def start(self) -> None:
        self.before = self._now()

    def stop(self) -> dict[str, float]:
        return {
            name: cpu - self.before[name]
            for name, cpu in self._now().items()
            if name in self.before
        }


def sigkill(proc: subprocess.Popen[bytes]) -> float:
    """SIGKILL ``proc`` and reap it; return when the signal was sent (wall clock, s)."""
    at = time.time()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return at


def terminate(proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """SIGTERM ``proc`` if it runs, and SIGKILL it if it has not stopped in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class TopicReader:
    """Reads chosen topic-partitions from their beginning in the background, read_committed,
    until stopped; a subclass's ``_read`` loop does something with the records."""

    def __init__(self, bootstrap: str, **options: int) -> None:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            isolation_level="read_committed",
            enable_auto_commit=False,
            **options,
        )
        self._task: asyncio.Task[None] | None = None

    def partitions(self) -> list[TopicPartition]:
        raise NotImplementedError

    async def _read(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        await self.consumer.start()
        tps = self.partitions()
        self.consumer.assign(tps)
        await self.consumer.seek_to_beginning(*tps)
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()
