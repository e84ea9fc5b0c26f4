"""The pure projection: run rows, step rows, the event index, and incremental folding."""

from __future__ import annotations

import json
import random

import pytest

from engine.codec import decode, encode
from engine.core import events as ev
from projections.project import (
    EVENT_COLUMNS,
    RUN_COLUMNS,
    STEP_COLUMNS,
    EventRow,
    json_text,
    project_batch,
    project_run,
    run_row,
    step_rows,
)
from projections.records import RunTimeline, timeline_of, timeline_record
from projections.timeline import (
    Timeline,
    build_timeline,
    render_timeline,
    timeline_from_dict,
    timeline_to_dict,
)
from tests.projections.scenarios import (
    BASE,
    BOOK,
    MINUTE,
    SECOND,
    breached,
    completed,
    escalated,
    many_runs,
    retried,
    waiting,
)


def test_the_run_row_of_a_completed_run() -> None:
    row = run_row(project_run(retried("r2", BASE), BOOK))
    assert {k: v for k, v in row.items() if k not in ("state", "input")} == {
        "run_id": "r2",
        "workflow": "claims",
        "version": 1,
        "tenant": "acme",
        "correlation_id": "r2",
        "requested_by": "alice",
        "status": "Completed",
        "started_at": BASE,
        "ended_at": BASE + 10 * SECOND,
        "duration_ms": 10 * SECOND,
        "attempts": 3,
        "cost": 0.03,
        "escalations": 0,
        "sla_due_at": BASE + 10 * MINUTE,
        "sla_breached": False,
        "sla_breaches": 0,
        "rejected_commands": 0,
        "approval_since": None,
        "approval_due_at": None,
        "error": None,
        "output": {"paid": True, "iban": "[redacted]"},
        "last_seq": row["last_seq"],
        "updated_at": BASE + 10 * SECOND,
        "events": row["last_seq"],
    }
    assert set(row) == {c.name for c in RUN_COLUMNS}


def test_step_rows_are_the_timeline() -> None:
    rows = step_rows(project_run(retried("r2", BASE), BOOK))
    assert set(rows[0]) == {c.name for c in STEP_COLUMNS}
    summary = [
        (
            r["idx"],
            r["step"],
            r["status"],
            r["started_at"] - BASE,
            r["duration_ms"],
            r["attempts"],
            r["waited_ms"],
        )
        for r in rows
    ]
    assert summary == [
        (0, "fetch", "completed", 0, 3 * SECOND, 2, SECOND),
        (1, "review", "completed", 3 * SECOND, 3 * SECOND, 0, 3 * SECOND),
        (2, "docs", "completed", 6 * SECOND, 2 * SECOND, 0, 2 * SECOND),
        (3, "pay", "completed", 8 * SECOND, 2 * SECOND, 1, 0),
    ]
    fetch, review, docs, pay = rows
    assert [e["code"] for e in fetch["errors"]] == ["UPSTREAM"]
    assert review["decisions"] == [
        {"approver": "bob", "decision": "approved", "ts": BASE + 6 * SECOND}
    ]
    assert docs["signal"] == {"name": "docs", "data": {"ssn": "[redacted]", "pages": 3}}
    assert pay["input"] == {"card": "[redacted]", "claim": "c-1"}
    assert pay["result"] == {"paid": True, "iban": "[redacted]"}
    assert fetch["result"]["customer"] == "ada"


def test_waiting_escalated_and_breached_runs() -> None:
    wait = project_run(waiting("r6", BASE), BOOK)
    assert (wait.status, wait.approval_since, wait.approval_due_at) == (
        "Waiting",
        BASE + SECOND,
        BASE + SECOND + 5 * MINUTE,
    )
    esc = project_run(escalated("r8", BASE), BOOK)
    assert (esc.escalations, esc.approval_since, esc.approval_due_at) == (
        1,
        BASE + 60 * MINUTE + SECOND,
        None,
    )
    assert esc.steps[1].note == "escalated to leads"
    late = project_run(breached("r9", BASE), BOOK)
    assert (late.sla_breached, late.sla_breaches, late.duration_ms) == (True, 1, 11 * MINUTE)


def test_a_run_ending_after_its_sla_is_breached_even_if_the_timer_did_not_fire() -> None:
    events = completed("r", BASE, (SECOND, 10 * MINUTE, SECOND, SECOND))
    assert not any(isinstance(e, ev.SlaBreached) for e in events)
    assert project_run(events, BOOK).sla_breached


