"""Restate peer benchmark: the same workload as Terranoha's Kafka benchmark.

Workload: N runs of a Restate Workflow (``Bench5`` in ``restate_service.py``, Python SDK,
served by Hypercorn over HTTP/2 cleartext) of 5 ``ctx.run_typed`` steps, each an async
no-op returning ``{"step": name}``; the workflow returns the list of its step results.
Restate journals every step in its log (the log's write-ahead log fsync'd on every write,
Restate's default; ``--wal-fsync off`` turns that off, as Kafka does not fsync by default)
and its partition store, and keeps completed invocations for a day, as it does by
default. With ``--kind service`` the same handler is a plain durable Service (no workflow
key) instead of a Workflow. The service is one Python process (one Hypercorn worker), as
Terranoha's workers are.

This script starts a fresh restate-server (its native binary: the npm wrapper is only a
node launcher, it would add a process to measure) with a temporary data directory
``.local/bench-peers/restate-data-<random>``, on free loopback ports, TCP only, telemetry
off, everything else at Restate's defaults; starts the service process; registers the
deployment through the admin API; runs a warm-up of ``--warmup`` runs (not counted);
measures; stops both (SIGTERM, then SIGKILL after a timeout) and removes the data
directory, also on error or on ``--timeout``.

Modes (``--mode``):

- ``send`` (default): what a Restate user does for a high-throughput backlog, and the
  analogue of Terranoha's triggers published to Kafka. All N runs are submitted as fast
  as the ingress takes them with ``POST /Bench5/<id>/run/send`` (one-way: Restate
  durably accepts the invocation and answers 202 at once) from C concurrent
  connections; C more connections attach to each accepted invocation
  (``GET /restate/invocation/<id>/attach``) to collect and check its result. Restate
  starts accepted invocations right away, up to its invoker's concurrency limit
  (``worker.invoker.concurrent-invocations-limit``, default 1000), so the runs of a burst
  progress together and finish together.
- ``call``: C concurrent connections each call ``POST /Bench5/<id>/run`` and wait for the
  result (request-response through the ingress, a closed loop of C runs in flight).

Every run's result is checked (200 with the five step results; in ``send`` mode the
server's introspection must also list it as succeeded). The client is a minimal HTTP/1.1
keep-alive client on asyncio (the peer environment has no HTTP client library; this one
costs the least CPU on the shared cores). Its CPU is reported separately
(``client_cpu_seconds``), not in ``cpu_seconds``.

Figures: completed runs/s and steps/s (runs x 5 / s) over the wall time from the first
submission to the last result received; per-run latency p50/p95/p99 from the moment the
client sends the run's request to its completion: the response in ``call`` mode, and the
server's ``completed_at`` (from ``sys_invocation``, millisecond resolution, same clock)
in ``send`` mode, so there it includes the wait behind the burst (``exec_latency_ms`` is
the server's ``running_at`` -> ``completed_at``). CPU seconds of restate-server and of the
service process (``/proc/<pid>/stat`` utime + stime, all threads, over the measured window)
and their peak RSS (``VmHWM``, over each process's life, warm-up included); ``cpu_seconds``
and ``peak_rss_mb`` are the sums of the two, ``*_by_process`` the parts.

Run with the peers' interpreter (``python -m bench.peers.venv`` prints it and the server),
from the repository root:

    .local/bench-peers/venv/bin/python bench/peers/restate_bench.py \\
        --server .local/bench-peers/npm/node_modules/.bin/restate-server \\
        --runs 2000 [--concurrency 64] [--mode send|call] [--kind workflow|service] \\
        [--wal-fsync on|off] [--warmup 50] [--timeout 900]

Human-readable lines go to stderr; the last line on stdout is one JSON object. Runs in
the peer environment only: it imports neither ``engine`` nor ``bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib.metadata
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PEERS_HOME = ROOT / ".local" / "bench-peers"
SERVICE_SCRIPT = Path(__file__).with_name("restate_service.py")
STEPS = tuple(f"s{i}" for i in range(5))
EXPECTED = {"steps": [{"step": name} for name in STEPS]}
TARGETS = {"workflow": "Bench5/{id}/run", "service": "Bench5Service/run"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ processes


def native_server(path: str) -> Path:
    """The restate-server executable behind ``path``: the npm ``.bin`` entry is a node
    script that spawns the platform package's binary; run that binary directly."""
    real = Path(path).resolve()
    with real.open("rb") as handle:
        is_script = handle.read(2) == b"#!"
    if not is_script:
        return real
    arch = {"x86_64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine(), platform.machine()
    )
    # .../node_modules/@restatedev/restate-server/lib/index.js
    binary = real.parents[2] / f"restate-server-{sys.platform}-{arch}" / "bin" / "restate-server"
    if not binary.exists():
        raise SystemExit(f"{path} is a launcher script and {binary} does not exist")
    return binary


