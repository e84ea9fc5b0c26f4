"""Redaction of payloads before they leave the run log.

The run event log keeps every payload as it was. Everything read by people or other
systems (projection rows, projection topics, CLI output, span attributes) goes through a
``RedactionPolicy`` first. A policy is built from a spec's ``redact`` list:

- JSON paths, starting with ``$``, point into the run's data document, the one spec
  expressions read: ``$.input`` (run input), ``$.output`` (run output),
  ``$.steps.<step>.input`` (a task's input), ``$.steps.<step>.result`` (a step's or task's
  result), ``$.steps.<step>.payload`` (what an approval is about), ``$.signals.<name>``
  (signal data). ``*`` matches any one key or list item, ``..`` any depth
  (``$..card_number``), ``[3]`` / ``[*]`` list items.
- Key patterns, anything else (``*token*``, ``password``): shell-style, case-insensitive,
  matched against every object key at any depth; the whole value under the key goes.

Always applied on top, whatever the spec says: keys named like ``*password*``,
``*secret*``, ``*api_key*``, ``*apikey*``, ``authorization``; keys named like ``*token*``
(``api_token``, ``access_token``, ``X-Auth-Token``, ``otp_token: 123456``), except a
number under a key that counts tokens (``prompt_tokens: 512``, ``max_tokens``,
``token_count``), so the counts LLM tools report stay readable while a token itself, a
string, a number, a list or an object, goes; and, inside any string (or integer),
card numbers (13 to 19 digits, spaces or dashes allowed, starting like a card network's
numbers and passing the Luhn check), ``Bearer`` tokens and JWTs. A spec that lists
``*token*`` itself hides the counts too.

A value hidden by a path or key rule is also hidden wherever else it turns up in the
same run, whole (the card number copied from the input into a task's input, the IBAN
of a step's result that becomes the run's output): the run's fold state keeps a
fingerprint of each such value (strings and integers of 8 characters or more; shorter
ones would hide too much by accident and their fingerprints could be guessed).

A redacted value becomes ``"[redacted]"``, or in ``hash`` mode ``"sha256:<12 hex>"`` of
the value (the same secret gives the same marker, so equal values can still be told
apart; unsalted, so a short secret can be guessed from it: use the default mode for card
numbers).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, TypeVar

from engine.core import events as ev
from engine.core.spec import WorkflowSpec
from engine.runtime.specs import SpecRegistry

log = logging.getLogger("terranoha.engine.runtime.redaction")

MARKER = "[redacted]"
Mode = Literal["redact", "hash"]
BUILTIN_KEYS = ("*password*", "*secret*", "*api_key*", "*apikey*", "authorization")
BUILTIN_TOKEN_KEY = "token"
"""Built in: a key containing this (any case) is hidden, unless it counts tokens."""
_TOKEN_COUNT_KEY = re.compile(r"tokens|token_?(?:count|usage|limit|budget|total)")

_CARD = re.compile(r"(?<![\d])\d(?:[ -]?\d){12,18}(?![\d])")
_BEARER = re.compile(r"\bbearer\s+[A-Za-z0-9\-._~+/]+=*", re.IGNORECASE)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+")
_ANY = "*"
_DEEP = "**"
_PATH_TOKEN = re.compile(r"\.\.|\.([^.\[\]]+)|\[(\*|\d+|'[^']*'|\"[^\"]*\")\]")

E = TypeVar("E", bound=ev.Event)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(text: str) -> bool:
    """13 to 19 digits passing Luhn, with a card network's first digit (2 to 6; 13 digits
    only for 4): epoch timestamps in ms or us (1...) are not taken for cards."""
    digits = text.replace(" ", "").replace("-", "")
    n = len(digits)
    if not 13 <= n <= 19 or digits[0] not in "23456" or (n == 13 and digits[0] != "4"):
        return False
    return luhn_ok(digits)


def parse_path(path: str) -> tuple[str, ...]:
    """``$.steps.lookup.result..card[0]`` as tokens; ``**`` stands for ``..``.
    Raises ``ValueError`` on anything that is not such a path."""
    if not path.startswith("$"):
        raise ValueError(f"a JSON path starts with $: {path!r}")
    tokens: list[str] = []
    pos = 1
    while pos < len(path):
        match = _PATH_TOKEN.match(path, pos)
        if match is None:
            raise ValueError(
                f"bad JSON path {path!r} at column {pos + 1}: write e.g. "
                "$.input.card_number, $.steps.*.result.token or $..password"
            )
        if match.group(0) == "..":
            tokens.append(_DEEP)
            # `$..name`: the name follows without its own dot
            name = re.match(r"[^.\[\]]+", path[match.end() :])
            if name:
                tokens.append(name.group(0))
                pos = match.end() + name.end()
                continue
        else:
            token = match.group(1) if match.group(1) is not None else match.group(2)
            tokens.append(token.strip("'\""))
        pos = match.end()
    return tuple(tokens)


def _location(at: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(at, str):
        return tuple(p for p in at.split(".") if p)
    return tuple(at)


@dataclass(frozen=True, slots=True)
class RedactionPolicy:
    """What to hide. Build one with ``RedactionPolicy.of(spec.redact)``; the default
    instance applies only the built-in rules."""

    paths: tuple[tuple[str, ...], ...] = ()
    keys: tuple[str, ...] = ()
    mode: Mode = "redact"
    builtin: bool = True
    _key_re: re.Pattern[str] | None = field(default=None, compare=False, repr=False)
    _key_seen: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.keys and self._key_re is None:
            pattern = "|".join(fnmatch.translate(k) for k in self.keys)
            object.__setattr__(self, "_key_re", re.compile(pattern))

    @classmethod
    def of(
        cls, rules: Iterable[str] = (), mode: Mode = "redact", builtin: bool = True
    ) -> RedactionPolicy:
        """A policy from a spec's ``redact`` list: ``$...`` entries are JSON paths, the
        others key patterns."""
        paths: list[tuple[str, ...]] = []
        keys: list[str] = []
        for rule in rules:
            rule = rule.strip()
            if not rule:
                continue
            if rule.startswith("$"):
                paths.append(parse_path(rule))
            else:
                keys.append(rule.lower())
        if builtin:
            keys += [k for k in BUILTIN_KEYS if k not in keys]
        if mode not in ("redact", "hash"):
            raise ValueError(f"redaction mode is redact or hash, not {mode!r}")
        return cls(tuple(paths), tuple(keys), mode, builtin)

    @classmethod
    def for_spec(cls, spec: WorkflowSpec | None, mode: Mode = "redact") -> RedactionPolicy:
        return cls.of(spec.redact if spec is not None else (), mode)

    # ------------------------------------------------------------------ markers

    def marker(self, value: Any) -> str:
        if self.mode == "redact":
            return MARKER
        text = (
            value
            if isinstance(value, str)
            else json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
        )
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:12]

    # ------------------------------------------------------------------ values

    def text(self, text: str) -> str:
        """``text`` with the built-in value patterns (cards, bearer tokens, JWTs) hidden."""
        if not self.builtin or len(text) < 13:
            return text
        out = text
        if any(ch.isdigit() for ch in out):
            out = _CARD.sub(
                lambda m: self.marker(m.group(0)) if _is_card(m.group(0)) else m.group(0), out
            )
        if "earer" in out or "EARER" in out:
            out = _BEARER.sub(lambda m: self.marker(m.group(0)), out)
        if "eyJ" in out:
            out = _JWT.sub(lambda m: self.marker(m.group(0)), out)
        return out

    def value(self, value: Any, at: str | Sequence[str] = (), taint: set[str] | None = None) -> Any:
        """``value`` with everything the policy hides replaced; ``at`` is where the value
        sits in the run's data document (``"input"``, ``"steps.lookup.result"``,
        ``("signals", name)``), for the JSON paths. ``taint`` holds the fingerprints of
        the run's values hidden so far: they are hidden here too, and what a rule hides
        here is added. Never changes ``value`` itself."""
        states = self._start()
        for token in _location(at):
            if self._matched(states):
                return self._hide(value, taint)
            states = self._advance(states, token)
        return self._walk(value, states, taint)

    def _hide(self, value: Any, taint: set[str] | None) -> str:
        if taint is not None:
            _fingerprints(value, taint)
        return self.marker(value)

    def _start(self) -> frozenset[tuple[int, int]]:
        return frozenset((i, 0) for i in range(len(self.paths)))

    def _closure(self, rule: int, pos: int) -> Iterable[int]:
        pattern = self.paths[rule]
        yield pos
        while pos < len(pattern) and pattern[pos] == _DEEP:
            pos += 1
            yield pos

    def _matched(self, states: frozenset[tuple[int, int]]) -> bool:
        return any(len(self.paths[r]) in self._closure(r, p) for r, p in states)

    def _advance(self, states: frozenset[tuple[int, int]], key: str) -> frozenset[tuple[int, int]]:
        if not states:
            return states
        out: set[tuple[int, int]] = set()
        for rule, pos in states:
            pattern = self.paths[rule]
            for p in self._closure(rule, pos):
                if p >= len(pattern):
                    continue
                token = pattern[p]
                if token == _DEEP:
                    out.add((rule, p))
                elif token in (_ANY, key):
                    out.add((rule, p + 1))
        return frozenset(out)

    def _key_hidden(self, key: str) -> bool:
        seen = self._key_seen.get(key)
        if seen is None:
            seen = self._key_re is not None and self._key_re.match(key.lower()) is not None
            if len(self._key_seen) > 10_000:  # payload keys can be ids: keep it bounded
                self._key_seen.clear()
            self._key_seen[key] = seen
        return seen

    def _walk(self, value: Any, states: frozenset[tuple[int, int]], taint: set[str] | None) -> Any:
        if states and self._matched(states):
            return self._hide(value, taint)
        if isinstance(value, str):
            if taint and len(value) >= _MIN_TAINT and _fingerprint(value) in taint:
                return self.marker(value)
            return self.text(value)
        if isinstance(value, Mapping):
            out: dict[str, Any] = {}
            for key, item in value.items():
                if self._key_hidden(str(key)) or (
                    self.builtin and _builtin_token_hidden(str(key), item)
                ):
                    out[key] = self._hide(item, taint)
                else:
                    out[key] = self._walk(item, self._advance(states, str(key)), taint)
            return out
        if isinstance(value, list | tuple):
            return [
                self._walk(item, self._advance(states, str(i)), taint)
                for i, item in enumerate(value)
            ]
        if isinstance(value, int) and not isinstance(value, bool):
            if taint and abs(value) >= 10 ** (_MIN_TAINT - 1) and _fingerprint(value) in taint:
                return self.marker(value)
            if self.builtin and value > 10**12 and _is_card(str(value)):
                return self.marker(value)
        return value

    # ------------------------------------------------------------------ events

    def event(self, event: E, taint: set[str] | None = None) -> E:
        """``event`` with its payloads and free-text fields redacted (a copy; the same
        object when there is nothing to hide). ``taint``: see ``value``."""
        fn = _EVENT_FIELDS.get(type(event))
        if fn is None:
            return event
        changes = fn(_Bound(self, taint), event)
        changed = {k: v for k, v in changes.items() if v != getattr(event, k)}
        return dataclasses.replace(event, **changed) if changed else event


DEFAULT_POLICY = RedactionPolicy.of()
"""Built-in rules only: for runs whose spec is unknown."""


def redact(value: Any, policy: RedactionPolicy | None = None, at: str | Sequence[str] = ()) -> Any:
    """``value`` as it may be shown: ``policy`` (default: built-in rules only) applied to
    a value found at ``at`` in the run's data document (e.g. ``"input"``,
    ``"steps.lookup.result"``). For the CLI and span attributes."""
    return (policy or DEFAULT_POLICY).value(value, at)


def redact_text(text: str, policy: RedactionPolicy | None = None) -> str:
    """Free text (an error message, a comment) with cards, bearer tokens, JWTs hidden."""
    return (policy or DEFAULT_POLICY).text(text)


_MIN_TAINT = 8


def _builtin_token_hidden(key: str, value: Any) -> bool:
    """Whether the built-in ``*token*`` rule hides ``value`` under ``key``: always, but
    for a number (not a numeric string) under a key that counts tokens."""
    lowered = key.lower()
    if BUILTIN_TOKEN_KEY not in lowered:
        return False
    counted = isinstance(value, int | float) and _TOKEN_COUNT_KEY.search(lowered) is not None
    return not counted


def _fingerprint(value: str | int) -> str:
    text = f"s:{value}" if isinstance(value, str) else f"i:{value}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _fingerprints(value: Any, into: set[str]) -> None:
    """Add the fingerprints of the long enough strings and integers in ``value``."""
    if isinstance(value, str):
        if len(value) >= _MIN_TAINT:
            into.add(_fingerprint(value))
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        if abs(value) >= 10 ** (_MIN_TAINT - 1):
            into.add(_fingerprint(value))
    elif isinstance(value, Mapping):
        for item in value.values():
            _fingerprints(item, into)
    elif isinstance(value, list | tuple):
        for item in value:
            _fingerprints(item, into)


def _steps(step: str, part: str) -> tuple[str, ...]:
    return ("steps", step, part)


@dataclass(frozen=True, slots=True)
class _Bound:
    """A policy with a run's taint, for the field table below."""

    policy: RedactionPolicy
    taint: set[str] | None

    def value(self, value: Any, at: Sequence[str]) -> Any:
        return self.policy.value(value, at, self.taint)

    def text(self, text: str) -> str:
        return self.policy.text(text)


