"""Run state: what ``evolve`` folds the events of one run into.

State objects are immutable; ``evolve`` returns new ones and shares what did not change.
The run status is derived from state, never stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

class RunStatus(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    WAITING = "Waiting"
    RETRY = "Retry"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


TERMINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})


class Waiting(StrEnum):
    """What the current step is waiting for."""

    NOTHING = ""
    TASK = "task"
    RETRY = "retry"
    APPROVAL = "approval"
    SIGNAL = "signal"
    TIMER = "timer"


@dataclass(frozen=True, slots=True)
class Timer:
    timer_id: str
    kind: str
    step: str
    ref: str
    due_at: int


@dataclass(frozen=True, slots=True)
class Approval:
    approval_id: str
    reason: str
    approvers: tuple[str, ...]
    quorum: int
    exclude_requester: bool
    requested_at: int
    expires_at: int | None
    votes: tuple[str, ...] = ()
    reminders: int = 0


@dataclass(frozen=True, slots=True)
class StepState:
    step: str
    visit: int
    kind: str
    started_at: int
    waiting: Waiting = Waiting.NOTHING
    phase: str = ""
    attempt: int = 0
    task_id: str = ""
    idempotency_key: str = ""
    change_set: Any = None
    result: Any = None
    approval: Approval | None = None
    signal: str = ""
    resume: str = ""


@dataclass(frozen=True, slots=True)
class RunState:
    run_id: str
    tenant: str
    correlation_id: str
    workflow: str = ""
    version: int = 0
    idempotency_key: str = ""
    requested_by: str = ""
    priority: int = 0
    input: Any = None
    started_at: int = 0
    seq: int = 0
    current: StepState | None = None
    results: Mapping[str, Any] = field(default_factory=dict)
    signals: Mapping[str, Any] = field(default_factory=dict)
    unconsumed: frozenset[str] = frozenset()
    visits: Mapping[str, int] = field(default_factory=dict)
    timers: Mapping[str, Timer] = field(default_factory=dict)
    cost: float = 0.0
    attempts: int = 0
    escalations: int = 0
    sla_breached: bool = False
    outcome: RunStatus | None = None
    error: Mapping[str, Any] | None = None
    output: Any = None
    ended_at: int | None = None
    last_error: Mapping[str, Any] | None = field(default=None)

    @property
    def status(self) -> RunStatus:
        if self.outcome is not None:
            return self.outcome
        current = self.current
        if current is None:
            return RunStatus.PENDING
        if current.waiting in (Waiting.APPROVAL, Waiting.SIGNAL, Waiting.TIMER):
            return RunStatus.WAITING
        if current.waiting is Waiting.RETRY:
            return RunStatus.RETRY
        return RunStatus.RUNNING

    @property
    def terminal(self) -> bool:
        return self.outcome is not None

    def data(self) -> dict[str, Any]:
        """The document expressions and input mappings are evaluated against."""
        return {
            "input": self.input,
            "steps": {name: {"result": value} for name, value in self.results.items()},
            "signals": dict(self.signals),
            "run": {
                "id": self.run_id,
                "tenant": self.tenant,
                "requested_by": self.requested_by,
                "workflow": self.workflow,
                "version": self.version,
            },
        }
