"""Property tests: random valid specs driven by random command sequences.

(a) after every command the live state equals the fold of the log so far;
(b) ``evolve`` is total: any logged event applied to any logged state (or None) works;
(c) the same commands at the same times give the same events;
(d) sequence numbers are contiguous and every event names the command that caused it;
(e) ``decide`` never raises, whatever it is given.

Commands are drawn as abstract actions ("complete the current task", "fire the second
armed timer 2 s late") and turned into concrete commands against the live state, so most
of them hit something real; some are aimed wrong on purpose (stale task ids, strangers
approving, timers that are not due).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.core import commands as cmd
from engine.core import events as ev
from engine.core.decide import process
from engine.core.evolve import evolve, fold
from engine.core.spec import WorkflowSpec, load_spec
from engine.core.state import RunState, Waiting, finished_record

RUN = "run-p"
T0 = 1_700_000_000_000
GROUPS = ("g1", "g2")
USERS = ("alice", "bob", "carol", "dave")
SIGNALS = ("sig_a", "sig_b")
CODES = ("B1", "B2")
KINDS = ("task", "prepare_commit", "approval", "wait_event", "choice", "sleep")
WHENS = (
    "input.flag",
    "input.amount > `5`",
    "signals.sig_a",
    "steps.st0.result.ok",
    "length(input.tags) > `1`",
)

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

durations = st.sampled_from([0, 500, 1_000, 30_000, 3_600_000])


# --------------------------------------------------------------------------- specs


@st.composite
def handlers(
    draw: st.DrawFn, ids: list[str], *, wait: bool = False, escalate: bool = True
) -> dict[str, Any] | str:
    options = ["fail", "goto"] + (["escalate"] if escalate else []) + (["wait"] if wait else [])
    action = draw(st.sampled_from(options))
    if action == "fail":
        return "fail"
    if action == "goto":
        return {"goto": draw(st.sampled_from(ids))}
    if action == "escalate":
        out: dict[str, Any] = {"escalate": draw(st.sampled_from(GROUPS))}
        if draw(st.booleans()):
            out["expires_after"] = draw(durations)
        return out
    out = {"wait_event": draw(st.sampled_from(SIGNALS))}
    if draw(st.booleans()):
        out["timeout"] = draw(durations)
    return out


@st.composite
def approvals(draw: st.DrawFn, ids: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "approvers": draw(st.lists(st.sampled_from(GROUPS), min_size=1, max_size=2, unique=True)),
        "quorum": draw(st.integers(1, 2)),
        "exclude_requester": draw(st.booleans()),
        "on_reject": draw(handlers(ids)),
    }
    for name in ("remind_every", "expires_after", "sla"):
        if draw(st.booleans()):
            out[name] = draw(durations)
    if "expires_after" in out:
        out["on_expire"] = draw(handlers(ids))
    return out


def _task_extras(draw: st.DrawFn, ids: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "timeout": draw(st.sampled_from([1_000, 30_000])),
        "retry": {
            "max_attempts": draw(st.integers(1, 3)),
            "initial": draw(st.sampled_from([0, 100, 1_000])),
            "multiplier": draw(st.sampled_from([1, 2, 3])),
            "max": draw(st.sampled_from([1_000, 60_000])),
            "jitter": draw(st.sampled_from(["full", "none"])),
        },
    }
    codes = draw(st.lists(st.sampled_from((*CODES, "*")), max_size=2, unique=True))
    if codes:
        out["on_business_error"] = {c: draw(handlers(ids, wait=True)) for c in codes}
    if draw(st.booleans()):
        out["on_exhausted"] = draw(handlers(ids))
    return out


@st.composite
def steps(draw: st.DrawFn, i: int, kinds: list[str]) -> dict[str, Any]:
    ids = [f"st{j}" for j in range(len(kinds))]
    kind = kinds[i]
    step: dict[str, Any] = {"id": ids[i]}
    if kind == "task":
        step["task"] = f"q.{ids[i]}"
        step |= _task_extras(draw, ids)
        gate = draw(st.sampled_from(["none", "critical", "review", "schema"]))
        if gate == "critical":
            step["critical"] = True
            step["approval"] = draw(approvals(ids))
        elif gate == "review":
            step["review_if"] = draw(
                st.sampled_from(
                    ["result.confidence < `0.5`", "confidence < `0.5`", "result.review"]
                )
            )
            step["review"] = draw(approvals(ids))
        elif gate == "schema":
            step["result"] = {"confidence": "number", "label": "string?"}
    elif kind == "prepare_commit":
        step["prepare_commit"] = {"prepare": f"q.{ids[i]}.prepare", "commit": f"q.{ids[i]}.commit"}
        step |= _task_extras(draw, ids)
        if draw(st.booleans()):
            step["approval"] = draw(approvals(ids))
            if draw(st.booleans()):
                step["review_if"] = "result.amount > `10`"
    elif kind == "approval":
        step["approval"] = draw(approvals(ids))
        if draw(st.booleans()):
            step["input"] = {"amount": "input.amount"}
    elif kind == "wait_event":
        wait: dict[str, Any] = {"name": draw(st.sampled_from(SIGNALS))}
        if draw(st.booleans()):
            wait["key"] = "input.amount"
        if draw(st.booleans()):
            wait["timeout"] = draw(durations)
            wait["on_timeout"] = draw(handlers(ids, escalate=False))
        step["wait_event"] = wait
    elif kind == "choice":
        # a choice may jump forward, or back to a step that waits: never round a choice loop
        targets = [ids[j] for j in range(len(ids)) if j > i or kinds[j] != "choice"]
        targets = [t for t in targets if t != ids[i]]
        if not targets:
            return {"id": ids[i], "sleep": draw(durations)}
        step["choice"] = [
            {"when": draw(st.sampled_from(WHENS)), "goto": draw(st.sampled_from(targets))}
            for _ in range(draw(st.integers(1, 2)))
        ]
        ahead = ids[i + 1 :]
        if len(ahead) > 0 and draw(st.booleans()):
            step["default"] = draw(st.sampled_from(ahead))  # forward, so the run can always end
    else:
        step["sleep"] = draw(durations)
    return step


@st.composite
def specs(draw: st.DrawFn) -> WorkflowSpec:
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=5))
    data: dict[str, Any] = {
        "workflow": "prop",
        "version": 1,
        "input": {"amount": "number", "flag": "boolean?", "tags": "array?"},
        "steps": [draw(steps(i, kinds)) for i in range(len(kinds))],
    }
    if draw(st.booleans()):
        data["sla"] = draw(durations)
    if draw(st.booleans()):
        data["output"] = draw(st.sampled_from(["steps", "input.amount", "signals"]))
    return load_spec(data)


# --------------------------------------------------------------------------- commands

results = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {"confidence": st.sampled_from([0.1, 0.9])},
        optional={
            "ok": st.booleans(),
            "amount": st.integers(0, 20),
            "review": st.booleans(),
            "label": st.just("x"),
        },
    ),
    st.fixed_dictionaries(
        {
            "confidence": st.sampled_from(["high", None, [0.1], True]),
            "amount": st.sampled_from(["12", None, 11.5, [1]]),
        }
    ),
    st.integers(),
    st.text(max_size=3),
)
valid_inputs = st.fixed_dictionaries(
    {"amount": st.integers(0, 10)},
    optional={"flag": st.booleans(), "tags": st.lists(st.just("t"), max_size=2)},
)
invalid_inputs = st.sampled_from(
    [{"flag": True}, ["not", "an", "object"], {"amount": 1, "tags": 5}]
)
wrong = st.sampled_from([False] * 4 + [True])
"""Aim a command at the wrong thing about one time in five."""


def weighted(*options: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Pick an option with probability proportional to its weight (shrinks to the first)."""
    table = [i for i, (weight, _) in enumerate(options) for _ in range(weight)]
    return st.sampled_from(table).flatmap(lambda i: options[i][1])


