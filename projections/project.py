"""The pure projection: events in, rows out. No I/O.

A projector keeps one ``Timeline`` per run (the fold state) and hands each batch of
events, with where each was read (partition, offset), to ``project_batch``. It gets back
copies of the timelines the batch touched and the event index rows; only once they are
stored does it adopt the copies, so a batch that fails to store leaves its state as it
was. Payloads are redacted (per the run's spec) before they enter a timeline, so nothing
derived from one (rows, topic records, the stored fold state) can hold a secret.

Three tables come out of a timeline, with the same columns on PostgreSQL and SQLite:
``runs`` (``run_row``), ``steps`` (``step_rows``) and ``run_events`` (``EventRow``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.core import events as ev
from engine.core.errors import TerranohaError
from engine.runtime.redaction import DEFAULT_POLICY, PolicyBook
from projections.timeline import Timeline, apply, copy_timeline, timeline_to_dict


class ProjectionError(TerranohaError):
    """A projection cannot run as asked; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Column:
    """A projection column. ``kind``: text, int, float, bool or json."""

    name: str
    kind: str


def _cols(spec: str) -> tuple[Column, ...]:
    return tuple(Column(*item.split(":")) for item in spec.split())


RUN_COLUMNS = _cols(
    "run_id:text workflow:text version:int tenant:text correlation_id:text "
    "requested_by:text status:text started_at:int ended_at:int duration_ms:int attempts:int "
    "cost:float escalations:int sla_due_at:int sla_breached:bool sla_breaches:int "
    "rejected_commands:int approval_since:int approval_due_at:int error:json input:json "
    "output:json last_seq:int updated_at:int events:int state:json"
)
STEP_COLUMNS = _cols(
    "run_id:text idx:int step:text visit:int kind:text status:text started_at:int "
    "ended_at:int duration_ms:int attempts:int waited_ms:int cost:float note:text "
    "decisions:json errors:json input:json payload:json signal:json result:json"
)
EVENT_COLUMNS = _cols("run_id:text seq:int type:text ts:int partition:int offset:int")

RUN_KEY = ("run_id",)
STEP_KEY = ("run_id", "idx")
EVENT_KEY = ("run_id", "seq")


def run_row(t: Timeline) -> dict[str, Any]:
    """The ``runs`` row of a run; ``state`` is the fold state to resume from."""
    return {
        "run_id": t.run_id,
        "workflow": t.workflow,
        "version": t.version,
        "tenant": t.tenant,
        "correlation_id": t.correlation_id,
        "requested_by": t.requested_by,
        "status": t.status,
        "started_at": t.started_at,
        "ended_at": t.ended_at,
        "duration_ms": t.duration_ms,
        "attempts": t.attempts,
        "cost": t.cost,
        "escalations": t.escalations,
        "sla_due_at": t.sla_due_at,
        "sla_breached": t.sla_breached,
        "sla_breaches": t.sla_breaches,
        "rejected_commands": t.rejected_commands,
        "approval_since": t.approval_since,
        "approval_due_at": t.approval_due_at,
        "error": t.error,
        "input": t.input,
        "output": t.output,
        "last_seq": t.last_seq,
        "updated_at": t.updated_at,
        "events": t.events,
        "state": timeline_to_dict(t),
    }


def step_rows(t: Timeline) -> list[dict[str, Any]]:
    """The ``steps`` rows of a run, one per step visit, ``idx`` in timeline order."""
    return [
        {
            "run_id": t.run_id,
            "idx": i,
            "step": s.step,
            "visit": s.visit,
            "kind": s.kind,
            "status": s.status,
            "started_at": s.started_at,
            "ended_at": s.ended_at,
            "duration_ms": s.duration_ms,
            "attempts": s.attempts,
            "waited_ms": s.waited_ms,
            "cost": s.cost,
            "note": s.note,
            "decisions": s.decisions,
            "errors": s.errors,
            "input": s.input,
            "payload": s.payload,
            "signal": s.signal,
            "result": s.result,
        }
        for i, s in enumerate(t.steps)
    ]


