"""Hypothesis on the admission core: random acquire / release / expire / pause / throttle
sequences under random limits.

After every command: the fold of the log equals the live state (the harness checks it),
and events and snapshots come back equal from their Avro encoding;
no grant while the key is at its concurrency, paused or its breaker open; no grant to a
request that has finished, and none twice; the rate never lets more through than its
burst plus its steady rate; a budget never reserves past its amount. At the end,
releasing and letting time pass drains everything: nothing is leaked.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.codec import decode, encode
from engine.core import admission as ad
from tests.flow.admission_harness import Key

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IDS = [f"r{i}" for i in range(12)]
TENANTS = ["t1", "t2", "t3"]


@st.composite
def rules(draw: st.DrawFn) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "concurrency": draw(st.integers(1, 4)),
        "lease": "20s",
        "aging": draw(st.sampled_from(["1s", "30s"])),
    }
    if draw(st.booleans()):
        rule["rate"] = draw(st.sampled_from(["2/s", "5/10s"]))
        rule["burst"] = draw(st.integers(1, 3))
    if draw(st.booleans()):
        rule["budget"] = {
            "amount": draw(st.sampled_from([3, 10])),
            "per": "hour",
            "estimate": 1,
            "on_exhausted": draw(st.sampled_from(["wait", "fail"])),
        }
    if draw(st.booleans()):
        rule["breaker"] = {
            "failure_rate": 0.5,
            "min_calls": 3,
            "window": "10s",
            "slow_call": "2s",
            "open_for": "5s",
            "half_open_calls": 1,
        }
    return rule


actions = st.one_of(
    st.tuples(
        st.just("acquire"),
        st.sampled_from(IDS),
        st.sampled_from(TENANTS),
        st.integers(0, 2),
        st.sampled_from([0, 5_000]),
    ),
    st.tuples(
        st.just("release"),
        st.sampled_from(IDS),
        st.sampled_from(["ok", "failed", "cancelled"]),
        st.sampled_from([0.0, 0.5, 2.0]),
        st.sampled_from([10, 3_000]),
    ),
    st.tuples(st.just("wait"), st.sampled_from([1, 400, 2_500, 21_000])),
    st.tuples(st.just("tick")),
    st.tuples(st.just("pause")),
    st.tuples(st.just("resume")),
    st.tuples(st.just("throttle"), st.sampled_from([500, 3_000])),
    st.tuples(st.just("configure"), st.integers(1, 4)),
)


class Checker:
    """Checks every granted event against the state it was granted in."""

    def __init__(self, key: Key) -> None:
        self.key = key
        self.finished: set[str] = set()
        self.granted: set[str] = set()
        self.grant_times: list[int] = []
        self.checked = 0
        self.state: ad.AdmissionState | None = None

    def check(self) -> None:
        for event in self.key.log[self.checked :]:
            s = self.state
            if isinstance(event, ad.Granted):
                assert s is not None
                assert event.request_id not in self.finished, "granted a finished request"
                assert event.request_id not in self.granted, "granted twice"
                limits = s.limits
                assert limits.concurrency is None or len(s.leases) < limits.concurrency
                assert not s.paused and s.breaker != "open"
                assert s.throttled_until <= event.at
                if limits.budget is not None:
                    total = s.spent + s.reserved + event.reserved
                    assert total <= limits.budget.amount + 1e-9, "over budget"
                self.granted.add(event.request_id)
                self.grant_times.append(event.at)
            elif isinstance(event, ad.Released | ad.Refused):
                self.finished.add(event.request_id)
            self.state = ad.evolve(s, event)
            assert decode(encode(event)) == event, "an event does not survive its codec"
        self.checked = len(self.key.log)
        assert self.state == self.key.state
        if self.state is not None:
            assert decode(encode(self.state)) == self.state, "a snapshot is not the state"


def _rate_holds(limits: Any, times: list[int]) -> None:
    if limits.rate is None:
        return
    burst, interval = limits.burst or limits.rate.count, limits.rate.interval_ms
    for i in range(len(times)):
        for j in range(i, len(times)):
            assert j - i + 1 <= burst + (times[j] - times[i]) / interval + 1e-6


@SETTINGS
@given(rule=rules(), steps=st.lists(actions, max_size=60))
def test_random_sequences_keep_every_limit_and_replay_to_the_live_state(
    rule: dict[str, Any], steps: list[tuple[Any, ...]]
) -> None:
    k = Key(**rule)
    checker = Checker(k)
    rate_limits = k.s.limits
    for step in steps:
        kind = step[0]
        if kind == "acquire":
            k.acquire(step[1], tenant=step[2], priority=step[3], lease_ms=step[4])
        elif kind == "release":
            k.release(step[1], outcome=step[2], cost=step[3], latency_ms=step[4])
        elif kind == "wait":
            k.now += step[1]
        elif kind == "tick":
            k.tick()
        elif kind == "pause":
            k.when(ad.Pause(k.key))
        elif kind == "resume":
            k.when(ad.Resume(k.key))
        elif kind == "throttle":
            k.when(ad.Throttle(k.key, k.now + step[1]))
        else:
            limits = replace(k.s.limits, concurrency=step[1])
            k.when(ad.Configure(k.key, limits, k.s.version + 1))
        checker.check()
    _rate_holds(rate_limits, checker.grant_times)

    # Everything drains: release what is held, let time pass, until nothing is left.
    k.when(ad.Resume(k.key))
    for _ in range(50):
        if not k.s.queue and not k.s.leases:
            break
        for rid in sorted(k.s.leases):
            k.release(rid)
        k.now += 2 * 3_600_000
        k.tick()
        checker.check()
    assert not k.s.queue and not k.s.leases, "requests left waiting or slots leaked"


@SETTINGS
@given(rule=rules(), steps=st.lists(actions, max_size=40))
def test_the_same_commands_at_the_same_times_give_the_same_events(
    rule: dict[str, Any], steps: list[tuple[Any, ...]]
) -> None:
    def play() -> list[ad.AdmissionEvent]:
        k = Key(**rule)
        for step in steps:
            if step[0] == "acquire":
                k.acquire(step[1], tenant=step[2], priority=step[3])
            elif step[0] == "release":
                k.release(step[1], outcome=step[2], cost=step[3], latency_ms=step[4])
            elif step[0] == "wait":
                k.now += step[1]
                k.tick()
        return k.log

    assert play() == play()
