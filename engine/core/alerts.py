"""Alerts: what an operator is told about flow control, as records of their own.

``alerts_of`` derives them from admission events, so an alert is written in the very
transaction that decided what it reports, and its id is a function of that event: a
delivery that sees the same alert twice can drop the second by id.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from engine.core import admission as ad
from engine.core.durations import format_duration


class AlertKind(StrEnum):
    BREAKER_OPENED = "breaker_opened"
    BREAKER_CLOSED = "breaker_closed"
    BUDGET_WARNING = "budget_warning"
    BUDGET_EXHAUSTED = "budget_exhausted"
    LEASE_EXPIRED = "lease_expired"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True, slots=True)
class Alert:
    alert_id: str
    """``<kind>:<key>:<at>[:<request>]``: the same event always gives the same id."""
    kind: AlertKind
    severity: Severity
    key: str
    at: int
    message: str
    details: Any = None


def alerts_of(event: ad.AdmissionEvent) -> list[Alert]:
    """The alerts one admission event raises (most raise none)."""
    key, at = event.key, event.at

    def alert(
        kind: AlertKind, severity: Severity, message: str, details: Any, suffix: str = ""
    ) -> list[Alert]:
        return [
            Alert(f"{kind.value}:{key}:{at}{suffix}", kind, severity, key, at, message, details)
        ]

    if isinstance(event, ad.BreakerOpened):
        return alert(
            AlertKind.BREAKER_OPENED,
            Severity.CRITICAL,
            f"breaker of {key} opened ({event.failure_rate:.0%} of calls failed or "
            f"were slow; trip {event.trips}); dispatch held for "
            f"{format_duration(event.until - at)}",
            {"until": event.until, "trips": event.trips, "failure_rate": event.failure_rate},
        )
    if isinstance(event, ad.BreakerClosed):
        return alert(
            AlertKind.BREAKER_CLOSED,
            Severity.INFO,
            f"breaker of {key} closed: its canary calls succeeded",
            None,
        )
    if isinstance(event, ad.BudgetWarned):
        return alert(
            AlertKind.BUDGET_WARNING,
            Severity.WARNING,
            f"{key} has spent {event.spent:g} of its budget of {event.amount:g}",
            {"spent": event.spent, "amount": event.amount},
        )
    if isinstance(event, ad.BudgetExhausted):
        return alert(
            AlertKind.BUDGET_EXHAUSTED,
            Severity.CRITICAL,
            f"{key} has no budget left for its next request ({event.spent:g} of "
            f"{event.amount:g} spent); the window turns at {event.until}",
            {"spent": event.spent, "amount": event.amount, "until": event.until},
        )
    if isinstance(event, ad.Released) and event.reason is ad.ReleaseReason.EXPIRED:
        return alert(
            AlertKind.LEASE_EXPIRED,
            Severity.WARNING,
            f"the slot of {event.request_id} on {key} expired after "
            f"{format_duration(event.latency_ms)} without a release (a crashed or "
            "stuck worker); it went to the next request",
            {"request_id": event.request_id},
            suffix=f":{event.request_id}",
        )
    return []
