"""Webhook triggers: named endpoints (``POST /v1/hooks/{name}``) that start a run from a
signed delivery.

A hooks file names each endpoint, how its deliveries are signed and what run they start::

    hooks:
      github-push:
        verify: github                 # X-Hub-Signature-256: sha256=HMAC(secret, body)
        secrets: [env:GITHUB_HOOK_SECRET]
        workflow: build
        tenant: acme
        input: "{repo: body.repository.full_name, ref: body.ref}"   # JMESPath

``verify`` is ``standard-webhooks`` (``webhook-id``/``webhook-timestamp``/
``webhook-signature``, secrets ``whsec_...``), ``slack`` (``X-Slack-Signature`` over
``v0:timestamp:body``) or ``github``. Several secrets may be listed: a delivery signed
with any of them passes, so a secret is rotated by adding the new one first. Signed
deliveries older than ``tolerance_s`` (Standard Webhooks, Slack; GitHub signs no time)
are stale. Unsigned, badly signed and stale deliveries get 401, start nothing, and are
counted per hook and reason.

The idempotency key defaults to the delivery id (``webhook-id``, ``X-GitHub-Delivery``,
Slack's ``event_id`` or ``trigger_id``), so a redelivery is the same run; ``key`` can
compute another one by JMESPath. Expressions see ``{body, headers}`` with header names
in lower case.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.parse
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import jmespath
import yaml
from jmespath.exceptions import JMESPathError
from jmespath.parser import ParsedResult
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from engine.core.errors import TerranohaError
from engine.notify.settings import Secret


class HookSettingsError(TerranohaError):
    """The hooks file was refused; ``issues`` lists (path, message) pairs."""

    def __init__(self, source: str, issues: list[tuple[str, str]]) -> None:
        self.issues = issues
        lines = "\n".join(f"  {path}: {message}" for path, message in issues)
        super().__init__(f"hooks file {source} is invalid:\n{lines}")


class RefusedDelivery(TerranohaError):
    """A delivery failed verification; ``reason`` is what the counters count."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Scheme(StrEnum):
    STANDARD_WEBHOOKS = "standard-webhooks"
    SLACK = "slack"
    GITHUB = "github"


def _expression(value: object) -> ParsedResult:
    if isinstance(value, ParsedResult):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError("write a JMESPath expression over {body, headers}")
    try:
        return jmespath.compile(value)
    except JMESPathError as exc:
        raise ValueError(f"not a valid JMESPath expression: {exc}") from None


Expression = Annotated[Any, BeforeValidator(_expression)]


