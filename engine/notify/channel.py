"""What every delivery channel (webhook, email) shares: one delivery, and how it fails."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from engine.core.errors import TerranohaError
from engine.core.outbox import Notification
from engine.notify.routing import Target


@dataclass(frozen=True, slots=True)
class Delivery:
    """One notification to one target."""

    notification: Notification
    notification_id: str
    target: Target


class DeliveryError(TerranohaError):
    """A delivery attempt failed. ``retriable`` says whether another attempt can help;
    ``retry_after_ms`` is the receiver's own wish (``Retry-After``), if it said one.
    The message names the target by what may be shown (never a secret or a URL's path)."""

    def __init__(self, message: str, *, retriable: bool, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.retriable = retriable
        self.retry_after_ms = retry_after_ms


class Channel(Protocol):
    async def send(self, delivery: Delivery) -> None:
        """Deliver, or raise ``DeliveryError``."""
        ...