actions = weighted(
    (1, st.tuples(st.just("start"), valid_inputs | invalid_inputs)),
    (
        5,
        st.tuples(
            st.just("complete"),
            results,
            st.sampled_from([None, 0.2, 0.95]),
            st.sampled_from([0.0, 0.5]),
            wrong,
        ),
    ),
    (
        3,
        st.tuples(
            st.just("fail"),
            st.sampled_from(["transient", "permanent", "business", "odd"]),
            st.sampled_from((*CODES, "OTHER")),
            wrong,
        ),
    ),
    (
        4,
        st.tuples(
            st.just("approve"),
            st.sampled_from(USERS),
            st.lists(st.sampled_from((*GROUPS, "g3")), min_size=1, max_size=2),
            st.booleans(),
            wrong,
        ),
    ),
    (2, st.tuples(st.just("signal"), st.sampled_from((*SIGNALS, "sig_c")), st.integers(0, 3))),
    (
        4,
        st.tuples(
            st.just("fire"),
            st.integers(0, 5),
            st.sampled_from([-2_000, -1, 0, 1, 5_000]),
            st.booleans(),
        ),
    ),
    (1, st.tuples(st.just("advance"), st.sampled_from([1, 1_000, 3_600_000]))),
    (1, st.tuples(st.just("cancel"))),
    (1, st.tuples(st.just("ghost"), st.integers(0, 2))),
)
scripts = st.tuples(
    weighted((9, valid_inputs), (1, invalid_inputs)), st.lists(actions, min_size=5, max_size=40)
)


