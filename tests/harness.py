"""given / when / then over the pure core.

    flow = Flow(spec).given(start(...)).when(complete("lookup")).then(TaskCompleted, ...)

``given`` and ``when`` take commands (decided and applied) or events (applied);
``then`` checks the events the last ``when`` produced, by type and optional fields.
"""

from __future__ import annotations

import itertools
from typing import Any, TypeVar

from engine.core import commands as cmd
from engine.core import events as ev
from engine.core.decide import process
from engine.core.evolve import evolve, fold
from engine.core.spec import WorkflowSpec, load_spec
from engine.core.state import RunState, RunStatus

E = TypeVar("E", bound=ev.Event)


def wf(*steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A spec named ``w`` version 1 with ``steps``: the shortest way to write one."""
    return {"workflow": "w", "version": 1, "steps": list(steps), **extra}


RUN = "run-1"
T0 = 1_700_000_000_000


class Flow:
    def __init__(self, spec: WorkflowSpec | dict[str, Any], run_id: str = RUN) -> None:
        self.spec = spec if isinstance(spec, WorkflowSpec) else load_spec(spec)
        self.run_id = run_id
        self.state: RunState | None = None
        self.log: list[ev.Event] = []
        self.last: list[ev.Event] = []
        self.now = T0
        self._ids = itertools.count(1)

    # -- time
    def at(self, now: int) -> Flow:
        self.now = now
        return self

    def after(self, ms: int) -> Flow:
        self.now += ms
        return self

    # -- applying
    def _apply(self, item: cmd.Command | ev.Event) -> list[ev.Event]:
        if isinstance(item, ev.Event):
            self.state = evolve(self.state, item)
            out = [item]
        else:
            decision = process(self.state, item, self.spec, self.now)
            if decision.state is not None:
                self.state = decision.state
            out = decision.events
        self.log.extend(e for e in out if e.seq > 0)
        return out

    def given(self, *items: cmd.Command | ev.Event) -> Flow:
        for item in items:
            self._apply(item)
        return self

    def when(self, item: cmd.Command | ev.Event) -> Flow:
        self.last = self._apply(item)
        return self

    def then(self, *expected: type[ev.Event] | tuple[type[ev.Event], dict[str, Any]]) -> Flow:
        got = [type(e).__name__ for e in self.last]
        want = [(x[0] if isinstance(x, tuple) else x).__name__ for x in expected]
        assert got == want, f"events differ:\n got  {got}\n want {want}"
        for event, exp in zip(self.last, expected, strict=True):
            if isinstance(exp, tuple):
                for name, value in exp[1].items():
                    actual = getattr(event, name)
                    assert actual == value, (
                        f"{type(event).__name__}.{name} = {actual!r}, want {value!r}"
                    )
        # live state must equal the state replay builds
        assert fold(self.log) == self.state, "live state differs from replayed state"
        return self

    def then_rejected(self, reason: str) -> Flow:
        """The last ``when`` was refused with ``reason`` and changed nothing but the seq."""
        return self.then((ev.CommandRejectedV2, {"reason": reason}))

    def then_status(self, status: RunStatus) -> Flow:
        assert self.state is not None, "no run"
        assert self.state.status is status, f"status {self.state.status}, want {status}"
        return self

    def then_contains(self, event_type: type[E], **fields: Any) -> E:
        for event in self.last:
            if isinstance(event, event_type) and all(
                getattr(event, k) == v for k, v in fields.items()
            ):
                return event
        got = [type(e).__name__ for e in self.last]
        raise AssertionError(f"no {event_type.__name__} with {fields} in {got}")

    # -- command builders
    def _id(self) -> str:
        return f"c{next(self._ids)}"

    def start(
        self,
        input: Any = None,
        *,
        by: str = "alice",
        key: str = "k1",
        version: int | None = None,
        tenant: str = "default",
        correlation_id: str = "",
    ) -> cmd.StartRun:
        return cmd.StartRun(
            command_id=self._id(),
            run_id=self.run_id,
            workflow=self.spec.workflow,
            version=version or self.spec.version,
            input={} if input is None else input,
            idempotency_key=key,
            requested_by=by,
            tenant=tenant,
            correlation_id=correlation_id,
        )

    def task(self, step: str | None = None) -> ev.TaskDispatched:
        for event in reversed(self.log):
            if isinstance(event, ev.TaskDispatched) and (step is None or event.step == step):
                return event
        raise AssertionError(f"no task dispatched for {step}")

    def complete(
        self,
        step: str,
        result: Any = None,
        *,
        cost: float = 0.0,
        confidence: float | None = None,
        task_id: str | None = None,
    ) -> cmd.CompleteTask:
        return cmd.CompleteTask(
            command_id=self._id(),
            run_id=self.run_id,
            step=step,
            task_id=task_id or self.task(step).task_id,
            result=result,
            cost=cost,
            confidence=confidence,
        )

    def fail(
        self,
        step: str,
        error_class: str,
        code: str = "E",
        message: str = "boom",
        *,
        field: str | None = None,
        task_id: str | None = None,
        cost: float = 0.0,
    ) -> cmd.FailTask:
        return cmd.FailTask(
            command_id=self._id(),
            run_id=self.run_id,
            step=step,
            task_id=task_id or self.task(step).task_id,
            error_class=error_class,
            code=code,
            message=message,
            field=field,
            cost=cost,
        )

    def approve(
        self, step: str, who: str, *roles: str, reject: bool = False, comment: str = ""
    ) -> cmd.DecideApproval:
        return cmd.DecideApproval(
            command_id=self._id(),
            run_id=self.run_id,
            step=step,
            approver=who,
            roles=roles,
            approve=not reject,
            comment=comment,
        )

    def signal(self, name: str, data: Any = None) -> cmd.DeliverSignal:
        return cmd.DeliverSignal(command_id=self._id(), run_id=self.run_id, name=name, data=data)

    def timer(self, kind: str) -> cmd.FireTimer:
        assert self.state is not None
        armed = [t for t in self.state.timers.values() if t.kind == kind]
        assert armed, f"no {kind} timer armed; armed: {list(self.state.timers)}"
        return cmd.FireTimer(command_id=self._id(), run_id=self.run_id, timer_id=armed[0].timer_id)

    def timers(self, kind: str | None = None) -> list[str]:
        """Ids of the armed timers (of ``kind``), oldest first."""
        assert self.state is not None
        armed = sorted(self.state.timers.values(), key=lambda t: (t.due_at, t.timer_id))
        return [t.timer_id for t in armed if kind is None or t.kind == kind]

    def fire_id(self, timer_id: str) -> cmd.FireTimer:
        """A FireTimer for ``timer_id`` as is (armed or not): for stale/early checks."""
        return cmd.FireTimer(command_id=self._id(), run_id=self.run_id, timer_id=timer_id)

    def due(self, kind: str) -> int:
        assert self.state is not None
        return next(t.due_at for t in self.state.timers.values() if t.kind == kind)

    def fire(self, kind: str) -> Flow:
        """Move the clock to the timer's due time and fire it."""
        self.now = max(self.now, self.due(kind))
        return self.when(self.timer(kind))

    def cancel(self, by: str = "ops", reason: str = "no longer needed") -> cmd.CancelRun:
        return cmd.CancelRun(command_id=self._id(), run_id=self.run_id, reason=reason, by=by)