_EVENT_FIELDS: dict[type[ev.Event], Callable[[_Bound, Any], dict[str, Any]]] = {
    ev.RunStarted: lambda p, e: {"input": p.value(e.input, ("input",))},
    ev.TaskDispatched: lambda p, e: {"input": p.value(e.input, _steps(e.step, "input"))},
    ev.TaskCompleted: lambda p, e: {"result": p.value(e.result, _steps(e.step, "result"))},
    ev.TaskFailed: lambda p, e: {"message": p.text(e.message)},
    ev.ApprovalRequested: lambda p, e: {"payload": p.value(e.payload, _steps(e.step, "payload"))},
    ev.ApprovalVoted: lambda p, e: {"comment": p.text(e.comment)},
    ev.ApprovalGranted: lambda p, e: {"comment": p.text(e.comment)},
    ev.ApprovalRejected: lambda p, e: {"comment": p.text(e.comment)},
    ev.SignalReceived: lambda p, e: {"data": p.value(e.data, ("signals", e.name))},
    ev.StepCompleted: lambda p, e: {"result": p.value(e.result, _steps(e.step, "result"))},
    ev.StepFailed: lambda p, e: {"message": p.text(e.message)},
    ev.RunCompleted: lambda p, e: {"output": p.value(e.output, ("output",))},
    ev.RunFailed: lambda p, e: {"message": p.text(e.message)},
    ev.RunCancelled: lambda p, e: {"reason": p.text(e.reason)},
    ev.CommandRejected: lambda p, e: {"detail": p.text(e.detail)},
    ev.CommandRejectedV2: lambda p, e: {"detail": p.text(e.detail)},
}


