"""Email delivery on the embedded store, to a real SMTP server (aiosmtpd) on loopback."""

from __future__ import annotations

from pathlib import Path

from engine.embedded.store import Store
from engine.notify import UNDELIVERABLE, DeliverySettings, notification_id
from tests.notify.helpers import deliver_pending, note, settings, write_notifications
from tests.notify.servers import SmtpSink


def _email_settings(sink: SmtpSink, *addresses: str, **smtp: object) -> DeliverySettings:
    return settings(
        {
            "smtp": {
                "host": "127.0.0.1",
                "port": sink.port,
                "from": "Terranoha <t@example.com>",
                "tls": "none",
                **smtp,
            },
            "routes": [{"recipients": ["finance"], "email": list(addresses)}],
        }
    )


def test_a_notification_is_mailed_to_each_address_of_its_route(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    sent = note()
    write_notifications(db, sent)
    with SmtpSink() as sink:
        notifier = deliver_pending(db, _email_settings(sink, "ann@example.com", "bob@example.com"))
    assert notifier.stats.delivered == 2
    by_address = {rcpts[0]: (sender, mail) for sender, rcpts, mail in sink.messages}
    assert sorted(by_address) == ["ann@example.com", "bob@example.com"]
    sender, mail = by_address["ann@example.com"]
    assert sender == "t@example.com"
    assert mail["From"] == "Terranoha <t@example.com>"
    assert mail["To"] == "ann@example.com"
    assert mail["Subject"] == "[terranoha] Approval needed: step refund of run run-1"
    assert mail["X-Terranoha-Notification-Id"] == notification_id(sent)
    assert mail["Message-ID"].startswith(f"<{notification_id(sent)}.")
    assert mail["Message-ID"] != by_address["bob@example.com"][1]["Message-ID"]
    body = mail.get_content()
    assert sent.message in body
    assert "approval:   refund#1/approval@7" in body
    assert "terranoha approve run-1 refund --as YOU" in body


def test_a_temporary_refusal_is_retried_and_mailed_once(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    write_notifications(db, note())
    with SmtpSink(rcpt_script=["451 4.3.0 mailbox busy, try later"]) as sink:
        notifier = deliver_pending(db, _email_settings(sink, "ann@example.com"))
        store = Store(db)
        try:
            store.set_offset("notifier", 0)  # redelivered: the ledger has it
        finally:
            store.close()
        again = deliver_pending(db, _email_settings(sink, "ann@example.com"))
    assert sink.attempts == 2
    assert len(sink.messages) == 1
    assert (notifier.stats.retries, notifier.stats.delivered) == (1, 1)
    assert again.stats.already_settled == 1


def test_a_refused_address_is_dead_lettered_and_the_others_are_mailed(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    write_notifications(db, note())
    with SmtpSink(refuse={"gone@example.com": "550 5.1.1 no such user"}) as sink:
        notifier = deliver_pending(db, _email_settings(sink, "gone@example.com", "ann@example.com"))
    assert sink.attempts == 2, "one attempt each: a 5xx is not retried"
    assert [rcpts for _, rcpts, _ in sink.messages] == [["ann@example.com"]]
    assert (notifier.stats.dead_lettered, notifier.stats.delivered) == (1, 1)
    store = Store(db)
    try:
        (dead,) = store.dead_letters()
    finally:
        store.close()
    assert dead.reason == UNDELIVERABLE
    assert dead.detail.startswith("email gone@example.com for notification ntf_")
    assert "550 5.1.1 no such user" in dead.detail and "permanent" in dead.detail
