"""Message correlation: the pure core, the run side of keyed waits, and properties."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.codec import decode, encode
from engine.core import commands as cmd
from engine.core.correlation import (
    DEDUP_WINDOW_MS,
    CloseSubscription,
    CorrelationState,
    ExpireMessages,
    MessageCorrelated,
    MessageError,
    MessageExpired,
    MessageIdsForgotten,
    MessagePublished,
    OpenSubscription,
    PublishMessage,
    RejectCorrelation,
    SubscriptionClosed,
    decide,
    delivery,
    evolve,
    is_empty,
    new_message,
    refused_delivery,
    subscription_changes,
    summarize,
    timer,
)
from engine.core.decide import process
from engine.core.events import RunFailed, SignalAwaited, SignalReceived, StepCompleted
from engine.core.spec import load_spec
from engine.core.state import RunState, RunStatus
from engine.runtime.correlator import correlate
from tests.harness import RUN, T0, Flow, wf

KEYED = wf(
    {"id": "pay", "wait_event": {"name": "payment", "key": "input.order", "timeout": "1h"}},
    input={"order": "string"},
)


def publish(
    mid: str,
    key: str = "o1",
    ttl: int = 0,
    name: str = "payment",
    tenant: str = "default",
    data: Any = None,
) -> PublishMessage:
    return PublishMessage(message_id=mid, name=name, key=key, tenant=tenant, data=data, ttl_ms=ttl)


def open_(
    run: str, key: str = "o1", wait: str = "pay#1", name: str = "payment", tenant: str = "default"
) -> OpenSubscription:
    return OpenSubscription(run_id=run, wait=wait, name=name, key=key, tenant=tenant)


def close(run: str, key: str = "o1", wait: str = "pay#1") -> CloseSubscription:
    return CloseSubscription(run_id=run, wait=wait, name="payment", key=key)


class Key:
    """One correlation key's state, decided and evolved like the processors do."""

    def __init__(self) -> None:
        self.state: CorrelationState | None = None
        self.last: list[Any] = []

    def when(self, command: Any, now: int = T0) -> list[Any]:
        self.last = decide(self.state, command, now)
        for event in self.last:
            self.state = evolve(self.state, event)
        return self.last

    def types(self) -> list[str]:
        return [type(e).__name__ for e in self.last]


# --------------------------------------------------------------------------- the core


def test_a_message_reaches_every_open_wait_of_its_key_once_each() -> None:
    key = Key()
    key.when(open_("r1"))
    key.when(open_("r2"))
    events = key.when(publish("m1", data={"paid": 10}))
    assert key.types() == [
        "MessagePublished",
        "MessageCorrelated",
        "MessageCorrelated",
        "MessageExpired",
    ]
    assert [(e.run_id, e.wait, e.data) for e in events if isinstance(e, MessageCorrelated)] == [
        ("r1", "pay#1", {"paid": 10}),
        ("r2", "pay#1", {"paid": 10}),
    ]
    assert events[-1].runs == ("r1", "r2")
    assert key.state is not None and key.state.subscriptions == ()


def test_a_message_for_another_name_or_tenant_on_the_same_key_string_does_not_match() -> None:
    key = Key()
    key.when(open_("r1", name="payment"))
    key.when(publish("m1", name="refund"))
    assert key.types() == ["MessagePublished", "MessageExpired"]
    assert key.last[-1].runs == ()


def test_a_message_nobody_waits_for_is_recorded_as_expired_with_no_runs() -> None:
    key = Key()
    assert [type(e) for e in key.when(publish("m1", ttl=0))] == [MessagePublished, MessageExpired]
    assert key.last[-1].runs == ()


def test_a_buffered_message_answers_a_wait_that_opens_within_its_ttl() -> None:
    key = Key()
    key.when(publish("m1", ttl=60_000, data="early"))
    assert key.types() == ["MessagePublished"]
    events = key.when(open_("r1"), T0 + 59_999)
    assert key.types() == ["SubscriptionOpened", "MessageCorrelated"]
    assert events[1].data == "early"


