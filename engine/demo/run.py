"""``terranoha demo``: one refund run, end to end, on the embedded backend.

Simulated reviewers act on the approvals as they appear: an expert confirms the
low-confidence classification; for the refund, the requester tries to approve her own
run (refused: four-eyes), then two other finance reviewers approve.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from engine.core.commands import DecideApproval
from engine.core.policies import run_id_for
from engine.core.records import Trigger
from engine.core.spec import WorkflowSpec, load_spec_yaml
from engine.core.state import RunState, Waiting
from engine.demo.tools import PaymentProvider, build_registry
from engine.embedded import EmbeddedEngine, EmbeddedWorker
from engine.runtime.redaction import PolicyBook, redact_events
from projections.timeline import build_timeline, render_timeline

TENANT = "acme"
REQUESTER = "alice"
DIRECTORY = {
    "erin": ("refund-experts",),
    "alice": ("finance",),
    "bob": ("finance",),
    "carol": ("finance",),
}
# Who tries to decide each kind of approval, in order.
SCRIPT = {"review": ["erin"], "prepare_commit": ["alice", "bob", "carol"]}


def demo_spec() -> WorkflowSpec:
    text = resources.files("engine.demo").joinpath("refund_agent.yaml").read_text()
    return load_spec_yaml(text)


async def run_demo(db: Path, say: Callable[[str], None] = print, timeout_s: float = 60.0) -> int:
    engine = EmbeddedEngine(db)
    payments = PaymentProvider(str(db))
    worker = EmbeddedWorker(db, build_registry(payments))
    spec = demo_spec()
    engine.store.deploy(spec, engine.clock.now_ms())
    engine.specs.add(spec)

    key = f"ticket-{uuid.uuid4().hex[:8]}"
    run_id = run_id_for(TENANT, key)
    trigger = Trigger(
        workflow=spec.workflow,
        tenant=TENANT,
        idempotency_key=key,
        requested_by=REQUESTER,
        correlation_id=key,
        input={
            "order_id": "ord-1001",
            "customer_message": "The teapot arrived broken, I want a refund.",
        },
    )
    say(f"store   {db}")
    say(f"run     {run_id}  ({spec.workflow} v{spec.version}, requested by {REQUESTER})")
    engine.submit(trigger, trigger)  # the second copy is a duplicate: still one run
    say("trigger published twice (same idempotency key): one run")

    stop = asyncio.Event()
    loops = [asyncio.create_task(engine.run(stop)), asyncio.create_task(worker.run(stop))]
    try:
        state = await _review(engine, run_id, say, timeout_s)
    finally:
        stop.set()
        await asyncio.gather(*loops)

    # What people see is redacted under the spec's policy, as `terranoha timeline` shows it;
    # the timeline lists the refused commands (the requester's own approval among them).
    events = redact_events(engine.store.events(run_id), PolicyBook(engine.specs))
    say("")
    say(render_timeline(build_timeline(events)))
    effects = payments.effects()
    say("")
    say(
        f"refunds applied by the payment provider: {sum(effects.values())} "
        f"(calls: {sum(payments.calls().values())})"
    )
    say(f"replay it:  terranoha replay {run_id} --db {db} --verify")
    engine.close()
    worker.close()
    ok = state is not None and state.status.value == "Completed"
    say(f"\nrun {state.status.value if state else 'unknown'}")
    return 0 if ok else 1


async def _review(
    engine: EmbeddedEngine, run_id: str, say: Callable[[str], None], timeout_s: float
) -> RunState | None:
    """Act as the reviewers until the run ends; return its final state."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    acted: set[tuple[str, str]] = set()
    while loop.time() < deadline:
        state = engine.cache.get(run_id)
        if state is not None and state.terminal:
            return state
        current = state.current if state else None
        approval = current.approval if current else None
        if (
            state is not None
            and current is not None
            and approval is not None
            and current.waiting is Waiting.APPROVAL
        ):
            for who in SCRIPT.get(approval.reason, []):
                if (approval.approval_id, who) in acted:
                    continue
                acted.add((approval.approval_id, who))
                groups = ", ".join(DIRECTORY[who])
                say(
                    f"review  {who} ({groups}) submits approval of {current.step}"
                    f" [{approval.reason}]"
                )
                engine.submit(
                    DecideApproval(
                        command_id=str(uuid.uuid4()),
                        run_id=run_id,
                        tenant=TENANT,
                        step=current.step,
                        approver=who,
                        roles=DIRECTORY[who],
                        approve=True,
                    )
                )
                break
        await asyncio.sleep(0.02)
    return engine.cache.get(run_id)