def free_ports(count: int) -> list[int]:
    """Ports the kernel hands out now on loopback (held together, so all distinct)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL if this script dies (Linux prctl)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(argv: list[str], log_path: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as out:
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            **kwargs,
        )


def stop(processes: dict[str, subprocess.Popen[bytes] | None], timeout: float = 12) -> None:
    """SIGTERM to all, then SIGKILL to those still running after ``timeout`` seconds."""
    running = {name: p for name, p in processes.items() if p is not None and p.poll() is None}
    for process in running.values():
        process.terminate()
    deadline = time.monotonic() + timeout
    for name, process in running.items():
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log(f"{name} did not stop in {timeout:.0f} s: killing it")
            process.kill()
            process.wait(5)


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------------ HTTP


def http_json(method: str, url: str, body: Any = None, timeout: float = 10) -> Any:
    """One admin request (blocking, outside the measured window)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"accept": "application/json"}
    if data is not None:
        headers["content-type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bool(response.status == 200)


def wait_until(
    check: Any, what: str, timeout: float, process: subprocess.Popen[bytes], log_path: Path
) -> None:
    deadline, last = time.monotonic() + timeout, "no answer"
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what}: process exited ({process.returncode})\n{tail(log_path)}")
        try:
            if check():
                return
        except (OSError, urllib.error.URLError) as error:
            last = repr(error)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout:.0f} s ({last})")
        time.sleep(0.1)


def port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


class Connection:
    """A minimal HTTP/1.1 keep-alive client connection (Content-Length or chunked)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(
            f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{self.port}\r\n"
            f"accept: application/json\r\ncontent-length: 0\r\n\r\n".encode()
        )
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("connection closed by the server")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._chunked()
        else:
            body = await self.reader.read()
            await self.close()
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, body

    async def _chunked(self) -> bytes:
        assert self.reader is not None
        parts = []
        while size := int((await self.reader.readline()).split(b";")[0], 16):
            parts.append(await self.reader.readexactly(size))
            await self.reader.readline()
        while (await self.reader.readline()) not in (b"\r\n", b""):
            pass  # trailers
        return b"".join(parts)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


# ------------------------------------------------------------------ workload


def note(errors: list[str], error: str) -> None:
    """Keep the first few errors (every failed run shows in ``completed``)."""
    if len(errors) < 5:
        errors.append(error)


async def pool(items: Any, concurrency: int, port: int, work: Any, errors: list[str]) -> None:
    """``await work(connection, item)`` for every item of ``items`` (an iterator or an
    asyncio.Queue ended by None), from ``concurrency`` connections."""

    async def next_item() -> Any:
        if isinstance(items, asyncio.Queue):
            return await items.get()
        return next(items, None)

    async def worker() -> None:
        connection = Connection(port)
        try:
            while (item := await next_item()) is not None:
                try:
                    await work(connection, item)
                except (OSError, asyncio.IncompleteReadError, ValueError) as error:
                    note(errors, f"{item}: {error!r}")
                    await connection.close()
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def check(status: int, body: bytes, ok: tuple[int, ...], errors: list[str], what: str) -> Any:
    """The decoded body if the answer has one of the ``ok`` statuses, else None."""
    try:
        value = json.loads(body) if status in ok else None
    except ValueError:
        value = None
    if value is None:
        note(errors, f"{what}: HTTP {status} {body[:200]!r}")
    return value


def check_result(status: int, body: bytes, errors: list[str], what: str) -> bool:
    """True if the run answered 200 with the five steps' results."""
    value = check(status, body, (200,), errors, what)
    if value is not None and value != EXPECTED:
        note(errors, f"{what}: unexpected result {body[:200]!r}")
    return value == EXPECTED