def test_a_buffered_message_past_its_ttl_answers_nobody_and_expires_by_its_timer() -> None:
    key = Key()
    key.when(publish("m1", ttl=60_000))
    assert key.state is not None
    due, fire = timer(key.state) or (0, None)
    assert due == T0 + 60_000 and isinstance(fire, ExpireMessages)
    key.when(open_("r1"), T0 + 60_000)
    assert key.types() == ["SubscriptionOpened"]
    key.when(fire, due)
    assert key.types() == ["MessageExpired"]
    assert key.last[0].runs == ()


def test_each_arming_of_a_keys_timer_is_a_different_command() -> None:
    """The keyed processor re-writes a timer its state still asks for: a timer for an
    earlier due time must not look like the one armed now."""
    key = Key()
    key.when(publish("m1", ttl=1_000), T0)
    first = timer(key.state)  # type: ignore[arg-type]
    key.when(publish("m2", ttl=1_000), T0 + 10)
    key.when(ExpireMessages(name="payment", key="o1", due_at=T0 + 1_000), T0 + 1_000)
    second = timer(key.state)  # type: ignore[arg-type]
    assert first is not None and second is not None
    assert first[1] != second[1] and (first[0], second[0]) == (T0 + 1_000, T0 + 1_010)


def test_a_buffered_message_reaches_a_run_at_most_once_across_its_waits() -> None:
    key = Key()
    key.when(publish("m1", ttl=60_000))
    key.when(open_("r1", wait="pay#1"))
    assert key.types() == ["SubscriptionOpened", "MessageCorrelated"]
    key.when(open_("r1", wait="pay#2"))  # the run loops back and waits again
    assert key.types() == ["SubscriptionOpened"]
    key.when(open_("r2"))
    assert key.types() == ["SubscriptionOpened", "MessageCorrelated"]


def test_a_wait_takes_the_oldest_buffered_message_and_only_one() -> None:
    key = Key()
    key.when(publish("m1", ttl=60_000, data=1), T0)
    key.when(publish("m2", ttl=60_000, data=2), T0 + 1)
    events = key.when(open_("r1"), T0 + 2)
    assert [e.message_id for e in events if isinstance(e, MessageCorrelated)] == ["m1"]
    events = key.when(open_("r2"), T0 + 3)
    assert [e.message_id for e in events if isinstance(e, MessageCorrelated)] == ["m1"]


def test_a_duplicate_publish_is_the_same_message_until_its_id_is_forgotten() -> None:
    key = Key()
    key.when(open_("r1"))
    key.when(publish("m1"))
    key.when(open_("r2"))
    assert key.when(publish("m1"), T0 + DEDUP_WINDOW_MS - 1) == []
    assert key.state is not None
    due, fire = timer(key.state) or (0, None)
    assert due == T0 + DEDUP_WINDOW_MS
    key.when(fire, due)
    assert key.last == [MessageIdsForgotten(message_ids=("m1",), ts=due)]
    key.when(publish("m1"), due)
    assert key.types() == ["MessagePublished", "MessageCorrelated", "MessageExpired"]


def test_closing_a_subscription_stops_deliveries_and_closing_twice_changes_nothing() -> None:
    key = Key()
    key.when(open_("r1"))
    assert key.when(close("r1")) == [
        SubscriptionClosed(
            run_id="r1", wait="pay#1", name="payment", key="o1", tenant="default", ts=T0
        )
    ]
    assert key.when(close("r1")) == []
    key.when(publish("m1"))
    assert key.last[-1].runs == ()


def test_opening_the_same_wait_twice_opens_it_once() -> None:
    key = Key()
    key.when(open_("r1"))
    assert key.when(open_("r1")) == []


def test_a_key_with_nothing_left_is_empty() -> None:
    key = Key()
    key.when(open_("r1"))
    key.when(close("r1"))
    assert key.state is not None and is_empty(key.state)