@dataclass
class Run:
    """One run driven command by command, keeping what the properties look at."""

    spec: WorkflowSpec
    state: RunState | None = None
    now: int = T0
    log: list[ev.Event] = field(default_factory=list)
    outside: list[ev.Event] = field(default_factory=list)
    states: list[RunState] = field(default_factory=list)
    sent: list[tuple[cmd.Command, int]] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)
    n: int = 0

    def _id(self) -> str:
        self.n += 1
        return f"c{self.n}"

    def send(self, command: cmd.Command) -> list[ev.Event]:
        self.sent.append((command, self.now))
        state = self.state if command.run_id == RUN else None
        decision = process(state, command, self.spec, self.now)
        if command.run_id != RUN:
            assert decision.state is None
            assert [(e.seq, type(e)) for e in decision.events] == [(0, ev.CommandRejectedV2)]
            self.outside += decision.events
            return decision.events
        if decision.state is not None:
            self.state = decision.state
            self.states.append(decision.state)
        self.log += [e for e in decision.events if e.seq > 0]
        self.task_ids += [e.task_id for e in decision.events if isinstance(e, ev.TaskDispatched)]
        return decision.events

    def command(self, action: tuple[Any, ...]) -> cmd.Command | None:
        """The concrete command an abstract action stands for, given the live state."""
        kind, *args = action
        current = self.state.current if self.state is not None else None
        step = current.step if current is not None else "st0"
        base: dict[str, Any] = {"command_id": self._id(), "run_id": RUN}
        if kind == "start":
            return cmd.StartRun(
                **base,
                workflow="prop",
                version=1,
                input=args[0],
                idempotency_key="k",
                requested_by="alice",
            )
        if kind in ("complete", "fail"):
            aim_wrong = args[-1]
            if current is not None and current.waiting is Waiting.TASK and not aim_wrong:
                tid = current.task_id
            else:
                tid = self.task_ids[0] if self.task_ids and aim_wrong else "bogus"
            if kind == "complete":
                result, confidence, cost, _ = args
                return cmd.CompleteTask(
                    **base, step=step, task_id=tid, result=result, confidence=confidence, cost=cost
                )
            error_class, code, _ = args
            return cmd.FailTask(
                **base,
                step=step,
                task_id=tid,
                error_class=error_class,
                code=code,
                message="m",
                field="f",
            )
        if kind == "approve":
            user, roles, approve, aim_wrong = args
            return cmd.DecideApproval(
                **base,
                step="elsewhere" if aim_wrong else step,
                approver=user,
                roles=tuple(roles),
                approve=approve,
            )
        if kind == "signal":
            name, data = args
            return cmd.DeliverSignal(**base, name=name, data={"n": data})
        if kind == "fire":
            index, offset, any_timer = args
            armed = (
                sorted(self.state.timers.values(), key=lambda t: t.timer_id)
                if self.state is not None
                else []
            )
            if not armed:
                return cmd.FireTimer(**base, timer_id="none@0")
            timer = armed[index % len(armed)]
            if not any_timer:
                timer = min(armed, key=lambda t: (t.due_at, t.timer_id))
            self.now = max(self.now, timer.due_at + offset)
            return cmd.FireTimer(**base, timer_id=timer.timer_id)
        if kind == "advance":
            self.now += args[0]
            return None
        if kind == "cancel":
            return cmd.CancelRun(**base, reason="r", by="ops")
        ghost = {**base, "run_id": "ghost"}
        strays: list[cmd.Command] = [
            cmd.CancelRun(**ghost),
            cmd.DeliverSignal(**ghost, name="sig_a"),
            cmd.FireTimer(**ghost, timer_id="t"),
        ]
        return strays[int(args[0])]


