"""Delivering one notification to every target it is routed to, once per id.

For each target the ledger has not settled: attempt, and on a retriable failure wait
(capped exponential backoff with full jitter drawn from a hash of the id, the target
and the attempt, or the receiver's ``Retry-After`` when that is longer, up to
``max_retry_after``) and attempt again, up to ``retry.max_attempts`` attempts. A
permanent refusal, or the last failed attempt, goes to the dead letters (reason
``notification_undeliverable``, the detail says why) and is settled as such. The dead
letter is written before the ledger entry: a crash in between writes it twice rather
than never.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import httpx

from engine.core.outbox import Notification
from engine.core.policies import backoff_ms
from engine.notify.channel import Channel, Delivery, DeliveryError
from engine.notify.ids import notification_id
from engine.notify.ledger import DeliveryLedger, Outcome
from engine.notify.routing import ChannelKind, route
from engine.notify.settings import DeliverySettings
from engine.notify.smtp import EmailChannel
from engine.notify.webhook import WebhookChannel
from engine.runtime.clock import Clock, SystemClock

log = logging.getLogger("terranoha.notify")

T = TypeVar("T")

UNDELIVERABLE = "notification_undeliverable"
"""The dead-letter reason of a delivery given up on."""

DeadLetterSink = Callable[[Delivery, str], Awaitable[None]]
"""Writes a dead letter for a delivery given up on, with the detail; the backend knows
where the notification came from."""


@dataclass(slots=True)
class NotifierStats:
    notifications: int = 0
    """Notifications handled (every target settled)."""
    delivered: int = 0
    """Deliveries made (one per notification and target)."""
    already_settled: int = 0
    """Deliveries skipped because the ledger had them settled: redeliveries."""
    retries: int = 0
    """Failed attempts followed by another."""
    dead_lettered: int = 0
    unrouted: int = 0
    """Notifications no route matched."""


def retry_delay_ms(
    settings: DeliverySettings, delivery: Delivery, attempt: int, retry_after_ms: int | None
) -> int:
    """The wait after failed attempt ``attempt`` (1-based): the retry policy's capped,
    jittered backoff (jitter drawn from the id, the target and the attempt), or the
    receiver's ``Retry-After`` when longer, up to ``max_retry_after``."""
    delay = backoff_ms(settings.retry, delivery.notification_id, str(delivery.target), attempt)
    if retry_after_ms is not None:
        delay = max(delay, min(retry_after_ms, settings.max_retry_after))
    return delay


class Deliverer:
    """Routes a notification, skips what the ledger has settled, delivers the rest."""

    def __init__(
        self,
        settings: DeliverySettings,
        ledger: DeliveryLedger,
        channels: Mapping[ChannelKind, Channel],
        clock: Clock | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        stats: NotifierStats | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.channels = dict(channels)
        self.clock = clock or SystemClock()
        self.sleep = sleep
        self.stats = stats if stats is not None else NotifierStats()
        self._in_flight: dict[str, asyncio.Future[None]] = {}

    async def deliver(self, note: Notification, dead_letter: DeadLetterSink) -> None:
        """Settle every target of ``note``: delivered, or dead-lettered. A second copy
        of a notification in hand waits for the first, then finds it settled."""
        nid = notification_id(note)
        while (earlier := self._in_flight.get(nid)) is not None:
            await asyncio.wait([earlier])
        done = asyncio.get_running_loop().create_future()
        self._in_flight[nid] = done
        try:
            await self._deliver(nid, note, dead_letter)
        finally:
            del self._in_flight[nid]
            done.set_result(None)
        self.stats.notifications += 1

    async def _deliver(self, nid: str, note: Notification, dead_letter: DeadLetterSink) -> None:
        targets = route(note, self.settings)
        if not targets:
            self.stats.unrouted += 1
            log.warning(
                "notification %s (%s of run %s step %s, for %s) matches no route; "
                "add one to the delivery settings",
                nid,
                note.kind,
                note.run_id,
                note.step,
                ", ".join(note.recipients) or "nobody",
            )
        else:
            settled = await self.ledger.outcomes(nid)
            pending = [t for t in targets if t not in settled]
            self.stats.already_settled += len(targets) - len(pending)
            async with asyncio.TaskGroup() as group:
                for target in pending:
                    group.create_task(self._settle(Delivery(note, nid, target), dead_letter))

    async def _settle(self, delivery: Delivery, dead_letter: DeadLetterSink) -> None:
        channel = self.channels[delivery.target.channel]
        limit = self.settings.retry.max_attempts
        attempt = 0
        while True:
            attempt += 1
            try:
                await channel.send(delivery)
            except DeliveryError as exc:
                if exc.retriable and attempt < limit:
                    delay = retry_delay_ms(self.settings, delivery, attempt, exc.retry_after_ms)
                    self.stats.retries += 1
                    log.info(
                        "notification %s to %s: %s; attempt %d of %d in %d ms",
                        delivery.notification_id,
                        delivery.target,
                        exc,
                        attempt + 1,
                        limit,
                        delay,
                    )
                    await self.sleep(delay / 1000)
                    continue
                why = (
                    f"gave up after {attempt} attempts"
                    if exc.retriable
                    else "a permanent refusal, not retried"
                )
                detail = (
                    f"{delivery.target} for notification {delivery.notification_id}: {exc} ({why})"
                )
                await dead_letter(delivery, detail)
                await self.ledger.record(
                    delivery.notification_id,
                    delivery.target,
                    Outcome.DEAD_LETTERED,
                    attempt,
                    detail,
                )
                self.stats.dead_lettered += 1
                log.warning("dead letter: %s", detail)
                return
            await self.ledger.record(
                delivery.notification_id, delivery.target, Outcome.DELIVERED, attempt
            )
            self.stats.delivered += 1
            return


@contextlib.asynccontextmanager
async def open_deliverer(
    settings: DeliverySettings,
    ledger: DeliveryLedger,
    clock: Clock | None = None,
    stats: NotifierStats | None = None,
) -> AsyncIterator[Deliverer]:
    """A ``Deliverer`` with the channels the settings need; their connections are
    closed on leaving."""
    clock = clock or SystemClock()
    async with httpx.AsyncClient(follow_redirects=False) as client:
        channels: dict[ChannelKind, Channel] = {
            ChannelKind.WEBHOOK: WebhookChannel(settings.webhooks, client, clock)
        }
        if settings.smtp is not None:
            channels[ChannelKind.EMAIL] = EmailChannel(settings.smtp)
        yield Deliverer(settings, ledger, channels, clock, stats=stats)


async def persistently(
    what: str,
    step: Callable[[], Awaitable[T]],
    transient: Callable[[Exception], bool],
    max_backoff_s: float = 5.0,
) -> T:
    """Run ``step`` until it succeeds, waiting after each failure ``transient`` accepts
    (a database restarting, a broker hiccup): a delivery made must not be forgotten."""
    backoff = 0.1
    while True:
        try:
            return await step()
        except Exception as exc:
            if not transient(exc):
                raise
            log.warning("%s failed (%r); retrying in %.1fs", what, exc, backoff)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, max_backoff_s)
