"""``terranoha api`` and ``terranoha api-keys`` as a user runs them: keys made on the
command line, the server in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.api.conftest import PAYOUT
from tests.api.server import free_port
from tests.cli.conftest import Cli

ROOT = Path(__file__).resolve().parents[2]


def test_keys_made_on_the_command_line_open_the_api_until_revoked(cli: Cli, tmp_path: Path) -> None:
    keys = str(tmp_path / "keys.db")
    made = cli(
        "api-keys",
        "create",
        "--keys",
        keys,
        "--subject",
        "alice",
        "--tenant",
        "acme",
        "--role",
        "admin",
        "--role",
        "approve:finance",
    )
    assert made.code == 0, made.err
    key = made.out.splitlines()[0]
    assert key.startswith("tnh_") and "shown once" in made.out
    key_id = key.split("_")[1]
    listed = cli("api-keys", "list", "--keys", keys)
    assert listed.out == f"{key_id}\talice\tacme\tadmin,approve:finance\tlive\n"
    assert key.split("_")[2] not in listed.out
    bad = cli(
        "api-keys",
        "create",
        "--keys",
        keys,
        "--subject",
        "bob",
        "--tenant",
        "acme",
        "--role",
        "superuser",
    )
    assert bad.code == 2 and "unknown role 'superuser'" in bad.err

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "api",
            "--db",
            str(tmp_path / "store.db"),
            "--keys",
            keys,
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert server.stdout is not None
        assert server.stdout.readline().decode().startswith(f"api on {url} over ")
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz").json() == {"status": "ok"}:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "api did not start"
            time.sleep(0.1)
        auth = {"Authorization": f"Bearer {key}"}
        assert (
            httpx.post(url + "/v1/workflows", json={"spec": PAYOUT}, headers=auth).status_code
            == 201
        )
        started = httpx.post(
            url + "/v1/runs", headers=auth, json={"workflow": "api-payout", "input": {"amount": 3}}
        )
        assert started.status_code == 201 and started.json()["requested_by"] == "alice"
        assert httpx.get(url + "/v1/runs").status_code == 401

        assert cli("api-keys", "revoke", "--keys", keys, key_id).code == 0
        assert httpx.get(url + "/v1/runs", headers=auth).status_code == 401
        assert "revoked" in cli("api-keys", "list", "--keys", keys).out
        again = cli("api-keys", "revoke", "--keys", keys, key_id)
        assert again.code == 2 and "no live key" in again.err
    finally:
        server.terminate()
        server.communicate(timeout=30)
