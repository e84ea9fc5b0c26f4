"""Replay a run from its log, and verify the current engine decides it the same way.

``verify`` walks the recorded commands in order. For each, it rebuilds the state from
the events before it, decides the command again with the current code and the ``now``
recorded with it, and compares the result with the recorded events. The first
difference is reported: that is where a code change broke determinism for this run.
A newer event version that only adds fields to the recorded one is not a difference
(``_same``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from engine.core.decide import process
from engine.core.events import Event
from engine.core.evolve import evolve
from engine.core.records import RecordedCommand
from engine.core.state import RunState
from engine.runtime.specs import SpecRegistry


@dataclass(frozen=True, slots=True)
class Divergence:
    command_id: str
    command_type: str
    seq: int
    expected: str
    actual: str

    def describe(self) -> str:
        return (
            f"first divergence at seq {self.seq}, command {self.command_type} "
            f"{self.command_id}:\n  recorded: {self.expected}\n  replayed: {self.actual}"
        )


@dataclass(frozen=True, slots=True)
class VerifyReport:
    run_id: str
    commands: int
    events: int
    divergence: Divergence | None

    @property
    def ok(self) -> bool:
        return self.divergence is None


def states(events: Sequence[Event]) -> list[RunState]:
    """The state after each event, in order."""
    out: list[RunState] = []
    state: RunState | None = None
    for event in events:
        state = evolve(state, event)
        out.append(state)
    return out


def verify(
    run_id: str, events: Sequence[Event], recorded: Sequence[RecordedCommand], specs: SpecRegistry
) -> VerifyReport:
    by_seq = {e.seq: e for e in events}
    state: RunState | None = None
    applied = 0
    ordered = sorted(events, key=lambda e: e.seq)
    for rec in sorted(recorded, key=lambda r: r.first_seq):
        while applied < len(ordered) and ordered[applied].seq < rec.first_seq:
            state = evolve(state, ordered[applied])
            applied += 1
        spec = (
            specs.get(state.workflow, state.version)
            if state is not None and state.workflow
            else specs.get(getattr(rec.command, "workflow", ""), getattr(rec.command, "version", 0))
        )
        replayed = process(state, rec.command, spec, rec.now).events
        expected = [by_seq[s] for s in range(rec.first_seq, rec.last_seq + 1) if s in by_seq]
        for i in range(max(len(expected), len(replayed))):
            want = expected[i] if i < len(expected) else None
            got = replayed[i] if i < len(replayed) else None
            if not _same(want, got):
                seq = want.seq if want is not None else rec.first_seq + i
                return VerifyReport(
                    run_id,
                    len(recorded),
                    len(events),
                    Divergence(
                        rec.command.command_id, rec.command.TYPE, seq, _show(want), _show(got)
                    ),
                )
    return VerifyReport(run_id, len(recorded), len(events), None)


def _same(recorded: Event | None, replayed: Event | None) -> bool:
    """Whether the replayed event is the recorded one. A newer version of an event that
    extends the recorded version (its class is a subclass: the same fields and more, as
    ``CommandRejectedV2`` extends ``CommandRejected``) matches when the recorded version's
    fields agree: an engine that now says more about the same decision has not diverged."""
    if recorded is None or replayed is None:
        return recorded is replayed
    if type(replayed) is not type(recorded) and isinstance(replayed, type(recorded)):
        return all(getattr(recorded, f.name) == getattr(replayed, f.name) for f in fields(recorded))
    return recorded == replayed


def _show(event: Event | None) -> str:
    if event is None:
        return "(no event)"
    body = ", ".join(
        f"{f.name}={_plain(getattr(event, f.name))!r}"
        for f in fields(event)
        if f.name not in ("run_id", "tenant", "correlation_id")
    )
    return f"{event.TYPE}({body})"


def _plain(value: Any) -> Any:
    """A decided event holds enum members where a decoded one holds their string
    values; both are shown as the string."""
    return value.value if isinstance(value, Enum) else value


def to_jsonable(value: Any) -> Any:
    """Dataclasses, enums, tuples and frozensets as plain JSON values."""
    if isinstance(value, Enum):
        return value.value
    if hasattr(value, "__dataclass_fields__"):
        data = {f: to_jsonable(getattr(value, f)) for f in value.__dataclass_fields__}
        if isinstance(value, Event):
            data = {"type": value.TYPE, "version": value.VERSION, **data}
        return data
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, frozenset | set):
        return sorted(to_jsonable(v) for v in value)
    if isinstance(value, bytes):
        return value.hex()
    return value


def state_view(state: RunState) -> dict[str, Any]:
    """The state as JSON, with the derived status."""
    data: dict[str, Any] = to_jsonable(state)
    data["status"] = state.status.value
    return data