def test_the_state_and_every_record_round_trip_through_the_codec() -> None:
    key = Key()
    records: list[Any] = [publish("m1", ttl=10, data={"a": [1]}), open_("r1"), close("r1")]
    for command in records:
        key.when(command)
        records.extend(key.last)
    records.append(ExpireMessages(name="payment", key="o1"))
    assert key.state is not None
    records.append(key.state)
    for record in records:
        assert decode(encode(record)) == record


def test_delivery_addresses_the_run_and_its_wait_with_a_stable_command_id() -> None:
    event = MessageCorrelated(
        message_id="m1",
        name="payment",
        key="o1",
        tenant="t",
        run_id="r1",
        wait="pay#1",
        data=1,
        ts=T0,
    )
    command = delivery(event)
    assert (command.run_id, command.wait, command.tenant, command.command_id) == (
        "r1",
        "pay#1",
        "t",
        "message:m1:r1:pay#1",
    )


def test_new_message_names_the_field_to_fix() -> None:
    for fields, word in (
        ({"name": ""}, "name"),
        ({"key": " "}, "key"),
        ({"ttl_ms": -1}, "ttl"),
        ({"message_id": ""}, "message_id"),
        ({"name": "a/b"}, "name"),
    ):
        args: dict[str, Any] = {"message_id": "m", "name": "n", "key": "k", **fields}
        try:
            new_message(**args)
        except MessageError as exc:
            assert str(exc).startswith(word), exc
        else:
            raise AssertionError(f"{fields} was accepted")


def test_summaries_tell_buffered_delivered_and_unmatched_messages_apart() -> None:
    key = Key()
    log: list[Any] = []
    for command in (publish("lost"), open_("r1"), publish("got"), publish("later", ttl=5)):
        log.extend(key.when(command))
    status = {m.message_id: (m.status, m.runs) for m in summarize(log)}
    assert status == {
        "lost": ("unmatched", []),
        "got": ("delivered", ["r1"]),
        "later": ("buffered", []),
    }


# --------------------------------------------------------------------------- the run side


def _waiting(spec: dict[str, Any]) -> Flow:
    flow = Flow(spec)
    return flow.given(flow.start({"order": "o1"}))


def _run(flow: Flow) -> RunState:
    assert flow.state is not None
    return flow.state


def test_a_keyed_wait_records_its_key_and_opens_its_subscription() -> None:
    flow = Flow(KEYED)
    decision = process(None, flow.start({"order": "o-42"}), flow.spec, T0)
    awaited = next(e for e in decision.events if isinstance(e, SignalAwaited))
    assert awaited.key == "o-42"
    assert decision.state is not None and decision.state.current is not None
    assert decision.state.current.signal_key == "o-42"
    assert subscription_changes(None, decision.events, decision.state) == [
        OpenSubscription(run_id=RUN, wait="pay#1", name="payment", key="o-42")
    ]


def test_a_correlated_message_answers_the_wait_and_closes_nothing_more() -> None:
    flow = _waiting(KEYED)
    before = _run(flow)
    message = cmd.CorrelateMessage(
        command_id="message:m1:run-1",
        run_id=RUN,
        name="payment",
        key="o1",
        message_id="m1",
        wait="pay#1",
        data={"paid": 1},
    )
    flow.when(message)
    flow.then_contains(SignalReceived, name="payment", data={"paid": 1})
    flow.then_contains(StepCompleted, step="pay", result={"paid": 1})
    flow.then_status(RunStatus.COMPLETED)
    # the delivery closed the subscription already; a close changes nothing there
    assert subscription_changes(before, flow.last, flow.state) == [
        CloseSubscription(run_id=RUN, wait="pay#1", name="payment", key="o1")
    ]


def test_a_message_for_another_key_or_an_ended_wait_is_refused() -> None:
    flow = _waiting(KEYED)
    for wait, key in (("pay#2", "o1"), ("pay#1", "o2")):
        flow.when(
            cmd.CorrelateMessage(
                command_id=f"x{wait}{key}",
                run_id=RUN,
                name="payment",
                key=key,
                message_id="m",
                wait=wait,
            )
        )
        flow.then_rejected("stale message")
    flow.then_status(RunStatus.WAITING)


