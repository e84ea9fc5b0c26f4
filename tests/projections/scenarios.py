"""Scripted runs of one workflow at fixed times, for the projection tests.

Every run carries secrets in its input, task results, signal data and error messages;
``SECRETS`` lists them: none may appear in any projected row or topic value.
"""

from __future__ import annotations

from typing import Any

from engine.core import events as ev
from engine.core.spec import load_spec
from engine.core.state import RunStatus
from engine.runtime.redaction import PolicyBook
from engine.runtime.specs import SpecRegistry
from tests.harness import Flow

SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
BASE = 1_699_999_200_000
"""The start of a 1-hour (and 1-minute) bucket."""

CARD = "4111 1111 1111 1111"
API_TOKEN = "tok-6e1f0c9a-secret"
SSN = "123-45-6789"
IBAN = "DE89370400440532013000"
BEARER = "Bearer eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.sig-55aa"
PASSWORD = "hunter2-but-longer"
SECRETS = (CARD, CARD.replace(" ", ""), API_TOKEN, SSN, IBAN, "c2VjcmV0LXBheWxvYWQ", PASSWORD)

CLAIMS = load_spec(
    {
        "workflow": "claims",
        "version": 1,
        "sla": "10m",
        "input": {"claim": "string", "card_number": "string", "note": "string?"},
        "redact": [
            "$.input.card_number",
            "*token*",
            "$.signals.docs.ssn",
            "$.steps.pay.result.iban",
        ],
        "steps": [
            {
                "id": "fetch",
                "task": "crm.fetch",
                "retry": {"max_attempts": 2, "initial": "1s", "jitter": "none"},
            },
            {
                "id": "review",
                "approval": {
                    "approvers": ["finance"],
                    "expires_after": "1h",
                    "sla": "5m",
                    "on_expire": {"escalate": "leads"},
                },
            },
            {"id": "docs", "wait_event": {"name": "docs"}},
            {
                "id": "pay",
                "task": "pay.send",
                "input": {"card": "input.card_number", "claim": "input.claim"},
            },
        ],
    }
)
BOOK = PolicyBook(SpecRegistry([CLAIMS]))

INPUT: dict[str, Any] = {
    "claim": "c-1",
    "card_number": CARD.replace(" ", ""),
    "note": f"customer pasted {CARD} into the form",
}
FETCH_RESULT = {"customer": "ada", "api_token": API_TOKEN, "auth": {"password": PASSWORD}}
DOCS = {"ssn": SSN, "pages": 3}
PAY_RESULT = {"paid": True, "iban": IBAN}


def started(run_id: str, at: int, tenant: str = "acme") -> Flow:
    flow = Flow(CLAIMS, run_id=run_id).at(at)
    flow.given(flow.start(INPUT, by="alice", key=run_id, tenant=tenant))
    return flow


def fetched(flow: Flow, after: int = SECOND) -> Flow:
    return flow.after(after).given(flow.complete("fetch", FETCH_RESULT, cost=0.01))


def completed(
    run_id: str, at: int, gaps: tuple[int, int, int, int] = (SECOND,) * 4, tenant: str = "acme"
) -> list[ev.Event]:
    """fetch, review, docs, pay, each ``gaps[i]`` after the previous one."""
    flow = fetched(started(run_id, at, tenant), gaps[0])
    flow.after(gaps[1]).given(flow.approve("review", "bob", "finance", comment="ok"))
    flow.after(gaps[2]).given(flow.signal("docs", DOCS))
    flow.after(gaps[3]).given(flow.complete("pay", PAY_RESULT, cost=0.02))
    assert flow.state is not None and flow.state.status is RunStatus.COMPLETED
    return flow.log


def retried(run_id: str, at: int) -> list[ev.Event]:
    """The fetch fails once (its message holds a bearer token), is retried after 1s;
    completes at +10s."""
    flow = started(run_id, at)
    flow.after(SECOND).given(
        flow.fail("fetch", "transient", "UPSTREAM", f"crm said 401 for {BEARER}")
    )
    flow.fire("retry")  # +2s
    fetched(flow)  # +3s
    flow.after(3 * SECOND).given(flow.approve("review", "bob", "finance"))  # +6s
    flow.after(2 * SECOND).given(flow.signal("docs", DOCS))  # +8s
    flow.after(2 * SECOND).given(flow.complete("pay", PAY_RESULT, cost=0.02))  # +10s
    assert flow.state is not None and flow.state.status is RunStatus.COMPLETED
    return flow.log


def failed(run_id: str, at: int) -> list[ev.Event]:
    flow = started(run_id, at)
    flow.after(SECOND).given(flow.fail("fetch", "permanent", "NOT_FOUND", "no such claim"))
    assert flow.state is not None and flow.state.status is RunStatus.FAILED
    return flow.log


def cancelled(run_id: str, at: int) -> list[ev.Event]:
    flow = fetched(started(run_id, at))
    flow.after(SECOND).given(flow.cancel())
    assert flow.state is not None and flow.state.status is RunStatus.CANCELLED
    return flow.log


def waiting(run_id: str, at: int) -> list[ev.Event]:
    """Waiting for the review approval, requested at +1s (its SLA: 5 minutes later)."""
    return fetched(started(run_id, at)).log


def escalated(run_id: str, at: int) -> list[ev.Event]:
    """The review expires after an hour and goes to the leads, who have not answered."""
    flow = fetched(started(run_id, at))
    flow.fire("approval_expiry")
    assert flow.state is not None and flow.state.escalations == 1
    return flow.log


def breached(run_id: str, at: int) -> list[ev.Event]:
    """The run SLA (10m) fires while it waits for documents; it completes at +11m."""
    flow = fetched(started(run_id, at))
    flow.after(SECOND).given(flow.approve("review", "bob", "finance"))
    flow.fire("run_sla")  # +10m
    flow.at(at + 10 * MINUTE + 30 * SECOND).given(flow.signal("docs", DOCS))
    flow.at(at + 11 * MINUTE).given(flow.complete("pay", PAY_RESULT, cost=0.02))
    assert flow.state is not None and flow.state.status is RunStatus.COMPLETED
    return flow.log


def scripted_runs() -> dict[str, list[ev.Event]]:
    """The runs of the SLA test; see ``test_sla.py`` for the figures they give."""
    return {
        "r1": completed("r1", BASE),
        "r2": retried("r2", BASE + MINUTE),
        "r3": completed("r3", BASE + 2 * MINUTE, (5 * SECOND,) * 4),
        "r4": failed("r4", BASE + 3 * MINUTE),
        "r5": cancelled("r5", BASE + 4 * MINUTE),
        "r6": waiting("r6", BASE + 5 * MINUTE),
        "r7": waiting("r7", BASE + 15 * MINUTE),
        "r8": escalated("r8", BASE + 6 * MINUTE + 40 * SECOND),
        "r9": breached("r9", BASE + 8 * MINUTE + 20 * SECOND),
        "b1": completed("b1", BASE + 30 * SECOND, tenant="beta"),
        "r10": completed("r10", BASE + HOUR + 10 * SECOND, (SECOND, SECOND, 4 * SECOND, SECOND)),
    }


def many_runs(n: int, start: int = BASE, prefix: str = "run") -> dict[str, list[ev.Event]]:
    """``n`` runs cycling through every script, one started every 7 seconds."""
    scripts = (completed, retried, failed, cancelled, waiting, escalated, breached)
    return {
        f"{prefix}-{i}": scripts[i % len(scripts)](f"{prefix}-{i}", start + i * 7 * SECOND)
        for i in range(n)
    }
