"""The admission core: who may start a task on a limit key, and when. Pure.

One ``AdmissionState`` per limit key (``tool:llm.classify``, ``tenant:acme``). Requests
arrive (``Acquire``), wait in the key's queue, are granted a slot as a lease, and give it
back (``Release``) when their task ends; a lease whose release never comes expires
(``Tick``), so a crash never leaks a slot. ``decide(state, command, now)`` returns the
events; ``evolve(state, event)`` is the only code that changes state, and live
processing folds the very events replay folds.

Which request is granted next:

1. strict priority levels (a higher ``priority`` first), where a request's level rises by
   one for every ``aging`` it has waited, so low priority cannot starve forever;
2. inside a level, weighted fair queueing across tenants (start-time fair queueing: a
   request's tag is ``max(virtual time, its tenant's last finish)``, the tenant's finish
   then grows by ``1 / weight``; the lowest tag goes first);
3. inside a tenant, arrival order (its tags only grow).

Whether it may go now: the key is not paused, its breaker lets calls through, a slot is
free (``concurrency``), the rate allows it (GCRA: a grant at most every ``interval``,
``burst`` of them at once; a tool's ``retry_after`` holds grants until then), and the
budget has room for the request's estimate (else it waits for the next window, or is
refused with ``BUDGET_EXHAUSTED``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from engine.core.admission_records import (
    COMMAND_TYPES,
    EVENT_TYPES,
    RECORD_TYPES,
    Acquire,
    AdmissionCommand,
    AdmissionEvent,
    AdmissionState,
    BreakerClosed,
    BreakerHalfOpened,
    BreakerOpened,
    BreakerState,
    BudgetExhausted,
    BudgetWarned,
    BudgetWindowOpened,
    Call,
    Configure,
    Configured,
    Granted,
    Lease,
    Outcome,
    Pause,
    Paused,
    Queued,
    Refused,
    Release,
    Released,
    ReleaseReason,
    Resume,
    Resumed,
    Throttle,
    Throttled,
    Tick,
    Waiter,
)
from engine.core.durations import format_duration
from engine.core.windows import format_instant, window_bounds

__all__ = [
    "BUDGET_EXHAUSTED",
    "COMMAND_TYPES",
    "EVENT_TYPES",
    "RECORD_TYPES",
    "Acquire",
    "AdmissionCommand",
    "AdmissionEvent",
    "AdmissionState",
    "BreakerClosed",
    "BreakerHalfOpened",
    "BreakerOpened",
    "BreakerState",
    "BudgetExhausted",
    "BudgetWarned",
    "BudgetWindowOpened",
    "Call",
    "Configure",
    "Configured",
    "Granted",
    "Hold",
    "HoldKind",
    "Lease",
    "Outcome",
    "Pause",
    "Paused",
    "Queued",
    "Refused",
    "Release",
    "ReleaseReason",
    "Released",
    "Resume",
    "Resumed",
    "Throttle",
    "Throttled",
    "Tick",
    "Waiter",
    "decide",
    "evolve",
    "hold",
    "next_due",
    "timers",
]

BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"


class HoldKind(StrEnum):
    """What holds the next request of a key back."""

    PAUSED = "paused"
    BREAKER_OPEN = "breaker open"
    BREAKER_PROBING = "breaker half-open"
    CONCURRENCY = "queued"
    THROTTLED = "throttled"
    RATE = "rate"
    BUDGET = "budget exhausted"


@dataclass(frozen=True, slots=True)
class Hold:
    kind: HoldKind
    reason: str
    """In the words a held run's status shows: ``queued: tool:llm.classify 8/8``."""


# ---------------------------------------------------------------------- decide


def decide(
    state: AdmissionState | None, command: AdmissionCommand, now: int
) -> list[AdmissionEvent]:
    """The events ``command`` causes on its key at ``now`` (ms). Never raises on bad
    input: a command that does not apply causes no event."""
    ctx = _Context(state if state is not None else AdmissionState.empty(command.key), now)
    handler = _DECIDERS.get(type(command))
    if handler is not None:
        handler(ctx, command)
    return ctx.events


