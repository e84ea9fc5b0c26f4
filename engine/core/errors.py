"""The root of every error Terranoha raises on purpose."""

from __future__ import annotations

from typing import Any


class TerranohaError(Exception):
    """Base class. ``retriable`` tells a caller whether trying again can help."""

    retriable: bool = False


class SpecError(TerranohaError):
    """A workflow spec was refused. ``issues`` lists (path, message) pairs, one per problem."""

    def __init__(self, workflow: str, issues: list[tuple[str, str]]) -> None:
        self.workflow = workflow
        self.issues = issues
        lines = "\n".join(f"  {path}: {message}" for path, message in issues)
        super().__init__(f"workflow spec {workflow or '<unnamed>'!s} is invalid:\n{lines}")


class ExpressionError(TerranohaError):
    """An expression could not be compiled or evaluated."""


class UnknownEventError(TerranohaError):
    """An event reached ``evolve`` with no evolver for its type and version.

    Applying it as a no-op would fold a run into a state the engine that wrote the event
    never had. It means the log was written by a newer engine (run that version, or a
    newer one, to read it) or an event class was added without its evolver (register
    one with ``@evolver`` in ``engine/core/evolve.py``).
    """

    def __init__(self, event: Any) -> None:
        self.event_type = type(event)
        name = getattr(event, "TYPE", type(event).__name__)
        version = getattr(event, "VERSION", "?")
        super().__init__(
            f"no evolver for event {name} v{version} ({type(event).__name__}) of run "
            f"{getattr(event, 'run_id', '?')!r} at seq {getattr(event, 'seq', '?')}: read this "
            "log with the engine version that wrote it or a newer one; a new event class "
            "needs an @evolver in engine/core/evolve.py"
        )