def test_a_wait_that_times_out_closes_its_subscription() -> None:
    flow = _waiting(KEYED)
    before = _run(flow)
    timer_id = next(iter(before.timers))
    flow.after(3_600_000).when(cmd.FireTimer(command_id="t", run_id=RUN, timer_id=timer_id))
    flow.then_contains(RunFailed, code="SIGNAL_TIMEOUT")
    assert subscription_changes(before, flow.last, flow.state) == [
        CloseSubscription(run_id=RUN, wait="pay#1", name="payment", key="o1")
    ]


def test_a_cancelled_run_closes_its_subscription() -> None:
    flow = _waiting(KEYED)
    before = _run(flow)
    flow.when(cmd.CancelRun(command_id="c", run_id=RUN))
    assert subscription_changes(before, flow.last, flow.state) == [
        CloseSubscription(run_id=RUN, wait="pay#1", name="payment", key="o1")
    ]


def test_a_signal_by_run_id_still_answers_a_keyed_wait_and_closes_its_subscription() -> None:
    flow = _waiting(KEYED)
    before = _run(flow)
    flow.when(flow.signal("payment", {"by": "operator"}))
    flow.then_status(RunStatus.COMPLETED)
    assert subscription_changes(before, flow.last, flow.state) == [
        CloseSubscription(run_id=RUN, wait="pay#1", name="payment", key="o1")
    ]


def test_a_wait_whose_key_is_null_fails_the_run_saying_which_key() -> None:
    spec = wf({"id": "pay", "wait_event": {"name": "payment", "key": "input.order"}})
    flow = Flow(spec)
    flow.when(flow.start({}))
    failed = flow.then_contains(RunFailed, code="CORRELATION_KEY_MISSING")
    assert "input.order" in failed.message


def test_an_unkeyed_wait_opens_no_subscription() -> None:
    spec = load_spec(wf({"id": "w", "wait_event": {"name": "payment"}}))
    decision = process(None, Flow(spec).start({}), spec, T0)
    assert subscription_changes(None, decision.events, decision.state) == []


def test_a_wait_entered_twice_in_a_loop_is_closed_then_opened_with_its_new_visit() -> None:
    spec = wf(
        {
            "id": "pay",
            "wait_event": {
                "name": "payment",
                "key": "input.order",
                "timeout": "1s",
                "on_timeout": {"goto": "pay"},
            },
        },
        input={"order": "string"},
    )
    flow = _waiting(spec)
    before = _run(flow)
    timer_id = next(t for t, v in before.timers.items() if v.kind == "signal_timeout")
    flow.after(1000).when(cmd.FireTimer(command_id="t", run_id=RUN, timer_id=timer_id))
    assert subscription_changes(before, flow.last, flow.state) == [
        CloseSubscription(run_id=RUN, wait="pay#1", name="payment", key="o1"),
        OpenSubscription(run_id=RUN, wait="pay#2", name="payment", key="o1"),
    ]


# --------------------------------------------------------------------------- properties

RUNS = ("r1", "r2", "r3")
NAMES = ("payment", "refund")
KEYS = ("k1", "k2")

operation = st.one_of(
    st.tuples(
        st.just("open"), st.sampled_from(RUNS), st.sampled_from(NAMES), st.sampled_from(KEYS)
    ),
    st.tuples(st.just("close"), st.sampled_from(RUNS)),
    st.tuples(
        st.just("publish"),
        st.sampled_from(NAMES),
        st.sampled_from(KEYS),
        st.sampled_from((0, 0, 50, 500)),
        st.integers(0, 5),
    ),
    st.tuples(st.just("tick"), st.integers(1, 300)),
)