@dataclass(frozen=True, slots=True)
class EventRow:
    """One line of the event index: where each event of a run is in the log."""

    run_id: str
    seq: int
    type: str
    ts: int
    partition: int
    offset: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "seq": self.seq,
            "type": self.type,
            "ts": self.ts,
            "partition": self.partition,
            "offset": self.offset,
        }


@dataclass(slots=True)
class ProjectorStats:
    """What a projector did since it started."""

    batches: int = 0
    records: int = 0
    events: int = 0
    skipped: int = 0
    undecodable: int = 0
    runs_written: int = 0
    reconnects: int = 0
    seconds: float = 0.0

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


@dataclass(slots=True)
class ProjectedBatch:
    """What one batch changed: the touched runs' new timelines (copies), the index rows
    of the events applied, and per partition the last offset read."""

    touched: dict[str, Timeline] = field(default_factory=dict)
    events: list[EventRow] = field(default_factory=list)
    offsets: dict[int, int] = field(default_factory=dict)
    skipped: int = 0


Located = tuple[ev.Event | None, int, int]
"""(event or None for a record that is not an event, partition, offset)."""


def project_batch(
    known: Mapping[str, Timeline],
    items: Iterable[Located],
    book: PolicyBook | None = None,
    load: Callable[[str], Timeline | None] | None = None,
) -> ProjectedBatch:
    """Fold ``items`` into copies of the timelines in ``known`` (or given by ``load`` for
    runs not in ``known``, or new ones). ``known`` is not changed.

    An event at or below its run's last applied sequence number is skipped (no row), so
    projecting a batch twice gives the same rows. Records that are not events (``None``)
    only move the offsets.
    """
    out = ProjectedBatch()
    for event, partition, offset in items:
        if out.offsets.get(partition, -1) < offset:
            out.offsets[partition] = offset
        if event is None:
            out.skipped += 1
            continue
        run_id = event.run_id
        timeline = out.touched.get(run_id)
        if timeline is None:
            existing = known.get(run_id)
            if existing is None and load is not None:
                existing = load(run_id)
            timeline = copy_timeline(existing) if existing is not None else Timeline(run_id)
            out.touched[run_id] = timeline
        if event.seq <= timeline.last_seq:
            out.skipped += 1
            continue
        if book is None:
            policy = DEFAULT_POLICY
        elif isinstance(event, ev.RunStarted):
            policy = book.policy(event.workflow, event.version)
        else:
            policy = book.policy(timeline.workflow, timeline.version)
        taint = set(timeline.redacted)
        apply(timeline, policy.event(event, taint))
        if len(taint) != len(timeline.redacted):
            timeline.redacted = sorted(taint)
        out.events.append(EventRow(run_id, event.seq, event.TYPE, event.ts, partition, offset))
    return out


def project_run(events: Iterable[ev.Event], book: PolicyBook | None = None) -> Timeline:
    """The timeline of one run's events, redacted: a fresh fold, for comparisons."""
    batch = project_batch({}, ((e, 0, i) for i, e in enumerate(events)), book)
    if len(batch.touched) != 1:
        raise ValueError(f"project_run needs the events of one run, got {len(batch.touched)}")
    return next(iter(batch.touched.values()))


# --------------------------------------------------------------------------- storage form


def _no_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_no_nul(k): _no_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_nul(v) for v in value]
    return value


def json_text(value: Any) -> str | None:
    """Canonical JSON text (sorted keys) of a payload, None for None. NUL characters,
    which neither PostgreSQL's jsonb nor its text can hold, become U+FFFD."""
    if value is None:
        return None
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    if "\\u0000" in text:
        text = json.dumps(
            _no_nul(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
        )
    return text


def db_value(column: Column, value: Any) -> Any:
    """``value`` as stored in ``column``: JSON as text, text without NULs, numbers as
    numbers."""
    if value is None:
        return None
    kind = column.kind
    if kind == "json":
        return json_text(value)
    if kind == "text":
        text = str(value)
        return text.replace("\x00", "\ufffd") if "\x00" in text else text
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    return bool(value)


def db_rows(
    columns: tuple[Column, ...], rows: Iterable[Mapping[str, Any]]
) -> list[tuple[Any, ...]]:
    """``rows`` as tuples of stored values, in ``columns`` order."""
    return [tuple(db_value(c, row[c.name]) for c in columns) for row in rows]
