"""Records of the projection topics: a run's timeline and SLA metrics per window.

Pure data, defined beside the other records so the codec can register them; the
projections fold events into them (``projections.records``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True, kw_only=True)
class StepTimeline:
    """One step visit of a ``RunTimeline``. ``wait_from`` is when an open wait began."""

    step: str
    visit: int
    kind: str
    status: str
    started_at: int
    ended_at: int | None = None
    duration_ms: int | None = None
    attempts: int = 0
    waited_ms: int = 0
    cost: float = 0.0
    note: str = ""
    decisions: Any = None
    errors: Any = None
    input: Any = None
    payload: Any = None
    signal: Any = None
    result: Any = None
    wait_from: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunTimeline:
    """A run's timeline as published on the run timelines topic."""

    TYPE: ClassVar[str] = "RunTimeline"
    VERSION: ClassVar[int] = 1
    run_id: str
    workflow: str = ""
    version: int = 0
    tenant: str = ""
    correlation_id: str = ""
    requested_by: str = ""
    status: str = "Pending"
    started_at: int = 0
    ended_at: int | None = None
    duration_ms: int | None = None
    attempts: int = 0
    cost: float = 0.0
    escalations: int = 0
    sla_due_at: int | None = None
    sla_breached: bool = False
    sla_breaches: int = 0
    rejected_commands: int = 0
    approval_id: str = ""
    approval_since: int | None = None
    approval_due_at: int | None = None
    error: Any = None
    input: Any = None
    output: Any = None
    last_seq: int = 0
    updated_at: int = 0
    events: int = 0
    steps: list[StepTimeline] = field(default_factory=list)
    redacted: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class SlaMetrics:
    """SLA figures of the runs of one workflow and tenant that started in one time bucket
    (``bucket_start`` .. ``bucket_start + window_ms``, epoch ms, UTC-aligned).

    ``success_rate`` is completed / finished runs; ``mean_ms`` and ``p95_ms`` are over the
    completed runs' durations (p95 interpolated like PostgreSQL's ``percentile_cont``);
    ``cost_per_run`` and ``escalation_rate`` are over every run started; ``sla_breaches``
    counts runs that breached their run SLA; ``approvals_overdue`` counts runs waiting for
    an approval past its expiry or SLA at ``computed_at``. Rates and means are null when
    there is nothing to divide by.
    """

    TYPE: ClassVar[str] = "SlaMetrics"
    VERSION: ClassVar[int] = 1
    workflow: str
    tenant: str
    window: str
    window_ms: int
    bucket_start: int
    started: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    running: int = 0
    success_rate: float | None = None
    mean_ms: float | None = None
    p95_ms: float | None = None
    cost_per_run: float | None = None
    escalation_rate: float | None = None
    approvals_waiting: int = 0
    approvals_overdue: int = 0
    sla_breaches: int = 0
    computed_at: int = 0

    @property
    def key(self) -> str:
        return f"{self.workflow}|{self.tenant}|{self.window}|{self.bucket_start}"
