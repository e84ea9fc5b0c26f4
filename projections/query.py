"""What the CLI asks of the projections, wherever they are: a PostgreSQL DSN or an
embedded store file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from projections.records import SlaMetrics
from projections.sla import render_sla
from projections.timeline import Timeline

__all__ = ["EventIndex", "event_index", "is_postgres", "render_sla", "sla", "timeline"]


def is_postgres(target: str | Path) -> bool:
    """Whether ``target`` is a PostgreSQL DSN (URL or key=value form) rather than a path."""
    if isinstance(target, Path):
        return False
    text = target.strip()
    return text.startswith(("postgresql://", "postgres://")) or any(
        f"{key}=" in text for key in ("host", "dbname", "user", "service")
    )


def sla(
    target: str | Path,
    workflow: str | None = None,
    tenant: str | None = None,
    window: str = "1h",
    now_ms: int | None = None,
) -> list[SlaMetrics]:
    """SLA figures per (workflow, tenant, ``window`` bucket by run start), newest bucket
    last, from PostgreSQL or an embedded store. ``render_sla`` prints them."""
    if is_postgres(target):
        from projections.postgres import sla_postgres

        return sla_postgres(str(target), workflow, tenant, window, now_ms)
    from projections.sqlite import sla_from_store

    return sla_from_store(target, workflow, tenant, window, now_ms)


def timeline(target: str | Path, run_id: str) -> Timeline | None:
    """A run's projected (redacted) timeline, by id or unambiguous prefix."""
    if is_postgres(target):
        from projections.postgres import timeline_from_postgres

        return timeline_from_postgres(str(target), run_id)
    from projections.sqlite import timeline_from_store

    return timeline_from_store(target, run_id)


@dataclass(frozen=True, slots=True)
class EventIndex:
    """Where the PostgreSQL projections saw a run's events on the events topic."""

    partition: int
    offsets: list[int]
    """The offset of each of the run's events the projector has read."""
    indexed_to: int
    """The first offset of that partition the projector has not read yet."""


def event_index(dsn: str, run_id: str, events_topic: str, partition: int) -> EventIndex | None:
    """The run's event offsets from the projections' ``run_events`` table; None when
    the projections at ``dsn`` do not follow ``events_topic`` (no index for it)."""
    from projections.postgres import event_offsets

    return event_offsets(dsn, run_id, events_topic, partition)
