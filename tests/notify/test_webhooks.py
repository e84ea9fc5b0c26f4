"""Webhook delivery on the embedded store, to a real HTTP server on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from engine.codec import decode
from engine.embedded.store import Store
from engine.notify import UNDELIVERABLE, notification_id
from tests.notify.helpers import deliver_pending, note, webhook_settings, write_notifications
from tests.notify.servers import Answer, new_secret, webhook_receiver


def test_a_notification_arrives_signed_as_a_standard_webhook(tmp_path: Path) -> None:
    secret = new_secret()
    db = tmp_path / "s.db"
    sent = note()
    write_notifications(db, sent)
    with webhook_receiver() as receiver:
        notifier = deliver_pending(db, webhook_settings(receiver.url, secret))
    assert notifier.stats.delivered == 1
    (request,) = receiver.received
    assert request.path == "/hooks/terranoha?token=s3cr3t"
    assert request.headers["webhook-id"] == notification_id(sent)
    assert request.headers["content-type"] == "application/json"
    event = Webhook(secret).verify(request.body, request.headers)
    assert event["type"] == "notification.approval_requested"
    assert event["timestamp"] == "2023-11-14T22:13:20.123Z"
    assert event["data"] == {
        "id": notification_id(sent),
        "kind": "approval_requested",
        "run_id": "run-1",
        "step": "refund",
        "approval_id": "refund#1/approval@7",
        "recipients": ["finance"],
        "message": sent.message,
        "ts": sent.ts,
        "tenant": "acme",
        "correlation_id": "corr-1",
    }
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(request.body, request.headers)


def test_during_a_rotation_both_secrets_sign_each_request(tmp_path: Path) -> None:
    old, new = new_secret(), new_secret()
    db = tmp_path / "s.db"
    write_notifications(db, note())
    with webhook_receiver() as receiver:
        deliver_pending(db, webhook_settings(receiver.url, new, old))
    (request,) = receiver.received
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):  # a receiver still on the old secret, and one moved on
        assert Webhook(secret).verify(request.body, request.headers)["data"]["step"] == "refund"


def test_a_failing_endpoint_is_retried_until_it_accepts_and_is_delivered_once(
    tmp_path: Path,
) -> None:
    db = tmp_path / "s.db"
    write_notifications(db, note())
    script = [Answer(500), Answer(503, {"retry-after": "0"}), Answer(429), Answer(200)]
    with webhook_receiver(script, default=Answer(500)) as receiver:
        notifier = deliver_pending(db, webhook_settings(receiver.url, new_secret()))
    assert len(receiver.received) == 4
    assert {r.headers["webhook-id"] for r in receiver.received} == {notification_id(note())}
    assert (notifier.stats.delivered, notifier.stats.retries, notifier.stats.dead_lettered) == (
        1,
        3,
        0,
    )
    store = Store(db)
    try:
        assert store.dead_letters() == []
    finally:
        store.close()
    # Redelivered from the start: the ledger has it, nothing is sent again.
    with webhook_receiver() as again:
        _rewind(db)
        notifier = deliver_pending(db, webhook_settings(again.url, new_secret()))
    assert again.received == []
    assert notifier.stats.already_settled == 1


def test_a_permanent_refusal_is_dead_lettered_without_a_retry(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    sent = note()
    write_notifications(db, sent)
    with webhook_receiver(default=Answer(400, body="unknown field 'kind'")) as receiver:
        notifier = deliver_pending(db, webhook_settings(receiver.url, new_secret()))
    assert len(receiver.received) == 1
    assert notifier.stats.dead_lettered == 1
    (dead,) = _dead_letters(db)
    assert dead.reason == UNDELIVERABLE
    assert dead.run_id == "run-1"
    assert dead.source == "notifications"
    assert decode(dead.payload) == sent
    assert "answered 400 Bad Request: unknown field 'kind'" in dead.detail
    assert "permanent" in dead.detail and notification_id(sent) in dead.detail
    assert "token" not in dead.detail and "/hooks" not in dead.detail  # no path, no query
    # Settled as dead-lettered: a redelivery neither sends nor dead-letters it again.
    with webhook_receiver() as again:
        _rewind(db)
        deliver_pending(db, webhook_settings(again.url, new_secret()))
    assert again.received == []
    assert len(_dead_letters(db)) == 1


def test_an_endpoint_that_keeps_failing_is_dead_lettered_after_the_last_attempt(
    tmp_path: Path,
) -> None:
    db = tmp_path / "s.db"
    write_notifications(db, note())
    with webhook_receiver(default=Answer(502)) as receiver:
        notifier = deliver_pending(db, webhook_settings(receiver.url, new_secret()))
    assert len(receiver.received) == 4  # FAST_RETRY's max_attempts
    assert notifier.stats.retries == 3
    (dead,) = _dead_letters(db)
    assert "answered 502 Bad Gateway" in dead.detail
    assert "gave up after 4 attempts" in dead.detail


def test_an_unreachable_endpoint_is_retried_then_dead_lettered(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    write_notifications(db, note())
    with webhook_receiver() as receiver:
        url = receiver.url
    notifier = deliver_pending(db, webhook_settings(url, new_secret()))  # nobody listens
    assert notifier.stats.retries == 3
    (dead,) = _dead_letters(db)
    assert "unreachable" in dead.detail and "gave up after 4 attempts" in dead.detail


def test_the_same_notification_twice_in_the_log_is_sent_once(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    write_notifications(db, note(), note(), note(kind="approval_reminder", ts=note().ts + 1))
    with webhook_receiver() as receiver:
        notifier = deliver_pending(db, webhook_settings(receiver.url, new_secret()))
    kinds = [json.loads(r.body)["type"] for r in receiver.received]
    assert sorted(kinds) == ["notification.approval_reminder", "notification.approval_requested"]
    assert notifier.stats.already_settled == 1


def test_notifications_no_route_matches_are_passed_over(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    write_notifications(db, note(recipients=["legal"]), note(recipients=[" FINANCE"]))
    with webhook_receiver() as receiver:
        notifier = deliver_pending(
            db, webhook_settings(receiver.url, new_secret(), recipients=["finance"])
        )
    assert len(receiver.received) == 1
    assert (notifier.stats.delivered, notifier.stats.unrouted) == (1, 1)
    store = Store(db)
    try:
        assert store.offset("notifier") == 2, "both are handled: the position moved past them"
    finally:
        store.close()


def _rewind(db: Path) -> None:
    """As if the notifier had crashed before storing its position."""
    store = Store(db)
    try:
        store.set_offset("notifier", 0)
    finally:
        store.close()


def _dead_letters(db: Path) -> list:  # type: ignore[type-arg]
    store = Store(db)
    try:
        return store.dead_letters()
    finally:
        store.close()
