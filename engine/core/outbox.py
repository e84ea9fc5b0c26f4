"""Commands out of the core, derived from events.

They are written in the same atomic unit as the events that imply them, and never
re-derived on replay: replay folds events only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from engine.core import admission_records as ad
from engine.core import events as ev


@dataclass(frozen=True, slots=True)
class TaskCommand:
    """What a worker receives on its queue."""

    queue: str
    task_id: str
    run_id: str
    step: str
    phase: str
    attempt: int
    idempotency_key: str
    input: Any
    deadline: int
    tenant: str
    correlation_id: str
    workflow: str = ""


class NotificationKind(StrEnum):
    """What a ``Notification`` is about; its ``kind`` holds the value."""

    APPROVAL_REQUESTED = "approval_requested"
    APPROVAL_REMINDER = "approval_reminder"
    ESCALATED = "escalated"
    SCHEDULE_MISSED = "schedule_missed"
    """Nominal times of a schedule that were not run (``step`` holds the schedule id)."""


@dataclass(frozen=True, slots=True)
class Notification:
    """A message for people: approvers asked, reminded, or an escalation group paged."""

    kind: str
    run_id: str
    step: str
    approval_id: str
    recipients: list[str]
    message: str
    ts: int
    tenant: str
    correlation_id: str


Outgoing = TaskCommand | Notification | ad.Acquire | ad.Release


def outgoing(event: ev.Event, workflow: str = "") -> list[Outgoing]:
    """The messages an event implies for the outside world (usually none)."""
    if isinstance(event, ev.TaskDispatched):
        return [
            TaskCommand(
                queue=event.queue,
                task_id=event.task_id,
                run_id=event.run_id,
                step=event.step,
                phase=event.phase,
                attempt=event.attempt,
                idempotency_key=event.idempotency_key,
                input=event.input,
                deadline=event.timeout_at,
                tenant=event.tenant,
                correlation_id=event.correlation_id,
                workflow=workflow,
            )
        ]
    if isinstance(event, ev.SlotRequested):
        return [
            ad.Acquire(
                key=event.key,
                request_id=event.task_id,
                tenant=event.tenant,
                priority=event.priority,
                lease_ms=event.lease_ms,
                limits=event.limits,
                version=event.limits_version,
                reply_to=event.run_id,
            )
        ]
    if isinstance(event, ev.SlotReleased):
        return [
            ad.Release(
                event.key, event.task_id, ad.Outcome(event.outcome), event.cost, event.latency_ms
            )
        ]
    if isinstance(event, ev.ApprovalRequested):
        return [
            _note(
                event,
                NotificationKind.APPROVAL_REQUESTED,
                event.approval_id,
                event.approvers,
                f"approval needed for step {event.step} ({event.reason}), quorum {event.quorum}",
            )
        ]
    if isinstance(event, ev.ApprovalReminded):
        return [
            _note(
                event,
                NotificationKind.APPROVAL_REMINDER,
                event.approval_id,
                event.approvers,
                f"reminder {event.reminder}: step {event.step} still awaits approval",
            )
        ]
    if isinstance(event, ev.Escalated):
        return [
            _note(
                event,
                NotificationKind.ESCALATED,
                "",
                [event.to],
                f"step {event.step} escalated to {event.to}: {event.reason}",
            )
        ]
    return []


def _note(
    event: Any, kind: NotificationKind, approval_id: str, recipients: list[str], message: str
) -> Notification:
    return Notification(
        kind=kind.value,
        run_id=event.run_id,
        step=event.step,
        approval_id=approval_id,
        recipients=list(recipients),
        message=message,
        ts=event.ts,
        tenant=event.tenant,
        correlation_id=event.correlation_id,
    )
