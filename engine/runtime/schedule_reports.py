"""What a run engine's batch tells the schedules: which of their runs will not go on.

A schedule counts its runs as running until it hears otherwise (its overlap policy
depends on it), so every way a scheduled run stops is reported, in the transaction of
the batch that saw it: the run ended (completed, failed, cancelled); a ``StartRun`` for
a run that already ended was refused as a duplicate (a backfill over a nominal time that
ran); or the ``StartRun`` became a dead letter (its workflow is not deployed).
"""

from __future__ import annotations

from engine.codec import DecodeError, decode
from engine.core.commands import StartRun
from engine.core.schedule_records import ReportRunEnded
from engine.core.schedules import run_ended_reports, schedule_origin
from engine.runtime.processor import Batch

NOT_STARTED = "NotStarted"


def schedule_reports(batch: Batch) -> list[ReportRunEnded]:
    reports = run_ended_reports(batch.events, batch.states)
    for dead in batch.dead_letters:
        try:
            record = decode(dead.payload)
        except DecodeError:
            continue
        origin = schedule_origin(record.idempotency_key) if isinstance(record, StartRun) else None
        if isinstance(record, StartRun) and origin is not None:
            reports.append(
                ReportRunEnded(
                    command_id=f"not-started:{record.run_id}",
                    schedule_id=origin[0],
                    run_id=record.run_id,
                    outcome=f"{NOT_STARTED}: {dead.reason}",
                )
            )
    return reports
