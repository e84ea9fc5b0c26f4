"""Which targets a notification goes to: a pure function of the record and the settings."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from engine.core.outbox import Notification
from engine.notify.settings import DeliverySettings, Route


class ChannelKind(StrEnum):
    WEBHOOK = "webhook"
    EMAIL = "email"


@dataclass(frozen=True, slots=True)
class Target:
    """One place a notification is delivered to: a webhook endpoint by its name in the
    settings, or an email address. Delivery is once per (notification id, target)."""

    channel: ChannelKind
    name: str

    def __str__(self) -> str:
        return f"{self.channel.value} {self.name}"


def _norm(name: str) -> str:
    return name.strip().casefold()


def matches(route: Route, note: Notification) -> bool:
    if route.kinds and note.kind not in route.kinds:
        return False
    if route.tenants and note.tenant not in route.tenants:
        return False
    if route.recipients:
        wanted = {_norm(r) for r in route.recipients}
        return any(_norm(r) in wanted for r in note.recipients)
    return True


def route(note: Notification, settings: DeliverySettings) -> list[Target]:
    """Every target of every route ``note`` matches, each once, in settings order."""
    targets: dict[Target, None] = {}
    for candidate in settings.routes:
        if matches(candidate, note):
            for name in candidate.webhooks:
                targets[Target(ChannelKind.WEBHOOK, name)] = None
            for address in candidate.email:
                targets[Target(ChannelKind.EMAIL, address)] = None
    return list(targets)