async def run_call(ids: list[str], kind: str, concurrency: int, port: int) -> dict[str, Any]:
    """Request-response: C runs in flight, each a blocking call through the ingress."""
    latencies: list[float] = []
    errors: list[str] = []

    async def one(connection: Connection, run_id: str) -> None:
        started = time.perf_counter()
        status, body = await connection.request("POST", "/" + TARGETS[kind].format(id=run_id))
        if check_result(status, body, errors, run_id):
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await pool(iter(ids), concurrency, port, one, errors)
    return {
        "completed": len(latencies),
        "seconds": time.perf_counter() - started,
        "latencies": latencies,
        "errors": errors,
        "submitted_at": {},
    }


async def run_send(ids: list[str], kind: str, concurrency: int, port: int) -> dict[str, Any]:
    """One-way submissions from C connections; C more attach to each accepted run."""
    errors: list[str] = []
    submitted_at: dict[str, float] = {}  # invocation id -> wall time its send was written
    accepted: asyncio.Queue[str | None] = asyncio.Queue()
    completed: set[str] = set()  # invocation ids whose result was checked
    submitted = 0.0  # when the last submission was accepted

    async def send(connection: Connection, run_id: str) -> None:
        sent = time.time()
        status, body = await connection.request(
            "POST", "/" + TARGETS[kind].format(id=run_id) + "/send"
        )
        answer = check(status, body, (200, 202), errors, f"send {run_id}")
        if answer and "invocationId" in answer:
            submitted_at[answer["invocationId"]] = sent
            accepted.put_nowait(answer["invocationId"])

    async def attach(connection: Connection, invocation: str) -> None:
        status, body = await connection.request("GET", f"/restate/invocation/{invocation}/attach")
        if check_result(status, body, errors, f"attach {invocation}"):
            completed.add(invocation)

    async def senders() -> None:
        nonlocal submitted
        try:
            await pool(iter(ids), concurrency, port, send, errors)
            submitted = time.perf_counter()
        finally:
            for _ in range(concurrency):
                accepted.put_nowait(None)

    started = time.perf_counter()
    await asyncio.gather(senders(), pool(accepted, concurrency, port, attach, errors))
    return {
        "completed": len(completed),
        "seconds": time.perf_counter() - started,
        "submit_seconds": submitted - started,
        "latencies": [],
        "errors": errors,
        "submitted_at": {k: v for k, v in submitted_at.items() if k in completed},
    }


def server_timestamps(admin: str, invocations: set[str]) -> dict[str, tuple[float, float]]:
    """invocation id -> (running_at, completed_at) as epoch seconds, from introspection."""
    rows = http_json(
        "POST",
        f"{admin}/query",
        {
            "query": "SELECT id, running_at, completed_at FROM sys_invocation "
            "WHERE status = 'completed' AND completion_result = 'success'"
        },
        timeout=120,
    )["rows"]

    def epoch(stamp: str) -> float:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()

    return {
        row["id"]: (epoch(row["running_at"]), epoch(row["completed_at"]))
        for row in rows
        if row["id"] in invocations and row.get("completed_at")
    }


