"""What every command shares: the error type, argument parsing helpers and how a run's
state is printed."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from engine.core.errors import TerranohaError
from engine.core.spec import WorkflowSpec, load_spec_yaml
from engine.core.state import RunState, Waiting
from engine.runtime.redaction import redact_text
from projections.views import redacted_view


class CliError(TerranohaError):
    """Bad input on the command line; the message says what to fix."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def json_arg(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(
            f"{what} is not valid JSON ({exc.msg} at column {exc.colno}): {text!r}"
        ) from None


def load_spec_file(path: str) -> WorkflowSpec:
    file = Path(path)
    if not file.exists():
        raise CliError(f"no spec file {path}")
    return load_spec_yaml(file.read_text())


def is_spec_file(text: str) -> bool:
    return text.endswith((".yaml", ".yml")) or Path(text).exists()


def print_state(
    state: RunState | None, out: TextIO, as_json: bool = False, specs: Sequence[WorkflowSpec] = ()
) -> None:
    if state is None:
        out.write("run not found\n")
        return
    if as_json:
        out.write(json.dumps(redacted_view(state, specs), indent=2, default=str) + "\n")
        return
    current = state.current
    where = ""
    if current is not None:
        where = f" at step {current.step}"
        if current.waiting is Waiting.APPROVAL and current.approval is not None:
            a = current.approval
            where += (
                f" (waiting for approval by {', '.join(a.approvers)}; "
                f"{len(a.votes)}/{a.quorum} approvals)"
            )
        elif current.waiting is Waiting.SIGNAL:
            where += (
                f" (waiting for signal {current.signal!r})"
                if current.signal_key is None
                else f" (waiting for message {current.signal!r} with key {current.signal_key!r})"
            )
        elif current.waiting is Waiting.TASK:
            task = "task" if current.phase == "task" else f"{current.phase} task"
            where += f" ({task} attempt {current.attempt} dispatched)"
        elif current.waiting is Waiting.RETRY:
            where += f" (retry after attempt {current.attempt})"
        elif current.waiting is Waiting.SLOT:
            where += (
                f" (queued for a slot on {current.slot}; `terranoha limits status` "
                "says what holds it)"
            )
    out.write(f"{state.run_id}  {state.workflow} v{state.version}  {state.status.value}{where}\n")
    if state.error:
        message = redact_text(str(state.error.get("message")))
        out.write(f"error: {state.error.get('code')}: {message}\n")