@dataclass
class Model:
    """What Zeebe's rules say should happen, written without the core's data structures."""

    now: int = T0
    waits: dict[str, tuple[str, str, str, int]] = field(default_factory=dict)
    """run -> (name, key, wait ref, visit): the run's open wait."""
    visits: dict[str, int] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    seen: set[tuple[str, str, str]] = field(default_factory=set)
    """(name, key, id): ids de-duplicate per name and key (no test lasts an hour, so none
    is forgotten here)."""
    deliveries: list[tuple[str, str, str]] = field(default_factory=list)
    """(name/key/message id, run, wait ref)."""

    def open(self, run: str, name: str, key: str) -> str:
        self.visits[run] = self.visits.get(run, 0) + 1
        ref = f"w#{self.visits[run]}"
        self.waits[run] = (name, key, ref, self.visits[run])
        for m in self.messages:
            if (
                (m["name"], m["key"]) == (name, key)
                and m["expires"] > self.now
                and run not in m["runs"]
            ):
                self._deliver(m, run, ref)
                break
        return ref

    def publish(self, mid: str, name: str, key: str, ttl: int) -> None:
        if (name, key, mid) in self.seen:
            return
        self.seen.add((name, key, mid))
        m = {"id": mid, "name": name, "key": key, "expires": self.now + ttl, "runs": []}
        for run, (wname, wkey, ref, _) in list(self.waits.items()):
            if (wname, wkey) == (name, key):
                self._deliver(m, run, ref)
        if ttl > 0:
            self.messages.append(m)

    def _deliver(self, m: dict[str, Any], run: str, ref: str) -> None:
        m["runs"].append(run)
        self.deliveries.append((f"{m['name']}/{m['key']}/{m['id']}", run, ref))
        del self.waits[run]  # the run's wait is answered


@settings(max_examples=300, deadline=None)
@given(st.lists(operation, max_size=40))
def test_deliveries_are_exactly_what_zeebes_rules_give(ops: list[tuple[Any, ...]]) -> None:
    """Deliver to exactly the matching open waits; buffer for the TTL; one message per
    wait; a message at most once per run; duplicates by id are one message."""
    model = Model()
    states: dict[str, CorrelationState] = {}
    got: list[tuple[str, str, str]] = []
    open_waits: dict[str, OpenSubscription] = {}

    def run_side(commands: list[Any]) -> None:
        batch = correlate(commands, states.get, model.now)
        states.update(batch.states)
        for d in batch.deliveries:
            wait = open_waits.get(d.run_id)
            # the run accepts only the wait it is in, which must match the message
            assert wait is not None and wait.wait == d.wait, f"{d} for a wait not open"
            assert (wait.name, wait.key) == (d.name, d.key), f"{d} does not match {wait}"
            del open_waits[d.run_id]
            got.append((f"{d.name}/{d.key}/{d.message_id}", d.run_id, d.wait))

    for op in ops:
        if op[0] == "open":
            _, run, name, key = op
            commands: list[Any] = []
            if run in open_waits:  # a run has one wait at a time: the old one ends first
                old = open_waits.pop(run)
                model.waits.pop(run, None)
                commands.append(
                    CloseSubscription(run_id=run, wait=old.wait, name=old.name, key=old.key)
                )
            ref = model.open(run, name, key)
            sub = OpenSubscription(run_id=run, wait=ref, name=name, key=key)
            open_waits[run] = sub
            run_side([*commands, sub])
        elif op[0] == "close":
            old_wait = open_waits.pop(op[1], None)
            model.waits.pop(op[1], None)
            if old_wait is not None:
                run_side(
                    [
                        CloseSubscription(
                            run_id=op[1], wait=old_wait.wait, name=old_wait.name, key=old_wait.key
                        )
                    ]
                )
        elif op[0] == "publish":
            _, name, key, ttl, n = op
            mid = f"m{n}"
            model.publish(mid, name, key, ttl)
            run_side([publish(mid, key=key, ttl=ttl, name=name)])
        else:
            model.now += op[1]
            due = [
                fire
                for s in states.values()
                if (armed := timer(s)) is not None and armed[0] <= model.now
                for fire in (armed[1],)
            ]
            run_side(due)
            for s in states.values():  # what is due has gone
                armed = timer(s)
                assert armed is None or armed[0] > model.now
            model.messages = [m for m in model.messages if m["expires"] > model.now]
    assert got == model.deliveries
    assert len({(mid, run) for mid, run, _ in got}) == len(got), "a run got a message twice"
    assert len({(run, ref) for _, run, ref in got}) == len(got), "a wait got two messages"