def drive(spec: WorkflowSpec, script: tuple[Any, list[tuple[Any, ...]]]) -> Iterator[Run]:
    """Run ``script`` against ``spec``, yielding the run after every command."""
    run = Run(spec)
    first, rest = script
    for action in [("start", first), *rest]:
        command = run.command(action)
        if command is not None:
            run.send(command)
            yield run


def replay(spec: WorkflowSpec, sent: list[tuple[cmd.Command, int]]) -> list[ev.Event]:
    state: RunState | None = None
    out: list[ev.Event] = []
    for command, now in sent:
        ours = command.run_id == RUN
        decision = process(state if ours else None, command, spec, now)
        if ours and decision.state is not None:
            state = decision.state
        out += decision.events
    return out


# --------------------------------------------------------------------------- properties


@SETTINGS
@given(spec=specs(), script=scripts)
def test_live_state_is_the_fold_of_the_log(spec: WorkflowSpec, script: Any) -> None:
    for run in drive(spec, script):
        assert run.state == fold(run.log)


@SETTINGS
@given(spec=specs(), script=scripts)
def test_log_envelope_is_contiguous_and_caused(spec: WorkflowSpec, script: Any) -> None:
    *_, run = drive(spec, script)
    assert [e.seq for e in run.log] == list(range(1, len(run.log) + 1))
    sent = {c.command_id: now for c, now in run.sent if c.run_id == RUN}
    for event in run.log:
        assert event.run_id == RUN and event.tenant == "default"
        assert event.causation_id in sent and event.ts == sent[event.causation_id]
        assert event.correlation_id == RUN
    # time only moves forward, and a timer never fires before it is due
    assert [e.ts for e in run.log] == sorted(e.ts for e in run.log)
    armed = {e.timer_id: e.due_at for e in run.log if isinstance(e, ev.TimerArmed)}
    fired = [e for e in run.log if isinstance(e, ev.TimerFired)]
    assert all(e.ts >= armed[e.timer_id] for e in fired)
    assert len({e.timer_id for e in fired}) == len(fired)
    # nothing but a rejection follows the end of a run
    ends = [i for i, e in enumerate(run.log) if isinstance(e, ev.TERMINAL_EVENTS)]
    assert len(ends) <= 1
    if ends:
        assert all(isinstance(e, ev.CommandRejected) for e in run.log[ends[0] + 1 :])