class _Context:
    __slots__ = ("events", "now", "state")

    def __init__(self, state: AdmissionState, now: int) -> None:
        self.state = state
        self.now = now
        self.events: list[AdmissionEvent] = []

    def emit(self, event: AdmissionEvent) -> None:
        self.state = evolve(self.state, event)
        self.events.append(event)

    @property
    def key(self) -> str:
        return self.state.key

    def advance(self) -> None:
        """What time alone causes, then every grant that can be made now."""
        s, now = self.state, self.now
        budget = s.limits.budget
        if budget is not None and now >= s.window_end:
            start, end = window_bounds(now, budget.per, budget.timezone)
            self.emit(BudgetWindowOpened(self.key, now, start, end))
        for lease in sorted(self.state.leases.values(), key=lambda x: (x.expires_at, x.request_id)):
            if lease.expires_at <= now:
                self.emit(
                    Released(
                        self.key,
                        now,
                        lease.request_id,
                        ReleaseReason.EXPIRED,
                        Outcome.FAILED,
                        0.0,
                        now - lease.granted_at,
                    )
                )
                self.judge(lease, failed=True)
        if self.state.breaker is BreakerState.OPEN and now >= self.state.breaker_until:
            self.emit(BreakerHalfOpened(self.key, now))
        while self.state.queue:
            waiter = _pick(self.state, now)
            budget = self.state.limits.budget
            short = _budget_short(self.state, waiter)
            never = budget is not None and _estimate(self.state, waiter) > budget.amount
            if never and budget is not None:
                # No window can ever hold it: waiting would block everyone behind it.
                self.emit(
                    Refused(
                        self.key,
                        now,
                        waiter.request_id,
                        BUDGET_EXHAUSTED,
                        f"this request reserves {_estimate(self.state, waiter):g}, more than "
                        f"the whole budget of {self.key} ({budget.amount:g} per {budget.per})",
                        "fail",
                        waiter.reply_to,
                    )
                )
                continue
            if short and budget is not None and not self.state.exhausted:
                self.emit(
                    BudgetExhausted(
                        self.key, now, self.state.spent, budget.amount, self.state.window_end
                    )
                )
            if short and budget is not None and budget.on_exhausted != "wait":
                self.emit(
                    Refused(
                        self.key,
                        now,
                        waiter.request_id,
                        BUDGET_EXHAUSTED,
                        f"{self.key} has spent {self.state.spent:g} of its budget of "
                        f"{budget.amount:g} per {budget.per}; this request reserves "
                        f"{_estimate(self.state, waiter):g}",
                        budget.on_exhausted,
                        waiter.reply_to,
                    )
                )
                continue
            if _gate(self.state, waiter, now) is not None:
                break
            lease_ms = waiter.lease_ms or self.state.limits.lease
            self.emit(
                Granted(
                    self.key,
                    now,
                    waiter.request_id,
                    waiter.tenant,
                    now + lease_ms,
                    _estimate(self.state, waiter),
                    self.state.breaker is BreakerState.HALF_OPEN,
                    waiter.reply_to,
                    now - waiter.enqueued_at,
                )
            )

    def judge(self, lease: Lease, failed: bool) -> None:
        """Feed one call's outcome to the breaker."""
        s, now = self.state, self.now
        spec = s.limits.breaker
        if spec is None:
            return
        if s.breaker is BreakerState.HALF_OPEN and lease.probe:
            if failed:
                self.trip(1.0)
            elif s.probes_ok >= spec.half_open_calls:
                self.emit(BreakerClosed(self.key, now))
            return
        if s.breaker is not BreakerState.CLOSED:
            return
        calls = [call.bad for call in s.outcomes if call.at > now - spec.window]
        if len(calls) >= spec.min_calls:
            rate = sum(calls) / len(calls)
            if rate >= spec.failure_rate:
                self.trip(rate)

    def trip(self, rate: float) -> None:
        spec = self.state.limits.breaker
        assert spec is not None
        open_for = min(spec.max_open_for, spec.open_for * 2**self.state.trips)
        self.emit(
            BreakerOpened(self.key, self.now, self.now + open_for, self.state.trips + 1, rate)
        )


def hold(state: AdmissionState, now: int) -> Hold | None:
    """Why the next request of the key is not granted at ``now``, or None if nothing holds
    it (or nothing waits)."""
    if not state.queue:
        return None
    return _gate(state, _pick(state, now), now)


def _estimate(s: AdmissionState, w: Waiter) -> float:
    budget = s.limits.budget
    if budget is None:
        return 0.0
    return w.estimate if w.estimate > 0 else budget.estimate


def _budget_short(s: AdmissionState, w: Waiter) -> bool:
    budget = s.limits.budget
    return budget is not None and s.spent + s.reserved + _estimate(s, w) > budget.amount + 1e-9