@settings(max_examples=200, deadline=None)
@given(st.lists(operation, max_size=30))
def test_every_published_message_is_accounted_for_when_it_expires(
    ops: list[tuple[Any, ...]],
) -> None:
    """No message is lost silently: each ends with one MessageExpired naming its runs."""
    states: dict[str, CorrelationState] = {}
    log: list[Any] = []
    now = T0
    for op in ops:
        command: Any
        if op[0] == "open":
            command = OpenSubscription(run_id=op[1], wait=f"w@{now}", name=op[2], key=op[3])
        elif op[0] == "publish":
            command = publish(f"m{op[4]}-{now}", key=op[2], ttl=op[3], name=op[1])
        else:
            now += op[1] if op[0] == "tick" else 0
            continue
        batch = correlate([command], states.get, now)
        states.update(batch.states)
        log.extend(batch.events)
    now += 10_000
    batch = correlate(
        [fire for s in states.values() if (armed := timer(s)) is not None for fire in (armed[1],)],
        states.get,
        now,
    )
    log.extend(batch.events)

    def ident(e: Any) -> tuple[str, str, str]:
        return e.name, e.key, e.message_id

    published = [ident(e) for e in log if isinstance(e, MessagePublished)]
    expired = [e for e in log if isinstance(e, MessageExpired)]
    assert sorted(published) == sorted(ident(e) for e in expired)
    for e in expired:
        assert list(e.runs) == [
            c.run_id for c in log if isinstance(c, MessageCorrelated) and ident(c) == ident(e)
        ]
    assert all(m.status != "buffered" for m in summarize(log))


def test_a_refused_delivery_goes_to_the_runs_next_wait_on_the_key() -> None:
    """The run's wait ended while the message was on its way and the run waits again on
    the key: once the run refuses the first delivery, its new wait takes the message."""
    key = Key()
    key.when(open_("r1", wait="pay#1"))
    key.when(publish("m1", ttl=60_000))  # correlated to pay#1 ...
    key.when(close("r1", wait="pay#1"))  # ... which timed out meanwhile
    key.when(open_("r1", wait="pay#2"))
    assert key.types() == ["SubscriptionOpened"], "a run gets a message at most once"
    events = key.when(
        RejectCorrelation(run_id="r1", wait="pay#1", message_id="m1", name="payment", key="o1")
    )
    assert key.types() == ["CorrelationRejected", "MessageCorrelated"]
    assert events[1].wait == "pay#2"


def test_a_refused_delivery_of_an_unbuffered_message_is_recorded_and_taken_back() -> None:
    key = Key()
    log = [*key.when(open_("r1")), *key.when(publish("m1"))]
    log += key.when(
        RejectCorrelation(run_id="r1", wait="pay#1", message_id="m1", name="payment", key="o1")
    )
    assert key.types() == ["CorrelationRejected"]
    assert [(m.message_id, m.status, m.runs) for m in summarize(log)] == [("m1", "unmatched", [])]


def test_the_run_side_answers_a_refused_delivery() -> None:
    flow = _waiting(KEYED)
    stale = cmd.CorrelateMessage(
        command_id="x", run_id=RUN, name="payment", key="o1", message_id="m1", wait="pay#7"
    )
    flow.when(stale)
    assert refused_delivery(stale, flow.last) == RejectCorrelation(
        run_id=RUN, wait="pay#7", message_id="m1", name="payment", key="o1"
    )
    good = cmd.CorrelateMessage(
        command_id="y", run_id=RUN, name="payment", key="o1", message_id="m2", wait="pay#1"
    )
    flow.when(good)
    assert refused_delivery(good, flow.last) is None


# ----------------------------------------------------------- both sides, interleaved

LOOPING = load_spec(
    wf(
        {
            "id": "pay",
            "wait_event": {
                "name": "payment",
                "key": "input.order",
                "timeout": "1s",
                "on_timeout": {"goto": "pay"},
            },
        },
        input={"order": "string"},
    )
)
ORDERS = {"r1": "k1", "r2": "k1", "r3": "k2"}

