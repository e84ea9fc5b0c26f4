"""Approval races: approve and reject at once, self-approval, approval after cancel or
expiry, duplicate approvals. The first valid decision wins; every other decision is
rejected with a reason in the run log (the audit trail)."""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter

import pytest

from engine.core.commands import CancelRun, Command, DecideApproval
from engine.core.events import (
    ApprovalExpired,
    ApprovalGranted,
    ApprovalRejected,
    ApprovalRequested,
    CommandRejected,
    Event,
)
from engine.core.state import RunStatus
from tests.faults.checkers import Check, assert_checks, run_checks
from tests.faults.harness import Fleet, LogView
from tests.faults.workflows import GATE, GATE_FAST

pytestmark = [pytest.mark.faults, pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

CLOSING = (ApprovalGranted, ApprovalRejected, ApprovalExpired)


def _decide(run_id: str, approver: str, approve: bool = True) -> DecideApproval:
    return DecideApproval(
        command_id=uuid.uuid4().hex,
        run_id=run_id,
        step="gate",
        approver=approver,
        roles=("finance",),
        approve=approve,
    )


def _requested(fleet: Fleet, run_ids: list[str], kind: type = ApprovalRequested) -> bool:
    view = fleet.read()
    seen = {e.record.run_id for e in view.committed if isinstance(e.record, kind)}
    return set(run_ids) <= seen


def _wait(fleet: Fleet, run_ids: list[str], kind: type = ApprovalRequested) -> None:
    deadline = time.monotonic() + 120
    while not _requested(fleet, run_ids, kind) and time.monotonic() < deadline:
        time.sleep(0.5)


def _audit(view: LogView, decisions: list[Command]) -> Check:
    """Every decision sent is either the one that closed its approval or a CommandRejected
    with a reason; each approval is closed once."""
    check = Check("approvals: first valid decision wins, the rest rejected and audited")
    caused: dict[str, list[str]] = {}
    for e in view.committed:
        if isinstance(e.record, Event):
            caused.setdefault(e.record.causation_id, []).append(e.record.TYPE)  # any version
    outcomes: Counter[str] = Counter()
    for command in decisions:
        kinds = caused.get(command.command_id, [])
        won = [k for k in kinds if k in ("ApprovalGranted", "ApprovalRejected", "RunCancelled")]
        rejected = "CommandRejected" in kinds
        if len(won) + rejected != 1:
            check.fail(
                f"{type(command).__name__} {command.command_id} on {command.run_id}: "
                f"caused {kinds or 'nothing'}"
            )
        outcomes["won" if won else "rejected" if rejected else "lost"] += 1
    closed = Counter(e.record.run_id for e in view.committed if isinstance(e.record, CLOSING))
    for run_id, n in closed.items():
        if n > 1:
            check.fail(f"{run_id}: approval closed {n} times")
    reasons = Counter(
        e.record.reason for e in view.committed if isinstance(e.record, CommandRejected)
    )
    check.found.append(
        f"{len(decisions)} decisions: {dict(outcomes)}; rejection reasons {dict(reasons)}"
    )
    print(check.report())
    return check


@pytest.mark.timeout(600)
def test_approval_races(fleet: Fleet, rng: random.Random, fault_seconds: float) -> None:
    fleet.setup(GATE, GATE_FAST)
    fleet.start()
    n = max(4, int(2 * fault_seconds))
    groups = {
        name: [f"{fleet.prefix}-{name}-{i}" for i in range(n)]
        for name in ("race", "self", "cancel", "twice")
    }
    for name, keys in groups.items():
        fleet.trigger(keys, workflow="gate", requested_by="alice" if name == "self" else "ann")
    expiring = [f"{fleet.prefix}-expire-{i}" for i in range(n)]
    fleet.trigger(expiring, workflow="gate-fast")
    ids = {name: [fleet.sent.triggers[k] for k in keys] for name, keys in groups.items()}
    expire_ids = [fleet.sent.triggers[k] for k in expiring]
    _wait(fleet, fleet.sent.run_ids)
    decisions: list[Command] = []
    for run_id in ids["race"]:
        pair = [_decide(run_id, "bob"), _decide(run_id, "carol", approve=False)]
        decisions += rng.sample(pair, 2)
    for run_id in ids["self"]:
        decisions += [_decide(run_id, "alice"), _decide(run_id, "bob")]
    for run_id in ids["cancel"]:
        decisions += [
            CancelRun(command_id=uuid.uuid4().hex, run_id=run_id, reason="test", by="ops"),
            _decide(run_id, "bob"),
        ]
    for run_id in ids["twice"]:
        decisions += [_decide(run_id, "bob"), _decide(run_id, "bob"), _decide(run_id, "dan")]
    fleet.send_commands(decisions)
    _wait(fleet, expire_ids, ApprovalExpired)
    late = [_decide(run_id, "bob") for run_id in expire_ids]
    fleet.send_commands(late)
    decisions += late
    wanted = {c.command_id for c in decisions}
    view, _ = fleet.wait_settled(
        120,
        done=lambda v: (
            wanted <= {e.record.causation_id for e in v.committed if isinstance(e.record, Event)}
        ),
    )
    states = view.states()
    finals = {
        name: Counter(states[r].status.value for r in run_ids)
        for name, run_ids in [*ids.items(), ("expire", expire_ids)]
    }
    print(
        f"drove {len(fleet.sent.triggers)} runs, {len(decisions)} decisions; final statuses "
        f"by case {finals}"
    )
    checks = run_checks(
        fleet,
        view,
        writes=("notify",),
        allowed=frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED}),
    )
    checks.append(_audit(view, decisions))
    expect = {"self": "Completed", "cancel": "Cancelled", "twice": "Completed", "expire": "Failed"}
    for name, status in expect.items():
        if set(finals[name]) != {status}:
            checks[-1].fail(f"{name}: expected every run {status}, found {finals[name]}")
    assert_checks(checks)
