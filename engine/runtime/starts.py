"""Whether a start request repeats an existing run or conflicts with it.

The same (tenant, idempotency key) always names the same run. A repeat with the same
workflow and input is the same request (the CLI prints the run, the API answers 200); one
with another workflow or input is a mistake worth naming (exit 5 on the CLI, 409 from the
API), with the input fields that differ.
"""

from __future__ import annotations

from engine.core.records import Trigger
from engine.core.state import RunState

__all__ = ["start_conflict"]

_ABSENT = object()


def start_conflict(trigger: Trigger, state: RunState | None) -> str | None:
    """How the existing run differs from what ``trigger`` asks for, or None."""
    if state is None:
        return None
    if state.workflow != trigger.workflow or trigger.version not in (0, state.version):
        return f"workflow {state.workflow} v{state.version}"
    if state.input == trigger.input:
        return None
    old = state.input if isinstance(state.input, dict) else {}
    new = trigger.input if isinstance(trigger.input, dict) else {}
    if not old and not new:
        return "another input"
    fields = sorted(k for k in {*old, *new} if old.get(k, _ABSENT) != new.get(k, _ABSENT))
    return "another input (it differs in " + ", ".join(f"input.{k}" for k in fields) + ")"
