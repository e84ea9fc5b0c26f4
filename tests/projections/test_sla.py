"""SLA figures of a scripted set of runs, against values worked out by hand.

The runs (``scenarios.scripted_runs``), workflow claims, tenant acme unless noted, all
started in the hour bucket BASE except r10:

    r1  completed in 4s        r6  waiting for review since +1s (due +5m1s)
    r2  completed in 10s       r7  waiting for review since +1s, started at +15m
    r3  completed in 20s       r8  escalated at +1h, waiting for the leads (no due time)
    r4  failed                 r9  run SLA fired, completed in 11m (breached)
    r5  cancelled              b1  tenant beta, completed in 4s
    r10 next hour, completed in 7s

Costs: a completed fetch 0.01, a completed pay 0.02.
"""

from __future__ import annotations

import pytest

from projections.project import project_run, run_row
from projections.sla import bucket_of, percentile_cont, render_sla, sla_aggregates, window_ms
from tests.projections.scenarios import BASE, BOOK, HOUR, MINUTE, SECOND, scripted_runs

NOW = BASE + 1000 * SECOND


def rows() -> list[dict[str, object]]:
    return [run_row(project_run(events, BOOK)) for events in scripted_runs().values()]


def test_percentile_cont_interpolates_like_postgresql() -> None:
    assert percentile_cont([], 0.95) is None
    assert percentile_cont([7], 0.95) == 7.0
    assert percentile_cont([4000, 10000, 20000, 660000], 0.95) == pytest.approx(564000.0)
    assert percentile_cont([1, 2, 3, 4, 5], 0.5) == 3.0
    assert percentile_cont([1, 2], 0.5) == 1.5


def test_windows_and_buckets() -> None:
    assert (window_ms("1m"), window_ms("1h"), window_ms("1d")) == (MINUTE, HOUR, 24 * HOUR)
    assert bucket_of(BASE + 59 * MINUTE, HOUR) == BASE
    with pytest.raises(ValueError, match="ms, s, m, h or d"):
        window_ms("hourly")


def test_hourly_figures() -> None:
    figures = sla_aggregates(rows(), "1h", now_ms=NOW)
    assert [(m.workflow, m.tenant, m.bucket_start) for m in figures] == [
        ("claims", "acme", BASE),
        ("claims", "beta", BASE),
        ("claims", "acme", BASE + HOUR),
    ]
    acme = figures[0]
    assert (acme.started, acme.completed, acme.failed, acme.cancelled, acme.running) == (
        9,
        4,
        1,
        1,
        3,
    )
    assert acme.success_rate == pytest.approx(4 / 6)
    assert acme.mean_ms == pytest.approx((4000 + 10000 + 20000 + 660000) / 4)
    assert acme.p95_ms == pytest.approx(20000 + (660000 - 20000) * 0.85)
    assert acme.cost_per_run == pytest.approx((3 * 0.03 + 0 + 0.01 + 3 * 0.01 + 0.03) / 9)
    assert acme.escalation_rate == pytest.approx(1 / 9)
    assert (acme.approvals_waiting, acme.approvals_overdue, acme.sla_breaches) == (3, 1, 1)
    assert (acme.window, acme.window_ms, acme.computed_at) == ("1h", HOUR, NOW)
    beta, later = figures[1], figures[2]
    assert (beta.started, beta.completed, beta.mean_ms, beta.p95_ms, beta.success_rate) == (
        1,
        1,
        4000,
        4000,
        1.0,
    )
    assert (later.started, later.mean_ms, later.cost_per_run) == (1, 7000, pytest.approx(0.03))


def test_overdue_depends_on_now() -> None:
    late = sla_aggregates(rows(), "1h", now_ms=BASE + 30 * MINUTE, tenant="acme")[0]
    early = sla_aggregates(rows(), "1h", now_ms=BASE, tenant="acme")[0]
    assert (late.approvals_overdue, early.approvals_overdue) == (2, 0)


def test_minute_figures_and_filters() -> None:
    figures = sla_aggregates(rows(), "1m", now_ms=NOW, tenant="acme")
    starts = {m.bucket_start - BASE: m for m in figures}
    assert sorted(starts) == [
        0,
        MINUTE,
        2 * MINUTE,
        3 * MINUTE,
        4 * MINUTE,
        5 * MINUTE,
        6 * MINUTE,
        8 * MINUTE,
        15 * MINUTE,
        HOUR,
    ]
    assert starts[0].started == 1 and starts[0].mean_ms == 4000
    assert starts[3 * MINUTE].failed == 1 and starts[3 * MINUTE].success_rate == 0.0
    assert starts[5 * MINUTE].approvals_overdue == 1
    assert starts[15 * MINUTE].approvals_overdue == 0
    assert starts[15 * MINUTE].success_rate is None and starts[15 * MINUTE].mean_ms is None
    assert sla_aggregates(rows(), "1h", now_ms=NOW, workflow="other") == []


def test_render_sla() -> None:
    text = render_sla(sla_aggregates(rows(), "1h", now_ms=NOW))
    lines = text.splitlines()
    assert lines[0].startswith("bucket (UTC)") and len(lines) == 4
    assert "66.7%" in lines[1] and "2m53s" in lines[1]
    assert render_sla([]).endswith("(no runs)")
