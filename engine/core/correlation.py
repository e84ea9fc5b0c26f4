"""Message correlation: events from outside, addressed by name and business key.

An outside system (a bank, a CRM) does not know run ids. It publishes a *message*: a
name (``payment``), a correlation key (``order-42``), data, an id and a time-to-live. A
run waiting in a ``wait_event`` step with that name, whose ``key`` expression evaluated
to that key when the wait began, receives it; no other run does.

The rules follow Zeebe's message correlation:

- A message reaches every run whose wait is open for its (tenant, name, key) when it is
  published, one delivery per run.
- With a time-to-live above zero it is also *buffered*: a wait that opens before the
  TTL runs out receives the oldest buffered message it has not received yet.
- A message is delivered to one run at most once, however many waits that run opens
  while the message is buffered.
- Each wait receives one message at most: delivery closes the subscription.
- A second publish with the id of a message published in the last ``DEDUP_WINDOW_MS``
  (or still buffered) for the same (tenant, name, key) is the same message: ignored.
- Every message ends with a ``MessageExpired`` that lists the runs it reached; an empty
  list records a message nobody waited for, so none is lost silently.

Everything here is pure: the commands carry no time, ``decide`` gets ``now``. State is
kept per correlation key (``correlation_key``): the subscriptions open on it, its
buffered messages and the message ids it remembers. The run side (``subscription_changes``)
derives the open and close commands of a run's waits from the run's events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from engine.core import events as ev
from engine.core.commands import CorrelateMessage
from engine.core.state import RunState, StepState, Waiting

DEDUP_WINDOW_MS = 3_600_000
"""How long a message id is remembered after its publish, when its TTL is shorter."""

DEFAULT_TTL_MS = 3_600_000
"""The time-to-live of a published message that names none (Zeebe's clients: 1 hour)."""


def correlation_key(tenant: str, name: str, key: str) -> str:
    """The record key of everything about (tenant, name, key): the partition and the
    state it lives in. Outside producers key message records by it."""
    return f"{tenant}/{name}/{key}"


# ---------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishMessage:
    """A message from outside. ``ttl_ms`` 0 delivers to the waits open now only."""

    TYPE: ClassVar[str] = "PublishMessage"
    VERSION: ClassVar[int] = 1
    message_id: str
    name: str
    key: str
    tenant: str = "default"
    data: Any = None
    ttl_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenSubscription:
    """Run ``run_id`` waits for (name, key) in the wait ``wait`` (``step#visit``)."""

    TYPE: ClassVar[str] = "OpenSubscription"
    VERSION: ClassVar[int] = 1
    run_id: str
    wait: str
    name: str
    key: str
    tenant: str = "default"


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseSubscription:
    """The wait ended without a message (timeout, cancel, failure, a signal by run id)."""

    TYPE: ClassVar[str] = "CloseSubscription"
    VERSION: ClassVar[int] = 1
    run_id: str
    wait: str
    name: str
    key: str
    tenant: str = "default"


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpireMessages:
    """The timer of a correlation key: expire what is due, forget old ids. ``due_at``
    tells one arming from the next, so a timer written for an earlier due time is
    recognised as spent (the keyed processor writes only timers the state still asks
    for)."""

    TYPE: ClassVar[str] = "ExpireMessages"
    VERSION: ClassVar[int] = 1
    name: str
    key: str
    tenant: str = "default"
    due_at: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class RejectCorrelation:
    """The run refused a delivery: the wait it was for had ended on the way (a timeout,
    say). The message is no longer counted as the run's, so the run's next wait on the
    key can take it (Zeebe does the same)."""

    TYPE: ClassVar[str] = "RejectCorrelation"
    VERSION: ClassVar[int] = 1
    run_id: str
    wait: str
    message_id: str
    name: str
    key: str
    tenant: str = "default"


CorrelationCommand = (
    PublishMessage | OpenSubscription | CloseSubscription | ExpireMessages | RejectCorrelation
)

CORRELATION_COMMANDS: tuple[type, ...] = (
    PublishMessage,
    OpenSubscription,
    CloseSubscription,
    ExpireMessages,
    RejectCorrelation,
)

RunSideCommand = OpenSubscription | CloseSubscription | RejectCorrelation
"""What a run's engine writes to message correlation."""


def key_of(command: CorrelationCommand) -> str:
    """The correlation key a command belongs to."""
    return correlation_key(command.tenant, command.name, command.key)


# ---------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True, kw_only=True)
class MessagePublished:
    TYPE: ClassVar[str] = "MessagePublished"
    VERSION: ClassVar[int] = 1
    message_id: str
    name: str
    key: str
    tenant: str
    data: Any
    ts: int
    expires_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageCorrelated:
    """Message ``message_id`` goes to run ``run_id`` for its wait ``wait``."""

    TYPE: ClassVar[str] = "MessageCorrelated"
    VERSION: ClassVar[int] = 1
    message_id: str
    name: str
    key: str
    tenant: str
    run_id: str
    wait: str
    data: Any
    ts: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageExpired:
    """The message's TTL ran out; ``runs`` are the runs it reached (none: unmatched)."""

    TYPE: ClassVar[str] = "MessageExpired"
    VERSION: ClassVar[int] = 1
    message_id: str
    name: str
    key: str
    tenant: str
    runs: tuple[str, ...]
    ts: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriptionOpened:
    TYPE: ClassVar[str] = "SubscriptionOpened"
    VERSION: ClassVar[int] = 1
    run_id: str
    wait: str
    name: str
    key: str
    tenant: str
    ts: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriptionClosed:
    TYPE: ClassVar[str] = "SubscriptionClosed"
    VERSION: ClassVar[int] = 1
    run_id: str
    wait: str
    name: str
    key: str
    tenant: str
    ts: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CorrelationRejected:
    """Run ``run_id`` refused message ``message_id`` for its ended wait ``wait``."""

    TYPE: ClassVar[str] = "CorrelationRejected"
    VERSION: ClassVar[int] = 1
    message_id: str
    name: str
    key: str
    tenant: str
    run_id: str
    wait: str
    ts: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageIdsForgotten:
    """Ids past their de-duplication window: a publish with one of them is new again."""

    TYPE: ClassVar[str] = "MessageIdsForgotten"
    VERSION: ClassVar[int] = 1
    message_ids: tuple[str, ...]
    ts: int


CorrelationEvent = (
    MessagePublished
    | MessageCorrelated
    | MessageExpired
    | SubscriptionOpened
    | SubscriptionClosed
    | CorrelationRejected
    | MessageIdsForgotten
)

CORRELATION_EVENTS: tuple[type, ...] = (
    MessagePublished,
    MessageCorrelated,
    MessageExpired,
    SubscriptionOpened,
    SubscriptionClosed,
    CorrelationRejected,
    MessageIdsForgotten,
)


# ---------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class Subscription:
    run_id: str
    wait: str
    name: str
    key: str
    tenant: str


@dataclass(frozen=True, slots=True)
class BufferedMessage:
    message_id: str
    name: str
    key: str
    tenant: str
    data: Any
    published_at: int
    expires_at: int
    runs: tuple[str, ...] = ()
    """The runs it has reached so far: it reaches each at most once."""


@dataclass(frozen=True, slots=True)
class CorrelationState:
    """What one correlation key holds. Subscriptions and messages keep their exact
    (tenant, name, key): matching compares those, never the combined key string."""

    TYPE: ClassVar[str] = "CorrelationState"
    VERSION: ClassVar[int] = 1
    key: str
    subscriptions: tuple[Subscription, ...] = ()
    messages: tuple[BufferedMessage, ...] = ()
    seen: Mapping[str, int] = field(default_factory=dict)
    """Message id to when it is forgotten: the ids a publish is de-duplicated against."""


def _matches(a: Subscription | BufferedMessage, tenant: str, name: str, key: str) -> bool:
    return a.tenant == tenant and a.name == name and a.key == key


def decide(
    state: CorrelationState | None, command: CorrelationCommand, now: int
) -> list[CorrelationEvent]:
    """The events ``command`` causes at ``now``; none when it changes nothing."""
    current = state or CorrelationState(key_of(command))
    if isinstance(command, PublishMessage):
        return _publish(current, command, now)
    if isinstance(command, OpenSubscription):
        return _open(current, command, now)
    if isinstance(command, CloseSubscription):
        return _close(current, command, now)
    if isinstance(command, RejectCorrelation):
        return _rejected(current, command, now)
    return _expire(current, now)


def _publish(state: CorrelationState, c: PublishMessage, now: int) -> list[CorrelationEvent]:
    if c.message_id in state.seen:
        return []
    ttl = max(c.ttl_ms, 0)
    out: list[CorrelationEvent] = [
        MessagePublished(
            message_id=c.message_id,
            name=c.name,
            key=c.key,
            tenant=c.tenant,
            data=c.data,
            ts=now,
            expires_at=now + ttl,
        )
    ]
    reached: list[str] = []
    for sub in state.subscriptions:
        if _matches(sub, c.tenant, c.name, c.key) and sub.run_id not in reached:
            reached.append(sub.run_id)
            out.append(_correlated(c.message_id, c.data, sub, now))
    if ttl == 0:
        out.append(
            MessageExpired(
                message_id=c.message_id,
                name=c.name,
                key=c.key,
                tenant=c.tenant,
                runs=tuple(reached),
                ts=now,
            )
        )
    return out


def _correlated(message_id: str, data: Any, sub: Subscription, now: int) -> MessageCorrelated:
    return MessageCorrelated(
        message_id=message_id,
        name=sub.name,
        key=sub.key,
        tenant=sub.tenant,
        run_id=sub.run_id,
        wait=sub.wait,
        data=data,
        ts=now,
    )


def _open(state: CorrelationState, c: OpenSubscription, now: int) -> list[CorrelationEvent]:
    if any(s.run_id == c.run_id and s.wait == c.wait for s in state.subscriptions):
        return []
    sub = Subscription(c.run_id, c.wait, c.name, c.key, c.tenant)
    out: list[CorrelationEvent] = [
        SubscriptionOpened(
            run_id=c.run_id, wait=c.wait, name=c.name, key=c.key, tenant=c.tenant, ts=now
        )
    ]
    for message in state.messages:  # oldest first
        if (
            _matches(message, c.tenant, c.name, c.key)
            and message.expires_at > now
            and c.run_id not in message.runs
        ):
            out.append(_correlated(message.message_id, message.data, sub, now))
            break
    return out


def _close(state: CorrelationState, c: CloseSubscription, now: int) -> list[CorrelationEvent]:
    if not any(s.run_id == c.run_id and s.wait == c.wait for s in state.subscriptions):
        return []  # delivered already (delivery closes it), or never opened
    return [
        SubscriptionClosed(
            run_id=c.run_id, wait=c.wait, name=c.name, key=c.key, tenant=c.tenant, ts=now
        )
    ]


def _rejected(state: CorrelationState, c: RejectCorrelation, now: int) -> list[CorrelationEvent]:
    out: list[CorrelationEvent] = [
        CorrelationRejected(
            message_id=c.message_id,
            name=c.name,
            key=c.key,
            tenant=c.tenant,
            run_id=c.run_id,
            wait=c.wait,
            ts=now,
        )
    ]
    message = next(
        (
            m
            for m in state.messages
            if m.message_id == c.message_id and _matches(m, c.tenant, c.name, c.key)
        ),
        None,
    )
    if message is None or message.expires_at <= now:
        return out  # not buffered (TTL 0, or expired): nothing is left to hand on
    for sub in state.subscriptions:  # the run waits again on this key: it takes it now
        if sub.run_id == c.run_id and _matches(sub, c.tenant, c.name, c.key):
            out.append(_correlated(message.message_id, message.data, sub, now))
            break
    return out


def _expire(state: CorrelationState, now: int) -> list[CorrelationEvent]:
    out: list[CorrelationEvent] = [
        MessageExpired(
            message_id=m.message_id, name=m.name, key=m.key, tenant=m.tenant, runs=m.runs, ts=now
        )
        for m in state.messages
        if m.expires_at <= now
    ]
    forgotten = tuple(sorted(mid for mid, at in state.seen.items() if at <= now))
    if forgotten:
        out.append(MessageIdsForgotten(message_ids=forgotten, ts=now))
    return out


def evolve(state: CorrelationState | None, event: CorrelationEvent) -> CorrelationState:
    """Fold one event into the state of its correlation key."""
    if isinstance(event, MessageIdsForgotten):
        assert state is not None, "ids are forgotten only from a state that has them"
        gone = set(event.message_ids)
        return replace(state, seen={m: at for m, at in state.seen.items() if m not in gone})
    current = state or CorrelationState(correlation_key(event.tenant, event.name, event.key))
    if isinstance(event, MessagePublished):
        forget_at = max(event.expires_at, event.ts + DEDUP_WINDOW_MS)
        seen = {**current.seen, event.message_id: forget_at}
        messages = current.messages
        if event.expires_at > event.ts:
            messages = (
                *messages,
                BufferedMessage(
                    event.message_id,
                    event.name,
                    event.key,
                    event.tenant,
                    event.data,
                    event.ts,
                    event.expires_at,
                ),
            )
        return replace(current, seen=seen, messages=messages)
    if isinstance(event, MessageCorrelated):
        return replace(
            current,
            subscriptions=tuple(
                s
                for s in current.subscriptions
                if not (s.run_id == event.run_id and s.wait == event.wait)
            ),
            messages=tuple(
                replace(m, runs=(*m.runs, event.run_id)) if m.message_id == event.message_id else m
                for m in current.messages
            ),
        )
    if isinstance(event, MessageExpired):
        return replace(
            current, messages=tuple(m for m in current.messages if m.message_id != event.message_id)
        )
    if isinstance(event, CorrelationRejected):
        return replace(
            current,
            messages=tuple(
                replace(m, runs=tuple(r for r in m.runs if r != event.run_id))
                if m.message_id == event.message_id
                else m
                for m in current.messages
            ),
        )
    if isinstance(event, SubscriptionOpened):
        sub = Subscription(event.run_id, event.wait, event.name, event.key, event.tenant)
        return replace(current, subscriptions=(*current.subscriptions, sub))
    return replace(
        current,
        subscriptions=tuple(
            s
            for s in current.subscriptions
            if not (s.run_id == event.run_id and s.wait == event.wait)
        ),
    )


def next_due(state: CorrelationState) -> int | None:
    """When the key's timer is due: its first expiry or id to forget (None: nothing)."""
    times = [m.expires_at for m in state.messages] + list(state.seen.values())
    return min(times) if times else None


def timer(state: CorrelationState) -> tuple[int, ExpireMessages] | None:
    """The key's timer, if it has one to arm."""
    due = next_due(state)
    if due is None:
        return None
    tenant, name, key = _parts(state)
    return due, ExpireMessages(name=name, key=key, tenant=tenant, due_at=due)


def _parts(state: CorrelationState) -> tuple[str, str, str]:
    for m in state.messages:
        return m.tenant, m.name, m.key
    for s in state.subscriptions:
        return s.tenant, s.name, s.key
    tenant, _, rest = state.key.partition("/")
    name, _, key = rest.partition("/")
    return tenant, name, key


def is_empty(state: CorrelationState) -> bool:
    """Nothing left to keep: the state can be dropped (a tombstone on Kafka)."""
    return not (state.subscriptions or state.messages or state.seen)


def delivery(event: MessageCorrelated) -> CorrelateMessage:
    """The command a correlation writes to its run's inputs. Its id names the message,
    the run and the wait: a message handed back and delivered to the run's next wait is
    another command."""
    return CorrelateMessage(
        command_id=f"message:{event.message_id}:{event.run_id}:{event.wait}",
        run_id=event.run_id,
        tenant=event.tenant,
        correlation_id=event.run_id,
        name=event.name,
        key=event.key,
        message_id=event.message_id,
        wait=event.wait,
        data=event.data,
    )


# ---------------------------------------------------------------------- the run side


@dataclass(frozen=True, slots=True)
class _Wait:
    run_id: str
    wait: str
    name: str
    key: str
    tenant: str


def _keyed_wait(state: RunState | None) -> _Wait | None:
    if state is None or state.outcome is not None:
        return None
    current: StepState | None = state.current
    if current is None or current.waiting is not Waiting.SIGNAL or current.signal_key is None:
        return None
    return _Wait(
        state.run_id,
        f"{current.step}#{current.visit}",
        current.signal,
        current.signal_key,
        state.tenant,
    )


def subscription_changes(
    before: RunState | None, events: Sequence[ev.Event], after: RunState | None
) -> list[OpenSubscription | CloseSubscription]:
    """The subscription commands of one decision of a run: open each keyed wait that
    began, close each that ended. A wait that ended by its message was closed by the
    delivery already; closing it again changes nothing."""
    out: list[OpenSubscription | CloseSubscription] = []
    open_wait = _keyed_wait(before)
    visits: dict[str, int] = {}
    for event in events:
        if isinstance(event, ev.StepStarted):
            visits[event.step] = event.visit
        elif isinstance(event, ev.SignalAwaited) and event.key is not None:
            visit = visits.get(event.step, after.visits.get(event.step, 1) if after else 1)
            wait = _Wait(event.run_id, f"{event.step}#{visit}", event.name, event.key, event.tenant)
            if open_wait is not None and open_wait != wait:
                out.append(_close_of(open_wait))
            open_wait = wait
            out.append(
                OpenSubscription(
                    run_id=wait.run_id,
                    wait=wait.wait,
                    name=wait.name,
                    key=wait.key,
                    tenant=wait.tenant,
                )
            )
    if open_wait is not None and open_wait != _keyed_wait(after):
        out.append(_close_of(open_wait))
    return out


def refused_delivery(
    command: CorrelateMessage, events: Sequence[ev.Event]
) -> RejectCorrelation | None:
    """The answer to correlation when the run refused ``command`` (its wait had ended)."""
    if not any(isinstance(e, ev.CommandRejected | ev.CommandRejectedV2) for e in events):
        return None
    return RejectCorrelation(
        run_id=command.run_id,
        wait=command.wait,
        message_id=command.message_id,
        name=command.name,
        key=command.key,
        tenant=command.tenant,
    )


def _close_of(wait: _Wait) -> CloseSubscription:
    return CloseSubscription(
        run_id=wait.run_id, wait=wait.wait, name=wait.name, key=wait.key, tenant=wait.tenant
    )


# ---------------------------------------------------------------------- the edges


class MessageError(ValueError):
    """A message that cannot be published; the text names the field and what to fix."""


def new_message(
    *,
    message_id: str,
    name: str,
    key: str,
    data: Any = None,
    ttl_ms: int = DEFAULT_TTL_MS,
    tenant: str = "default",
) -> PublishMessage:
    """A ``PublishMessage`` checked at the edge (CLI, API): what the processors would have
    to refuse later is refused here, with the field to fix."""
    for field_name, value in (
        ("message_id", message_id),
        ("name", name),
        ("key", key),
        ("tenant", tenant),
    ):
        if not isinstance(value, str) or not value.strip():
            raise MessageError(f"{field_name}: give a non-empty string")
    if "/" in tenant or "/" in name:
        raise MessageError(
            f"{'tenant' if '/' in tenant else 'name'}: '/' separates tenant, "
            "name and key in the record key; use another character"
        )
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms < 0:
        raise MessageError(
            "ttl: give a duration of zero or more (0 delivers only to the waits open now)"
        )
    return PublishMessage(
        message_id=message_id, name=name, key=key, tenant=tenant, data=data, ttl_ms=ttl_ms
    )


@dataclass(slots=True)
class MessageSummary:
    """One message as its events tell it, for listings (``terranoha messages``)."""

    message_id: str
    name: str
    key: str
    tenant: str
    published_at: int
    expires_at: int
    runs: list[str]
    expired: bool = False

    @property
    def status(self) -> str:
        if not self.expired:
            return "buffered"
        return "delivered" if self.runs else "unmatched"


def summarize(events: Sequence[CorrelationEvent]) -> list[MessageSummary]:
    """The messages of ``events`` (in log order), oldest first."""
    out: dict[tuple[str, str, str, str], MessageSummary] = {}
    for e in events:
        if isinstance(e, MessagePublished):
            out[(e.tenant, e.name, e.key, e.message_id)] = MessageSummary(
                e.message_id, e.name, e.key, e.tenant, e.ts, e.expires_at, []
            )
        elif isinstance(e, MessageCorrelated | MessageExpired | CorrelationRejected):
            found = out.get((e.tenant, e.name, e.key, e.message_id))
            if found is None:
                continue
            if isinstance(e, MessageCorrelated):
                found.runs.append(e.run_id)
            elif isinstance(e, CorrelationRejected):
                found.runs = [r for r in found.runs if r != e.run_id]
            else:
                found.expired = True
    return sorted(out.values(), key=lambda m: m.published_at)
