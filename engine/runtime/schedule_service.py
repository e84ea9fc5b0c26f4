"""What a front end (the CLI, the HTTP API) asks of schedules, on either backend.

``ScheduleService`` is the contract: each backend implements it (``engine.embedded.
schedules.EmbeddedScheduleService``, ``engine.kafka.schedules.KafkaScheduleService``)
and one contract test suite runs against both. Every change is a command on the
schedules' inputs, decided by the schedule processor; the service waits (a little) for
its outcome so a front end can answer with it.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from engine.core.errors import TerranohaError
from engine.core.schedule_records import (
    BackfillSchedule,
    CreateSchedule,
    DeleteSchedule,
    PauseSchedule,
    ResumeSchedule,
    ScheduleCommand,
    ScheduleEvent,
    ScheduleSpec,
    ScheduleState,
    TriggerSchedule,
)


class ScheduleNotFoundError(TerranohaError):
    """No schedule with that id (or it was deleted)."""


@dataclass(frozen=True, slots=True)
class ScheduleView:
    """A schedule's state and its log (oldest first)."""

    state: ScheduleState
    events: Sequence[ScheduleEvent]


def command_id() -> str:
    return str(uuid.uuid4())


class ScheduleService(ABC):
    """Create, read and steer schedules. ``by`` names who asked (recorded on the event)."""

    @abstractmethod
    def send(self, command: ScheduleCommand) -> list[ScheduleEvent]:
        """Write ``command`` durably; return the events it caused once decided (empty if
        it caused none, or if no processor decided it within a few seconds)."""

    @abstractmethod
    def get(self, schedule_id: str) -> ScheduleView | None:
        """The schedule, deleted ones included; None if it never existed."""

    @abstractmethod
    def list_schedules(self) -> list[ScheduleState]:
        """Every schedule that is not deleted, by id."""

    def close(self) -> None:
        return None

    def create(self, spec: ScheduleSpec) -> list[ScheduleEvent]:
        return self.send(
            CreateSchedule(command_id=command_id(), schedule_id=spec.schedule_id, spec=spec)
        )

    def pause(self, schedule_id: str, by: str = "") -> list[ScheduleEvent]:
        self.require(schedule_id)
        return self.send(PauseSchedule(command_id=command_id(), schedule_id=schedule_id, by=by))

    def resume(self, schedule_id: str, by: str = "") -> list[ScheduleEvent]:
        self.require(schedule_id)
        return self.send(ResumeSchedule(command_id=command_id(), schedule_id=schedule_id, by=by))

    def delete(self, schedule_id: str, by: str = "") -> list[ScheduleEvent]:
        self.require(schedule_id)
        return self.send(DeleteSchedule(command_id=command_id(), schedule_id=schedule_id, by=by))

    def trigger(self, schedule_id: str, at: int, by: str = "") -> list[ScheduleEvent]:
        """Start a run now; ``at`` (the request's time) is its nominal time."""
        self.require(schedule_id)
        return self.send(
            TriggerSchedule(command_id=command_id(), schedule_id=schedule_id, at=at, by=by)
        )

    def backfill(self, schedule_id: str, start: int, end: int, by: str = "") -> list[ScheduleEvent]:
        self.require(schedule_id)
        return self.send(
            BackfillSchedule(
                command_id=command_id(), schedule_id=schedule_id, start=start, end=end, by=by
            )
        )

    def require(self, schedule_id: str) -> ScheduleState:
        view = self.get(schedule_id)
        if view is None or view.state.deleted:
            raise ScheduleNotFoundError(
                f"no schedule {schedule_id!r}; list them with `terranoha schedules list`"
            )
        return view.state
