"""The delivery ledger: which (notification id, target) pairs are settled, and how.

The notifier looks a notification's id up before it sends, and records each target's
outcome after: a redelivered notification (a crash before its offset or position was
stored, a duplicate record) finds its targets settled and is not sent again. A send
that succeeded just before a crash, before the record was written, is sent once more;
receivers de-duplicate by the id (``webhook-id``, the email's ``Message-ID``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import StrEnum

from engine.notify.routing import Target


class Outcome(StrEnum):
    DELIVERED = "delivered"
    DEAD_LETTERED = "dead_lettered"
    """Given up on (a permanent refusal, or every attempt failed) and written to the
    dead letters: settled too, so a redelivery does not start over."""


class DeliveryLedger(ABC):
    """Settled deliveries by (notification id, target). ``SqliteDeliveryLedger`` keeps
    them in the embedded store, ``PostgresDeliveryLedger`` in PostgreSQL."""

    @abstractmethod
    async def outcomes(self, notification_id: str) -> dict[Target, Outcome]:
        """The targets of ``notification_id`` already settled, with their outcome."""

    @abstractmethod
    async def record(
        self,
        notification_id: str,
        target: Target,
        outcome: Outcome,
        attempts: int,
        detail: str = "",
    ) -> bool:
        """Settle a target; False if it was settled already (the first outcome stays)."""

    async def close(self) -> None:  # noqa: B027 - most ledgers hold nothing to close
        """Release the ledger's connection, if it holds one."""
