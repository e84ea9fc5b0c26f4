"""The records of the projection topics, Avro like every other record (schemas in
``schemas/projections/``, registered in ``engine/codec/_registry.py``).

- ``RunTimeline``: the value of ``<prefix>.run-timelines`` (compacted, key run id): a
  run's current timeline, steps included; it carries everything the fold needs to go on,
  so the topic is also the projector's changelog.
- ``SlaMetrics``: the value of ``<prefix>.sla-metrics`` (compacted, key
  ``workflow|tenant|window|bucket_start``), and the row type of the SLA queries.

Payloads (input, result, output...) are JSON strings, already redacted.
"""

from __future__ import annotations

from engine.core.projection_records import RunTimeline, SlaMetrics, StepTimeline
from projections.timeline import StepEntry, Timeline

__all__ = ["RunTimeline", "SlaMetrics", "StepTimeline", "timeline_of", "timeline_record"]


def timeline_record(t: Timeline) -> RunTimeline:
    """``t`` as a topic record."""
    return RunTimeline(
        run_id=t.run_id,
        workflow=t.workflow,
        version=t.version,
        tenant=t.tenant,
        correlation_id=t.correlation_id,
        requested_by=t.requested_by,
        status=t.status,
        started_at=t.started_at,
        ended_at=t.ended_at,
        duration_ms=t.duration_ms,
        attempts=t.attempts,
        cost=t.cost,
        escalations=t.escalations,
        sla_due_at=t.sla_due_at,
        sla_breached=t.sla_breached,
        sla_breaches=t.sla_breaches,
        rejected_commands=t.rejected_commands,
        approval_id=t.approval_id,
        approval_since=t.approval_since,
        approval_due_at=t.approval_due_at,
        error=t.error,
        input=t.input,
        output=t.output,
        last_seq=t.last_seq,
        updated_at=t.updated_at,
        events=t.events,
        redacted=list(t.redacted),
        steps=[
            StepTimeline(
                step=s.step,
                visit=s.visit,
                kind=s.kind,
                status=s.status,
                started_at=s.started_at,
                ended_at=s.ended_at,
                duration_ms=s.duration_ms,
                attempts=s.attempts,
                waited_ms=s.waited_ms,
                cost=s.cost,
                note=s.note,
                decisions=s.decisions,
                errors=s.errors,
                input=s.input,
                payload=s.payload,
                signal=s.signal,
                result=s.result,
                wait_from=s._wait_from,
            )
            for s in t.steps
        ],
    )


def timeline_of(record: RunTimeline) -> Timeline:
    """The fold state back from a topic record (to go on folding)."""
    t = Timeline(
        run_id=record.run_id,
        workflow=record.workflow,
        version=record.version,
        tenant=record.tenant,
        correlation_id=record.correlation_id,
        status=record.status,
        started_at=record.started_at,
        ended_at=record.ended_at,
        cost=record.cost,
        attempts=record.attempts,
        escalations=record.escalations,
        sla_breaches=record.sla_breaches,
        rejected_commands=record.rejected_commands,
        error=record.error,
        requested_by=record.requested_by,
        input=record.input,
        output=record.output,
        sla_due_at=record.sla_due_at,
        sla_breached=record.sla_breached,
        approval_id=record.approval_id,
        approval_since=record.approval_since,
        approval_due_at=record.approval_due_at,
        last_seq=record.last_seq,
        updated_at=record.updated_at,
        events=record.events,
        redacted=list(record.redacted),
    )
    for s in record.steps:
        t.steps.append(
            StepEntry(
                step=s.step,
                visit=s.visit,
                kind=s.kind,
                started_at=s.started_at,
                status=s.status,
                ended_at=s.ended_at,
                attempts=s.attempts,
                waited_ms=s.waited_ms,
                cost=s.cost,
                decisions=list(s.decisions or ()),
                errors=list(s.errors or ()),
                note=s.note,
                result=s.result,
                _wait_from=s.wait_from,
                input=s.input,
                payload=s.payload,
                signal=s.signal,
            )
        )
    return t
