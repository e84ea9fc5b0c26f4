"""The notifier from the command line on the embedded store: ``notify --once``,
``notify --check`` and ``serve --notify``, delivering a real run's approval request."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from tests.cli.conftest import Cli
from tests.notify.servers import Answer, WebhookReceiver, new_secret, webhook_receiver

ROOT = Path(__file__).resolve().parents[2]
SPEC = """
workflow: sign-off
version: 1
steps:
  - id: sign_off
    approval: {approvers: [finance], expires_after: 1h}
"""


def _files(tmp_path: Path, url: str) -> tuple[Path, Path]:
    (tmp_path / "spec.yaml").write_text(SPEC)
    settings = tmp_path / "notify.yaml"
    settings.write_text(f"""
webhooks:
  ops: {{url: "{url}", secrets: [env:TEST_WEBHOOK_SECRET]}}
routes:
  - recipients: [finance]
    webhooks: [ops]
""")
    return tmp_path / "spec.yaml", settings


def test_notify_once_delivers_a_runs_approval_request(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = new_secret()
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", secret)
    db = str(tmp_path / "t.db")
    with webhook_receiver() as receiver:
        spec, settings = _files(tmp_path, receiver.url)
        started = cli("run", str(spec), "--db", db, "--key", "k1")
        assert started.code == 0, started.err
        done = cli("notify", str(settings), "--db", db, "--once")
        assert done.code == 0, done.err
        assert done.out.strip() == (
            "1 notifications: 1 delivered, 0 already settled, "
            "0 dead-lettered, 0 matched no route; 0 retries"
        )
        again = cli("notify", str(settings), "--db", db, "--once")
        assert again.out.startswith("0 notifications"), "the position was stored"
    (request,) = receiver.received
    event = Webhook(secret).verify(request.body, request.headers)
    assert event["type"] == "notification.approval_requested"
    assert event["data"]["step"] == "sign_off"
    assert event["data"]["recipients"] == ["finance"]
    status = cli("status", event["data"]["run_id"], "--db", db, "--json")
    assert json.loads(status.out)["status"] == "Waiting"


def test_notify_logs_retries_without_a_urls_path_or_a_secret(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = new_secret()
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", secret)
    db = str(tmp_path / "t.db")
    with webhook_receiver([Answer(500)]) as receiver, caplog.at_level(logging.DEBUG):
        spec, settings = _files(tmp_path, receiver.url)
        assert cli("run", str(spec), "--db", db).code == 0
        done = cli("notify", str(settings), "--db", db, "--once", "--log-level", "debug")
    assert done.code == 0, done.err
    assert len(receiver.received) == 2
    assert "answered 500 Internal Server Error; attempt 2 of 8" in caplog.text
    assert "token" not in caplog.text and "/hooks" not in caplog.text
    assert secret not in caplog.text and secret.removeprefix("whsec_") not in caplog.text


def test_notify_check_shows_the_routes_and_no_secret(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = new_secret()
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", secret)
    _, settings = _files(tmp_path, "https://hooks.example.com/x?token=abc")
    checked = cli("notify", str(settings), "--check")
    assert checked.code == 0, checked.err
    assert checked.out.splitlines()[1:3] == [
        "  webhook ops: https://hooks.example.com, 1 secret(s), timeout 10000 ms",
        "  route 0: recipient in finance -> webhook ops",
    ]
    assert secret not in checked.out and "token" not in checked.out


def test_bad_settings_stop_the_command_with_what_to_fix(cli: Cli, tmp_path: Path) -> None:
    _, settings = _files(tmp_path, "https://hooks.example.com/x")
    failed = cli("notify", str(settings), "--check")
    assert failed.code == 2
    assert (
        "webhooks.ops.secrets[0]: environment variable TEST_WEBHOOK_SECRET is not set" in failed.err
    )


def test_serve_with_notify_delivers_while_it_runs(cli: Cli, tmp_path: Path) -> None:
    secret = new_secret()
    db = str(tmp_path / "t.db")
    with webhook_receiver() as receiver:
        spec, settings = _files(tmp_path, receiver.url)
        assert cli("workflows", "deploy", str(spec), "--db", db).code == 0
        server = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", "--db", db, "--notify", str(settings)],
            env={**os.environ, "PYTHONPATH": str(ROOT), "TEST_WEBHOOK_SECRET": secret},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert server.stdout is not None
            assert server.stdout.readline().startswith(b"serving")
            assert cli("run", "sign-off", "--db", db, "--key", "k2").code == 0
            assert _received(receiver, 1), "the approval request never arrived"
        finally:
            server.send_signal(signal.SIGTERM)
            _, err = server.communicate(timeout=60)
        assert server.returncode == 0, err.decode(errors="replace")
    (request,) = receiver.received
    assert Webhook(secret).verify(request.body, request.headers)["data"]["step"] == "sign_off"


def _received(receiver: WebhookReceiver, count: int, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while len(receiver.received) < count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
