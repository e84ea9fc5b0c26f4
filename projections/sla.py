"""SLA figures per (workflow, tenant, time bucket by run start), computed from run rows.

PostgreSQL computes the counts and the percentile in SQL (``sla_metrics`` in
``projections.postgres``); SQLite, the topic projector and the tests use
``sla_aggregates`` here. Both end in ``metrics_of``, so the rates are computed the same
way, and the p95 here interpolates exactly like ``percentile_cont``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from engine.core.durations import format_duration, parse_duration
from projections.records import SlaMetrics
from projections.timeline import Timeline

TERMINAL = ("Completed", "Failed", "Cancelled")
DEFAULT_WINDOWS = ("1m", "1h")


def window_ms(window: str) -> int:
    """``1m``, ``1h``, ``1d``... as milliseconds; ``ValueError`` with a hint otherwise."""
    ms = parse_duration(window)
    if ms <= 0:
        raise ValueError(f"an SLA window must be longer than 0, not {window!r}")
    return ms


def bucket_of(started_at: int, width_ms: int) -> int:
    """The start of the epoch-aligned bucket holding ``started_at``."""
    return started_at // width_ms * width_ms


def percentile_cont(ordered: Sequence[float], fraction: float) -> float | None:
    """PostgreSQL's ``percentile_cont``: linear interpolation between the two nearest
    ranks of the sorted values; None for no values."""
    if not ordered:
        return None
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = math.ceil(position)
    first = float(ordered[low])
    if low == high:
        return first
    return first + (float(ordered[high]) - first) * (position - low)


def sla_row(t: Timeline) -> dict[str, Any]:
    """The fields of a run the SLA figures need (a subset of its ``runs`` row)."""
    return {
        "workflow": t.workflow,
        "tenant": t.tenant,
        "started_at": t.started_at,
        "status": t.status,
        "duration_ms": t.duration_ms,
        "cost": t.cost,
        "escalations": t.escalations,
        "approval_since": t.approval_since,
        "approval_due_at": t.approval_due_at,
        "sla_breached": t.sla_breached,
    }


def metrics_of(
    *,
    workflow: str,
    tenant: str,
    window: str,
    width_ms: int,
    bucket: int,
    started: int,
    completed: int,
    failed: int,
    cancelled: int,
    mean_ms: float | None,
    p95_ms: float | None,
    cost_sum: float,
    escalated: int,
    waiting: int,
    overdue: int,
    breaches: int,
    now_ms: int,
) -> SlaMetrics:
    finished = completed + failed + cancelled
    return SlaMetrics(
        workflow=workflow,
        tenant=tenant,
        window=window,
        window_ms=width_ms,
        bucket_start=bucket,
        started=started,
        completed=completed,
        failed=failed,
        cancelled=cancelled,
        running=started - finished,
        success_rate=completed / finished if finished else None,
        mean_ms=mean_ms,
        p95_ms=p95_ms,
        cost_per_run=cost_sum / started if started else None,
        escalation_rate=escalated / started if started else None,
        approvals_waiting=waiting,
        approvals_overdue=overdue,
        sla_breaches=breaches,
        computed_at=now_ms,
    )


def sla_aggregates(
    runs: Iterable[Mapping[str, Any]],
    window: str = "1h",
    *,
    now_ms: int,
    workflow: str | None = None,
    tenant: str | None = None,
) -> list[SlaMetrics]:
    """The SLA figures of ``runs`` (``runs`` rows, see ``projections.project.run_row``),
    one per (workflow, tenant, bucket) with at least one run, ordered by bucket, workflow
    and tenant. Runs never started (no ``RunStarted`` seen) are left out."""
    width = window_ms(window)
    groups: dict[tuple[str, str, int], list[Mapping[str, Any]]] = defaultdict(list)
    for run in runs:
        if (
            not run["workflow"]
            or (workflow is not None and run["workflow"] != workflow)
            or (tenant is not None and run["tenant"] != tenant)
        ):
            continue
        groups[(run["workflow"], run["tenant"], bucket_of(run["started_at"], width))].append(run)
    out = []
    for (wf, tn, bucket), members in groups.items():
        durations = sorted(
            r["duration_ms"]
            for r in members
            if r["status"] == "Completed" and r["duration_ms"] is not None
        )
        waiting = [r for r in members if r["approval_since"] is not None]
        out.append(
            metrics_of(
                workflow=wf,
                tenant=tn,
                window=window,
                width_ms=width,
                bucket=bucket,
                started=len(members),
                completed=sum(r["status"] == "Completed" for r in members),
                failed=sum(r["status"] == "Failed" for r in members),
                cancelled=sum(r["status"] == "Cancelled" for r in members),
                mean_ms=sum(durations) / len(durations) if durations else None,
                p95_ms=percentile_cont(durations, 0.95),
                cost_sum=sum(float(r["cost"]) for r in members),
                escalated=sum(r["escalations"] > 0 for r in members),
                waiting=len(waiting),
                overdue=sum(
                    r["approval_due_at"] is not None and r["approval_due_at"] <= now_ms
                    for r in waiting
                ),
                breaches=sum(bool(r["sla_breached"]) for r in members),
                now_ms=now_ms,
            )
        )
    out.sort(key=lambda m: (m.bucket_start, m.workflow, m.tenant))
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ms(value: float | None) -> str:
    return format_duration(None if value is None else round(value))


def render_sla(rows: Iterable[SlaMetrics]) -> str:
    """A fixed-width table for terminals (bucket starts in UTC)."""
    lines = [
        f"{'bucket (UTC)':<17} {'workflow':<18}{'tenant':<12}{'started':>8}{'done':>6}"
        f"{'failed':>7}{'open':>6}{'success':>9}{'mean':>9}{'p95':>9}{'cost/run':>10}"
        f"{'escal.':>8}{'appr.wait':>10}{'overdue':>8}{'breached':>9}"
    ]
    for m in rows:
        bucket = datetime.fromtimestamp(m.bucket_start / 1000, UTC).strftime("%Y-%m-%d %H:%M")
        cost = "-" if m.cost_per_run is None else f"${m.cost_per_run:.4f}"
        lines.append(
            f"{bucket:<17} {m.workflow[:17]:<18}{m.tenant[:11]:<12}{m.started:>8}"
            f"{m.completed:>6}{m.failed:>7}{m.running:>6}{_pct(m.success_rate):>9}"
            f"{_ms(m.mean_ms):>9}{_ms(m.p95_ms):>9}{cost:>10}{_pct(m.escalation_rate):>8}"
            f"{m.approvals_waiting:>10}{m.approvals_overdue:>8}{m.sla_breaches:>9}"
        )
    if len(lines) == 1:
        lines.append("(no runs)")
    return "\n".join(lines)
