"""What people may see of a run: its state with every payload under the run's redaction
policy. The CLI prints it and the API returns it."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from engine.core.spec import WorkflowSpec
from engine.core.state import RunState
from engine.runtime.redaction import RedactionPolicy
from engine.runtime.replay import state_view
from engine.runtime.specs import SpecRegistry

__all__ = ["redacted_view"]


def redacted_view(state: RunState, specs: Sequence[WorkflowSpec] = ()) -> dict[str, Any]:
    """The run state as JSON with every payload under the run's redaction policy (the
    spec's ``redact`` rules plus the built-in ones): what people may see."""
    spec = SpecRegistry(specs).get(state.workflow, state.version) if state.workflow else None
    policy = _policy(tuple(spec.redact) if spec is not None else ())
    taint: set[str] = set()  # a value hidden once is hidden wherever it shows up again
    view = state_view(state)
    view["input"] = policy.value(view["input"], "input", taint)
    view["results"] = {
        step: policy.value(value, ("steps", step, "result"), taint)
        for step, value in view["results"].items()
    }
    view["signals"] = {
        name: policy.value(value, ("signals", name), taint)
        for name, value in view["signals"].items()
    }
    current = view.get("current")
    if current:
        for field in ("result", "change_set"):
            current[field] = policy.value(
                current[field], ("steps", current["step"], "result"), taint
            )
    view["output"] = policy.value(view["output"], "output", taint)
    for field in ("error", "last_error"):
        if view.get(field) and view[field].get("message"):
            view[field]["message"] = policy.text(view[field]["message"])
    return view


@lru_cache(maxsize=1024)
def _policy(rules: tuple[str, ...]) -> RedactionPolicy:
    """The policy of a spec's ``redact`` rules, built once: building one compiles its key
    patterns, and the API shows a run on nearly every request."""
    return RedactionPolicy.of(rules)
