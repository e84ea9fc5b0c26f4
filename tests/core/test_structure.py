"""Structural rules of the core: every event has an evolver, every step kind, timer kind
and approval reason has its processor, and the core stays pure."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

import engine.core
from engine.core import decide
from engine.core import events as ev
from engine.core.errors import UnknownEventError
from engine.core.events import EVENT_TYPES
from engine.core.evolve import EVOLVERS, evolve, fold
from engine.core.kinds import ApprovalReason, StepKind, TimerKind

CORE = Path(engine.core.__file__).parent
FORBIDDEN = frozenset(
    {
        "asyncio",
        "aiokafka",
        "psycopg",
        "sqlite3",
        "socket",
        "time",
        "random",
        "datetime",
        "threading",
        "os",
        "subprocess",
        "requests",
        "httpx",
        "opentelemetry",
    }
)


@pytest.mark.parametrize("event_type", list(EVENT_TYPES.values()), ids=lambda t: t.TYPE)
def test_every_event_type_has_an_evolver(event_type: type) -> None:
    assert event_type in EVOLVERS, (
        f"add an @evolver({event_type.__name__}) in engine/core/evolve.py"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class _Unregistered(ev.Event):
    TYPE: ClassVar[str] = "Unregistered"


def _started() -> ev.RunStarted:
    return ev.RunStarted(
        run_id="r",
        seq=1,
        ts=0,
        tenant="t",
        correlation_id="r",
        causation_id="c",
        workflow="w",
        version=1,
        input={},
        idempotency_key="k",
        requested_by="",
        priority=0,
    )


def test_an_event_without_an_evolver_is_an_error_not_a_skip() -> None:
    stray = _Unregistered(run_id="r", seq=2, ts=0, tenant="t", correlation_id="r", causation_id="c")
    with pytest.raises(UnknownEventError, match="no evolver for event Unregistered v1"):
        evolve(fold([_started()]), stray)
    with pytest.raises(UnknownEventError, match="@evolver"):
        fold([_started(), stray])
    with pytest.raises(UnknownEventError):
        evolve(None, stray)


@pytest.mark.parametrize("kind", list(StepKind))
def test_every_step_kind_has_an_entry(kind: StepKind) -> None:
    assert kind in decide._ENTER, f"register an @_enters(StepKind.{kind.name}) in decide.py"


@pytest.mark.parametrize("kind", list(TimerKind))
def test_every_timer_kind_has_a_handler(kind: TimerKind) -> None:
    assert kind in decide._TIMER_KINDS, f"add TimerKind.{kind.name} to decide._TIMER_KINDS"


@pytest.mark.parametrize("reason", list(ApprovalReason))
def test_every_approval_reason_has_a_grant_rule(reason: ApprovalReason) -> None:
    assert reason in decide._ON_GRANT, f"register an @_on_grant(ApprovalReason.{reason.name})"


def test_event_registry_keys_match_the_classes() -> None:
    assert all(key == (cls.TYPE, cls.VERSION) for key, cls in EVENT_TYPES.items())
    assert len(set(EVENT_TYPES.values())) == len(EVENT_TYPES)
    versions: dict[str, list[int]] = {}
    for name, version in EVENT_TYPES:
        versions.setdefault(name, []).append(version)
    assert all(sorted(v) == list(range(1, len(v) + 1)) for v in versions.values()), versions


def _imports(path: Path) -> list[tuple[int, str]]:
    """Top-level package names imported by ``path``, with their line numbers."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "__import__"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value.split(".")[0]))
    return found


def test_core_modules_are_found() -> None:
    names = {p.name for p in CORE.glob("*.py")}
    assert {"decide.py", "evolve.py", "spec.py", "state.py", "events.py"} <= names


CALENDAR = {"windows.py": frozenset({"datetime"})}
"""Modules allowed a forbidden import for calendar arithmetic on instants they are
given; ``test_calendar_modules_never_read_the_clock`` keeps them from asking the time."""
CLOCK_READS = frozenset({"now", "today", "utcnow", "time", "monotonic", "time_ns"})


@pytest.mark.parametrize("module", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_does_no_io(module: Path) -> None:
    allowed = CALENDAR.get(module.name, frozenset())
    bad = [
        f"{module.name}:{line} imports {name}"
        for line, name in _imports(module)
        if name in FORBIDDEN - allowed
    ]
    assert not bad, "engine/core must stay pure (time and ids come in as arguments): " + ", ".join(
        bad
    )


@pytest.mark.parametrize("name", sorted(CALENDAR))
def test_calendar_modules_never_read_the_clock(name: str) -> None:
    tree = ast.parse((CORE / name).read_text())
    reads = [
        f"{name}:{node.lineno} calls .{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in CLOCK_READS
    ]
    assert not reads, ", ".join(reads)


def test_the_scan_sees_every_import_form(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os.path\nfrom time import time\nif True:\n    import socket\n"
        "__import__('random')\nfrom . import sibling\n"
    )
    assert {name for _, name in _imports(sample)} == {"os", "time", "socket", "random"}
