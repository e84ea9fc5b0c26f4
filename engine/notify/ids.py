"""The id of a notification, derived from the record itself.

A ``Notification`` carries no id field, and needs none: each one is implied by one
event of one run, and its fields say which. An approval request names its approval,
whose id holds the run's sequence number at the request (``step#visit/reason@seq``); a
reminder adds its number (in the message) and its time; an escalation names the step,
the group and the time. Two records equal in every field would be the same message to
the same people about the same step at the same millisecond: one notification.

A redelivered record has the same bytes, so the same id. The id hashes the fields of
``Notification`` version 1 by name, so a later version that adds fields with defaults
gives an old record read through it the id it always had.
"""

from __future__ import annotations

import hashlib
import json

from engine.core.outbox import Notification

ID_FIELDS = (
    "kind",
    "run_id",
    "step",
    "approval_id",
    "recipients",
    "message",
    "ts",
    "tenant",
    "correlation_id",
)
"""The fields that make the id. Never change this tuple: ids already handed to
receivers (``webhook-id``) and kept in delivery ledgers would no longer match."""

PREFIX = "ntf_"


def notification_id(note: Notification) -> str:
    """``ntf_`` and 32 hex digits: the same record, the same id, on every backend."""
    canonical = json.dumps(
        [getattr(note, name) for name in ID_FIELDS], ensure_ascii=False, separators=(",", ":")
    )
    return PREFIX + hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()
