"""Schedules on every backend: ticks start runs keyed by (schedule, nominal time), the run
engine reports their end back, overlap policies act on running runs, and backfill and
trigger start each nominal time's run once."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from engine.core.schedule_records import (
    FireReason,
    ScheduledRunEnded,
    ScheduledRunSkipped,
    ScheduledRunStarted,
    ScheduleSpec,
)
from engine.core.schedules import run_id_of
from engine.core.spec import load_spec
from engine.runtime.schedule_service import ScheduleService, ScheduleView
from engine.runtime.schedule_spec import load_schedule
from engine.worker import TaskContext, ToolRegistry
from tests.conformance.drivers import Driver

HOUR = 3_600_000

SPECS = [
    load_spec(
        {
            "workflow": "report",
            "version": 1,
            "steps": [{"id": "make", "task": "s.echo", "input": {"day": "input.day"}}],
        }
    ),
    load_spec(
        {
            "workflow": "hold",
            "version": 1,
            "steps": [{"id": "wait", "wait_event": {"name": "never", "timeout": "5m"}}],
        }
    ),
]


def _registry() -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool("s.echo")
    async def echo(ctx: TaskContext) -> object:
        return ctx.input

    return registry


@pytest.fixture
def scheduled(driver: Driver) -> Iterator[tuple[Driver, ScheduleService]]:
    driver.start(SPECS, _registry(), schedules=True)
    assert driver.schedules is not None
    try:
        yield driver, driver.schedules
    finally:
        driver.stop()


def _spec(**fields: object) -> ScheduleSpec:
    return load_schedule(
        {
            "id": f"s-{uuid.uuid4().hex[:8]}",
            "workflow": "report",
            "input": {"day": "today"},
            **fields,
        }
    )


def _until(
    service: ScheduleService,
    schedule_id: str,
    ok: Callable[[ScheduleView], bool],
    what: str,
    timeout_s: float = 60.0,
) -> ScheduleView:
    deadline = time.monotonic() + timeout_s
    view = None
    while time.monotonic() < deadline:
        view = service.get(schedule_id)
        if view is not None and ok(view):
            return view
        time.sleep(0.1)
    raise AssertionError(
        f"schedule {schedule_id}: {what} did not happen; last: {view.state if view else None}"
    )


def _started(view: ScheduleView) -> list[ScheduledRunStarted]:
    return [e for e in view.events if isinstance(e, ScheduledRunStarted)]


def test_ticks_start_one_run_per_nominal_time_and_learn_when_each_ends(
    scheduled: tuple[Driver, ScheduleService],
) -> None:
    driver, service = scheduled
    spec = _spec(interval="1s", overlap="allow_all")
    service.create(spec)
    view = _until(service, spec.schedule_id, lambda v: len(_started(v)) >= 3, "three runs")
    starts = _started(view)[:3]
    nominals = [e.nominal for e in starts]
    assert len(set(nominals)) == 3 and all(n % 1000 == 0 for n in nominals)
    for event in starts:
        assert event.run_id == run_id_of(spec, event.nominal)
        state = driver.wait_status(event.run_id, "Completed")
        assert state.input == {"day": "today"}
    ended = {
        e.run_id
        for e in _until(
            service,
            spec.schedule_id,
            lambda v: (
                {s.run_id for s in _started(v)[:3]}
                <= {e.run_id for e in v.events if isinstance(e, ScheduledRunEnded)}
            ),
            "the run engine's end reports",
        ).events
        if isinstance(e, ScheduledRunEnded)
    }
    assert {e.run_id for e in starts} <= ended
    service.delete(spec.schedule_id)


def test_skip_starts_nothing_while_a_run_is_going(
    scheduled: tuple[Driver, ScheduleService],
) -> None:
    driver, service = scheduled
    spec = _spec(workflow="hold", interval="1s", overlap="skip")
    service.create(spec)
    view = _until(
        service,
        spec.schedule_id,
        lambda v: sum(isinstance(e, ScheduledRunSkipped) for e in v.events) >= 2,
        "two skipped nominal times",
    )
    (first,) = _started(view)
    assert driver.wait_status(first.run_id, "Waiting").status.value == "Waiting"
    service.delete(spec.schedule_id)


def test_cancel_other_cancels_the_running_run(scheduled: tuple[Driver, ScheduleService]) -> None:
    driver, service = scheduled
    spec = _spec(workflow="hold", interval="1s", overlap="cancel_other")
    service.create(spec)
    view = _until(service, spec.schedule_id, lambda v: len(_started(v)) >= 2, "two runs")
    first, second = _started(view)[:2]
    assert driver.wait_status(first.run_id, "Cancelled").status.value == "Cancelled"
    assert driver.wait_status(second.run_id, "Waiting", "Cancelled")
    service.delete(spec.schedule_id)


def test_backfill_and_trigger_start_each_nominal_time_once(
    scheduled: tuple[Driver, ScheduleService],
) -> None:
    driver, service = scheduled
    spec = _spec(cron="0 * * * *", timezone="Europe/Berlin", paused=True)
    service.create(spec)
    _until(service, spec.schedule_id, lambda v: True, "creation")
    now = int(time.time() * 1000)
    start, end = now - now % HOUR - 3 * HOUR, now - now % HOUR - HOUR
    service.backfill(spec.schedule_id, start, end)
    # The overlap policy (skip) applies to a trigger: let the backfilled runs end first.
    _until(
        service,
        spec.schedule_id,
        lambda v: len(_started(v)) == 3 and not v.state.running,
        "three backfilled runs, ended",
    )
    service.trigger(spec.schedule_id, now)
    view = _until(service, spec.schedule_id, lambda v: len(_started(v)) == 4, "four runs")
    backfilled = [e for e in _started(view) if e.reason is FireReason.BACKFILL]
    assert [e.nominal for e in backfilled] == [start, start + HOUR, end]
    for event in _started(view):
        driver.wait_status(event.run_id, "Completed")
    service.backfill(spec.schedule_id, start, end)  # the same nominal times again
    view = _until(service, spec.schedule_id, lambda v: len(_started(v)) == 7, "the repeat")
    for event in backfilled:
        events = driver.events(event.run_id)
        assert [e.TYPE for e in events].count("RunStarted") == 1, "a nominal time ran twice"


def test_a_run_that_cannot_start_does_not_block_the_schedule(
    scheduled: tuple[Driver, ScheduleService],
) -> None:
    """Its workflow is not deployed: the StartRun is a dead letter, and the run engine
    reports the run as not started, so ``skip`` does not skip every later time."""
    _, service = scheduled
    spec = _spec(workflow="not-deployed", interval="1s", overlap="skip")
    service.create(spec)
    view = _until(service, spec.schedule_id, lambda v: len(_started(v)) >= 2, "two runs")
    ended = [e for e in view.events if isinstance(e, ScheduledRunEnded)]
    assert ended and ended[0].outcome.startswith("NotStarted: unknown_workflow")
    assert not any(isinstance(e, ScheduledRunSkipped) for e in view.events)
    service.delete(spec.schedule_id)
