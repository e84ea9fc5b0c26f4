"""The records of the admission core: its commands, events and per-key state.

``engine.core.admission`` decides and folds them; every one is a plain frozen record with
an Avro schema in ``schemas/admission``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from engine.core.limits import UNLIMITED, KeyLimits


class Outcome(StrEnum):
    """How a task that held a slot ended (``cancelled``: it is no longer wanted)."""

    OK = "ok"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ReleaseReason(StrEnum):
    DONE = "done"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# ---------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class Acquire:
    """Ask for a slot on ``key`` for ``request_id`` (one task attempt), on behalf of
    ``tenant``. ``limits`` are the key's limits as of document ``version``, as the
    requester resolved them; a newer version than the key has seen replaces its limits.
    ``lease_ms`` bounds how long the grant is held without a release (0: the key's
    ``lease``)."""

    key: str
    request_id: str
    tenant: str = "default"
    priority: int = 0
    weight: float = 1.0
    estimate: float = 0.0
    lease_ms: int = 0
    limits: KeyLimits | None = None
    """None: the requester knows of no limits document."""
    version: int = 0
    reply_to: str = ""
    """Where the grant is to be delivered (the run id, for the run engine)."""


@dataclass(frozen=True, slots=True)
class Release:
    """The task of ``request_id`` ended (``ok``/``failed``, with its cost and how long it
    ran) or is no longer wanted (``cancelled``: a run cancelled while queued or held)."""

    key: str
    request_id: str
    outcome: Outcome = Outcome.OK
    cost: float = 0.0
    latency_ms: int = 0


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: expire leases, let the rate, a throttle, a budget window or an open
    breaker move on. Written by the key's timer; harmless at any time."""

    key: str
    due_at: int = 0


@dataclass(frozen=True, slots=True)
class Throttle:
    """The tool answered "too many requests, retry after ``until``": hold grants."""

    key: str
    until: int


@dataclass(frozen=True, slots=True)
class Configure:
    """Apply the limits of document ``version`` (ignored if the key knows a newer one)."""

    key: str
    limits: KeyLimits
    version: int


@dataclass(frozen=True, slots=True)
class Pause:
    key: str


@dataclass(frozen=True, slots=True)
class Resume:
    key: str


AdmissionCommand = Acquire | Release | Tick | Throttle | Configure | Pause | Resume


# ---------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Configured:
    key: str
    at: int
    limits: KeyLimits
    version: int


@dataclass(frozen=True, slots=True)
class Queued:
    key: str
    at: int
    request_id: str
    tenant: str
    priority: int
    weight: float
    estimate: float
    lease_ms: int
    tag: float
    reply_to: str


@dataclass(frozen=True, slots=True)
class Granted:
    key: str
    at: int
    request_id: str
    tenant: str
    expires_at: int
    reserved: float
    probe: bool
    reply_to: str
    waited_ms: int


@dataclass(frozen=True, slots=True)
class Refused:
    """A queued request will not be granted: the budget is spent and ``on_exhausted`` is
    ``fail`` (``action`` fail) or ``escalate`` (ask for an approval to exceed it)."""

    key: str
    at: int
    request_id: str
    code: str
    message: str
    action: str
    """``fail`` or ``escalate`` (the budget's ``on_exhausted``)."""
    reply_to: str


@dataclass(frozen=True, slots=True)
class Released:
    """A lease ended (``done``, ``expired``) or a queued request was withdrawn
    (``cancelled``); ``unknown`` records a release of a request the key never saw, so a
    late duplicate of its ``Acquire`` is not granted."""

    key: str
    at: int
    request_id: str
    reason: ReleaseReason
    outcome: Outcome
    cost: float
    latency_ms: int


@dataclass(frozen=True, slots=True)
class Throttled:
    key: str
    at: int
    until: int


@dataclass(frozen=True, slots=True)
class Paused:
    key: str
    at: int


@dataclass(frozen=True, slots=True)
class Resumed:
    key: str
    at: int


@dataclass(frozen=True, slots=True)
class BudgetWindowOpened:
    key: str
    at: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class BudgetWarned:
    key: str
    at: int
    spent: float
    amount: float


@dataclass(frozen=True, slots=True)
class BudgetExhausted:
    key: str
    at: int
    spent: float
    amount: float
    until: int


