"""The delivery settings document: where notifications go, and how hard to try.

```yaml
webhooks:                        # endpoints by name
  ops:
    url: https://hooks.example.com/terranoha
    secrets: [env:OPS_WEBHOOK_SECRET, file:secrets/ops-webhook-old]
    timeout: 10s
smtp:                            # needed when a route sends email
  host: smtp.example.com
  port: 587                      # default 587 (starttls), 465 (implicit), 25 (none)
  from: Terranoha <terranoha@example.com>
  tls: starttls                  # starttls (default), implicit or none
  username: terranoha            # optional, with password
  password: env:SMTP_PASSWORD
routes:                          # a notification goes to every route it matches
  - recipients: [finance, finance-leads]   # any of these among its recipients
    kinds: [approval_requested, escalated]
    tenants: [acme]
    webhooks: [ops]
    email: [finance@example.com]
retry: {max_attempts: 8, initial: 2s, multiplier: 2, max: 5m, jitter: full}
max_retry_after: 1h
```

Secrets are never written inline: ``env:NAME`` reads an environment variable,
``file:PATH`` a file (relative to the settings file; one trailing newline dropped). They
are resolved when the document is loaded and held as ``SecretStr``, which prints as
``**********``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from standardwebhooks import Webhook

from engine.core.errors import TerranohaError
from engine.core.outbox import NotificationKind
from engine.core.spec import Duration, RetryPolicy

DEFAULT_RETRY = RetryPolicy(max_attempts=8, initial=2_000, multiplier=2.0, max=300_000)
"""At most 8 attempts, the waits between them capped at 2 s, 4 s, ... 5 min, jittered."""


class SettingsError(TerranohaError):
    """The delivery settings were refused. ``issues`` lists (path, message) pairs."""

    def __init__(self, source: str, issues: list[tuple[str, str]]) -> None:
        self.source = source
        self.issues = issues
        lines = "\n".join(f"  {path}: {message}" for path, message in issues)
        super().__init__(f"delivery settings {source} are invalid:\n{lines}")


class TlsMode(StrEnum):
    STARTTLS = "starttls"
    IMPLICIT = "implicit"
    NONE = "none"


DEFAULT_SMTP_PORTS = {TlsMode.STARTTLS: 587, TlsMode.IMPLICIT: 465, TlsMode.NONE: 25}


def _resolve_secret(value: object, info: ValidationInfo) -> SecretStr:
    """``env:NAME`` or ``file:PATH`` to the secret it names. Messages never hold the value."""
    if isinstance(value, SecretStr):
        return value
    if not isinstance(value, str) or not value.startswith(("env:", "file:")):
        raise ValueError("write a secret as env:NAME or file:PATH, never inline")
    context: Mapping[str, Any] = info.context or {}
    scheme, _, name = value.partition(":")
    if not name:
        raise ValueError(f"{scheme}: needs a name after the colon")
    if scheme == "env":
        environ: Mapping[str, str] = context.get("environ", os.environ)
        if not environ.get(name):
            raise ValueError(f"environment variable {name} is not set (or empty)")
        return SecretStr(environ[name])
    path = Path(name)
    if not path.is_absolute():
        path = Path(context.get("base", ".")) / path
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None
    text = text.removesuffix("\n")
    if not text:
        raise ValueError(f"secret file {path} is empty")
    return SecretStr(text)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _standard_webhooks_secret(secret: SecretStr) -> SecretStr:
    try:
        Webhook(secret.get_secret_value())
    except Exception:
        raise ValueError(
            "not a Standard Webhooks secret; write whsec_ followed by base64 (at least 24 bytes)"
        ) from None
    return secret


Secret = Annotated[SecretStr, BeforeValidator(_resolve_secret)]
"""``env:NAME`` or ``file:PATH`` in the document; the secret itself once loaded."""
WebhookSecret = Annotated[Secret, AfterValidator(_standard_webhooks_secret)]


class WebhookEndpoint(_Model):
    """An HTTPS (or HTTP) endpoint. Every secret signs each request, so a receiver that
    knows any one of them verifies it: add the new secret, move the receiver, drop the
    old one."""

    url: str = Field(pattern=r"^https?://[^\s/]+")
    secrets: list[WebhookSecret] = Field(min_length=1)
    timeout: Duration = 10_000

    @property
    def origin(self) -> str:
        """Scheme and host only: what logs and dead letters may show (a path or query
        can hold a token)."""
        scheme, _, rest = self.url.partition("://")
        host = rest.split("/", 1)[0].split("?", 1)[0].rsplit("@", 1)[-1]
        return f"{scheme}://{host}"


class SmtpServer(_Model):
    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    sender: str = Field(alias="from", min_length=3)
    tls: TlsMode = TlsMode.STARTTLS
    username: str | None = None
    password: Secret | None = None
    timeout: Duration = 30_000

    @model_validator(mode="after")
    def _auth_pairs(self) -> SmtpServer:
        if (self.username is None) != (self.password is None):
            raise ValueError("give username and password together, or neither")
        return self

    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else DEFAULT_SMTP_PORTS[self.tls]


Address = Annotated[str, Field(pattern=r"^[^@\s<>]+@[^@\s<>]+$")]


class Route(_Model):
    """Which notifications go where. An omitted (or empty) criterion matches all;
    recipients are compared without case and surrounding blanks."""

    recipients: list[str] = Field(default_factory=list)
    kinds: list[NotificationKind] = Field(default_factory=list)
    tenants: list[str] = Field(default_factory=list)
    webhooks: list[str] = Field(default_factory=list)
    email: list[Address] = Field(default_factory=list)

    @model_validator(mode="after")
    def _goes_somewhere(self) -> Route:
        if not self.webhooks and not self.email:
            raise ValueError("a route needs webhooks or email (or both)")
        return self


class DeliverySettings(_Model):
    """The whole document; see the module's documentation."""

    webhooks: dict[str, WebhookEndpoint] = Field(default_factory=dict)
    smtp: SmtpServer | None = None
    routes: list[Route] = Field(min_length=1)
    retry: RetryPolicy = DEFAULT_RETRY
    max_retry_after: Duration = 3_600_000
    """A receiver's Retry-After is honoured up to this long."""


