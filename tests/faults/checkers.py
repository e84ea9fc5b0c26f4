"""Invariant checkers, run when a scenario is quiescent. Each prints what it found; a failed
check names run ids and log offsets.

1. every accepted trigger produced exactly one run (and no run came from nowhere);
2. every run is Completed, Failed, Cancelled, or Waiting with a valid reason;
3. every side effect was applied once per idempotency key, one key per logical write;
4. the PostgreSQL projections, written by a projector that lived through the faults,
   equal a fresh fold of the events topic into an empty schema (checksum; on a mismatch
   the runs whose rows differ);
5. the run log: per-run sequence numbers contiguous, no duplicate events, and nothing
   counted that only a read_uncommitted consumer sees.

``check_decided_once`` is the narrow form of 1 and 5 for the transaction-window
scenarios (tests/faults/test_txn_windows.py): no projection or worker, only the log.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from engine.core.events import Event, RunStarted
from engine.core.records import RecordedCommand
from engine.core.state import RunState, RunStatus, Waiting
from projections._pg_schema import CHECKSUM_TABLES
from projections.postgres import checksum, counts, create_schema, rebuild, stored_offsets
from tests.faults.harness import Fleet, Logged, LogView, Sent


@dataclass
class Check:
    name: str
    ok: bool = True
    found: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def fail(self, problem: str) -> None:
        self.ok = False
        self.problems.append(problem)

    def report(self) -> str:
        head = f"[{'PASS' if self.ok else 'FAIL'}] {self.name}: " + "; ".join(self.found)
        return "\n".join([head, *(f"    {p}" for p in self.problems[:20])])


def _where(view: LogView, run_id: str) -> str:
    spots = [f"{e.partition}@{e.offset}" for e in view.events().get(run_id, [])[:4]]
    return f"{run_id} (events at {', '.join(spots) or 'nowhere'})"


def check_triggers(sent: Sent, view: LogView, extra_runs: Iterable[str] = ()) -> Check:
    check = Check("1 one run per accepted trigger")
    starts = Counter(e.record.run_id for e in view.committed if isinstance(e.record, RunStarted))
    for key, run_id in sent.triggers.items():
        if starts[run_id] != 1:
            check.fail(f"trigger {key}: {starts[run_id]} RunStarted for {_where(view, run_id)}")
    known = set(sent.triggers.values()) | set(sent.unacknowledged.values()) | set(extra_runs)
    for run_id in starts:
        if run_id not in known:
            check.fail(f"run from no trigger: {_where(view, run_id)}")
    maybe = sum(1 for r in sent.unacknowledged.values() if starts[r])
    check.found.append(
        f"{len(sent.triggers)} accepted triggers ({sent.copies} records sent), "
        f"{len(starts)} runs started, {len(sent.unacknowledged)} unacknowledged "
        f"sends of which {maybe} started"
    )
    return check


def check_statuses(view: LogView, allowed: frozenset[RunStatus] | None = None) -> Check:
    check = Check("2 every run terminal or validly waiting")
    counts: Counter[str] = Counter()
    for run_id, state in view.states().items():
        status = state.status
        counts[status.value] += 1
        if allowed is not None and status not in allowed:
            check.fail(
                f"{status.value} (not {sorted(s.value for s in allowed)}): "
                f"{_where(view, run_id)} at step {_step(state)}"
            )
        elif status is RunStatus.WAITING and not _waits_validly(state):
            check.fail(f"Waiting without a reason: {_where(view, run_id)} at {_step(state)}")
        elif status not in (
            RunStatus.COMPLETED,
            RunStatus.FAILED,
            RunStatus.CANCELLED,
            RunStatus.WAITING,
        ):
            check.fail(f"stuck {status.value}: {_where(view, run_id)} at step {_step(state)}")
    check.found.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no runs")
    return check


def _step(state: RunState) -> str:
    current = state.current
    if current is None:
        return "-"
    return f"{current.step}/{current.waiting.value or 'active'}/attempt {current.attempt}"


def _waits_validly(state: RunState) -> bool:
    current = state.current
    if current is None:
        return False
    if current.waiting is Waiting.APPROVAL:
        return current.approval is not None
    if current.waiting is Waiting.SIGNAL:
        return bool(current.signal)
    if current.waiting is Waiting.TIMER:
        return any(t.step == current.step for t in state.timers.values())
    return False


def check_effects(
    effects: Path,
    view: LogView,
    writes: tuple[str, ...] = ("pay", "notify"),
) -> Check:
    """The effects table applies each key once (``INSERT OR IGNORE``), so what can go wrong
    is a second key for the same logical write, a missing write, or a write for a run that
    never reached that step."""
    check = Check("3 side effects once per key, one key per write")
    if not effects.exists():
        rows: list[tuple[str, str, str]] = []
        calls: list[tuple[str, int]] = []
    else:
        db = sqlite3.connect(effects)
        try:
            rows = list(db.execute("SELECT idempotency_key, step, run_id FROM effects"))
            calls = list(
                db.execute("SELECT idempotency_key, COUNT(*) FROM calls GROUP BY idempotency_key")
            )
        finally:
            db.close()
    keys_per_write: dict[tuple[str, str], set[str]] = {}
    for key, step, run_id in rows:
        keys_per_write.setdefault((run_id, step), set()).add(key)
    for (run_id, step), keys in keys_per_write.items():
        if len(keys) != 1:
            check.fail(
                f"{step} of {_where(view, run_id)} applied under {len(keys)} keys: {sorted(keys)}"
            )
    states = view.states()
    for run_id, state in states.items():
        if state.status is not RunStatus.COMPLETED:
            continue
        for step in writes:
            if step in state.results and (run_id, step) not in keys_per_write:
                check.fail(f"{step} of completed {_where(view, run_id)} has no effect")
    for run_id, step in keys_per_write:
        if run_id not in states:
            check.fail(f"effect {step} for a run not in the log: {run_id}")
    repeated = sum(1 for _, n in calls if n > 1)
    check.found.append(
        f"{len(rows)} effects applied for {len(keys_per_write)} writes; "
        f"{sum(n for _, n in calls)} calls, {repeated} keys called more than once"
    )
    return check


def check_log(view: LogView) -> Check:
    check = Check("5 run log contiguous, no duplicates, nothing from aborted transactions")
    counted = {(e.partition, e.offset) for e in view.committed}
    aborted = view.aborted
    leaked = [a for a in aborted if (a.partition, a.offset) in counted]
    for a in leaked[:10]:
        check.fail(f"aborted record counted at {a.partition}@{a.offset}")
    events = view.events()
    for run_id, logged in events.items():
        by_seq: dict[int, list[str]] = {}
        for e in logged:
            by_seq.setdefault(e.record.seq, []).append(f"{e.partition}@{e.offset}")
        doubled = {s: where for s, where in by_seq.items() if len(where) > 1}
        if doubled:
            check.fail(f"{run_id}: seq written twice {dict(list(doubled.items())[:3])}")
        seqs = sorted(by_seq)
        if seqs != list(range(1, len(seqs) + 1)):
            gaps = sorted(set(range(1, seqs[-1] + 1)) - set(seqs))[:5]
            check.fail(
                f"{run_id}: missing seq {gaps} (log {logged[0].partition}@"
                f"{logged[0].offset}..{logged[-1].offset})"
            )
        partitions = {e.partition for e in logged}
        if len(partitions) != 1:
            check.fail(f"{run_id}: events on several partitions {sorted(partitions)}")
    aborted_events = [a for a in aborted if isinstance(a.record, Event)]
    check.found.append(
        f"{len(view.committed)} committed records, {len(events)} runs; "
        f"{len(aborted)} records only visible read_uncommitted "
        f"({len(aborted_events)} events), none counted"
        if not leaked
        else f"{len(leaked)} aborted records counted"
    )
    return check


def check_decided_once(view: LogView, triggers: Mapping[str, str]) -> Check:
    """What a transaction committed twice leaves in the log, by name: each trigger
    (idempotency key -> run id) has exactly one ``RunStarted``; each run's sequence
    numbers are committed once each and contiguous from 1; each command a run recorded
    (``RecordedCommand``, keyed by its command id, which names the input's position) is
    recorded once. Only what a read_committed consumer sees counts."""
    check = Check("each input decided once: one run per trigger, each seq once")
    runs = view.events()
    starts: dict[str, list[Logged]] = {}
    recorded: dict[tuple[str, str], list[Logged]] = {}
    for logged in view.committed:
        record = logged.record
        if isinstance(record, RunStarted):
            starts.setdefault(record.run_id, []).append(logged)
        elif isinstance(record, RecordedCommand):
            recorded.setdefault((record.run_id, record.command.command_id), []).append(logged)
    for key, run_id in triggers.items():
        found = starts.get(run_id, [])
        if len(found) != 1:
            check.fail(
                f"trigger {key}: {len(found)} RunStarted for run {run_id}"
                + (f" at {_offsets(found)}" if found else " (no committed event)")
            )
    for run_id, events in runs.items():
        by_seq: dict[int, list[Logged]] = {}
        for entry in events:
            by_seq.setdefault(entry.record.seq, []).append(entry)
        for seq, entries in sorted(by_seq.items()):
            if len(entries) > 1:
                kinds = "/".join(sorted({type(e.record).__name__ for e in entries}))
                check.fail(
                    f"run {run_id}: seq {seq} ({kinds}) committed {len(entries)} "
                    f"times, at {_offsets(entries)}"
                )
        if sorted(by_seq) != list(range(1, len(by_seq) + 1)):
            check.fail(
                f"run {run_id}: seqs {sorted(by_seq)} are not 1..{len(by_seq)} "
                f"(events at {_offsets(events)})"
            )
    for (run_id, command_id), entries in recorded.items():
        if len(entries) > 1:
            check.fail(
                f"run {run_id}: command {command_id} recorded {len(entries)} times, "
                f"at {_offsets(entries)}"
            )
    check.found.append(
        f"{len(triggers)} triggers, {len(runs)} runs, "
        f"{sum(len(e) for e in runs.values())} committed events, "
        f"{len(view.aborted)} records only visible read_uncommitted"
    )
    return check


def _offsets(entries: Iterable[Logged]) -> str:
    return ", ".join(f"{e.partition}@{e.offset}" for e in entries)


def _row_digests(dsn: str, table: str) -> dict[str, list[str]]:
    """run id -> the sorted digests of its rows in ``table``."""
    out: dict[str, list[str]] = {}
    with psycopg.connect(dsn) as conn:
        query = sql.SQL("SELECT run_id, md5(t::text) FROM {} t").format(sql.Identifier(table))
        for run_id, digest in conn.execute(query):
            out.setdefault(run_id, []).append(digest)
    return {run_id: sorted(d) for run_id, d in out.items()}


def check_projections(fleet: Fleet, view: LogView, timeout_s: float = 120.0) -> Check:
    """Checker 4: wait until the scenario's projector has projected every committed event,
    then fold the events topic afresh into an empty schema and compare checksums."""
    check = Check("PostgreSQL projections equal a fresh fold of the events topic")
    live = fleet.projection_dsn
    topic = fleet.topics.events
    wanted: dict[int, int] = {}
    for logged in view.committed:
        wanted[logged.partition] = max(wanted.get(logged.partition, -1), logged.offset)
    restarts = 0
    deadline = time.monotonic() + timeout_s
    behind = dict(wanted)
    while behind and time.monotonic() < deadline:
        if fleet.revive_projector():
            restarts += 1
        try:
            stored = stored_offsets(live, topic)
        except psycopg.OperationalError:
            stored = {}
        behind = {p: o for p, o in wanted.items() if stored.get(p, -1) < o}
        if behind:
            time.sleep(0.5)
    for exit_line in fleet.projector_exits():
        check.fail(f"the projector died: {exit_line}")
    if behind:
        stored = stored_offsets(live, topic)
        check.fail(
            f"the projector did not catch up in {timeout_s:.0f}s: "
            + ", ".join(
                f"partition {p} at {stored.get(p, -1)} of {o}" for p, o in sorted(behind.items())
            )
        )
        return check
    fresh = create_schema(fleet.infra.postgres, f"{fleet.prefix}_fresh")
    stats = asyncio.run(rebuild(fleet.infra.bootstrap, fleet.topics, fresh, name="fresh"))
    live_sum, fresh_sum = checksum(live), checksum(fresh)
    by_run = view.events()
    runs, events = len(by_run), sum(len(e) for e in by_run.values())
    rows = counts(live)
    check.found.append(
        f"projector restarted {restarts} times; {runs} runs and {events} events "
        f"in the log; {rows['runs']} runs, {rows['steps']} steps and "
        f"{rows['run_events']} events projected; a fresh fold of "
        f"{stats.records} records; "
        f"checksum live {live_sum[:12]} fresh {fresh_sum[:12]}"
    )
    if live_sum != fresh_sum:
        for table in CHECKSUM_TABLES:
            a, b = _row_digests(live, table), _row_digests(fresh, table)
            differ = sorted(r for r in set(a) | set(b) if a.get(r) != b.get(r))
            if differ:
                check.fail(
                    f"{table}: {len(differ)} runs differ, e.g. "
                    + ", ".join(_where(view, r) for r in differ[:5])
                )
        if check.ok:
            check.fail("checksums differ but no run's rows do (row order independent?)")
    _explain_event_count(check, view, live, rows["runs"], runs)
    return check


def _projected_events(dsn: str) -> set[tuple[str, int]]:
    with psycopg.connect(dsn) as conn:
        return {(r, int(s)) for r, s in conn.execute("SELECT run_id, seq FROM run_events")}


def _explain_event_count(
    check: Check, view: LogView, dsn: str, projected_runs: int, runs: int
) -> None:
    """Say where every difference between the log's events and the projected ones went:
    a repeat of a (run, seq) already projected is de-duplicated by design (the projector
    keeps the first); a distinct event with no row was lost; a row with no event came
    from nowhere. Only the last two are the projector's fault (check 5 fails for the
    repeats themselves)."""
    in_log = Counter(
        (e.record.run_id, e.record.seq) for logged in view.events().values() for e in logged
    )
    repeats = sum(n - 1 for n in in_log.values())
    projected = _projected_events(dsn)
    lost = sorted(set(in_log) - projected)
    extra = sorted(projected - set(in_log))
    check.found.append(
        f"{sum(in_log.values())} events in the log = {len(in_log)} distinct "
        f"(run, seq) + {repeats} repeats; {len(projected)} projected: "
        f"{repeats} repeats de-duplicated, {len(lost)} lost, "
        f"{len(extra)} from nowhere"
    )
    if lost:
        check.fail(
            f"{len(lost)} events of the log never projected, e.g. "
            + ", ".join(f"{r} seq {q}" for r, q in lost[:5])
        )
    if extra:
        check.fail(
            f"{len(extra)} projected events not in the log, e.g. "
            + ", ".join(f"{r} seq {q}" for r, q in extra[:5])
        )
    if projected_runs != runs:
        check.fail(f"{projected_runs} runs projected for {runs} runs in the log")


def check_survival(fleet: Fleet) -> Check:
    check = Check("engine processes survive the faults")
    for crash in fleet.crashes():
        check.fail(crash)
    check.found.append(
        f"{len(fleet.procs)} engine processes started, "
        f"{len(fleet.crashes())} crashed, {fleet.revived} restarted for them"
    )
    return check


def run_checks(
    fleet: Fleet,
    view: LogView,
    *,
    allowed: frozenset[RunStatus] | None = frozenset({RunStatus.COMPLETED}),
    writes: tuple[str, ...] = ("pay", "notify"),
    extra_runs: Iterable[str] = (),
) -> list[Check]:
    """Every checker; prints each report and returns them (the caller asserts)."""
    checks = [
        check_triggers(fleet.sent, view, extra_runs),
        check_statuses(view, allowed),
        check_effects(fleet.effects, view, writes),
        check_log(view),
        check_survival(fleet),
        check_projections(fleet, view),
    ]
    for check in checks:
        print(check.report())
    return checks


def assert_checks(checks: list[Check]) -> None:
    failed = [c for c in checks if not c.ok]
    assert not failed, "\n".join(c.report() for c in failed)
