"""Webhook triggers: Standard Webhooks, Slack and GitHub deliveries, signed well, badly,
late, twice and with a rotated secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from engine.api.backends import EmbeddedApiBackend
from engine.api.hooks import HookSettingsError, parse_hooks
from tests.api.server import Api, serve_api

OLD = "whsec_" + base64.b64encode(b"o" * 32).decode()
NEW = "whsec_" + base64.b64encode(b"n" * 32).decode()
SLACK = "8f742231b10e8888abcd99yyyzzz85a5"
GITHUB = "It's a Secret to Everybody"

SPEC = """\
workflow: hooked
version: 1
input: {text: string}
steps:
  - id: hold
    wait_event: {name: go, timeout: 1h}
"""

ENV = {"OLD_SECRET": OLD, "NEW_SECRET": NEW, "SLACK_SECRET": SLACK, "GITHUB_SECRET": GITHUB}

HOOKS = {
    "hooks": {
        "std": {
            "verify": "standard-webhooks",
            "secrets": ["env:NEW_SECRET", "env:OLD_SECRET"],
            "workflow": "hooked",
            "tenant": "acme",
            "input": "{text: body.message}",
        },
        "slack": {
            "verify": "slack",
            "secrets": ["env:SLACK_SECRET"],
            "workflow": "hooked",
            "tenant": "acme",
            "input": "{text: body.text || body.event.text}",
        },
        "gh": {
            "verify": "github",
            "secrets": ["env:GITHUB_SECRET"],
            "workflow": "hooked",
            "tenant": "acme",
            "input": "{text: body.ref}",
        },
    }
}


@pytest.fixture
def hooked(tmp_path: Path) -> Iterator[Api]:
    hooks = parse_hooks(HOOKS, environ=ENV)
    with serve_api(EmbeddedApiBackend(tmp_path / "store.db"), tmp_path / "keys.db") as api:
        api.ctx.hooks = hooks
        admin = api.client(api.key("root", ["*"], ["admin"]))
        assert admin.post("/v1/workflows", json={"spec": SPEC}).status_code == 201
        yield api


def _standard(secret: str, body: bytes, msg_id: str, at: float | None = None) -> dict[str, str]:
    stamp = datetime.fromtimestamp(at if at is not None else time.time(), tz=UTC)
    signature = Webhook(secret).sign(msg_id, stamp, body.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(stamp.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


def _post(api: Api, name: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{api.url}/v1/hooks/{name}", content=body, headers=headers)


def _counts(api: Api, name: str) -> dict[str, Any]:
    admin = api.client(api.key("root2", ["*"], ["admin"]))
    [hook] = [h for h in admin.get("/v1/hooks").json()["hooks"] if h["name"] == name]
    return hook


def test_standard_webhooks_start_one_run_per_delivery_with_rotated_secrets(hooked: Api) -> None:
    body = json.dumps({"message": "hello"}).encode()
    first = _post(hooked, "std", body, _standard(NEW, body, "msg_1"))
    assert first.status_code == 201, first.text
    run = first.json()
    assert run["tenant"] == "acme" and run["requested_by"] == "hook:std"
    assert run["input"] == {"text": "hello"}
    again = _post(hooked, "std", body, _standard(NEW, body, "msg_1"))
    assert again.status_code == 200 and again.json()["run_id"] == run["run_id"]
    rotated = _post(hooked, "std", body, _standard(OLD, body, "msg_2"))
    assert rotated.status_code == 201 and rotated.json()["run_id"] != run["run_id"]
    assert _counts(hooked, "std")["accepted"] == 3


def test_unsigned_badly_signed_and_stale_deliveries_are_refused_and_counted(hooked: Api) -> None:
    body = json.dumps({"message": "hello"}).encode()
    forged = _standard("whsec_" + base64.b64encode(b"x" * 32).decode(), body, "msg_3")
    tampered = {**_standard(NEW, body, "msg_4")}
    stale = _standard(NEW, body, "msg_5", at=time.time() - 3600)
    for headers in ({"content-type": "application/json"}, forged, stale):
        answer = _post(hooked, "std", body, headers)
        assert answer.status_code == 401, answer.text
    assert _post(hooked, "std", body.replace(b"hello", b"HELLO"), tampered).status_code == 401
    counts = _counts(hooked, "std")
    assert counts["refused"] == {"bad signature": 2, "stale": 1, "unsigned": 1}
    assert counts["accepted"] == 0
    admin = hooked.client(hooked.key("root3", ["*"], ["read"]))
    assert admin.get("/v1/runs").json()["runs"] == []


def _slack_headers(
    body: bytes,
    at: float | None = None,
    secret: str = SLACK,
    kind: str = "application/x-www-form-urlencoded",
) -> dict[str, str]:
    stamp = str(int(at if at is not None else time.time()))
    mac = hmac.new(secret.encode(), b"v0:" + stamp.encode() + b":" + body, hashlib.sha256)
    return {
        "x-slack-request-timestamp": stamp,
        "x-slack-signature": "v0=" + mac.hexdigest(),
        "content-type": kind,
    }


def test_a_slack_slash_command_and_an_events_api_message_start_runs(hooked: Api) -> None:
    command = urllib.parse.urlencode(
        {
            "command": "/refund",
            "text": "order 42",
            "trigger_id": "13345224609.738474920.8088930838d88f00",
            "user_id": "U2147483697",
        }
    ).encode()
    answer = _post(hooked, "slack", command, _slack_headers(command))
    assert answer.status_code == 201, answer.text
    assert answer.json()["input"] == {"text": "order 42"}
    event = json.dumps(
        {
            "type": "event_callback",
            "event_id": "Ev08MFMKH6",
            "event": {"type": "app_mention", "text": "refund 43"},
        }
    ).encode()
    headers = _slack_headers(event, kind="application/json")
    assert _post(hooked, "slack", event, headers).status_code == 201
    assert _post(hooked, "slack", event, headers).status_code == 200  # Slack's retry
    challenge = json.dumps({"type": "url_verification", "challenge": "3eZbrw1a"}).encode()
    answer = _post(hooked, "slack", challenge, _slack_headers(challenge, kind="application/json"))
    assert answer.json() == {"challenge": "3eZbrw1a"}
    late = _post(hooked, "slack", command, _slack_headers(command, at=time.time() - 600))
    wrong = _post(hooked, "slack", command, _slack_headers(command, secret="nope"))
    assert late.status_code == 401 and wrong.status_code == 401
    assert _counts(hooked, "slack")["refused"] == {"bad signature": 1, "stale": 1}


def test_a_github_delivery_is_one_run_per_delivery_id(hooked: Api) -> None:
    body = json.dumps({"ref": "refs/heads/main", "repository": {"full_name": "o/r"}}).encode()
    mac = hmac.new(GITHUB.encode(), body, hashlib.sha256).hexdigest()
    headers = {
        "x-hub-signature-256": "sha256=" + mac,
        "x-github-delivery": "d-1",
        "x-github-event": "push",
        "content-type": "application/json",
    }
    first = _post(hooked, "gh", body, headers)
    assert first.status_code == 201, first.text
    assert first.json()["input"] == {"text": "refs/heads/main"}
    assert _post(hooked, "gh", body, headers).json()["run_id"] == first.json()["run_id"]
    bad = {**headers, "x-hub-signature-256": "sha256=" + "0" * 64}
    assert _post(hooked, "gh", body, bad).status_code == 401
    assert _post(hooked, "nope", body, headers).status_code == 404


def test_a_hooks_file_names_what_is_wrong() -> None:
    bad = {
        "hooks": {
            "std": {
                "verify": "standard-webhooks",
                "secrets": ["env:GITHUB_SECRET"],
                "workflow": "w",
                "tenant": "t",
                "input": "{a: ",
            },
            "gh": {
                "verify": "carrier-pigeon",
                "secrets": ["inline"],
                "workflow": "w",
                "tenant": "t",
            },
        }
    }
    with pytest.raises(HookSettingsError) as caught:
        parse_hooks(bad, environ=ENV)
    paths = {path for path, _ in caught.value.issues}
    assert {"hooks.std.input", "hooks.gh.verify", "hooks.gh.secrets[0]"} <= paths
