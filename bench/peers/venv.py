"""The peers' own environment: a virtual environment and an npm folder under
``.local/bench-peers/``, created on first use, never the project's ``.venv``.

    python -m bench.peers.venv        # create or update it, print the peer python
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOME = ROOT / ".local" / "bench-peers"
VENV = HOME / "venv"
REQUIREMENTS = Path(__file__).with_name("requirements.txt")
RESTATE_NPM = "@restatedev/restate-server@1.7.12"


def _stamp(path: Path, content: str) -> bool:
    """True if ``path`` already records ``content``'s hash (nothing to do)."""
    digest = hashlib.sha256(content.encode()).hexdigest()
    return path.exists() and path.read_text() == digest


def peer_python() -> Path:
    """The peers' interpreter, with ``requirements.txt`` installed."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".installed"
    wanted = REQUIREMENTS.read_text()
    if python.exists() and _stamp(stamp, wanted):
        return python
    HOME.mkdir(parents=True, exist_ok=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "-r", str(REQUIREMENTS)], check=True
    )
    stamp.write_text(hashlib.sha256(wanted.encode()).hexdigest())
    return python


def restate_server() -> Path:
    """The ``restate-server`` binary from the npm package, installed under HOME/npm."""
    prefix = HOME / "npm"
    stamp = prefix / ".installed"
    binary = prefix / "node_modules" / ".bin" / "restate-server"
    if binary.exists() and _stamp(stamp, RESTATE_NPM):
        return binary
    prefix.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "npm",
            "install",
            "--silent",
            "--no-audit",
            "--no-fund",
            "--prefix",
            str(prefix),
            RESTATE_NPM,
        ],
        check=True,
    )
    stamp.write_text(hashlib.sha256(RESTATE_NPM.encode()).hexdigest())
    return binary


if __name__ == "__main__":
    print(peer_python())
    print(restate_server())