class Hook(BaseModel):
    """One named endpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    verify: Scheme
    secrets: list[Secret] = Field(min_length=1)
    workflow: str = Field(min_length=1)
    version: int = Field(0, ge=0)
    tenant: str = Field(min_length=1)
    input: Expression = Field(default_factory=lambda: jmespath.compile("body"))
    key: Expression | None = None
    tolerance_s: int = Field(300, ge=1, le=3600)

    @model_validator(mode="after")
    def _secrets_fit(self) -> Hook:
        if self.verify is Scheme.STANDARD_WEBHOOKS:
            for index, secret in enumerate(self.secrets):
                try:
                    Webhook(secret.get_secret_value())
                except Exception:
                    raise ValueError(
                        f"secrets[{index}] is not a Standard Webhooks secret; "
                        "write whsec_ followed by base64"
                    ) from None
        return self


class _HooksFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hooks: dict[str, Hook]


@dataclass
class Hooks:
    """The configured endpoints and what happened to their deliveries."""

    hooks: Mapping[str, Hook] = field(default_factory=dict)
    accepted: Counter[str] = field(default_factory=Counter)
    refused: Counter[tuple[str, str]] = field(default_factory=Counter)

    def counts(self, name: str) -> dict[str, Any]:
        return {
            "accepted": self.accepted[name],
            "refused": {
                reason: n for (hook, reason), n in sorted(self.refused.items()) if hook == name
            },
        }


def parse_hooks(
    data: object,
    source: str = "<hooks>",
    environ: Mapping[str, str] | None = None,
    base: Path | None = None,
) -> Hooks:
    import os

    context = {"environ": os.environ if environ is None else environ, "base": base or Path()}
    try:
        parsed = _HooksFile.model_validate(data, context=context)
    except ValidationError as exc:
        issues = []
        for error in exc.errors():
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
            issues.append((path.lstrip(".") or "$", error["msg"].removeprefix("Value error, ")))
        raise HookSettingsError(source, issues) from None
    return Hooks(parsed.hooks)


def load_hooks(path: str | Path) -> Hooks:
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise HookSettingsError(
            str(path), [("$", f"cannot read the file: {exc.strerror}")]
        ) from None
    except yaml.YAMLError as exc:
        raise HookSettingsError(str(path), [("$", f"not valid YAML: {exc}")]) from None
    return parse_hooks(data, str(path), base=file.resolve().parent)


# ---------------------------------------------------------------------- verification


def verify(hook: Hook, body: bytes, headers: Mapping[str, str], now_s: float | None = None) -> str:
    """Check the delivery's signature and age; return its delivery id (may be empty).
    Raises ``RefusedDelivery`` with reason ``unsigned``, ``bad signature`` or ``stale``."""
    now = time.time() if now_s is None else now_s
    secrets = [s.get_secret_value() for s in hook.secrets]
    if hook.verify is Scheme.STANDARD_WEBHOOKS:
        return _standard(secrets, body, headers, now, hook.tolerance_s)
    if hook.verify is Scheme.SLACK:
        return _slack(secrets, body, headers, now, hook.tolerance_s)
    return _github(secrets, body, headers)


def _standard(
    secrets: list[str], body: bytes, headers: Mapping[str, str], now: float, tolerance_s: int
) -> str:
    needed = ("webhook-id", "webhook-timestamp", "webhook-signature")
    if not all(headers.get(h) for h in needed):
        raise RefusedDelivery(
            "unsigned",
            "a Standard Webhooks delivery carries webhook-id, "
            "webhook-timestamp and webhook-signature",
        )
    try:
        stamp = int(headers["webhook-timestamp"])
    except ValueError:
        raise RefusedDelivery("bad signature", "webhook-timestamp is not a number") from None
    if abs(now - stamp) > tolerance_s:
        raise RefusedDelivery(
            "stale",
            f"the delivery was signed {int(now - stamp)} s ago; "
            f"at most {tolerance_s} s are accepted",
        )
    subset = {h: headers[h] for h in needed}
    for secret in secrets:
        try:
            Webhook(secret).verify(body, subset)
        except WebhookVerificationError:
            continue
        return headers["webhook-id"]
    raise RefusedDelivery("bad signature", "no configured secret made webhook-signature")


def _slack(
    secrets: list[str], body: bytes, headers: Mapping[str, str], now: float, tolerance_s: int
) -> str:
    stamp_text = headers.get("x-slack-request-timestamp", "")
    signature = headers.get("x-slack-signature", "")
    if not stamp_text or not signature:
        raise RefusedDelivery(
            "unsigned", "a Slack request carries X-Slack-Request-Timestamp and X-Slack-Signature"
        )
    try:
        stamp = int(stamp_text)
    except ValueError:
        raise RefusedDelivery(
            "bad signature", "X-Slack-Request-Timestamp is not a number"
        ) from None
    if abs(now - stamp) > tolerance_s:
        raise RefusedDelivery(
            "stale",
            f"the request was signed {int(now - stamp)} s ago; "
            f"at most {tolerance_s} s are accepted",
        )
    base = b"v0:" + stamp_text.encode() + b":" + body
    if not any(
        hmac.compare_digest(
            "v0=" + hmac.new(s.encode(), base, hashlib.sha256).hexdigest(), signature
        )
        for s in secrets
    ):
        raise RefusedDelivery("bad signature", "no configured secret made X-Slack-Signature")
    doc = parse_body(body, headers)
    if isinstance(doc, Mapping):
        return str(doc.get("event_id") or doc.get("trigger_id") or "")
    return ""


def _github(secrets: list[str], body: bytes, headers: Mapping[str, str]) -> str:
    signature = headers.get("x-hub-signature-256", "")
    if not signature:
        raise RefusedDelivery("unsigned", "a GitHub delivery carries X-Hub-Signature-256")
    if not any(
        hmac.compare_digest(
            "sha256=" + hmac.new(s.encode(), body, hashlib.sha256).hexdigest(), signature
        )
        for s in secrets
    ):
        raise RefusedDelivery("bad signature", "no configured secret made X-Hub-Signature-256")
    return headers.get("x-github-delivery", "")


def parse_body(body: bytes, headers: Mapping[str, str]) -> Any:
    """JSON, or a form (Slack slash commands) as a mapping of its fields."""
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/x-www-form-urlencoded":
        return dict(urllib.parse.parse_qsl(body.decode(errors="replace")))
    return json.loads(body) if body.strip() else {}
