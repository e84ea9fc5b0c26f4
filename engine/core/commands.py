"""Commands: what someone asks a run to do. Imperative names, never renamed.

Every command carries ``command_id`` (unique, becomes the causation id of the events it
produces), the ``run_id`` it is addressed to, the tenant and the correlation id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    TYPE: ClassVar[str] = "Command"
    VERSION: ClassVar[int] = 1

    command_id: str
    run_id: str
    tenant: str = "default"
    correlation_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class StartRun(Command):
    """Start ``workflow`` at ``version``. The run id is derived from (tenant, idempotency key)
    at the edge, so the same key always addresses the same run."""

    TYPE: ClassVar[str] = "StartRun"
    workflow: str
    version: int
    input: Any = field(default_factory=dict)
    idempotency_key: str = ""
    requested_by: str = ""
    priority: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class CompleteTask(Command):
    TYPE: ClassVar[str] = "CompleteTask"
    step: str
    task_id: str
    result: Any = None
    cost: float = 0.0
    confidence: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FailTask(Command):
    """``error_class`` is ``transient``, ``permanent`` or ``business``."""

    TYPE: ClassVar[str] = "FailTask"
    step: str
    task_id: str
    error_class: str
    code: str
    message: str = ""
    field: str | None = None
    cost: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DecideApproval(Command):
    """``roles`` are the groups the edge authenticated ``approver`` into."""

    TYPE: ClassVar[str] = "DecideApproval"
    step: str
    approver: str
    roles: tuple[str, ...] = ()
    approve: bool = True
    comment: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliverSignal(Command):
    TYPE: ClassVar[str] = "DeliverSignal"
    name: str
    data: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CorrelateMessage(Command):
    """Message ``message_id`` (``name``, correlation ``key``) answers the run's wait
    ``wait`` (``step#visit``). The correlation processor writes it to the run's inputs;
    the run refuses it when that wait is no longer open."""

    TYPE: ClassVar[str] = "CorrelateMessage"
    name: str
    key: str
    message_id: str
    wait: str
    data: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FireTimer(Command):
    TYPE: ClassVar[str] = "FireTimer"
    timer_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelRun(Command):
    TYPE: ClassVar[str] = "CancelRun"
    reason: str = ""
    by: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class GrantSlot(Command):
    """The admission processor granted the slot the task ``task_id`` waited for."""

    TYPE: ClassVar[str] = "GrantSlot"
    task_id: str
    key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RefuseSlot(Command):
    """The admission processor will not grant the slot (``code`` BUDGET_EXHAUSTED)."""

    TYPE: ClassVar[str] = "RefuseSlot"
    task_id: str
    key: str
    code: str
    message: str = ""


COMMAND_TYPES: dict[str, type[Command]] = {
    cls.TYPE: cls
    for cls in (
        StartRun,
        CompleteTask,
        FailTask,
        DecideApproval,
        DeliverSignal,
        FireTimer,
        CancelRun,
        CorrelateMessage,
        GrantSlot,
        RefuseSlot,
    )
}