def _reference_issues(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Routes naming webhooks that are not defined, or sending email without smtp:
    checked on the raw document, so they are reported with every other problem."""
    webhooks = data.get("webhooks")
    known = set(webhooks) if isinstance(webhooks, Mapping) else set()
    routes = data.get("routes")
    issues: list[tuple[str, str]] = []
    for index, item in enumerate(routes if isinstance(routes, list) else []):
        if not isinstance(item, Mapping):
            continue
        names = item.get("webhooks")
        for name in names if isinstance(names, list) else []:
            if isinstance(name, str) and name not in known:
                issues.append(
                    (
                        f"routes[{index}].webhooks",
                        f"no webhook named {name!r} (known: {', '.join(sorted(known)) or 'none'})",
                    )
                )
        if item.get("email") and data.get("smtp") is None:
            issues.append((f"routes[{index}].email", "sending email needs an smtp section"))
    return issues


def parse_settings(
    data: object,
    source: str = "<settings>",
    environ: Mapping[str, str] | None = None,
    base: Path | None = None,
) -> DeliverySettings:
    """Validate plain data. Raises ``SettingsError`` listing every problem with its path."""
    if not isinstance(data, Mapping):
        raise SettingsError(
            source, [("$", "the settings are a mapping with routes (and webhooks and/or smtp)")]
        )
    context = {"environ": os.environ if environ is None else environ, "base": base or Path(".")}
    issues = []
    try:
        settings = DeliverySettings.model_validate(data, context=context)
    except ValidationError as exc:
        for error in exc.errors():
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            issues.append((path.lstrip(".") or "$", message))
    issues += _reference_issues(data)
    if issues:
        raise SettingsError(source, issues)
    return settings


def load_settings(path: str | Path, environ: Mapping[str, str] | None = None) -> DeliverySettings:
    """Read and validate a settings file (YAML, or JSON); secrets are resolved now."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise SettingsError(str(path), [("$", f"cannot read the file: {exc.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SettingsError(str(path), [("$", f"not valid YAML: {exc}")]) from None
    return parse_settings(data, str(path), environ, file.resolve().parent)
