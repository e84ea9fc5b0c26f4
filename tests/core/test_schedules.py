"""The schedule core: nominal times across daylight-saving changes, overlap policies,
catch-up after downtime, misses, backfill, pause and trigger; and, as properties, that
no nominal time starts twice and that the fold of the log equals the live state."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.codec import decode, encode
from engine.core.commands import CancelRun, StartRun
from engine.core.events import CommandRejected, RunCompleted
from engine.core.schedule_records import (
    BackfillSchedule,
    CreateSchedule,
    DeleteSchedule,
    FireReason,
    FireScheduleTick,
    MissReason,
    OverlapPolicy,
    PauseSchedule,
    ReportRunEnded,
    ResumeSchedule,
    ScheduleCommand,
    ScheduleCommandRejected,
    ScheduledRunBuffered,
    ScheduledRunCancelRequested,
    ScheduledRunSkipped,
    ScheduledRunStarted,
    ScheduleEvent,
    ScheduleSpec,
    ScheduleState,
    ScheduleTicksMissed,
    TriggerSchedule,
)
from engine.core.schedules import (
    MAX_BACKFILL,
    alerts,
    decide,
    due_at,
    evolve,
    idempotency_key,
    jitter_delay,
    outputs,
    run_ended_reports,
    run_id_of,
    schedule_origin,
    timers,
)
from engine.core.state import RunState, RunStatus
from engine.runtime.schedule_spec import CronCalendar, ScheduleSpecError, load_schedule

CALENDAR = CronCalendar()
MINUTE = 60_000
T0 = 1_800_000_000_000 - 1_800_000_000_000 % MINUTE  # a whole minute


def at(text: str, zone: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp() * 1000)


def local(ms: int, zone: str) -> str:
    return datetime.fromtimestamp(ms / 1000, ZoneInfo(zone)).isoformat()


@dataclass
class Schedule:
    """One schedule driven by hand: commands in, events out, live state beside the log."""

    state: ScheduleState | None = None
    log: list[ScheduleEvent] = field(default_factory=list)
    count: int = 0

    def send(self, command: ScheduleCommand, now: int) -> list[ScheduleEvent]:
        events = decide(self.state, command, now, CALENDAR)
        for event in events:
            self.state = evolve(self.state, event)
            assert decode(encode(event)) == event
        self.log.extend(events)
        folded: ScheduleState | None = None
        for event in self.log:
            folded = evolve(folded, event)
        assert folded == self.state, "the fold of the log differs from the live state"
        return events

    def cmd_id(self) -> str:
        self.count += 1
        return f"c{self.count}"

    def create(self, spec: ScheduleSpec, now: int) -> list[ScheduleEvent]:
        return self.send(
            CreateSchedule(command_id=self.cmd_id(), schedule_id=spec.schedule_id, spec=spec), now
        )

    def run_until(self, end: int) -> list[ScheduleEvent]:
        """Fire every timer as it falls due, up to ``end`` (an engine that never stops)."""
        out: list[ScheduleEvent] = []
        while self.state is not None and (due := due_at(self.state)) is not None and due <= end:
            for tick in timers(self.state):
                out += self.send(tick, due)
        return out

    def tick_at(self, now: int) -> list[ScheduleEvent]:
        """The engine comes back at ``now`` and fires the timer it finds (overdue)."""
        assert self.state is not None
        out: list[ScheduleEvent] = []
        for tick in timers(self.state):
            out += self.send(tick, now)
        return out

    def ended(self, run_id: str, now: int, outcome: str = "Completed") -> list[ScheduleEvent]:
        assert self.state is not None
        return self.send(
            ReportRunEnded(
                command_id=self.cmd_id(),
                schedule_id=self.state.schedule_id,
                run_id=run_id,
                outcome=outcome,
            ),
            now,
        )


def started(events: Sequence[ScheduleEvent]) -> list[ScheduledRunStarted]:
    return [e for e in events if isinstance(e, ScheduledRunStarted)]


def cron(expr: str, zone: str, **more: Any) -> ScheduleSpec:
    return load_schedule(
        {
            "id": "s1",
            "workflow": "report",
            "cron": expr,
            "timezone": zone,
            "overlap": "allow_all",
            **more,
        }
    )


def every_minute(**more: Any) -> ScheduleSpec:
    return load_schedule({"id": "s1", "workflow": "report", "interval": "1m", **more})


# Daylight-saving changes


def test_spring_forward_in_berlin_fires_a_missing_time_once_after_the_gap() -> None:
    zone = "Europe/Berlin"
    s = Schedule()
    s.create(cron("30 2 * * *", zone), at("2026-03-28T00:00", zone))
    fired = started(s.run_until(at("2026-03-30T12:00", zone)))
    assert [local(e.nominal, zone) for e in fired] == [
        "2026-03-28T02:30:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
    ]


def test_fall_back_in_berlin_fires_a_repeated_time_once() -> None:
    zone = "Europe/Berlin"
    s = Schedule()
    s.create(cron("30 2 * * *", zone), at("2026-10-24T12:00", zone))
    fired = started(s.run_until(at("2026-10-26T12:00", zone)))
    assert [local(e.nominal, zone) for e in fired] == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",
    ]
    assert len({e.run_id for e in fired}) == 2


def test_fall_back_in_new_york_fires_an_hourly_step_in_both_hours() -> None:
    zone = "America/New_York"
    s = Schedule()
    s.create(cron("*/30 * * * *", zone), at("2026-11-01T00:50", zone))
    fired = started(s.run_until(at("2026-11-01T02:10", zone)))
    nominals = [e.nominal for e in fired]
    assert [local(n, zone) for n in nominals] == [
        "2026-11-01T01:00:00-04:00",
        "2026-11-01T01:30:00-04:00",
        "2026-11-01T01:00:00-05:00",
        "2026-11-01T01:30:00-05:00",
        "2026-11-01T02:00:00-05:00",
    ]
    assert all(b - a == 30 * MINUTE for a, b in itertools.pairwise(nominals))


def test_spring_forward_in_new_york_skips_no_day() -> None:
    zone = "America/New_York"
    s = Schedule()
    s.create(cron("15 2 * * *", zone), at("2026-03-07T12:00", zone))
    fired = started(s.run_until(at("2026-03-09T12:00", zone)))
    assert [local(e.nominal, zone) for e in fired] == [
        "2026-03-08T03:00:00-04:00",
        "2026-03-09T02:15:00-04:00",
    ]


def test_a_six_field_cron_counts_seconds_first() -> None:
    s = Schedule()
    s.create(cron("*/20 * * * * *", "UTC"), T0)
    fired = started(s.run_until(T0 + MINUTE))
    assert [e.nominal - T0 for e in fired] == [20_000, 40_000, 60_000]


# Overlap policies


def _two_ticks(policy: OverlapPolicy) -> tuple[Schedule, list[ScheduleEvent]]:
    s = Schedule()
    s.create(every_minute(overlap=policy.value), T0 + 1)
    return s, s.run_until(T0 + 3 * MINUTE)


def test_skip_records_the_nominal_times_that_come_while_a_run_is_going() -> None:
    _s, events = _two_ticks(OverlapPolicy.SKIP)
    assert len(started(events)) == 1
    skipped = [e for e in events if isinstance(e, ScheduledRunSkipped)]
    assert [e.nominal - T0 for e in skipped] == [2 * MINUTE, 3 * MINUTE]


def test_buffer_one_starts_one_kept_time_when_the_run_ends_and_skips_the_rest() -> None:
    s, events = _two_ticks(OverlapPolicy.BUFFER_ONE)
    first = started(events)
    assert [e.nominal - T0 for e in first] == [MINUTE]
    assert [e.nominal - T0 for e in events if isinstance(e, ScheduledRunBuffered)] == [2 * MINUTE]
    assert [e.nominal - T0 for e in events if isinstance(e, ScheduledRunSkipped)] == [3 * MINUTE]
    after = s.ended(first[0].run_id, T0 + 3 * MINUTE + 5)
    assert [(e.nominal - T0, e.reason) for e in started(after)] == [
        (2 * MINUTE, FireReason.BUFFERED)
    ]
    assert s.state is not None and s.state.buffered is None


def test_allow_all_starts_every_nominal_time() -> None:
    _, events = _two_ticks(OverlapPolicy.ALLOW_ALL)
    assert len(started(events)) == 3


def test_cancel_other_cancels_the_running_run_before_starting_the_next() -> None:
    s, events = _two_ticks(OverlapPolicy.CANCEL_OTHER)
    runs = started(events)
    cancels = [e for e in events if isinstance(e, ScheduledRunCancelRequested)]
    assert [c.run_id for c in cancels] == [runs[0].run_id, runs[1].run_id]
    assert s.state is not None
    (command,) = outputs(cancels[0])
    assert isinstance(command, CancelRun) and command.run_id == runs[0].run_id


def test_a_started_run_is_a_start_run_command_keyed_by_schedule_and_nominal_time() -> None:
    s, events = _two_ticks(OverlapPolicy.ALLOW_ALL)
    assert s.state is not None
    (command,) = outputs(started(events)[0])
    assert isinstance(command, StartRun)
    assert command.run_id == run_id_of(s.state.spec, T0 + MINUTE)
    assert schedule_origin(command.idempotency_key) == ("s1", T0 + MINUTE)
    assert command.workflow == "report"


def test_a_time_buffered_when_the_run_ended_while_paused_starts_on_resume() -> None:
    s, events = _two_ticks(OverlapPolicy.BUFFER_ONE)
    s.send(PauseSchedule(command_id="p", schedule_id="s1"), T0 + 3 * MINUTE + 1)
    s.ended(started(events)[0].run_id, T0 + 3 * MINUTE + 2)
    assert s.state is not None and s.state.buffered == T0 + 2 * MINUTE
    resumed = s.send(ResumeSchedule(command_id="r", schedule_id="s1"), T0 + 3 * MINUTE + 3)
    assert [(e.nominal - T0, e.reason) for e in started(resumed)] == [
        (2 * MINUTE, FireReason.BUFFERED)
    ]


def test_the_run_engine_reports_ended_runs_and_refused_restarts_of_ended_ones() -> None:
    spec = every_minute()
    run_id = run_id_of(spec, T0)
    key = idempotency_key("s1", T0)
    base: dict[str, Any] = dict(
        run_id=run_id, seq=1, tenant="default", correlation_id=run_id, causation_id="c", ts=T0
    )
    ended = RunState(
        run_id=run_id,
        tenant="default",
        correlation_id=run_id,
        workflow="w",
        version=1,
        idempotency_key=key,
        outcome=RunStatus.COMPLETED,
    )
    completed = RunCompleted(**base, output=None)
    (report,) = run_ended_reports([completed], {run_id: ended})
    assert (report.schedule_id, report.run_id, report.outcome) == ("s1", run_id, "Completed")
    refused = CommandRejected(
        **base, command_type="StartRun", command_id="x", reason="duplicate start"
    )
    assert len(run_ended_reports([refused], {run_id: ended})) == 1
    going = replace(ended, outcome=None)
    assert not run_ended_reports([refused], {run_id: going})
    other = replace(ended, idempotency_key="order-1")
    assert not run_ended_reports([completed], {run_id: other})


# The engine down across ticks


def test_an_engine_down_across_three_ticks_catches_each_up_inside_the_window() -> None:
    s = Schedule()
    s.create(every_minute(overlap="allow_all", catch_up_window="10m"), T0 + 1)
    events = s.tick_at(T0 + 3 * MINUTE + 30_000)  # down from before the first tick
    assert [(e.nominal - T0, e.reason) for e in started(events)] == [
        (MINUTE, FireReason.CATCH_UP),
        (2 * MINUTE, FireReason.CATCH_UP),
        (3 * MINUTE, FireReason.CATCH_UP),
    ]
    assert s.state is not None and s.state.next_nominal == T0 + 4 * MINUTE
    assert not s.tick_at(T0 + 3 * MINUTE + 31_000), "an old tick again does nothing"


def test_an_engine_down_across_three_ticks_with_skip_starts_one_and_records_two() -> None:
    s = Schedule()
    s.create(every_minute(catch_up_window="10m"), T0 + 1)
    events = s.tick_at(T0 + 3 * MINUTE + 30_000)
    assert len(started(events)) == 1
    assert len([e for e in events if isinstance(e, ScheduledRunSkipped)]) == 2


def test_times_outside_the_catch_up_window_are_recorded_as_missed() -> None:
    s = Schedule()
    s.create(every_minute(overlap="allow_all", catch_up_window="90s"), T0 + 1)
    events = s.tick_at(T0 + 3 * MINUTE + 30_000)
    missed = [e for e in events if isinstance(e, ScheduleTicksMissed)]
    assert [(m.first - T0, m.last - T0, m.count, m.reason) for m in missed] == [
        (MINUTE, MINUTE, 1, MissReason.OUTSIDE_WINDOW)
    ]
    assert [e.nominal - T0 for e in started(events)] == [2 * MINUTE, 3 * MINUTE]
    assert s.state is not None and s.state.missed == 1 and s.state.started == 2


def test_times_missed_outside_the_window_are_an_alert_and_paused_ones_are_not() -> None:
    s = Schedule()
    s.create(every_minute(catch_up_window="0s", tenant="acme"), T0 + 1)
    (missed,) = [e for e in s.tick_at(T0 + 5 * MINUTE) if isinstance(e, ScheduleTicksMissed)]
    (alert,) = alerts(missed)
    assert (alert.kind, alert.step, alert.tenant) == ("schedule_missed", "s1", "acme")
    assert "missed 4 nominal time(s)" in alert.message
    s.send(PauseSchedule(command_id="p", schedule_id="s1"), T0 + 5 * MINUTE + 1)
    resumed = s.send(ResumeSchedule(command_id="r", schedule_id="s1"), T0 + 9 * MINUTE)
    (paused,) = [e for e in resumed if isinstance(e, ScheduleTicksMissed)]
    assert paused.reason is MissReason.PAUSED and not alerts(paused)


def test_a_long_outage_is_one_missed_range_with_its_count() -> None:
    s = Schedule()
    s.create(every_minute(catch_up_window="0s"), T0 + 1)
    events = s.tick_at(T0 + 1000 * MINUTE)
    (missed,) = [e for e in events if isinstance(e, ScheduleTicksMissed)]
    assert missed.count == 999 and missed.first == T0 + MINUTE
    assert [e.nominal - T0 for e in started(events)] == [1000 * MINUTE]


# Jitter, pause, trigger, backfill


def test_jitter_is_derived_from_the_schedule_and_the_nominal_time() -> None:
    delays = [jitter_delay("s1", T0 + k * MINUTE, 30_000) for k in range(50)]
    assert delays == [jitter_delay("s1", T0 + k * MINUTE, 30_000) for k in range(50)]
    assert all(0 <= d <= 30_000 for d in delays) and len(set(delays)) > 10
    s = Schedule()
    s.create(every_minute(jitter="30s"), T0 + 1)
    assert s.state is not None and due_at(s.state) == T0 + MINUTE + delays[1]
    assert not s.tick_at(T0 + MINUTE + delays[1] - 1), "not before its delay"


def test_pause_stops_the_timer_and_resume_records_the_paused_times() -> None:
    s = Schedule()
    s.create(every_minute(), T0 + 1)
    s.send(PauseSchedule(command_id="p", schedule_id="s1"), T0 + 2)
    assert s.state is not None and not timers(s.state)
    events = s.send(ResumeSchedule(command_id="r", schedule_id="s1"), T0 + 3 * MINUTE + 10)
    (missed,) = [e for e in events if isinstance(e, ScheduleTicksMissed)]
    assert (missed.count, missed.reason) == (3, MissReason.PAUSED)
    assert s.state.next_nominal == T0 + 4 * MINUTE


def test_trigger_now_starts_a_run_once_per_request() -> None:
    s = Schedule()
    s.create(every_minute(), T0 + 1)
    command = TriggerSchedule(command_id="t", schedule_id="s1", at=T0 + 5)
    first = s.send(command, T0 + 6)
    assert [(e.nominal, e.reason) for e in started(first)] == [(T0 + 5, FireReason.TRIGGER)]
    assert not s.send(replace(command, command_id="t-again"), T0 + 7)


def test_backfill_starts_every_nominal_time_of_the_range_whatever_the_policy() -> None:
    s = Schedule()
    s.create(every_minute(), T0 + 10 * MINUTE)
    events = s.send(
        BackfillSchedule(command_id="b", schedule_id="s1", start=T0, end=T0 + 3 * MINUTE),
        T0 + 10 * MINUTE + 1,
    )
    assert [(e.nominal - T0, e.reason) for e in started(events)] == [
        (k * MINUTE, FireReason.BACKFILL) for k in range(4)
    ]


def test_a_backfill_over_times_that_ran_addresses_the_same_runs() -> None:
    s = Schedule()
    s.create(every_minute(overlap="allow_all"), T0 + 1)
    ticked = {e.nominal: e.run_id for e in started(s.run_until(T0 + 2 * MINUTE))}
    again = s.send(
        BackfillSchedule(command_id="b", schedule_id="s1", start=T0 + 1, end=T0 + 2 * MINUTE),
        T0 + 2 * MINUTE + 1,
    )
    assert {e.nominal: e.run_id for e in started(again)} == ticked


def test_a_backfill_too_large_or_backwards_is_refused_with_what_to_do() -> None:
    s = Schedule()
    s.create(every_minute(), T0)
    (too_many,) = s.send(
        BackfillSchedule(
            command_id="b", schedule_id="s1", start=T0, end=T0 + (MAX_BACKFILL + 5) * MINUTE
        ),
        T0,
    )
    assert isinstance(too_many, ScheduleCommandRejected) and "smaller" in too_many.detail
    (backwards,) = s.send(
        BackfillSchedule(command_id="b2", schedule_id="s1", start=T0, end=T0 - 1), T0
    )
    assert isinstance(backwards, ScheduleCommandRejected) and "--from" in backwards.detail


def test_a_deleted_schedule_fires_nothing_and_can_be_created_again() -> None:
    s = Schedule()
    s.create(every_minute(), T0 + 1)
    s.send(DeleteSchedule(command_id="d", schedule_id="s1"), T0 + 2)
    assert s.state is not None and not timers(s.state)
    assert not s.send(
        FireScheduleTick(command_id="x", schedule_id="s1", nominal=T0 + MINUTE), T0 + MINUTE
    )
    assert s.create(every_minute(), T0 + 3)


def test_creating_an_existing_schedule_again_is_idempotent_and_another_is_refused() -> None:
    s = Schedule()
    s.create(every_minute(), T0)
    assert not s.create(every_minute(), T0 + 1)
    (refused,) = s.create(every_minute(overlap="allow_all"), T0 + 2)
    assert isinstance(refused, ScheduleCommandRejected) and "delete it first" in refused.detail


# Validation at the edge


def test_a_bad_document_names_every_offending_field() -> None:
    with pytest.raises(ScheduleSpecError) as caught:
        load_schedule(
            {
                "id": "nightly",
                "workflow": "report",
                "cron": "0 25 * * *",
                "timezone": "Europe/Berlln",
                "overlap": "sometimes",
                "catch_up_window": "soon",
            }
        )
    fields = [path for path, _ in caught.value.issues]
    assert {"cron", "timezone", "overlap", "catch_up_window"} <= set(fields)
    assert "Europe/Berlin" in str(caught.value)


def test_a_document_needs_cron_or_interval_not_both() -> None:
    with pytest.raises(ScheduleSpecError, match="cron: give a cron"):
        load_schedule({"id": "x", "workflow": "w"})
    with pytest.raises(ScheduleSpecError, match="interval: give cron or interval"):
        load_schedule({"id": "x", "workflow": "w", "cron": "* * * * *", "interval": "1m"})


# Properties

_commands = st.lists(
    st.one_of(
        st.tuples(st.just("wait"), st.integers(0, 5 * MINUTE)),
        st.tuples(st.just("down"), st.integers(0, 20 * MINUTE)),
        st.tuples(st.just("end"), st.integers(0, 3)),
        st.tuples(st.just("trigger"), st.integers(0, 3)),
        st.tuples(st.just("pause"), st.just(0)),
        st.tuples(st.just("resume"), st.just(0)),
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None)
@given(
    policy=st.sampled_from(list(OverlapPolicy)),
    window=st.integers(0, 10),
    jitter=st.integers(0, 40),
    steps=_commands,
)
def test_no_nominal_time_starts_twice_and_replay_equals_live(
    policy: OverlapPolicy, window: int, jitter: int, steps: list[tuple[str, int]]
) -> None:
    s = Schedule()
    now = T0 + 1
    s.create(
        every_minute(overlap=policy.value, catch_up_window=f"{window}m", jitter=f"{jitter}s"), now
    )
    for action, value in steps:
        assert s.state is not None
        if action == "wait":
            now += value
            s.run_until(now)
        elif action == "down":
            now += value
            s.tick_at(now)
        elif action == "end" and s.state.running:
            run = s.state.running[value % len(s.state.running)]
            s.ended(run.run_id, now)
        elif action == "trigger":
            s.send(
                TriggerSchedule(command_id=s.cmd_id(), schedule_id="s1", at=now - value * 1000 - 7),
                now,
            )  # off the minute grid
        elif action == "pause":
            s.send(PauseSchedule(command_id=s.cmd_id(), schedule_id="s1"), now)
        elif action == "resume":
            s.send(ResumeSchedule(command_id=s.cmd_id(), schedule_id="s1"), now)
    runs = [e.run_id for e in started(s.log)]
    assert len(runs) == len(set(runs)), "a nominal time started twice"
    # Ticks are on the minute grid, triggers off it; a buffered time's start is its second
    # event (the first was ScheduledRunBuffered).
    ticked = [
        e.nominal
        for e in s.log
        if isinstance(e, ScheduledRunStarted | ScheduledRunSkipped | ScheduledRunBuffered)
        and (e.nominal - T0) % MINUTE == 0
        and not (isinstance(e, ScheduledRunStarted) and e.reason is FireReason.BUFFERED)
    ]
    assert len(ticked) == len(set(ticked)), "a nominal time was decided twice"
    missed = sum(e.count for e in s.log if isinstance(e, ScheduleTicksMissed))
    assert s.state is not None and s.state.next_nominal is not None
    every = (s.state.next_nominal - (T0 + MINUTE)) // MINUTE
    # Each tick-driven nominal time up to the cursor has exactly one outcome.
    assert len(ticked) + missed == every
