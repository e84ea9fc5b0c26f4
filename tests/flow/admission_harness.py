"""given / when / then over the admission core of one key, folding as replay does:
every ``when`` also checks that the fold of the whole log equals the live state."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from engine.core import admission as ad
from engine.core.limits import KeyLimits, load_limits, resolve

T0 = 1_700_000_000_000


def limits(**rule: Any) -> KeyLimits:
    """The limits of ``tool:t`` written as a rule of a limits document."""
    return resolve(load_limits({"limits": "v1", "rules": [{"key": "tool:t", **rule}]}), "tool:t")


class Key:
    def __init__(self, key: str = "tool:t", *, at: int = T0, **rule: Any) -> None:
        self.key = key
        self.now = at
        self.state: ad.AdmissionState | None = None
        self.log: list[ad.AdmissionEvent] = []
        self.last: list[ad.AdmissionEvent] = []
        if rule:
            self.when(ad.Configure(key, limits(**rule), 1))

    def at(self, ms: int) -> Key:
        self.now = T0 + ms
        return self

    def when(self, *commands: ad.AdmissionCommand) -> Key:
        self.last = []
        for command in commands:
            events = ad.decide(self.state, command, self.now)
            for event in events:
                self.state = ad.evolve(self.state, event)
            self.log.extend(events)
            self.last.extend(events)
        replayed: ad.AdmissionState | None = None
        for event in self.log:
            replayed = ad.evolve(replayed, event)
        assert replayed == self.state, "the fold of the log differs from the live state"
        return self

    def acquire(self, request_id: str, **fields_: Any) -> Key:
        return self.when(ad.Acquire(self.key, request_id, **fields_))

    def release(self, request_id: str, outcome: str = "ok", **fields_: Any) -> Key:
        return self.when(ad.Release(self.key, request_id, ad.Outcome(outcome), **fields_))

    def tick(self) -> Key:
        return self.when(ad.Tick(self.key, self.now))

    def granted(self) -> list[str]:
        """The requests the last ``when`` granted, in order."""
        return [e.request_id for e in self.last if isinstance(e, ad.Granted)]

    def then(self, event_type: type[Any], **expected: Any) -> Any:
        """The one event of ``event_type`` the last ``when`` produced, with ``expected``."""
        found = [e for e in self.last if isinstance(e, event_type)]
        assert len(found) == 1, f"expected one {event_type.__name__}, got {self.last}"
        names = {f.name for f in fields(found[0])}
        for name, value in expected.items():
            assert name in names, name
            assert getattr(found[0], name) == value, (name, getattr(found[0], name))
        return found[0]

    @property
    def s(self) -> ad.AdmissionState:
        assert self.state is not None
        return self.state