@dataclass(frozen=True, slots=True)
class BreakerOpened:
    key: str
    at: int
    until: int
    trips: int
    failure_rate: float


@dataclass(frozen=True, slots=True)
class BreakerHalfOpened:
    key: str
    at: int


@dataclass(frozen=True, slots=True)
class BreakerClosed:
    key: str
    at: int


AdmissionEvent = (
    Configured
    | Queued
    | Granted
    | Refused
    | Released
    | Throttled
    | Paused
    | Resumed
    | BudgetWindowOpened
    | BudgetWarned
    | BudgetExhausted
    | BreakerOpened
    | BreakerHalfOpened
    | BreakerClosed
)


# ---------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class Waiter:
    """A queued request."""

    request_id: str
    tenant: str
    priority: int
    weight: float
    estimate: float
    lease_ms: int
    tag: float
    enqueued_at: int
    reply_to: str


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted slot, held until released or ``expires_at``."""

    request_id: str
    tenant: str
    granted_at: int
    expires_at: int
    reserved: float
    probe: bool


@dataclass(frozen=True, slots=True)
class Call:
    """One ended call, as the breaker counts it."""

    at: int
    bad: bool
    """Failed, expired or slow."""


@dataclass(frozen=True, slots=True)
class AdmissionState:
    """Everything one limit key knows. Never changed in place: ``evolve`` returns a new
    one, so a batch that is not committed leaves the committed state as it was."""

    key: str
    limits: KeyLimits
    version: int = 0
    paused: bool = False
    queue: tuple[Waiter, ...] = ()
    leases: Mapping[str, Lease] = field(default_factory=dict)
    finished: Mapping[str, int] = field(default_factory=dict)
    """Recently ended request ids (oldest first) and when they ended."""
    vtime: float = 0.0
    finish_tags: Mapping[str, float] = field(default_factory=dict)
    """Each tenant's last virtual finish time, while it is ahead of ``vtime``."""
    tat: float = 0.0
    """GCRA's theoretical arrival time of the next grant at the steady rate."""
    throttled_until: int = 0
    window_start: int = 0
    window_end: int = 0
    spent: float = 0.0
    warned: bool = False
    exhausted: bool = False
    breaker: BreakerState = BreakerState.CLOSED
    breaker_until: int = 0
    trips: int = 0
    outcomes: tuple[Call, ...] = ()
    """The calls that ended in the breaker's window."""
    probes_ok: int = 0
    probes_granted: int = 0
    clock: int = 0
    """The time of the latest event: what the key's timers are computed from."""

    @classmethod
    def empty(cls, key: str) -> AdmissionState:
        return cls(key, UNLIMITED)

    @property
    def executing(self) -> int:
        return len(self.leases)

    @property
    def reserved(self) -> float:
        return sum(lease.reserved for lease in self.leases.values())

    def tokens(self, now: int) -> float:
        """Grants the rate would allow at once now (0 to ``burst``)."""
        rate = self.limits.rate
        if rate is None:
            return float("inf")
        burst = self.limits.burst or rate.count
        return max(0.0, min(float(burst), burst - (self.tat - now) / rate.interval_ms))

    def known(self, request_id: str) -> bool:
        return (
            request_id in self.leases
            or request_id in self.finished
            or any(w.request_id == request_id for w in self.queue)
        )


COMMAND_TYPES: tuple[type, ...] = (Acquire, Release, Tick, Throttle, Configure, Pause, Resume)
EVENT_TYPES: tuple[type, ...] = (
    Configured,
    Queued,
    Granted,
    Refused,
    Released,
    Throttled,
    Paused,
    Resumed,
    BudgetWindowOpened,
    BudgetWarned,
    BudgetExhausted,
    BreakerOpened,
    BreakerHalfOpened,
    BreakerClosed,
)
RECORD_TYPES: tuple[type, ...] = (
    Acquire,
    Release,
    Tick,
    Throttle,
    Configure,
    Pause,
    Resume,
    Configured,
    Queued,
    Granted,
    Refused,
    Released,
    Throttled,
    Paused,
    Resumed,
    BudgetWindowOpened,
    BudgetWarned,
    BudgetExhausted,
    BreakerOpened,
    BreakerHalfOpened,
    BreakerClosed,
    AdmissionState,
)
"""Every admission record with a schema of its own (``schemas/admission``)."""
