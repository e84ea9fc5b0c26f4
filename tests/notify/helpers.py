"""Notifications, settings and the embedded store for the notifier's tests."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.core.outbox import Notification
from engine.embedded.store import Store
from engine.notify import DeliverySettings, EmbeddedNotifier, parse_settings
from engine.runtime.processor import Batch

FAST_RETRY = {
    "max_attempts": 4,
    "initial": "10ms",
    "multiplier": 2,
    "max": "40ms",
    "jitter": "none",
}


def note(**changes: Any) -> Notification:
    base = Notification(
        kind="approval_requested",
        run_id="run-1",
        step="refund",
        approval_id="refund#1/approval@7",
        recipients=["finance"],
        message="approval needed for step refund (approval), quorum 1",
        ts=1_700_000_000_123,
        tenant="acme",
        correlation_id="corr-1",
    )
    return replace(base, **changes)


def settings(data: dict[str, Any], secrets: dict[str, str] | None = None) -> DeliverySettings:
    return parse_settings({"retry": FAST_RETRY, **data}, environ=secrets or {})


def webhook_settings(url: str, *secrets: str, **route: Any) -> DeliverySettings:
    names = {f"SECRET_{i}": s for i, s in enumerate(secrets)}
    return settings(
        {
            "webhooks": {"ops": {"url": url, "secrets": [f"env:{n}" for n in names]}},
            "routes": [{"webhooks": ["ops"], **route}],
        },
        names,
    )


def write_notifications(db: Path, *notes: Notification) -> None:
    """As the embedded engine writes them: in a batch."""
    store = Store(db)
    try:
        store.write_batch(Batch(notifications=list(notes)), consumer="tests")
    finally:
        store.close()


def deliver_pending(
    db: Path, delivery: DeliverySettings, notifier: EmbeddedNotifier | None = None
) -> EmbeddedNotifier:
    """Run a notifier over the store until every notification present is handled."""
    notifier = notifier or EmbeddedNotifier(db, delivery)
    asyncio.run(notifier.run(asyncio.Event(), once=True))
    return notifier
