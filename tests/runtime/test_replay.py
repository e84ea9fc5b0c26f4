"""``verify`` re-decides every recorded command and reports the first event that differs:
a verifier that always said OK would fail here."""

from __future__ import annotations

import dataclasses
from typing import Any

from engine.core import commands as cmd
from engine.core import events as ev
from engine.core.decide import process
from engine.core.records import RecordedCommand
from engine.core.spec import load_spec
from engine.core.state import RunState
from engine.runtime.replay import verify
from engine.runtime.specs import SpecRegistry
from tests.harness import RUN, T0, wf

SPEC = load_spec(
    wf(
        {"id": "sign", "approval": {"approvers": ["finance"], "quorum": 2}},
        {"id": "pay", "task": "payments.pay"},
    )
)


class Recorder:
    """Decides commands as the runtime does and keeps the log and the recorded commands."""

    def __init__(self) -> None:
        self.state: RunState | None = None
        self.events: list[ev.Event] = []
        self.recorded: list[RecordedCommand] = []
        self.now = T0

    def send(self, command: cmd.Command) -> list[ev.Event]:
        self.now += 1000
        decision = process(self.state, command, SPEC, self.now)
        assert decision.state is not None
        self.state = decision.state
        self.events += decision.events
        self.recorded.append(
            RecordedCommand(
                run_id=RUN,
                command=command,
                now=self.now,
                first_seq=decision.events[0].seq,
                last_seq=decision.events[-1].seq,
            )
        )
        return decision.events


def _run() -> Recorder:
    r = Recorder()
    r.send(cmd.StartRun(command_id="c1", run_id=RUN, workflow="w", version=1, requested_by="alice"))
    r.send(
        cmd.DecideApproval(
            command_id="c2", run_id=RUN, step="sign", approver="alice", roles=("finance",)
        )
    )
    r.send(
        cmd.DecideApproval(
            command_id="c3", run_id=RUN, step="sign", approver="bob", roles=("finance",)
        )
    )
    r.send(
        cmd.DecideApproval(
            command_id="c4", run_id=RUN, step="sign", approver="carol", roles=("finance",)
        )
    )
    return r


def _replace(events: list[ev.Event], seq: int, **changes: Any) -> list[ev.Event]:
    return [dataclasses.replace(e, **changes) if e.seq == seq else e for e in events]


def test_an_untouched_log_verifies() -> None:
    r = _run()
    report = verify(RUN, r.events, r.recorded, SpecRegistry([SPEC]))
    assert report.ok and report.commands == 4 and report.events == len(r.events)


def test_the_first_event_that_differs_is_reported() -> None:
    r = _run()
    granted = next(e for e in r.events if isinstance(e, ev.ApprovalGranted))
    tampered = _replace(r.events, granted.seq, approvers=["bob", "mallory"])
    report = verify(RUN, tampered, r.recorded, SpecRegistry([SPEC]))
    assert not report.ok and report.divergence is not None
    d = report.divergence
    assert (d.seq, d.command_id, d.command_type) == (granted.seq, "c4", "DecideApproval")
    assert "approvers=['bob', 'mallory']" in d.expected
    assert "approvers=['bob', 'carol']" in d.actual
    assert d.describe().startswith(
        f"first divergence at seq {granted.seq}, command "
        "DecideApproval c4:\n  recorded: ApprovalGranted("
    )


def test_an_event_the_engine_no_longer_emits_is_a_divergence() -> None:
    r = _run()
    last = r.recorded[-1]
    extra = dataclasses.replace(r.events[-1], seq=last.last_seq + 1)
    longer = [*r.events, extra]
    recorded = [*r.recorded[:-1], dataclasses.replace(last, last_seq=last.last_seq + 1)]
    report = verify(RUN, longer, recorded, SpecRegistry([SPEC]))
    assert report.divergence is not None
    assert report.divergence.seq == extra.seq and report.divergence.actual == "(no event)"


def test_a_refusal_recorded_as_version_1_matches_version_2_with_the_same_fields() -> None:
    r = _run()
    [refusal] = [e for e in r.events if isinstance(e, ev.CommandRejected)]
    assert isinstance(refusal, ev.CommandRejectedV2) and refusal.by == "alice"
    common = {f.name: getattr(refusal, f.name) for f in dataclasses.fields(ev.CommandRejected)}
    older = [ev.CommandRejected(**common) if e is refusal else e for e in r.events]
    assert verify(RUN, older, r.recorded, SpecRegistry([SPEC])).ok

    reworded = [
        dataclasses.replace(e, detail="something else") if e.seq == refusal.seq else e
        for e in older
    ]
    report = verify(RUN, reworded, r.recorded, SpecRegistry([SPEC]))
    assert report.divergence is not None and report.divergence.seq == refusal.seq
