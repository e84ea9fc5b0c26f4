"""The delivery settings document, routing and notification ids: pure, no servers."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import pytest

from engine.core.outbox import Notification
from engine.notify import (
    ChannelKind,
    Delivery,
    SettingsError,
    Target,
    load_settings,
    parse_settings,
    route,
)
from engine.notify import notification_id as nid
from engine.notify.deliver import retry_delay_ms
from engine.notify.ids import ID_FIELDS
from engine.notify.webhook import retry_after_ms
from tests.notify.helpers import note
from tests.notify.servers import new_secret

SECRET = new_secret()

DOCUMENT = """
webhooks:
  ops:
    url: https://hooks.example.com/terranoha?token=abc
    secrets: [env:OPS_SECRET, file:old-secret]
    timeout: 5s
smtp:
  host: smtp.example.com
  from: Terranoha <terranoha@example.com>
  username: terranoha
  password: env:SMTP_PASSWORD
routes:
  - recipients: [finance]
    webhooks: [ops]
    email: [finance@example.com]
  - kinds: [escalated]
    tenants: [acme]
    email: [oncall@example.com, finance@example.com]
retry: {max_attempts: 5, initial: 1s, max: 1m}
max_retry_after: 10m
"""


def _load(tmp_path: Path, text: str = DOCUMENT, **environ: str):  # type: ignore[no-untyped-def]
    (tmp_path / "old-secret").write_text(SECRET + "\n")
    path = tmp_path / "notify.yaml"
    path.write_text(text)
    return load_settings(path, {"OPS_SECRET": SECRET, "SMTP_PASSWORD": "hunter2", **environ})


def test_a_settings_file_resolves_its_secrets_and_never_shows_them(tmp_path: Path) -> None:
    settings = _load(tmp_path)
    ops = settings.webhooks["ops"]
    assert [s.get_secret_value() for s in ops.secrets] == [SECRET, SECRET]
    assert ops.timeout == 5000 and ops.origin == "https://hooks.example.com"
    assert settings.smtp is not None and settings.smtp.effective_port == 587
    assert settings.smtp.password is not None
    assert settings.smtp.password.get_secret_value() == "hunter2"
    assert settings.retry.max_attempts == 5 and settings.max_retry_after == 600_000
    shown = repr(settings) + str(settings)
    assert SECRET not in shown and "hunter2" not in shown


def test_every_problem_in_the_settings_is_reported_at_once_without_secret_values(
    tmp_path: Path,
) -> None:
    text = DOCUMENT.replace("env:SMTP_PASSWORD", "hunter2").replace("[ops]", "[opz]")
    text = text.replace("file:old-secret", "file:missing-secret")
    with pytest.raises(SettingsError) as caught:
        _load(tmp_path, text, OPS_SECRET="")
    assert caught.value.issues == [
        ("webhooks.ops.secrets[0]", "environment variable OPS_SECRET is not set (or empty)"),
        (
            "webhooks.ops.secrets[1]",
            f"cannot read secret file {tmp_path / 'missing-secret'}: No such file or directory",
        ),
        ("smtp.password", "write a secret as env:NAME or file:PATH, never inline"),
        ("routes[0].webhooks", "no webhook named 'opz' (known: ops)"),
    ]
    assert "hunter2" not in str(caught.value)


def test_routes_must_name_known_webhooks_and_have_smtp_for_email() -> None:
    with pytest.raises(SettingsError) as caught:
        parse_settings(
            {
                "routes": [
                    {"webhooks": ["ops"]},
                    {"email": ["a@example.com"]},
                    {"recipients": ["x"]},
                    {"kinds": ["nope"], "webhooks": ["ops"]},
                ]
            }
        )
    message = str(caught.value)
    assert "routes[2]: a route needs webhooks or email" in message
    assert "routes[3].kinds[0]" in message
    with pytest.raises(SettingsError) as caught:
        parse_settings({"routes": [{"webhooks": ["ops"]}, {"email": ["a@example.com"]}]})
    message = str(caught.value)
    assert "routes[0].webhooks: no webhook named 'ops' (known: none)" in message
    assert "routes[1].email: sending email needs an smtp section" in message


def test_a_webhook_secret_must_be_a_standard_webhooks_secret() -> None:
    with pytest.raises(SettingsError, match="not a Standard Webhooks secret"):
        parse_settings(
            {
                "webhooks": {"ops": {"url": "https://h", "secrets": ["env:S"]}},
                "routes": [{"webhooks": ["ops"]}],
            },
            environ={"S": "whsec_!!"},
        )


def test_a_notification_goes_to_every_target_of_every_route_it_matches_once(tmp_path: Path) -> None:
    settings = _load(tmp_path)
    webhook = Target(ChannelKind.WEBHOOK, "ops")
    finance = Target(ChannelKind.EMAIL, "finance@example.com")
    oncall = Target(ChannelKind.EMAIL, "oncall@example.com")
    assert route(note(recipients=["Finance "]), settings) == [webhook, finance]
    assert route(note(recipients=["finance-leads"], kind="escalated"), settings) == [
        oncall,
        finance,
    ]
    assert route(note(recipients=["finance"], kind="escalated"), settings) == [
        webhook,
        finance,
        oncall,
    ]
    assert route(note(recipients=["legal"], kind="escalated", tenant="other"), settings) == []


def test_the_id_is_the_same_for_the_same_record_and_differs_when_any_field_does() -> None:
    base = note()
    assert nid(base) == nid(note()) == nid(replace(base, recipients=list(base.recipients)))
    assert nid(base).startswith("ntf_") and len(nid(base)) == 36
    assert set(ID_FIELDS) == {f.name for f in fields(Notification)}
    changed = {
        "kind": "approval_reminder",
        "run_id": "run-2",
        "step": "other",
        "approval_id": "refund#2/approval@9",
        "recipients": ["legal"],
        "message": "reminder 2",
        "ts": base.ts + 1,
        "tenant": "other",
        "correlation_id": "corr-2",
    }
    ids = {nid(replace(base, **{name: value})) for name, value in changed.items()}
    assert len(ids) == len(changed) and nid(base) not in ids


def test_a_longer_retry_after_is_honoured_up_to_its_cap(tmp_path: Path) -> None:
    settings = parse_settings(
        {
            "webhooks": {"ops": {"url": "https://h", "secrets": ["env:S"]}},
            "routes": [{"webhooks": ["ops"]}],
            "retry": {"initial": "1s", "max": "8s", "jitter": "none"},
            "max_retry_after": "30s",
        },
        environ={"S": SECRET},
    )
    delivery = Delivery(note(), nid(note()), Target(ChannelKind.WEBHOOK, "ops"))
    assert [retry_delay_ms(settings, delivery, n, None) for n in (1, 2, 3, 4, 5)] == [
        1000,
        2000,
        4000,
        8000,
        8000,
    ]
    assert retry_delay_ms(settings, delivery, 1, 20_000) == 20_000
    assert retry_delay_ms(settings, delivery, 4, 2_000) == 8000
    assert retry_delay_ms(settings, delivery, 1, 3_600_000) == 30_000
    jittered = settings.model_copy(
        update={"retry": settings.retry.model_copy(update={"jitter": "full"})}
    )
    draws = [retry_delay_ms(jittered, delivery, 3, None) for _ in range(3)]
    assert len(set(draws)) == 1 and 0 <= draws[0] < 4000, "jitter is drawn from a hash"


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    now = 1_700_000_000_000
    assert retry_after_ms("120", now) == 120_000
    assert retry_after_ms("Tue, 14 Nov 2023 22:14:20 GMT", now) == 60_000
    assert retry_after_ms("Tue, 14 Nov 2023 22:00:00 GMT", now) == 0
    assert retry_after_ms("soon", now) is None
    assert retry_after_ms(None, now) is None