def _level(s: AdmissionState, w: Waiter, now: int) -> int:
    return w.priority + max(0, now - w.enqueued_at) // max(1, s.limits.aging)


def _pick(s: AdmissionState, now: int) -> Waiter:
    """The request to be granted next: highest level, then lowest fair-queue tag, then
    the earliest to arrive."""
    best = s.queue[0]
    best_rank = (-_level(s, best, now), best.tag)
    for w in s.queue[1:]:
        rank = (-_level(s, w, now), w.tag)
        if rank < best_rank:
            best, best_rank = w, rank
    return best


def _gate(s: AdmissionState, w: Waiter, now: int) -> Hold | None:
    """What holds ``w`` back now, or None. A budget that refuses (fail, escalate) does not
    hold: the request is refused instead."""
    limits, key = s.limits, s.key
    if s.paused:
        return Hold(HoldKind.PAUSED, f"paused: {key}")
    if s.breaker is BreakerState.OPEN:
        return Hold(HoldKind.BREAKER_OPEN, f"breaker open: {key}")
    spec = limits.breaker
    if (
        s.breaker is BreakerState.HALF_OPEN
        and spec is not None
        and s.probes_granted >= spec.half_open_calls
    ):
        return Hold(
            HoldKind.BREAKER_PROBING,
            f"breaker half-open: {key} {s.probes_granted}/{spec.half_open_calls} probes out",
        )
    if limits.concurrency is not None and len(s.leases) >= limits.concurrency:
        return Hold(HoldKind.CONCURRENCY, f"queued: {key} {len(s.leases)}/{limits.concurrency}")
    if s.throttled_until > now:
        return Hold(HoldKind.THROTTLED, f"throttled: {key} (the tool asked to retry later)")
    if limits.rate is not None and _rate_wait(s, now) > 0:
        return Hold(
            HoldKind.RATE,
            f"rate: {key} {limits.rate.count}/{format_duration(limits.rate.period_ms)}",
        )
    budget = limits.budget
    if budget is not None and budget.on_exhausted == "wait" and _budget_short(s, w):
        return Hold(
            HoldKind.BUDGET,
            f"budget exhausted: {key} until {format_instant(s.window_end, budget.timezone)}",
        )
    return None


def _rate_wait(s: AdmissionState, now: int) -> float:
    """How long until GCRA allows one more grant (0: now)."""
    rate = s.limits.rate
    if rate is None:
        return 0.0
    burst = s.limits.burst or rate.count
    tolerance = rate.interval_ms * (burst - 1)
    return max(0.0, s.tat - tolerance - now)


def _acquire(ctx: _Context, c: Acquire) -> None:
    if c.limits is not None and c.version > ctx.state.version:
        ctx.emit(Configured(ctx.key, ctx.now, c.limits, c.version))
    if ctx.state.known(c.request_id):
        ctx.advance()
        return
    s = ctx.state
    start = max(s.vtime, s.finish_tags.get(c.tenant, 0.0))
    weight = c.weight if c.weight > 0 else 1.0
    ctx.emit(
        Queued(
            ctx.key,
            ctx.now,
            c.request_id,
            c.tenant,
            c.priority,
            weight,
            max(0.0, c.estimate),
            max(0, c.lease_ms),
            start,
            c.reply_to,
        )
    )
    ctx.advance()


def _release(ctx: _Context, c: Release) -> None:
    s = ctx.state
    lease = s.leases.get(c.request_id)
    cost = max(0.0, c.cost)
    if lease is not None:
        ctx.emit(
            Released(
                ctx.key,
                ctx.now,
                c.request_id,
                ReleaseReason.DONE,
                c.outcome,
                cost,
                max(0, c.latency_ms),
            )
        )
        if c.outcome is not Outcome.CANCELLED:
            spec = s.limits.breaker
            slow = (
                spec is not None and spec.slow_call is not None and c.latency_ms >= spec.slow_call
            )
            ctx.judge(lease, failed=c.outcome is Outcome.FAILED or slow)
    elif any(w.request_id == c.request_id for w in s.queue):
        ctx.emit(
            Released(
                ctx.key, ctx.now, c.request_id, ReleaseReason.CANCELLED, Outcome.CANCELLED, 0.0, 0
            )
        )
    elif c.request_id not in s.finished:
        ctx.emit(Released(ctx.key, ctx.now, c.request_id, ReleaseReason.UNKNOWN, c.outcome, 0.0, 0))
    ctx.advance()
    if ctx.state.limits.budget is not None:
        _warn(ctx)