def percentiles(values: list[float]) -> dict[str, float] | None:
    """Nearest-rank p50/p95/p99 (as bench/_common.percentile), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return {
        f"p{round(q * 100)}": round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)
        for q in (0.5, 0.95, 0.99)
    }


# ------------------------------------------------------------------ main


def config_toml(data_dir: Path, fabric: int, admin: int, ingress: int, fsync: bool) -> str:
    no_fsync = "" if fsync else "rocksdb-disable-wal-fsync = true"
    return "\n".join(
        [
            'node-name = "bench"',
            f'base-dir = "{data_dir}"',
            'listen-mode = "tcp"',
            'bind-ip = "127.0.0.1"',
            f"bind-port = {fabric}",
            "disable-telemetry = true",
            'log-filter = "warn,octocrab=off"',  # octocrab: the update check, offline here
            'shutdown-timeout = "10s"',
            "",
            "[admin]",
            f"bind-port = {admin}",
            "",
            "[ingress]",
            f"bind-port = {ingress}",
            "",
            "[log-server]",  # the log of a single node (replicated loglet, replication 1)
            no_fsync,
            "",
            "[bifrost.local]",
            no_fsync,
            "",
        ]
    )


def measure(
    args: argparse.Namespace,
    server: subprocess.Popen[bytes],
    service: subprocess.Popen[bytes],
    ingress: int,
    admin_url: str,
) -> dict[str, Any]:
    mode = run_send if args.mode == "send" else run_call
    token = secrets.token_hex(3)
    if args.warmup:
        warm = asyncio.run(
            mode(
                [f"warm-{token}-{i}" for i in range(args.warmup)],
                args.kind,
                args.concurrency,
                ingress,
            )
        )
        log(f"warm-up: {warm['completed']}/{args.warmup} runs in {warm['seconds']:.2f} s")
        for error in warm["errors"]:
            log(f"  {error}")

    ids = [f"run-{token}-{i}" for i in range(args.runs)]
    pids = {"server": server.pid, "service": service.pid}
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client_before = time.process_time()
    figures = asyncio.run(mode(ids, args.kind, args.concurrency, ingress))
    client_cpu = time.process_time() - client_before
    figures["cpu"] = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    figures["rss"] = {name: peak_rss_mb(pid) for name, pid in pids.items()}
    figures["client_cpu"] = client_cpu

    figures["exec_latencies"] = []
    if figures["submitted_at"]:  # send mode: completion times from the server
        stamps = server_timestamps(admin_url, set(figures["submitted_at"]))
        for invocation, sent in figures["submitted_at"].items():
            if invocation in stamps:
                running, done = stamps[invocation]
                figures["latencies"].append((done - sent) * 1000)
                figures["exec_latencies"].append((done - running) * 1000)
        if len(stamps) != figures["completed"]:
            figures["errors"].append(
                f"introspection lists {len(stamps)} successful "
                f"invocations of {figures['completed']} attached"
            )
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--server",
        default=str(PEERS_HOME / "npm" / "node_modules" / ".bin" / "restate-server"),
        help="restate-server (the npm .bin launcher or the binary)",
    )
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=64,
        help="client connections submitting (and as many attaching)",
    )
    parser.add_argument("--mode", choices=("send", "call"), default="send")
    parser.add_argument("--kind", choices=("workflow", "service"), default="workflow")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument(
        "--wal-fsync",
        choices=("on", "off"),
        default="on",
        help="fsync the log's write-ahead log on every write (Restate's "
        "default: on; Kafka's default is not to fsync)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=900,
        help="give up (and clean up) after this many seconds in all",
    )
    args = parser.parse_args()

    def give_up(signum: int, _frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum} (timeout {args.timeout:.0f} s or terminated)")

    signal.signal(signal.SIGALRM, give_up)
    signal.signal(signal.SIGTERM, give_up)
    signal.alarm(int(args.timeout))

    binary = native_server(args.server)
    server_version = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    sdk_version = importlib.metadata.version("restate-sdk")
    fabric, admin, ingress, service_port = free_ports(4)
    admin_url = f"http://127.0.0.1:{admin}"
    PEERS_HOME.mkdir(parents=True, exist_ok=True)
    data_dir = PEERS_HOME / f"restate-data-{secrets.token_hex(4)}"
    data_dir.mkdir()
    server = service = None
    try:
        (data_dir / "restate.toml").write_text(
            config_toml(data_dir, fabric, admin, ingress, args.wal_fsync == "on")
        )
        server_log, service_log = data_dir / "server.log", data_dir / "service.log"
        server = spawn(
            [str(binary), "--no-logo", "--config-file", str(data_dir / "restate.toml")],
            server_log,
            cwd=data_dir,
        )
        service = spawn(
            [sys.executable, str(SERVICE_SCRIPT), "--port", str(service_port)], service_log
        )
        log(
            f"{server_version} (pid {server.pid}), restate-sdk {sdk_version} service "
            f"(pid {service.pid}); ingress :{ingress}, admin :{admin}, service "
            f":{service_port}, data {data_dir.relative_to(ROOT)}"
        )
        wait_until(lambda: http_ok(f"{admin_url}/health"), "restate admin", 60, server, server_log)
        wait_until(
            lambda: http_ok(f"http://127.0.0.1:{ingress}/restate/health"),
            "restate ingress",
            60,
            server,
            server_log,
        )
        wait_until(lambda: port_open(service_port), "service", 30, service, service_log)
        deployment = http_json(
            "POST",
            f"{admin_url}/deployments",
            {"uri": f"http://127.0.0.1:{service_port}"},
            timeout=30,
        )
        log(
            f"registered deployment {deployment['id']}: "
            + ", ".join(s["name"] for s in deployment["services"])
        )
        probe = TARGETS[args.kind].format(id=f"probe-{secrets.token_hex(3)}")
        wait_until(
            lambda: http_json("POST", f"http://127.0.0.1:{ingress}/{probe}") == EXPECTED,
            "the service through the ingress",
            30,
            service,
            service_log,
        )

        figures = measure(args, server, service, ingress, admin_url)
        if service.poll() is not None or server.poll() is not None:
            figures["errors"].append("a process exited during the measurement")
    except BaseException:
        for name, path in (
            ("server", data_dir / "server.log"),
            ("service", data_dir / "service.log"),
        ):
            if text := tail(path):
                log(f"--- {name} log (tail)\n{text}")
        raise
    finally:
        signal.alarm(0)
        stop({"restate-server": server, "service": service})
        shutil.rmtree(data_dir, ignore_errors=True)

    completed, seconds = figures["completed"], figures["seconds"]
    steps = completed * len(STEPS)
    cpu = sum(figures["cpu"].values())
    report = {
        "engine": "restate",
        "version": f"restate-server {server_version.split()[-1]}, restate-sdk {sdk_version}",
        "runs": args.runs,
        "completed": completed,
        "seconds": round(seconds, 3),
        "runs_per_s": round(completed / seconds, 1),
        "steps_per_s": round(steps / seconds, 1),
        "cpu_seconds": round(cpu, 3),
        "cpu_seconds_by_process": {k: round(v, 3) for k, v in figures["cpu"].items()},
        "cpu_s_per_1k_steps": round(cpu / steps * 1000, 4) if steps else None,
        "peak_rss_mb": round(sum(figures["rss"].values()), 1),
        "peak_rss_mb_by_process": {k: round(v, 1) for k, v in figures["rss"].items()},
        "client_cpu_seconds": round(figures["client_cpu"], 3),
        "latency_ms": percentiles(figures["latencies"]),
        "settings": {
            "concurrency": args.concurrency,
            "mode": args.mode,
            "kind": args.kind,
            "steps_per_run": len(STEPS),
            "warmup": args.warmup,
            "latency": (
                "client send -> server completed_at"
                if args.mode == "send"
                else "client request -> response"
            ),
            "log_wal_fsync": args.wal_fsync == "on",
            "server_config": "defaults; loopback TCP only, telemetry off",
            "python": platform.python_version(),
            "cores": os.cpu_count(),
        },
    }
    if args.mode == "send":
        report["exec_latency_ms"] = percentiles(figures["exec_latencies"])
        report["submit_seconds"] = round(figures["submit_seconds"], 3)
    if figures["errors"]:
        report["errors"] = figures["errors"]

    log(
        f"completed {completed}/{args.runs} runs in {seconds:.2f} s: "
        f"{report['runs_per_s']:,.0f} runs/s, {report['steps_per_s']:,.0f} steps/s"
        + (f" (all submitted in {report['submit_seconds']:.2f} s)" if args.mode == "send" else "")
    )
    for key in ("latency_ms", "exec_latency_ms"):
        if lat := report.get(key):
            log(
                f"{key.removesuffix('_ms').replace('_', ' ')}: p50 {lat['p50']:.0f} ms, "
                f"p95 {lat['p95']:.0f} ms, p99 {lat['p99']:.0f} ms"
            )
    by_cpu, by_rss = report["cpu_seconds_by_process"], report["peak_rss_mb_by_process"]
    log(
        f"cpu {cpu:.2f} s (server {by_cpu['server']:.2f}, service {by_cpu['service']:.2f}; "
        f"{report['cpu_s_per_1k_steps']} s per 1k steps); peak rss server "
        f"{by_rss['server']:.0f} MB, service {by_rss['service']:.0f} MB; client cpu "
        f"{report['client_cpu_seconds']:.2f} s"
    )
    for error in figures["errors"]:
        log(f"error: {error}")
    print(json.dumps(report), flush=True)
    return 0 if completed == args.runs and not figures["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