@SETTINGS
@given(spec=specs(), script=scripts)
def test_same_commands_give_the_same_events(spec: WorkflowSpec, script: Any) -> None:
    *_, run = drive(spec, script)
    first = replay(spec, run.sent)
    assert first == replay(spec, run.sent)
    assert [e for e in first if e.seq > 0] == run.log


@SETTINGS
@given(spec=specs(), script=scripts, data=st.data())
def test_evolve_is_total(spec: WorkflowSpec, script: Any, data: st.DataObject) -> None:
    *_, run = drive(spec, script)
    events = run.log + run.outside
    states: list[RunState | None] = [None, *run.states]
    picked_states = data.draw(st.lists(st.sampled_from(states), min_size=1, max_size=10))
    for state in picked_states:
        for event in events:
            after = evolve(state, event)
            assert isinstance(after, RunState) and after.seq == event.seq


def _junk(command_type: type[cmd.Command], **fields: Any) -> st.SearchStrategy[cmd.Command]:
    return st.builds(command_type, command_id=st.text(max_size=3), run_id=st.just(RUN), **fields)


junk_commands = st.one_of(
    _junk(
        cmd.CompleteTask,
        step=st.text(max_size=4),
        task_id=st.text(max_size=4),
        result=st.none() | st.integers(),
        cost=st.floats(0, 10),
        confidence=st.none() | st.floats(0, 1),
    ),
    _junk(
        cmd.FailTask,
        step=st.text(max_size=4),
        task_id=st.text(max_size=4),
        error_class=st.text(max_size=10),
        code=st.text(max_size=4),
    ),
    _junk(
        cmd.DecideApproval,
        step=st.text(max_size=4),
        approver=st.text(max_size=4),
        roles=st.lists(st.text(max_size=3)).map(tuple),
        approve=st.booleans(),
    ),
    _junk(cmd.DeliverSignal, name=st.text(max_size=6), data=st.none() | st.integers()),
    _junk(cmd.FireTimer, timer_id=st.text(max_size=8)),
    _junk(
        cmd.StartRun,
        workflow=st.sampled_from(["prop", "other"]),
        version=st.integers(0, 2),
        input=st.none() | st.dictionaries(st.text(max_size=3), st.integers()),
    ),
    _junk(cmd.CancelRun),
    _junk(cmd.Command),
)


@SETTINGS
@given(
    spec=specs(),
    other=specs().map(lambda s: s.model_copy(update={"version": 2})),
    script=scripts,
    garbage=st.lists(junk_commands, max_size=8),
    when=st.integers(-(10**12), 10**13),
)
def test_decide_never_raises(
    spec: WorkflowSpec, other: WorkflowSpec, script: Any, garbage: list[cmd.Command], when: int
) -> None:
    *_, run = drive(spec, script)
    for state in (None, run.state, *run.states[:3]):
        for command in garbage:
            for against in (spec, other, None):
                decision = process(state, command, against, when)
                assert all(isinstance(e, ev.Event) for e in decision.events)
                if decision.state is not None:
                    assert decision.state == fold(decision.events, state)


@SETTINGS
@given(
    spec=specs(),
    other=specs().map(lambda s: s.model_copy(update={"version": 2})),
    script=scripts,
    garbage=st.lists(junk_commands, max_size=8),
    when=st.integers(-(10**12), 10**13),
)
def test_a_finished_runs_compact_record_decides_every_command_as_its_full_state(
    spec: WorkflowSpec, other: WorkflowSpec, script: Any, garbage: list[cmd.Command], when: int
) -> None:
    finished = [
        state
        for run in drive(spec, script)
        for state in [run.state]
        if state is not None and state.terminal
    ]
    for state in finished[:3]:
        compact = finished_record(state)
        assert compact.status is state.status and compact.seq == state.seq
        for command in garbage:
            for against in (spec, other, None):
                full = process(state, command, against, when)
                small = process(compact, command, against, when)
                assert small.events == full.events
                assert small.state is None or finished_record(small.state) == small.state