def test_the_event_index() -> None:
    events = completed("r1", BASE)
    batch = project_batch({}, [(e, 3, 100 + i) for i, e in enumerate(events)], BOOK)
    assert batch.events == [
        EventRow("r1", e.seq, e.TYPE, e.ts, 3, 100 + i) for i, e in enumerate(events)
    ]
    assert set(batch.events[0].as_dict()) == {c.name for c in EVENT_COLUMNS}
    assert batch.offsets == {3: 100 + len(events) - 1}


def test_records_that_are_not_events_only_move_the_offsets() -> None:
    events = completed("r1", BASE)
    batch = project_batch({}, [(events[0], 0, 5), (None, 0, 6), (None, 1, 9)], BOOK)
    assert (len(batch.events), batch.skipped, batch.offsets) == (1, 2, {0: 6, 1: 9})


def test_a_batch_applied_twice_changes_nothing() -> None:
    events = retried("r2", BASE)
    items = [(e, 0, i) for i, e in enumerate(events)]
    once = project_batch({}, items, BOOK)
    twice = project_batch(once.touched, items, BOOK)
    assert twice.events == [] and twice.skipped == len(events)
    assert run_row(twice.touched["r2"]) == run_row(once.touched["r2"])


def test_project_batch_does_not_change_what_it_is_given() -> None:
    events = completed("r1", BASE)
    first = project_batch({}, [(e, 0, i) for i, e in enumerate(events[:5])], BOOK)
    before = timeline_to_dict(first.touched["r1"])
    project_batch(first.touched, [(e, 0, 5 + i) for i, e in enumerate(events[5:])], BOOK)
    assert timeline_to_dict(first.touched["r1"]) == before


def test_folding_in_random_batches_with_stored_state_equals_one_fold() -> None:
    """The projector's way (batches across runs, state stored as JSON and read back
    between batches) gives the rows of a fresh fold of each run."""
    runs = many_runs(40)
    log = [e for events in runs.values() for e in events]
    rng = random.Random(7)
    queues = {run_id: list(events) for run_id, events in runs.items()}
    interleaved = []
    while queues:
        run_id = rng.choice(sorted(queues))
        interleaved.append(queues[run_id].pop(0))
        if not queues[run_id]:
            del queues[run_id]
    stored: dict[str, Timeline] = {}
    pos = 0
    while pos < len(interleaved):
        size = rng.randint(1, 60)
        chunk = [(e, 0, pos + i) for i, e in enumerate(interleaved[pos : pos + size])]
        batch = project_batch(stored, chunk, BOOK)
        for run_id, t in batch.touched.items():
            stored[run_id] = timeline_from_dict(json.loads(json_text(timeline_to_dict(t)) or "{}"))
        pos += size
    assert len(log) == len(interleaved)
    for run_id, events in runs.items():
        fresh = project_run(events, BOOK)
        assert run_row(stored[run_id]) == run_row(fresh)
        assert step_rows(stored[run_id]) == step_rows(fresh)


def test_the_timeline_record_round_trips_and_resumes_the_fold() -> None:
    events = completed("r1", BASE)
    half = project_run(events[:9], BOOK)
    record = decode(encode(timeline_record(half)))
    assert isinstance(record, RunTimeline)
    rest = project_batch(
        {"r1": timeline_of(record)}, [(e, 0, 9 + i) for i, e in enumerate(events[9:])], BOOK
    )
    assert run_row(rest.touched["r1"]) == run_row(project_run(events, BOOK))


def test_the_cli_timeline_still_renders() -> None:
    text = render_timeline(build_timeline(breached("r9", BASE)))
    assert "sla BREACHED" in text and "review" in text


@pytest.mark.parametrize("event_type", list(ev.EVENT_TYPES.values()), ids=lambda t: t.__name__)
def test_every_event_type_is_folded_into_the_timeline_or_known_to_change_nothing(
    event_type: type[ev.Event],
) -> None:
    from projections import timeline

    folded, ignored = event_type in timeline._FOLDS, event_type in timeline.IGNORED
    assert folded != ignored, (
        f"register a @_folds({event_type.__name__}) in projections/timeline.py, or add it "
        "to IGNORED if a timeline shows nothing of it"
    )
