"""The admission core, rule by rule: concurrency as leases, priority, fairness, aging,
pause, rate (and a tool's retry_after), budgets and breakers."""

from __future__ import annotations

from dataclasses import replace

from engine.core import admission as ad
from tests.flow.admission_harness import T0, Key


def test_a_key_without_limits_grants_at_once() -> None:
    k = Key()
    assert k.acquire("a").granted() == ["a"]
    assert k.acquire("b").granted() == ["b"]


def test_concurrency_holds_the_next_request_until_a_slot_is_released() -> None:
    k = Key(concurrency=2)
    assert k.acquire("a").granted() == ["a"]
    assert k.acquire("b").granted() == ["b"]
    assert k.acquire("c").granted() == []
    hold = ad.hold(k.s, k.now)
    assert hold is not None and hold.reason == "queued: tool:t 2/2"
    k.release("a", outcome="ok")
    k.then(ad.Released, request_id="a", reason="done")
    assert k.granted() == ["c"]
    assert k.s.executing == 2


def test_a_lease_whose_release_never_comes_expires_and_frees_the_slot() -> None:
    k = Key(concurrency=1, lease="30s")
    k.acquire("a").acquire("b")
    assert ad.next_due(k.s) == T0 + 30_000
    k.at(29_999).tick()
    assert k.last == []
    k.at(30_000).tick()
    k.then(ad.Released, request_id="a", reason="expired")
    assert k.granted() == ["b"]


def test_the_requesters_lease_bound_wins_over_the_keys() -> None:
    k = Key(concurrency=1, lease="10m")
    k.acquire("a", lease_ms=5_000)
    assert k.s.leases["a"].expires_at == T0 + 5_000


def test_a_finished_request_is_never_granted_again() -> None:
    k = Key(concurrency=1)
    k.acquire("a").release("a")
    assert k.acquire("a").last == []
    k.release("ghost")
    k.then(ad.Released, request_id="ghost", reason="unknown")
    assert k.acquire("ghost").granted() == []


def test_a_queued_request_that_is_cancelled_leaves_the_queue() -> None:
    k = Key(concurrency=1)
    k.acquire("a").acquire("b")
    k.release("b", outcome="cancelled")
    k.then(ad.Released, request_id="b", reason="cancelled")
    assert k.release("a").granted() == []


def test_higher_priority_goes_first_and_fifo_within_a_tenant() -> None:
    k = Key(concurrency=1)
    k.acquire("hold")
    for rid, priority in (("low1", 0), ("high1", 5), ("low2", 0), ("high2", 5)):
        k.acquire(rid, priority=priority)
    order = [k.release(rid).granted()[0] for rid in ("hold", "high1", "high2", "low1")]
    assert order == ["high1", "high2", "low1", "low2"]


def test_waiting_raises_a_requests_level_so_low_priority_cannot_starve() -> None:
    k = Key(concurrency=1, aging="10s")
    k.acquire("hold").acquire("old", priority=0)
    k.at(25_000).acquire("new", priority=2)  # old has waited 2.5 agings: level 2, older tag
    assert k.release("hold").granted() == ["old"]


def test_tenants_share_fairly_by_weight_whatever_they_offer() -> None:
    k = Key(concurrency=1)
    k.acquire("hold", tenant="x")
    for i in range(30):
        k.acquire(f"heavy{i}", tenant="heavy")
    for i in range(3):
        k.acquire(f"light{i}", tenant="light")
    grants = []
    previous = "hold"
    for _ in range(8):
        previous = k.release(previous).granted()[0]
        grants.append(previous)
    assert grants[:6] == ["heavy0", "light0", "heavy1", "light1", "heavy2", "light2"]
    assert grants[6:] == ["heavy3", "heavy4"]


def test_a_heavier_tenant_gets_its_weights_share() -> None:
    k = Key(concurrency=1)
    k.acquire("hold", tenant="x")
    for i in range(20):
        k.acquire(f"a{i}", tenant="acme", weight=3)
        k.acquire(f"g{i}", tenant="globex", weight=1)
    previous, grants = "hold", []
    for _ in range(16):
        previous = k.release(previous).granted()[0]
        grants.append(previous)
    assert sum(g.startswith("a") for g in grants) == 12


def test_a_paused_key_grants_nothing_until_resumed() -> None:
    k = Key(concurrency=5)
    k.when(ad.Pause("tool:t"))
    k.acquire("a")
    assert k.granted() == []
    hold = ad.hold(k.s, k.now)
    assert hold is not None and hold.kind is ad.HoldKind.PAUSED
    k.when(ad.Resume("tool:t"))
    assert k.granted() == ["a"]


def test_the_rate_allows_a_burst_then_one_grant_per_interval() -> None:
    k = Key(rate="2/s", burst=2)
    assert [k.acquire(r).granted() for r in ("a", "b", "c")] == [["a"], ["b"], []]
    hold = ad.hold(k.s, k.now)
    assert hold is not None and hold.reason == "rate: tool:t 2/1.0s"
    due = ad.next_due(k.s)
    assert due == T0 + 500
    k.at(499).tick()
    assert k.granted() == []
    k.at(500).tick()
    assert k.granted() == ["c"]


def test_a_tools_retry_after_holds_grants_until_then() -> None:
    k = Key(concurrency=5)
    k.when(ad.Throttle("tool:t", T0 + 2_000))
    k.then(ad.Throttled, until=T0 + 2_000)
    k.acquire("a")
    assert k.granted() == []
    assert ad.next_due(k.s) == T0 + 2_000
    k.at(2_000).tick()
    assert k.granted() == ["a"]


