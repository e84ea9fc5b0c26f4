"""The root of every error Terranoha raises on purpose."""

from __future__ import annotations


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
