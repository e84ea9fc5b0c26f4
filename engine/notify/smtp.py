"""Email delivery through an SMTP server (``aiosmtplib``), one message per address.

The message's ``Message-ID`` is derived from the notification id and the address, and
``X-Terranoha-Notification-Id`` carries the id: a message sent again after a crash is
recognisable as the same one. 4xx replies, timeouts and lost connections are worth
retrying; 5xx replies (a refused recipient, failed authentication) are permanent.
"""

from __future__ import annotations

import email.utils
import hashlib
from email.message import EmailMessage

import aiosmtplib

from engine.core.outbox import NotificationKind
from engine.notify.channel import Delivery, DeliveryError
from engine.notify.settings import SmtpServer, TlsMode

SUBJECTS: dict[str, str] = {
    NotificationKind.APPROVAL_REQUESTED: "Approval needed",
    NotificationKind.APPROVAL_REMINDER: "Reminder: approval still needed",
    NotificationKind.ESCALATED: "Escalated",
    NotificationKind.SCHEDULE_MISSED: "Schedule missed nominal times",
}
DECIDABLE = frozenset({NotificationKind.APPROVAL_REQUESTED, NotificationKind.APPROVAL_REMINDER})


def message(delivery: Delivery, sender: str) -> EmailMessage:
    """The email for one address."""
    note = delivery.notification
    address = delivery.target.name
    digest = hashlib.blake2b(address.casefold().encode(), digest_size=6).hexdigest()
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = address
    about = f"step {note.step} of run {note.run_id}" if note.run_id else note.step
    mail["Subject"] = f"[terranoha] {SUBJECTS.get(note.kind, note.kind)}: {about}"
    mail["Date"] = email.utils.formatdate(note.ts / 1000, usegmt=True)
    mail["Message-ID"] = f"<{delivery.notification_id}.{digest}@terranoha>"
    mail["X-Terranoha-Notification-Id"] = delivery.notification_id
    lines = [note.message, "", f"run:        {note.run_id}", f"step:       {note.step}"]
    if note.approval_id:
        lines.append(f"approval:   {note.approval_id}")
    lines += [
        f"for:        {', '.join(note.recipients)}",
        f"tenant:     {note.tenant}",
        f"kind:       {note.kind}",
        f"id:         {delivery.notification_id}",
    ]
    if note.kind in DECIDABLE:
        lines += [
            "",
            f"Decide with: terranoha approve {note.run_id} {note.step} --as YOU [--reject]",
        ]
    mail.set_content("\n".join(lines) + "\n")
    return mail


class EmailChannel:
    """Sends each message on a connection of its own: notifications are rare, and a
    connection that the server closed in between cannot fail the next one."""

    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def send(self, delivery: Delivery) -> None:
        server = self.server
        where = f"SMTP {server.host}:{server.effective_port}"
        password = server.password.get_secret_value() if server.password else None
        try:
            await aiosmtplib.send(
                message(delivery, server.sender),
                hostname=server.host,
                port=server.effective_port,
                username=server.username,
                password=password,
                use_tls=server.tls is TlsMode.IMPLICIT,
                start_tls=server.tls is TlsMode.STARTTLS,
                timeout=server.timeout / 1000,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            said = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
            raise DeliveryError(
                f"{where} refused {delivery.target.name}: {said}",
                retriable=all(400 <= c < 500 for c in codes),
            ) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise DeliveryError(
                f"{where} replied {exc.code} {exc.message}", retriable=400 <= exc.code < 500
            ) from None
        except (
            aiosmtplib.SMTPTimeoutError,
            aiosmtplib.SMTPServerDisconnected,
            aiosmtplib.SMTPConnectError,
            OSError,
        ) as exc:
            raise DeliveryError(f"{where} unreachable: {exc}", retriable=True) from None
        except aiosmtplib.SMTPException as exc:
            # e.g. STARTTLS or AUTH not offered: the settings and the server disagree.
            raise DeliveryError(
                f"{where}: {exc}; check the smtp settings (tls, username)", retriable=False
            ) from None
