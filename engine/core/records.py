"""Records that travel beside events: triggers, recorded commands, dead letters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine.core.commands import Command


@dataclass(frozen=True, slots=True, kw_only=True)
class Trigger:
    """What users publish to start a run. ``version`` 0 means the latest deployed.

    Without an ``idempotency_key`` the trigger's identity is its source position.
    """

    TYPE: ClassVar[str] = "Trigger"
    VERSION: ClassVar[int] = 1
    workflow: str
    version: int = 0
    tenant: str = "default"
    idempotency_key: str = ""
    input: Any = field(default_factory=dict)
    priority: int = 0
    correlation_id: str = ""
    requested_by: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedCommand:
    """A processed command kept in the run log next to the events it produced
    (sequence numbers ``first_seq``..``last_seq``), with the ``now`` it was decided at,
    so ``replay --verify`` can decide it again and compare."""

    TYPE: ClassVar[str] = "RecordedCommand"
    VERSION: ClassVar[int] = 1
    run_id: str
    command: Command
    now: int
    first_seq: int
    last_seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """An input that could not be processed, with why and where it came from.
    ``payload`` holds the original bytes untouched."""

    TYPE: ClassVar[str] = "DeadLetter"
    VERSION: ClassVar[int] = 1
    source: str
    partition: int
    offset: int
    reason: str
    detail: str
    payload: bytes
    ts: int
    run_id: str = ""