step = st.one_of(
    st.tuples(st.just("run"), st.sampled_from(sorted(ORDERS))),  # a run takes an input
    st.tuples(st.just("correlate"), st.sampled_from(("k1", "k2"))),  # correlation does
    st.tuples(st.just("timeout"), st.sampled_from(sorted(ORDERS))),  # a wait's timer fires
    st.tuples(st.just("publish"), st.sampled_from(("k1", "k2")), st.sampled_from((0, 3_600_000))),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, max_size=40))
def test_runs_and_correlation_interleaved_lose_no_message_and_double_none(
    steps: list[tuple[Any, ...]],
) -> None:
    """The run side and correlation exchange records through queues (per run, per key, in
    order, as Kafka partitions keep them) processed in any interleaving, with waits that
    time out and begin again while deliveries are on their way. Then: a run completes only
    with a message of its own key, no run gets a message twice, and once everything is
    delivered no run still waits while a buffered message of its key has not reached it."""
    now = T0
    runs: dict[str, RunState] = {}
    run_queue: dict[str, list[cmd.Command]] = {r: [] for r in ORDERS}
    key_queue: dict[str, list[Any]] = {"k1": [], "k2": []}
    keys: dict[str, CorrelationState] = {}
    received: dict[str, list[Any]] = {r: [] for r in ORDERS}
    ids = iter(range(10_000))

    def to_correlation(records: list[Any]) -> None:
        for record in records:
            key_queue[record.key].append(record)

    def run_input(run: str) -> None:
        if not run_queue[run]:
            return
        command = run_queue[run].pop(0)
        decision = process(runs.get(run), command, LOOPING, now)
        assert decision.state is not None
        before, runs[run] = runs.get(run), decision.state
        if isinstance(command, cmd.CorrelateMessage) and any(
            isinstance(e, SignalReceived) for e in decision.events
        ):
            received[run].append(command)
        changes: list[Any] = list(subscription_changes(before, decision.events, decision.state))
        if isinstance(command, cmd.CorrelateMessage):
            refused = refused_delivery(command, decision.events)
            if refused is not None:
                changes.append(refused)
        to_correlation(changes)

    def correlation_input(key: str) -> None:
        if not key_queue[key]:
            return
        batch = correlate([key_queue[key].pop(0)], keys.get, now)
        keys.update(batch.states)
        for delivered in batch.deliveries:
            run_queue[delivered.run_id].append(delivered)

    for run, order in ORDERS.items():
        run_queue[run].append(
            cmd.StartRun(
                command_id=f"s-{run}", run_id=run, workflow="w", version=1, input={"order": order}
            )
        )
        run_input(run)
    for s in steps:
        if s[0] == "run":
            run_input(s[1])
        elif s[0] == "correlate":
            correlation_input(s[1])
        elif s[0] == "timeout":
            state = runs[s[1]]
            armed = [t for t in state.timers.values() if t.kind == "signal_timeout"]
            if armed:
                now = max(now, armed[0].due_at)
                run_queue[s[1]].append(
                    cmd.FireTimer(
                        command_id=f"t{next(ids)}", run_id=s[1], timer_id=armed[0].timer_id
                    )
                )
        else:
            key_queue[s[1]].append(publish(f"m{next(ids)}", key=s[1], ttl=s[2]))
    while any(run_queue.values()) or any(key_queue.values()):  # deliver everything in hand
        for run in ORDERS:
            run_input(run)
        for key in key_queue:
            correlation_input(key)

    for run, got in received.items():
        assert len(got) <= 1, f"{run} completed twice"
        assert all(c.key == ORDERS[run] for c in got), f"{run} got another key's message"
        assert (runs[run].status is RunStatus.COMPLETED) == bool(got)
    for state in keys.values():
        for message in state.messages:
            for run, order in ORDERS.items():
                if order == message.key and runs[run].status is RunStatus.WAITING:
                    assert run not in message.runs, f"{message.message_id} counted for {run}"
                    raise AssertionError(
                        f"{run} waits on {key} beside buffered {message.message_id}"
                    )