def test_a_budget_reserves_the_estimate_and_settles_with_the_cost() -> None:
    k = Key(budget={"amount": 10, "per": "day", "warn_at": 0.5, "estimate": 4})
    assert k.acquire("a").granted() == ["a"]
    assert k.acquire("b").granted() == ["b"]
    assert k.s.reserved == 8
    k.acquire("c")  # 8 reserved + 4 > 10: waits
    hold = ad.hold(k.s, k.now)
    assert hold is not None and hold.kind is ad.HoldKind.BUDGET
    assert hold.reason.startswith("budget exhausted: tool:t until ")
    k.then(ad.BudgetExhausted)
    k.release("a", cost=1.0)  # settled below the estimate: room again
    assert k.granted() == ["c"]
    assert (k.s.spent, k.s.reserved) == (1.0, 8.0)
    k.release("b", cost=5.0)
    k.then(ad.BudgetWarned, spent=6.0)


def test_the_budget_window_resets_at_local_midnight() -> None:
    # 2026-07-01 21:30 UTC is 23:30 in Berlin (summer time): the day ends at 22:00 UTC.
    start = 1_782_941_400_000
    k = Key(
        at=start, budget={"amount": 1, "per": "day", "timezone": "Europe/Berlin", "estimate": 1}
    )
    k.acquire("a").release("a", cost=1.0).acquire("b")
    assert k.granted() == []
    assert k.s.window_end == start + 30 * 60_000
    assert ad.next_due(k.s) == k.s.window_end
    k.now = k.s.window_end
    k.tick()
    k.then(ad.BudgetWindowOpened)
    assert k.granted() == ["b"]


def test_an_exhausted_budget_that_fails_refuses_with_budget_exhausted() -> None:
    k = Key(budget={"amount": 1, "per": "hour", "on_exhausted": "fail", "estimate": 1})
    k.acquire("a").acquire("b")
    refused = k.then(ad.Refused, request_id="b", code="BUDGET_EXHAUSTED", action="fail")
    assert "spent 0 of its budget of 1 per hour" in refused.message
    assert k.acquire("b").last == []  # refused is finished


def test_an_exhausted_budget_that_escalates_says_so() -> None:
    k = Key(budget={"amount": 1, "per": "hour", "on_exhausted": "escalate", "estimate": 1})
    k.acquire("a").acquire("b")
    k.then(ad.Refused, request_id="b", action="escalate")


BREAKER = {
    "failure_rate": 0.5,
    "min_calls": 4,
    "window": "60s",
    "slow_call": "10s",
    "open_for": "30s",
    "half_open_calls": 2,
}


def _calls(k: Key, outcomes: list[str], latency_ms: int = 10) -> None:
    for i, outcome in enumerate(outcomes):
        rid = f"c{len(k.log)}-{i}"
        k.acquire(rid).release(rid, outcome=outcome, latency_ms=latency_ms)


def test_the_breaker_opens_on_the_failure_rate_then_lets_canaries_through() -> None:
    k = Key(breaker=BREAKER)
    _calls(k, ["ok", "failed", "ok"])
    assert k.s.breaker == "closed"  # 3 calls: below min_calls
    _calls(k, ["failed"])
    k.then(ad.BreakerOpened, until=k.now + 30_000, trips=1)
    k.acquire("held")
    assert k.granted() == []
    assert ad.next_due(k.s) == k.now + 30_000
    k.at(30_000).tick()
    k.then(ad.BreakerHalfOpened)
    assert k.granted() == ["held"]
    assert k.acquire("p2").granted() == ["p2"]
    assert k.acquire("p3").granted() == []  # two canaries at most
    k.release("held").release("p2")
    k.then(ad.BreakerClosed)
    assert k.granted() == ["p3"]


def test_slow_calls_count_as_failures() -> None:
    k = Key(breaker=BREAKER)
    _calls(k, ["ok"] * 4, latency_ms=12_000)
    assert k.s.breaker == "open"


def test_a_failed_canary_opens_the_breaker_again_for_longer() -> None:
    k = Key(breaker=BREAKER)
    _calls(k, ["failed"] * 4)
    k.at(30_000).tick().acquire("probe").release("probe", outcome="failed")
    k.then(ad.BreakerOpened, trips=2, until=T0 + 30_000 + 60_000)


def test_a_newer_limits_version_replaces_the_keys_limits_and_an_older_one_does_not() -> None:
    k = Key(concurrency=1)
    k.acquire("a").acquire("b")
    assert k.granted() == []
    k.when(ad.Configure("tool:t", replace(k.s.limits, concurrency=2), 2))
    assert k.granted() == ["b"]
    k.when(ad.Configure("tool:t", replace(k.s.limits, concurrency=9), 1))
    assert k.last == [] and k.s.limits.concurrency == 2


def test_a_request_larger_than_the_whole_budget_is_refused_rather_than_blocking() -> None:
    k = Key(budget={"amount": 5, "per": "day", "on_exhausted": "wait"})
    k.acquire("huge", estimate=6)
    refused = k.then(ad.Refused, request_id="huge", action="fail")
    assert "more than the whole budget" in refused.message
    assert k.acquire("small", estimate=1).granted() == ["small"]
