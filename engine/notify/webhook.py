"""Webhook delivery, signed as Standard Webhooks (https://www.standardwebhooks.com).

Each request is a POST of JSON::

    {"type": "notification.approval_requested", "timestamp": "2025-01-02T03:04:05.678Z",
     "data": {"id": "ntf_...", "kind": ..., "run_id": ..., "step": ..., "approval_id": ...,
              "recipients": [...], "message": ..., "ts": ..., "tenant": ...,
              "correlation_id": ...}}

with ``webhook-id`` (the notification id, the same on every attempt: receivers
de-duplicate by it), ``webhook-timestamp`` (the attempt's time, in seconds) and
``webhook-signature`` (one ``v1,<base64>`` per configured secret, space-separated).
Any Standard Webhooks verifier checks it, e.g. Python's
``standardwebhooks.Webhook(secret).verify(body, headers)``.

A 2xx answer delivers. 408, 429, 5xx, timeouts and connection errors are worth
retrying, honouring ``Retry-After``; every other answer is a permanent refusal.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
from collections.abc import Mapping
from typing import Any

import httpx
from standardwebhooks import Webhook

from engine.notify.channel import Delivery, DeliveryError
from engine.notify.settings import WebhookEndpoint
from engine.runtime.clock import Clock

RETRIABLE_STATUSES = frozenset({408, 429})
BODY_EXCERPT = 200
"""How much of a refusing answer's body a dead letter keeps."""
USER_AGENT = "terranoha-notifier"


def payload(delivery: Delivery) -> bytes:
    """The request body: the notification as a Standard Webhooks event."""
    note = delivery.notification
    data = {
        "id": delivery.notification_id,
        "kind": note.kind,
        "run_id": note.run_id,
        "step": note.step,
        "approval_id": note.approval_id,
        "recipients": list(note.recipients),
        "message": note.message,
        "ts": note.ts,
        "tenant": note.tenant,
        "correlation_id": note.correlation_id,
    }
    when = dt.datetime.fromtimestamp(note.ts / 1000, tz=dt.UTC)
    event = {
        "type": f"notification.{note.kind}",
        "timestamp": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "data": data,
    }
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()


def signature(signers: list[Webhook], msg_id: str, timestamp: dt.datetime, body: str) -> str:
    """Every secret's ``v1,<base64>``, space-separated: a receiver that knows any one of
    the secrets verifies the request, so secrets rotate without a gap."""
    return " ".join(signer.sign(msg_id, timestamp, body) for signer in signers)


def retry_after_ms(value: str | None, now_ms: int) -> int | None:
    """``Retry-After`` as milliseconds from now: delta seconds or an HTTP date."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return int(text) * 1000
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0, int(when.timestamp() * 1000) - now_ms)


class WebhookChannel:
    """POSTs notifications to the named endpoints through one shared ``httpx`` client."""

    def __init__(
        self, endpoints: Mapping[str, WebhookEndpoint], client: httpx.AsyncClient, clock: Clock
    ) -> None:
        self.endpoints = dict(endpoints)
        self.client = client
        self.clock = clock
        self._signers = {
            name: [Webhook(s.get_secret_value()) for s in endpoint.secrets]
            for name, endpoint in self.endpoints.items()
        }

    async def send(self, delivery: Delivery) -> None:
        name = delivery.target.name
        endpoint = self.endpoints[name]
        body = payload(delivery)
        now = dt.datetime.fromtimestamp(self.clock.now_ms() // 1000, tz=dt.UTC)
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": delivery.notification_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature(
                self._signers[name], delivery.notification_id, now, body.decode()
            ),
        }
        where = endpoint.origin
        try:
            answer = await self.client.post(
                endpoint.url, content=body, headers=headers, timeout=endpoint.timeout / 1000
            )
        except httpx.TimeoutException as exc:
            raise DeliveryError(
                f"{where} timed out after {endpoint.timeout} ms ({type(exc).__name__})",
                retriable=True,
            ) from None
        except httpx.TransportError as exc:
            raise DeliveryError(f"{where} unreachable: {_reason(exc)}", retriable=True) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise DeliveryError(
                f"{where} refused the request before sending: {_reason(exc)}", retriable=False
            ) from None
        status = answer.status_code
        if 200 <= status < 300:
            return
        said = f"{where} answered {status} {answer.reason_phrase}{_excerpt(answer)}"
        if status >= 500 or status in RETRIABLE_STATUSES:
            raise DeliveryError(
                said,
                retriable=True,
                retry_after_ms=retry_after_ms(
                    answer.headers.get("retry-after"), self.clock.now_ms()
                ),
            )
        hint = (
            "; point the endpoint at its final URL (redirects are not followed)"
            if 300 <= status < 400
            else ""
        )
        raise DeliveryError(said + hint, retriable=False)


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _excerpt(answer: httpx.Response) -> str:
    text: Any = answer.text.strip()
    if not text:
        return ""
    return f": {text[:BODY_EXCERPT]}" + ("..." if len(text) > BODY_EXCERPT else "")