class PolicyBook:
    """The redaction policy of each (workflow, version), from the deployed specs.

    A run whose spec is not in ``specs`` gets the built-in rules only, and a warning: a
    projector should refresh its specs (``SpecFollower.catch_up``) before projecting a
    run of an unknown workflow, see ``missing``.
    """

    def __init__(self, specs: SpecRegistry | None = None, mode: Mode = "redact") -> None:
        self.specs = specs if specs is not None else SpecRegistry()
        self.mode: Mode = mode
        self._policies: dict[tuple[str, int], RedactionPolicy] = {}
        self._default = RedactionPolicy.of((), mode)
        self._warned: set[tuple[str, int]] = set()

    def policy(self, workflow: str, version: int) -> RedactionPolicy:
        key = (workflow, version)
        policy = self._policies.get(key)
        if policy is not None:
            return policy
        spec = self.specs.get(workflow, version) if workflow and version else None
        if spec is None:
            if workflow and key not in self._warned:
                self._warned.add(key)
                log.warning(
                    "no spec for %s version %d: its payloads get the built-in redaction rules only",
                    workflow,
                    version,
                )
            return self._default
        policy = _policy_of(tuple(spec.redact), self.mode)
        self._policies[key] = policy
        return policy

    def missing(self, events: Iterable[ev.Event]) -> bool:
        """Whether a run in ``events`` starts with a spec this book does not have yet."""
        return any(
            isinstance(e, ev.RunStarted)
            and (e.workflow, e.version) not in self._policies
            and self.specs.get(e.workflow, e.version) is None
            for e in events
        )


@lru_cache(maxsize=256)
def _policy_of(rules: tuple[str, ...], mode: Mode) -> RedactionPolicy:
    try:
        return RedactionPolicy.of(rules, mode)
    except ValueError as exc:
        log.error(
            "a spec's redact list is not valid (%s): hiding with the built-in rules and "
            "the key patterns only",
            exc,
        )
        return RedactionPolicy.of([r for r in rules if not r.startswith("$")], mode)


def redact_events(
    events: Iterable[ev.Event],
    book: PolicyBook | None = None,
    policy: RedactionPolicy | None = None,
) -> list[ev.Event]:
    """The events of one run, redacted with its spec's policy (from ``book``, found by
    the run's ``RunStarted``) or with ``policy``. For ``build_timeline`` in the CLI."""
    out: list[ev.Event] = []
    chosen = policy
    taint: set[str] = set()
    for event in events:
        if chosen is None and book is not None and isinstance(event, ev.RunStarted):
            chosen = book.policy(event.workflow, event.version)
        out.append((chosen or DEFAULT_POLICY).event(event, taint))
    return out