def _warn(ctx: _Context) -> None:
    s = ctx.state
    budget = s.limits.budget
    assert budget is not None
    if budget.warn_at is not None and not s.warned and s.spent >= budget.warn_at * budget.amount:
        ctx.emit(BudgetWarned(ctx.key, ctx.now, s.spent, budget.amount))


def _tick(ctx: _Context, c: Tick) -> None:
    ctx.advance()


def _throttle(ctx: _Context, c: Throttle) -> None:
    if c.until > ctx.state.throttled_until:
        ctx.emit(Throttled(ctx.key, ctx.now, c.until))
    ctx.advance()


def _configure(ctx: _Context, c: Configure) -> None:
    if c.version > ctx.state.version:
        ctx.emit(Configured(ctx.key, ctx.now, c.limits, c.version))
        ctx.advance()


def _pause(ctx: _Context, c: Pause) -> None:
    if not ctx.state.paused:
        ctx.emit(Paused(ctx.key, ctx.now))


def _resume(ctx: _Context, c: Resume) -> None:
    if ctx.state.paused:
        ctx.emit(Resumed(ctx.key, ctx.now))
        ctx.advance()


_DECIDERS: dict[type[Any], Callable[[_Context, Any], None]] = {
    Acquire: _acquire,
    Release: _release,
    Tick: _tick,
    Throttle: _throttle,
    Configure: _configure,
    Pause: _pause,
    Resume: _resume,
}


# ---------------------------------------------------------------------- evolve


def evolve(state: AdmissionState | None, event: AdmissionEvent) -> AdmissionState:
    """Fold one event into the key's state. Total and deterministic."""
    s = state if state is not None else AdmissionState.empty(event.key)
    applier = _APPLIERS[type(event)]
    result: AdmissionState = applier(s, event)
    return result if event.at <= result.clock else replace(result, clock=event.at)


FINISHED_MEMORY = 4096
"""How many finished request ids a key remembers, so that a duplicate ``Acquire`` of a
request that has ended is not granted again."""


def _finish(s: AdmissionState, request_id: str, at: int) -> dict[str, int]:
    finished = dict(s.finished)
    finished[request_id] = at
    while len(finished) > FINISHED_MEMORY:
        del finished[next(iter(finished))]
    return finished


def _on_configured(s: AdmissionState, e: Configured) -> AdmissionState:
    changes: dict[str, Any] = {"limits": e.limits, "version": e.version}
    if e.limits.budget != s.limits.budget:
        changes |= {"window_start": 0, "window_end": 0}  # re-read in the new timezone
    if e.limits.breaker is None:
        changes |= {"breaker": BreakerState.CLOSED, "outcomes": (), "trips": 0}
    return replace(s, **changes)


def _on_queued(s: AdmissionState, e: Queued) -> AdmissionState:
    waiter = Waiter(
        e.request_id,
        e.tenant,
        e.priority,
        e.weight,
        e.estimate,
        e.lease_ms,
        e.tag,
        e.at,
        e.reply_to,
    )
    tags = dict(s.finish_tags)
    tags[e.tenant] = e.tag + 1.0 / e.weight
    return replace(s, queue=(*s.queue, waiter), finish_tags=tags)


def _on_granted(s: AdmissionState, e: Granted) -> AdmissionState:
    waiter = next(w for w in s.queue if w.request_id == e.request_id)
    leases = dict(s.leases)
    leases[e.request_id] = Lease(e.request_id, e.tenant, e.at, e.expires_at, e.reserved, e.probe)
    vtime = max(s.vtime, waiter.tag)
    tags = {t: f for t, f in s.finish_tags.items() if f > vtime}
    tat = s.tat
    if s.limits.rate is not None:
        tat = max(s.tat, float(e.at)) + s.limits.rate.interval_ms
    return replace(
        s,
        queue=tuple(w for w in s.queue if w.request_id != e.request_id),
        leases=leases,
        vtime=vtime,
        finish_tags=tags,
        tat=tat,
        probes_granted=s.probes_granted + (1 if e.probe else 0),
    )


def _on_refused(s: AdmissionState, e: Refused) -> AdmissionState:
    return replace(
        s,
        queue=tuple(w for w in s.queue if w.request_id != e.request_id),
        finished=_finish(s, e.request_id, e.at),
    )


