"""The limits document (``limits: v1``): flow-control rules shared by every workflow.

A tool or a tenant is shared by many workflows, so its limits are not part of any
workflow spec: they are a document of their own, deployed and versioned like a spec
(each deploy of a changed document is the next version; the engine follows the latest).

```yaml
limits: v1
rules:
  - key: tool:llm.classify      # every task on that worker queue
    concurrency: 8
    rate: 50/s
  - key: tenant:*               # each tenant on its own
    concurrency: 20
  - key: tenant:acme            # a specific key adds to (and overrides) the wildcard
    weight: 3
```

``load_limits`` validates at the edge and raises ``LimitsError`` listing every offending
field by its path (``rules[1](tenant:*).budget.timezone``). ``resolve`` gives the limits
that apply to one concrete key: the wildcard rule of its kind, overridden field by field
by the rule naming the key itself.
"""

from __future__ import annotations

import json
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from engine.core.durations import parse_duration
from engine.core.errors import TerranohaError

Duration = Annotated[int, BeforeValidator(parse_duration)]

KEY = re.compile(r"^(?P<kind>[a-z][a-z_]*):(?P<name>\*|[A-Za-z0-9_][A-Za-z0-9_.@/-]*)$")
"""``kind:name``: ``tool:llm.classify``, ``tenant:acme``, ``tenant:*`` (every tenant)."""

_RATE = re.compile(r"^\s*(?P<count>\d+)\s*/\s*(?P<unit>ms|s|m|h|d|\d+(?:ms|s|m|h|d))\s*$")

WINDOWS = ("hour", "day", "week", "month")
_WINDOW_ALIASES = {"1h": "hour", "1d": "day", "1w": "week", "7d": "week", "1mo": "month"}

LIMIT_FIELDS = ("concurrency", "rate", "burst", "weight", "budget", "breaker", "aging", "lease")


class LimitsError(TerranohaError):
    """A limits document was refused. ``issues`` lists (path, message) pairs."""

    def __init__(self, issues: list[tuple[str, str]]) -> None:
        self.issues = issues
        lines = "\n".join(f"  {path}: {message}" for path, message in issues)
        super().__init__(f"limits document is invalid:\n{lines}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rate(_Model):
    """``count`` grants per ``period_ms``; written ``50/s``, ``100/m``, ``5/10s``."""

    count: int = Field(ge=1)
    period_ms: int = Field(ge=1)


def _parse_rate(value: object) -> object:
    if isinstance(value, str):
        match = _RATE.match(value)
        if match is None:
            raise ValueError(
                f"bad rate {value!r}: write a count per duration, e.g. 50/s, 100/m or 5/10s"
            )
        unit = match.group("unit")
        period = parse_duration(unit if unit[0].isdigit() else f"1{unit}")
        return {"count": int(match.group("count")), "period_ms": period}
    return value


def _parse_window(value: object) -> object:
    if isinstance(value, str):
        text = value.strip().lower()
        text = _WINDOW_ALIASES.get(text, text)
        if text not in WINDOWS:
            raise ValueError(
                f"bad budget window {value!r}: use one of {', '.join(WINDOWS)} (or 1h, 1d, 1w, 1mo)"
            )
        return text
    return value


def _check_timezone(value: object) -> object:
    if not isinstance(value, str):
        raise ValueError("timezone is an IANA name such as Europe/Berlin or UTC")
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown timezone {value!r}: use an IANA name such as "
            "Europe/Berlin, America/New_York or UTC"
        ) from None
    return value


class Budget(_Model):
    """Spend allowed per calendar window in the key's timezone. An estimate is reserved
    when a task is granted and replaced by the reported cost when it ends."""

    amount: float = Field(gt=0)
    per: Annotated[Literal["hour", "day", "week", "month"], BeforeValidator(_parse_window)]
    timezone: Annotated[str, BeforeValidator(_check_timezone)] = "UTC"
    warn_at: float | None = Field(default=None, gt=0, le=1)
    on_exhausted: Literal["wait", "fail", "escalate"] = "wait"
    estimate: float = Field(default=0.0, ge=0)
    """What a task reserves when neither the tool nor the step says (``est_cost``)."""


class Breaker(_Model):
    """Stops dispatch to a failing tool: opens when, over the last ``window``, at least
    ``min_calls`` ended and the share of failed or slow ones reached ``failure_rate``;
    after ``open_for`` (doubled on each trip in a row, up to ``max_open_for``) lets
    ``half_open_calls`` canaries through, and closes if they all succeed."""

    failure_rate: float = Field(gt=0, le=1)
    min_calls: int = Field(default=10, ge=1)
    window: Duration = 60_000
    slow_call: Duration | None = None
    open_for: Duration = 30_000
    max_open_for: Duration = 600_000
    half_open_calls: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _open_bounds(self) -> Breaker:
        if self.window <= 0 or self.open_for <= 0:
            raise ValueError("window and open_for must be longer than 0")
        if self.max_open_for < self.open_for:
            raise ValueError("max_open_for must be at least open_for")
        return self


def check_key(value: object) -> str:
    """A limit key as written in a rule, a step or ``limits pause``."""
    if not isinstance(value, str) or KEY.match(value) is None:
        raise ValueError(
            f"bad key {value!r}: write kind:name, e.g. tool:llm.classify, "
            "tenant:acme or tenant:* (letters, digits, _ . @ / -)"
        )
    return value


