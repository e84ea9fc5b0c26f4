"""The run core under flow control: a task on a limited tool waits for its slot, is
dispatched on the grant, and gives the slot back however it ends. Without a limits
document, or with none binding its tool, the run is exactly as before."""

from __future__ import annotations

from typing import Any

from engine.core import admission as ad
from engine.core import commands as cmd
from engine.core import events as ev
from engine.core.decide import process
from engine.core.evolve import fold
from engine.core.flow import FlowLimits
from engine.core.limits import load_limits
from engine.core.outbox import outgoing
from engine.core.spec import load_spec
from engine.core.state import RunState, Waiting

T0 = 1_700_000_000_000
RUN = "run-1"
SPEC = load_spec(
    {
        "workflow": "w",
        "version": 1,
        "steps": [
            {
                "id": "classify",
                "task": "llm.classify",
                "timeout": "30s",
                "retry": {"max_attempts": 1},
                "on_business_error": {"BUDGET_EXHAUSTED": {"goto": "cheap"}},
            },
            {"id": "done", "task": "mail.send"},
            {"id": "cheap", "task": "rules.classify"},
        ],
    }
)
FLOW = FlowLimits(
    load_limits({"limits": "v1", "rules": [{"key": "tool:llm.classify", "concurrency": 2}]}),
    version=4,
)


class Run:
    def __init__(self, flow: FlowLimits | None = FLOW) -> None:
        self.flow = flow
        self.state: RunState | None = None
        self.log: list[ev.Event] = []
        self.last: list[ev.Event] = []
        self.now = T0
        self.n = 0

    def when(self, command: cmd.Command) -> Run:
        decision = process(self.state, command, SPEC, self.now, self.flow)
        self.state, self.last = decision.state, decision.events
        self.log.extend(decision.events)
        assert fold(self.log) == self.state, "the fold of the log differs from live state"
        return self

    def types(self) -> list[str]:
        return [e.TYPE for e in self.last if e.TYPE not in ("TimerArmed", "StepStarted")]

    def one(self, event_type: type[Any]) -> Any:
        [found] = [e for e in self.last if isinstance(e, event_type)]
        return found

    def c(self, kind: type[cmd.Command], **fields: Any) -> cmd.Command:
        self.n += 1
        return kind(command_id=f"c{self.n}", run_id=RUN, **fields)

    def start(self) -> Run:
        return self.when(
            self.c(cmd.StartRun, workflow="w", version=1, input={}, idempotency_key="k", priority=2)
        )

    @property
    def task_id(self) -> str:
        assert self.state is not None and self.state.current is not None
        return self.state.current.task_id


def test_a_task_on_a_limited_tool_waits_for_its_slot_then_is_dispatched() -> None:
    run = Run().start()
    assert run.types() == ["RunStarted", "SlotRequested"]
    asked = run.one(ev.SlotRequested)
    assert (asked.key, asked.limits.concurrency, asked.limits_version, asked.priority) == (
        "tool:llm.classify",
        2,
        4,
        2,
    )
    assert asked.lease_ms == 30_000 + 30_000
    [acquire] = outgoing(asked)
    assert isinstance(acquire, ad.Acquire)
    assert (acquire.key, acquire.request_id, acquire.reply_to) == (
        "tool:llm.classify",
        asked.task_id,
        RUN,
    )
    assert run.state is not None and run.state.current is not None
    assert run.state.current.waiting is Waiting.SLOT
    run.now += 500
    run.when(run.c(cmd.GrantSlot, task_id=asked.task_id, key="tool:llm.classify"))
    assert run.types() == ["TaskDispatched"]
    assert run.one(ev.TaskDispatched).timeout_at == run.now + 30_000  # from the grant


def test_the_slot_is_given_back_with_the_cost_when_the_task_completes() -> None:
    run = Run().start()
    tid = run.task_id
    run.when(run.c(cmd.GrantSlot, task_id=tid, key="tool:llm.classify"))
    run.now += 1_200
    run.when(run.c(cmd.CompleteTask, step="classify", task_id=tid, result={"a": 1}, cost=0.4))
    released = run.one(ev.SlotReleased)
    assert (released.key, released.outcome, released.cost, released.latency_ms) == (
        "tool:llm.classify",
        "ok",
        0.4,
        1_200,
    )
    [release] = outgoing(released)
    assert release == ad.Release("tool:llm.classify", tid, ad.Outcome.OK, 0.4, 1_200)
    assert run.types()[:2] == ["SlotReleased", "TaskCompleted"]
    assert "TaskDispatched" in run.types()  # mail.send is not limited: dispatched at once


def test_a_failed_or_timed_out_task_gives_its_slot_back_as_failed() -> None:
    run = Run().start()
    tid = run.task_id
    run.when(run.c(cmd.GrantSlot, task_id=tid, key="tool:llm.classify"))
    run.when(run.c(cmd.FailTask, step="classify", task_id=tid, error_class="transient", code="E"))
    assert run.one(ev.SlotReleased).outcome == "failed"

    timed = Run().start()
    tid = timed.task_id
    timed.when(timed.c(cmd.GrantSlot, task_id=tid, key="tool:llm.classify"))
    timer = next(t for t in timed.state.timers.values())  # type: ignore[union-attr]
    timed.now = timer.due_at
    timed.when(timed.c(cmd.FireTimer, timer_id=timer.timer_id))
    assert timed.one(ev.SlotReleased).outcome == "failed"


def test_a_run_cancelled_while_it_waits_withdraws_its_request() -> None:
    run = Run().start()
    run.when(run.c(cmd.CancelRun, reason="no longer needed"))
    assert run.types() == ["SlotReleased", "RunCancelled"]
    assert run.one(ev.SlotReleased).outcome == "cancelled"


def test_a_grant_that_is_not_awaited_is_refused() -> None:
    run = Run().start()
    tid = run.task_id
    run.when(run.c(cmd.GrantSlot, task_id=tid, key="tool:other"))
    assert run.one(ev.CommandRejectedV2).reason == "stale grant"
    run.when(run.c(cmd.GrantSlot, task_id=tid, key="tool:llm.classify"))
    run.when(run.c(cmd.GrantSlot, task_id=tid, key="tool:llm.classify"))
    assert run.one(ev.CommandRejectedV2).reason == "stale grant"


def test_an_exhausted_budget_is_a_business_error_the_step_can_handle() -> None:
    run = Run().start()
    run.when(
        run.c(
            cmd.RefuseSlot,
            task_id=run.task_id,
            key="tool:llm.classify",
            code="BUDGET_EXHAUSTED",
            message="spent",
        )
    )
    assert run.types()[:2] == ["SlotReleased", "BusinessErrorHandled"]
    assert run.state is not None and run.state.current is not None
    assert run.state.current.step == "cheap"


def test_without_limits_or_with_none_binding_the_run_is_as_before() -> None:
    for flow in (
        None,
        FlowLimits(
            load_limits({"limits": "v1", "rules": [{"key": "tool:elsewhere", "concurrency": 1}]}),
            version=1,
        ),
    ):
        run = Run(flow).start()
        assert run.types() == ["RunStarted", "TaskDispatched"]