def _on_released(s: AdmissionState, e: Released) -> AdmissionState:
    leases = dict(s.leases)
    lease = leases.pop(e.request_id, None)
    changes: dict[str, Any] = {
        "leases": leases,
        "finished": _finish(s, e.request_id, e.at),
        "queue": tuple(w for w in s.queue if w.request_id != e.request_id),
    }
    if lease is not None:
        if s.limits.budget is not None:
            changes["spent"] = s.spent + e.cost
        spec = s.limits.breaker
        if spec is not None and e.outcome is not Outcome.CANCELLED:
            slow = spec.slow_call is not None and e.latency_ms >= spec.slow_call
            bad = e.outcome is Outcome.FAILED or e.reason is ReleaseReason.EXPIRED or slow
            kept = tuple(o for o in s.outcomes if o.at > e.at - spec.window)
            changes["outcomes"] = (*kept, Call(e.at, bad))
            if lease.probe and not bad:
                changes["probes_ok"] = s.probes_ok + 1
    return replace(s, **changes)


def _on_throttled(s: AdmissionState, e: Throttled) -> AdmissionState:
    return replace(s, throttled_until=e.until)


def _on_paused(s: AdmissionState, e: Paused) -> AdmissionState:
    return replace(s, paused=True)


def _on_resumed(s: AdmissionState, e: Resumed) -> AdmissionState:
    return replace(s, paused=False)


def _on_window(s: AdmissionState, e: BudgetWindowOpened) -> AdmissionState:
    # What leases hold stays reserved; their cost lands in the window they end in.
    return replace(
        s, window_start=e.start, window_end=e.end, spent=0.0, warned=False, exhausted=False
    )


def _on_warned(s: AdmissionState, e: BudgetWarned) -> AdmissionState:
    return replace(s, warned=True)


def _on_exhausted(s: AdmissionState, e: BudgetExhausted) -> AdmissionState:
    return replace(s, exhausted=True)


def _on_opened(s: AdmissionState, e: BreakerOpened) -> AdmissionState:
    return replace(
        s,
        breaker=BreakerState.OPEN,
        breaker_until=e.until,
        trips=e.trips,
        probes_ok=0,
        probes_granted=0,
    )


def _on_half_opened(s: AdmissionState, e: BreakerHalfOpened) -> AdmissionState:
    return replace(s, breaker=BreakerState.HALF_OPEN, probes_ok=0, probes_granted=0)


def _on_closed(s: AdmissionState, e: BreakerClosed) -> AdmissionState:
    return replace(
        s, breaker=BreakerState.CLOSED, trips=0, outcomes=(), probes_ok=0, probes_granted=0
    )


_APPLIERS: dict[type[Any], Callable[[AdmissionState, Any], AdmissionState]] = {
    Configured: _on_configured,
    Queued: _on_queued,
    Granted: _on_granted,
    Refused: _on_refused,
    Released: _on_released,
    Throttled: _on_throttled,
    Paused: _on_paused,
    Resumed: _on_resumed,
    BudgetWindowOpened: _on_window,
    BudgetWarned: _on_warned,
    BudgetExhausted: _on_exhausted,
    BreakerOpened: _on_opened,
    BreakerHalfOpened: _on_half_opened,
    BreakerClosed: _on_closed,
}


# ---------------------------------------------------------------------- timers


def next_due(state: AdmissionState) -> int | None:
    """When time alone will change something on this key (a ``Tick`` is due), or None.
    Aging needs no timer: it changes who is next, and a grant is only ever made when
    something else happens."""
    due: list[int] = [lease.expires_at for lease in state.leases.values()]
    if state.breaker is BreakerState.OPEN:
        due.append(state.breaker_until)
    held = hold(state, state.clock)
    if held is not None:
        if held.kind is HoldKind.THROTTLED:
            due.append(state.throttled_until)
        elif held.kind is HoldKind.RATE:
            due.append(state.clock + math.ceil(_rate_wait(state, state.clock)))
        elif held.kind is HoldKind.BUDGET:
            due.append(state.window_end)
    return min(due) if due else None


def timers(key: str, state: AdmissionState) -> list[tuple[int, Tick]]:
    """The key's timer, in the form ``engine.kafka.keyed`` arms."""
    due = next_due(state)
    return [] if due is None else [(due, Tick(key, due))]