class Rule(_Model):
    """The limits of one key (or, with ``*``, of every key of a kind)."""

    key: Annotated[str, BeforeValidator(check_key)]
    concurrency: int | None = Field(default=None, ge=1)
    rate: Annotated[Rate | None, BeforeValidator(_parse_rate)] = None
    burst: int | None = Field(default=None, ge=1)
    weight: float | None = Field(default=None, gt=0, le=1000)
    budget: Budget | None = None
    breaker: Breaker | None = None
    aging: Duration | None = None
    """Waiting this long raises a request's priority by one level (no starvation)."""
    lease: Duration | None = None
    """How long a grant is held at most if its release never comes (a crash)."""

    @model_validator(mode="after")
    def _meaningful(self) -> Rule:
        if all(getattr(self, name) is None for name in LIMIT_FIELDS):
            raise ValueError(
                f"rule {self.key!r} sets no limit: give at least one of {', '.join(LIMIT_FIELDS)}"
            )
        if self.burst is not None and self.rate is None:
            raise ValueError("burst needs a rate")
        if self.aging is not None and self.aging <= 0:
            raise ValueError("aging must be longer than 0")
        return self

    @property
    def kind(self) -> str:
        return self.key.split(":", 1)[0]

    @property
    def wildcard(self) -> bool:
        return self.key.endswith(":*")


class LimitsDocument(_Model):
    """A whole deployed limits document."""

    limits: Literal["v1"]
    rules: list[Rule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_keys(self) -> LimitsDocument:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.key in seen:
                raise ValueError(f"key {rule.key!r} has two rules: merge them into one")
            seen.add(rule.key)
        return self

    def rule(self, key: str) -> Rule | None:
        return next((r for r in self.rules if r.key == key), None)


@dataclass(frozen=True, slots=True)
class RateLimit:
    count: int
    period_ms: int

    @property
    def interval_ms(self) -> float:
        """The spacing of grants at the steady rate (GCRA's emission interval)."""
        return self.period_ms / self.count


@dataclass(frozen=True, slots=True)
class BudgetLimit:
    amount: float
    per: str
    timezone: str = "UTC"
    warn_at: float | None = None
    on_exhausted: str = "wait"
    estimate: float = 0.0


@dataclass(frozen=True, slots=True)
class BreakerLimit:
    failure_rate: float
    min_calls: int = 10
    window: int = 60_000
    slow_call: int | None = None
    open_for: int = 30_000
    max_open_for: int = 600_000
    half_open_calls: int = 1


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """The limits in force on one concrete key, after the wildcard and the key's own rule
    are merged: what the admission core works with (plain records, carried on its
    commands and state). None means no limit of that kind."""

    concurrency: int | None = None
    rate: RateLimit | None = None
    burst: int | None = None
    weight: float = 1.0
    budget: BudgetLimit | None = None
    breaker: BreakerLimit | None = None
    aging: int = 60_000
    lease: int = 600_000

    @property
    def binding(self) -> bool:
        """Whether anything here can hold a request back."""
        return any(x is not None for x in (self.concurrency, self.rate, self.budget, self.breaker))


UNLIMITED = KeyLimits()


def resolve(document: LimitsDocument | None, key: str) -> KeyLimits:
    """The limits of ``key``: its kind's wildcard rule, then its own rule on top."""
    if document is None:
        return UNLIMITED
    merged: dict[str, Any] = {}
    kind = key.split(":", 1)[0]
    for rule in (document.rule(f"{kind}:*"), document.rule(key)):
        if rule is not None:
            merged.update(
                {
                    name: getattr(rule, name)
                    for name in LIMIT_FIELDS
                    if getattr(rule, name) is not None
                }
            )
    rate, budget, breaker = (
        merged.pop("rate", None),
        merged.pop("budget", None),
        merged.pop("breaker", None),
    )
    return KeyLimits(
        **merged,
        rate=None if rate is None else RateLimit(rate.count, rate.period_ms),
        budget=None if budget is None else BudgetLimit(**budget.model_dump()),
        breaker=None if breaker is None else BreakerLimit(**breaker.model_dump()),
    )


# --------------------------------------------------------------------------- loading


def load_limits(data: Any) -> LimitsDocument:
    """Validate a limits document given as plain data; raise ``LimitsError`` listing
    every problem with the path of the offending field."""
    if not isinstance(data, Mapping):
        raise LimitsError([("$", "a limits document is a mapping with limits: v1 and rules")])
    try:
        return LimitsDocument.model_validate(data)
    except ValidationError as exc:
        raise LimitsError([_issue(data, err) for err in exc.errors()]) from None


def load_limits_yaml(text: str) -> LimitsDocument:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LimitsError([("$", f"not valid YAML: {exc}")]) from None
    return load_limits(data)


def limits_to_data(document: LimitsDocument) -> dict[str, Any]:
    """The canonical plain-data form, stored and shipped on deploy."""
    return document.model_dump(mode="json", exclude_none=True)


def limits_body(document: LimitsDocument) -> str:
    """Canonical JSON: two deploys of the same rules give the same bytes."""
    return json.dumps(limits_to_data(document), sort_keys=True, separators=(",", ":"))


def _issue(data: Any, err: Any) -> tuple[str, str]:
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown field (check the spelling; see Flow control in the README)"
    elif err["type"] == "missing":
        message = "required field is missing"
    elif err["type"] == "literal_error" and tuple(err["loc"]) == ("limits",):
        message = "this engine reads limits: v1"
    return _path(data, tuple(err["loc"])), message


def _path(data: Any, loc: tuple[int | str, ...]) -> str:
    """``rules[1](tenant:*).budget.timezone``: the rule's key shown beside its index."""
    out, node = "", data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, Mapping) and isinstance(node.get("key"), str):
                out += f"({node['key']})"
        else:
            if part.startswith(("function-", "literal[")) or "[" in part:
                continue
            out += f".{part}" if out else part
            node = node.get(part) if isinstance(node, Mapping) else None
    return out or "$"
