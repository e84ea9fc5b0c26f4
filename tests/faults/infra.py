"""A private Kafka broker and PostgreSQL cluster for the fault scenarios.

The shared instance (127.0.0.1:29092 / :25432) serves other test runs, so the scenarios that
pause, kill or restart servers get their own: ``deploy/local/infra.sh`` with another
``TERRANOHA_LOCAL_DIR`` and other ports. The Kafka jars are shared through a symlink.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INFRA_SH = ROOT / "deploy" / "local" / "infra.sh"
SHARED_LIB = ROOT / ".local" / "kafka" / "lib"


def _port(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class FaultInfra:
    """Start, pause, kill and restart a broker and a PostgreSQL cluster nobody else uses."""

    def __init__(self) -> None:
        # Below Linux's ephemeral range (32768-60999): a client reconnecting to a killed
        # broker's port in that range can be given that very port as its own, connect to
        # itself, and hold the port, so that the broker cannot bind it when it restarts.
        self.kafka_port = _port("TERRANOHA_FAULT_KAFKA_PORT", 28092)
        self.controller_port = _port("TERRANOHA_FAULT_CONTROLLER_PORT", self.kafka_port + 1)
        self.pg_port = _port("TERRANOHA_FAULT_PG_PORT", 28432)
        self.proxied_port = _port("TERRANOHA_FAULT_PROXIED_PORT", self.kafka_port + 2)
        """A second client listener of the broker, the upstream of ``tests.faults.kafka_proxy``."""
        self.proxy_port = _port("TERRANOHA_FAULT_PROXY_PORT", self.kafka_port + 3)
        """Where that listener is advertised: the proxy listens here while a test runs one."""
        self.dir = Path(tempfile.mkdtemp(prefix="terranoha-faults-"))
        self.bootstrap = f"127.0.0.1:{self.kafka_port}"
        """Direct to the broker: admin clients, readers, load generators."""
        self.proxied_bootstrap = f"127.0.0.1:{self.proxy_port}"
        """Through the proxy: a client bootstrapped here reaches the broker only while a
        ``KafkaProxy(fault_infra.proxy_port, fault_infra.proxied_port)`` runs, and every
        broker address it learns (metadata, coordinators) is the proxy's again."""
        self.postgres = f"postgresql://terranoha:terranoha@127.0.0.1:{self.pg_port}/terranoha"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "TERRANOHA_LOCAL_DIR": str(self.dir),
            "TERRANOHA_KAFKA_PORT": str(self.kafka_port),
            "TERRANOHA_CONTROLLER_PORT": str(self.controller_port),
            "TERRANOHA_PG_PORT": str(self.pg_port),
            "TERRANOHA_KAFKA_PROXIED_PORT": str(self.proxied_port),
            "TERRANOHA_KAFKA_PROXY_PORT": str(self.proxy_port),
        }

    def _infra(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["bash", str(INFRA_SH), *args],
            env=self.env,
            text=True,
            capture_output=True,
            timeout=300,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"infra.sh {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        return done

    def up(self) -> None:
        for port in (
            self.kafka_port,
            self.controller_port,
            self.pg_port,
            self.proxied_port,
            self.proxy_port,
        ):
            if _port_open(port):
                raise RuntimeError(
                    f"127.0.0.1:{port} is in use; the fault suite needs its own ports "
                    "(set TERRANOHA_FAULT_KAFKA_PORT, TERRANOHA_FAULT_CONTROLLER_PORT, "
                    "TERRANOHA_FAULT_PG_PORT, TERRANOHA_FAULT_PROXIED_PORT, "
                    "TERRANOHA_FAULT_PROXY_PORT)"
                )
        # The postgres OS user must reach the data directory (the server runs as it).
        self.dir.chmod(0o755)
        (self.dir / "kafka").mkdir(exist_ok=True)
        if not SHARED_LIB.is_dir():
            raise RuntimeError(f"no Kafka jars in {SHARED_LIB}; run deploy/local/infra.sh up")
        (self.dir / "kafka" / "lib").symlink_to(SHARED_LIB)
        self._infra("up")

    def down(self) -> None:
        self.resume_broker()
        self._infra("down", "--purge", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ kafka

    def broker_pid(self) -> int | None:
        try:
            pid = int((self.dir / "kafka" / "kafka.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    def pause_broker(self) -> None:
        pid = self.broker_pid()
        assert pid is not None, "the fault broker is not running"
        os.kill(pid, signal.SIGSTOP)

    def resume_broker(self) -> None:
        pid = self.broker_pid()
        if pid is not None:
            os.kill(pid, signal.SIGCONT)

    def kill_broker(self) -> None:
        pid = self.broker_pid()
        assert pid is not None, "the fault broker is not running"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)

    def start(self) -> float:
        """``infra.sh up`` (idempotent); returns how long it took."""
        started = time.monotonic()
        self._infra("up")
        return time.monotonic() - started

    # ------------------------------------------------------------------ postgres

    def crash_postgres(self) -> None:
        """Stop the cluster without a checkpoint (``-m immediate``): a crash, as far as
        clients and recovery can tell."""
        bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
        cmd = [
            str(bindir / "pg_ctl"),
            "stop",
            "-D",
            str(self.dir / "pg" / "data"),
            "-m",
            "immediate",
            "-w",
        ]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60, cwd=self.dir / "pg")
