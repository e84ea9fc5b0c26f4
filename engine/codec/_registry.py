"""Which classes are records, where their schemas live, and what each schema must be."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.codec._shapes import NAMESPACE, record_schema
from engine.core import admission_records as admission
from engine.core.alerts import Alert
from engine.core.commands import COMMAND_TYPES, Command
from engine.core.correlation import CORRELATION_COMMANDS, CORRELATION_EVENTS, CorrelationState
from engine.core.events import EVENT_TYPES
from engine.core.outbox import Notification, TaskCommand
from engine.core.projection_records import RunTimeline, SlaMetrics
from engine.core.records import DeadLetter, RecordedCommand, Trigger
from engine.core.schedule_records import (
    SCHEDULE_COMMAND_TYPES,
    SCHEDULE_EVENT_TYPES,
    ScheduleState,
)
from engine.core.state import RunState

EMBEDDED: frozenset[type] = frozenset({Command})
"""Polymorphic bases a record can hold; such a field is written as framed bytes."""

SEMANTIC_VERSIONS = frozenset({"events"})
"""Kinds whose version is part of the meaning: every (type, version) is its own class,
so a schema version without a class is unknown, never read as another version. For the
other kinds a version is a revision of one class's schema, and older revisions are read
into the current class by Avro schema resolution."""


@dataclass(frozen=True, slots=True)
class RecordType:
    """A record class with its schema's folder (``kind``), name and version.

    ``name`` is the class's ``TYPE`` (its class name when it has none) and is the Avro
    record name; ``version`` is the class's ``VERSION`` (1 when it has none).
    """

    cls: type
    kind: str
    name: str
    version: int

    @classmethod
    def of(cls, record_class: type, kind: str) -> RecordType:
        name = getattr(record_class, "TYPE", record_class.__name__)
        version = getattr(record_class, "VERSION", 1)
        return cls(record_class, kind, name, version)

    @property
    def file(self) -> str:
        """The schema file, relative to the schemas folder."""
        return schema_file(self.kind, self.name, self.version)

    @property
    def semantic_versions(self) -> bool:
        return self.kind in SEMANTIC_VERSIONS

    def schema(self) -> dict[str, Any]:
        """The Avro schema this class's fields call for (what the generator writes)."""
        body = record_schema(self.cls, self.name, EMBEDDED)
        return {
            "type": "record",
            "name": self.name,
            "namespace": NAMESPACE,
            **{k: v for k, v in body.items() if k not in ("type", "name")},
        }

    def drift(self, schema: dict[str, Any]) -> str:
        """How ``schema`` differs from what the class calls for, docs aside ("" if not)."""
        actual, wanted = _without_docs(schema), _without_docs(self.schema())
        if actual == wanted:
            return ""
        have = {f.get("name"): f for f in actual.get("fields", [])}
        need = {f["name"]: f for f in wanted["fields"]}
        problems = [f"field {n} is not in the schema" for n in need if n not in have]
        problems += [f"schema field {n} is not on the class" for n in have if n not in need]
        problems += [
            f"field {n}: the schema has {have[n]}, the class needs {need[n]}"
            for n in need
            if n in have and have[n] != need[n]
        ]
        return "; ".join(problems) or "the record attributes differ"


def schema_file(kind: str, name: str, version: int) -> str:
    return f"{kind}/{name}.v{version}.avsc"


def core_records() -> list[RecordType]:
    """Every record the engine writes or reads."""
    return [
        *(RecordType.of(cls, "events") for cls in EVENT_TYPES.values()),
        *(RecordType.of(cls, "commands") for cls in COMMAND_TYPES.values()),
        RecordType.of(Trigger, "records"),
        RecordType.of(RecordedCommand, "records"),
        RecordType.of(DeadLetter, "records"),
        RecordType.of(TaskCommand, "outbox"),
        RecordType.of(Notification, "outbox"),
        RecordType.of(RunState, "state"),
        *projection_records(),
        *admission_records(),
        *correlation_records(),
        *schedule_records(),
    ]


def admission_records() -> list[RecordType]:
    """The admission processor's commands, events and per-key state."""
    return [
        *(RecordType.of(cls, "admission") for cls in admission.RECORD_TYPES),
        RecordType.of(Alert, "records"),
    ]


def schedule_records() -> list[RecordType]:
    """The records of the schedules' topics: commands, events, state."""
    return [
        *(RecordType.of(cls, "schedules") for cls in SCHEDULE_COMMAND_TYPES),
        *(RecordType.of(cls, "schedules") for cls in SCHEDULE_EVENT_TYPES),
        RecordType.of(ScheduleState, "schedules"),
    ]


def projection_records() -> list[RecordType]:
    """The records of the projection topics (run timelines, SLA metrics)."""
    return [RecordType.of(RunTimeline, "projections"), RecordType.of(SlaMetrics, "projections")]


def correlation_records() -> list[RecordType]:
    """The records of message correlation: its commands, its events, its key's state."""
    return [
        RecordType.of(cls, "correlation")
        for cls in (*CORRELATION_COMMANDS, *CORRELATION_EVENTS, CorrelationState)
    ]


def _without_docs(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_docs(v) for k, v in value.items() if k != "doc"}
    if isinstance(value, list):
        return [_without_docs(v) for v in value]
    return value
