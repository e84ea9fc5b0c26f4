"""Run state: what ``evolve`` folds the events of one run into.

State objects are immutable; ``evolve`` returns new ones and shares what did not change.
The run status is derived from state, never stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, TypeVar


class RunStatus(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    WAITING = "Waiting"
    RETRY = "Retry"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


class Waiting(StrEnum):
    """What the current step is waiting for."""

    NOTHING = ""
    TASK = "task"
    RETRY = "retry"
    APPROVAL = "approval"
    SIGNAL = "signal"
    TIMER = "timer"
    SLOT = "slot"
    """A slot of a limit key (flow control) before the task is dispatched."""


@dataclass(frozen=True, slots=True)
class Timer:
    timer_id: str
    kind: str
    step: str
    ref: str
    due_at: int


@dataclass(frozen=True, slots=True)
class Approval:
    approval_id: str
    reason: str
    approvers: tuple[str, ...]
    quorum: int
    exclude_requester: bool
    requested_at: int
    expires_at: int | None
    votes: tuple[str, ...] = ()
    reminders: int = 0


@dataclass(frozen=True, slots=True)
class StepState:
    step: str
    visit: int
    kind: str
    started_at: int
    waiting: Waiting = Waiting.NOTHING
    phase: str = ""
    attempt: int = 0
    task_id: str = ""
    idempotency_key: str = ""
    change_set: Any = None
    result: Any = None
    approval: Approval | None = None
    signal: str = ""
    resume: str = ""
    signal_key: str | None = None
    """The correlation key of a ``wait_event`` with a key: messages with the signal's
    name and this key answer the wait."""
    slot: str = ""
    """The limit key whose slot the task waits for or holds ("" for none)."""
    slot_at: int = 0
    """When the slot was asked for (waiting) or granted (held)."""


@dataclass(frozen=True, slots=True)
class RunState:
    VERSION: ClassVar[int] = 3
    """2: ``StepState.signal_key`` (the correlation key of a keyed wait). 3: the current
    step's ``slot`` and ``slot_at`` (flow control), ``Waiting.SLOT``."""

    run_id: str
    tenant: str
    correlation_id: str
    workflow: str = ""
    version: int = 0
    idempotency_key: str = ""
    requested_by: str = ""
    priority: int = 0
    input: Any = None
    started_at: int = 0
    seq: int = 0
    current: StepState | None = None
    results: Mapping[str, Any] = field(default_factory=dict)
    signals: Mapping[str, Any] = field(default_factory=dict)
    unconsumed: frozenset[str] = frozenset()
    visits: Mapping[str, int] = field(default_factory=dict)
    timers: Mapping[str, Timer] = field(default_factory=dict)
    cost: float = 0.0
    attempts: int = 0
    escalations: int = 0
    sla_breached: bool = False
    outcome: RunStatus | None = None
    error: Mapping[str, Any] | None = None
    output: Any = None
    ended_at: int | None = None
    last_error: Mapping[str, Any] | None = field(default=None)

    @property
    def status(self) -> RunStatus:
        if self.outcome is not None:
            return self.outcome
        current = self.current
        if current is None:
            # Between two steps (a step completed, the next not yet entered) the run has
            # started: only a run that has entered no step yet is pending.
            return RunStatus.RUNNING if self.visits else RunStatus.PENDING
        if current.waiting in (Waiting.APPROVAL, Waiting.SIGNAL, Waiting.TIMER, Waiting.SLOT):
            return RunStatus.WAITING
        if current.waiting is Waiting.RETRY:
            return RunStatus.RETRY
        return RunStatus.RUNNING

    @property
    def terminal(self) -> bool:
        return self.outcome is not None

    def data(self) -> dict[str, Any]:
        """The document expressions and input mappings are evaluated against."""
        return {
            "input": self.input,
            "steps": {name: {"result": value} for name, value in self.results.items()},
            "signals": dict(self.signals),
            "run": {
                "id": self.run_id,
                "tenant": self.tenant,
                "requested_by": self.requested_by,
                "workflow": self.workflow,
                "version": self.version,
            },
        }


# --------------------------------------------------------------------------- replace

S = TypeVar("S")
_MISSING = object()


def _compile_replace(cls: type) -> Callable[..., Any]:
    """Write, once, the ``replace`` that ``dataclasses.replace`` amounts to for ``cls``.

    Folding replaces a record once or twice per event. The generic ``dataclasses.replace``
    re-reads the fields and goes through the frozen ``__init__`` (keyword arguments, one
    ``object.__setattr__`` call per field) every time: two thirds of replay time. This
    generates the straight-line copy instead, the same way ``dataclasses`` generates
    ``__init__``. It only suits what the state records are: slotted, every field in
    ``__init__``, no ``__post_init__`` (checked here).
    """
    names = [f.name for f in dataclasses.fields(cls)]
    if (
        not all(f.init for f in dataclasses.fields(cls))
        or hasattr(cls, "__post_init__")
        or "__slots__" not in cls.__dict__
        or any(n.startswith("_") for n in names)
    ):
        raise TypeError(f"{cls.__name__} is not a plain slotted record; use dataclasses.replace")
    lines = [
        f"def replace(obj_, /, *, {', '.join(f'{n}=MISSING_' for n in names)}):",
        "    new_ = new_object_(cls_)",
    ]
    lines += [f"    set_(new_, {n!r}, obj_.{n} if {n} is MISSING_ else {n})" for n in names]
    lines.append("    return new_")
    namespace: dict[str, Any] = {
        "MISSING_": _MISSING,
        "new_object_": object.__new__,
        "cls_": cls,
        "set_": object.__setattr__,
    }
    exec("\n".join(lines), namespace)
    fn: Callable[..., Any] = namespace["replace"]
    fn.__qualname__ = f"replace[{cls.__name__}]"
    return fn


_REPLACE: dict[type, Callable[..., Any]] = {
    cls: _compile_replace(cls) for cls in (Timer, Approval, StepState, RunState)
}


def replace(obj: S, /, **changes: Any) -> S:
    """``dataclasses.replace(obj, **changes)``, about three times faster for the state
    records (any other dataclass goes to ``dataclasses.replace``)."""
    fast = _REPLACE.get(type(obj))
    if fast is None:
        return dataclasses.replace(obj, **changes)  # type: ignore[type-var]
    result: S = fast(obj, **changes)
    return result


def finished_record(state: RunState) -> RunState:
    """What a finished run keeps once it leaves memory: its identity, its sequence number
    and its outcome, without its inputs, results, signals and steps.

    That is all ``decide`` reads of a finished run: a duplicate ``StartRun`` is refused
    because the run has a workflow, any other command because the run has an outcome
    (``run ended``), and the refusal's event takes the run's tenant, correlation id and
    next sequence number. The full history stays on the run's events. A run that has not
    finished is returned as it is."""
    if state.outcome is None:
        return state
    return replace(
        state,
        input=None,
        current=None,
        results={},
        signals={},
        unconsumed=frozenset(),
        visits={},
        timers={},
        output=None,
        last_error=None,
    )
