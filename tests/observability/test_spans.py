"""Run traces built from committed events: the span tree, ids, times and redaction."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from engine.core import events as ev
from engine.core.commands import DecideApproval
from engine.core.evolve import fold
from engine.core.policies import run_id_for
from engine.core.records import Trigger
from engine.core.spec import load_spec
from engine.embedded import EmbeddedEngine, EmbeddedWorker
from engine.kafka._util import trace_headers
from engine.observability import attempt_span_id, run_span_id, step_span_id, trace_id_of
from engine.observability.setup import Telemetry
from engine.observability.spans import RunSpans
from engine.runtime.clock import ManualClock
from engine.runtime.redaction import PolicyBook
from engine.runtime.specs import SpecRegistry
from engine.worker import TaskContext, ToolRegistry, TransientError
from tests.harness import T0, Flow

CARD = "4111 1111 1111 1111"
API_TOKEN = "tok-9f8e7d6c5b4a3928"
SPEC = load_spec(
    {
        "workflow": "refund",
        "version": 2,
        "input": {"order": "string", "card": "string"},
        "redact": ["$.input.card", "*token*"],
        "steps": [
            {
                "id": "lookup",
                "task": "crm.get",
                "input": {"card": "input.card"},
                "retry": {"max_attempts": 3, "initial": "1s", "jitter": "none"},
            },
            {
                "id": "refund",
                "task": "pay.refund",
                "approval": {"approvers": ["finance"], "quorum": 2},
            },
        ],
    }
)


def _book() -> PolicyBook:
    return PolicyBook(SpecRegistry([SPEC]))


def _flow() -> Flow:
    """A run with a retried lookup, a two-vote approval and a completed refund."""
    flow = Flow(SPEC)
    flow.given(flow.start({"order": "o-1", "card": CARD}, correlation_id="ticket-7"))
    flow.after(500).when(flow.fail("lookup", "transient", "HTTP_503", "try later"))
    flow.fire("retry")
    flow.after(300).when(flow.complete("lookup", {"api_token": API_TOKEN, "amount": 12}, cost=0.5))
    flow.after(1000).when(flow.approve("refund", "bob", "finance", comment="ok"))
    flow.after(1000).when(flow.approve("refund", "carol", "finance"))
    flow.after(200).when(flow.complete("refund", {"refund_id": "r-1"}, cost=0.25))
    return flow


def _by_name(spans: Sequence[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        out.setdefault(span.name, []).append(span)
    return out


def _exported(events: Sequence[ev.Event], **kwargs: Any) -> list[ReadableSpan]:
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(SimpleSpanProcessor(exporter))
    telemetry.book.specs = SpecRegistry([SPEC])
    telemetry.observe(events)
    return list(exporter.get_finished_spans())


def test_a_run_is_one_trace_with_step_and_attempt_spans() -> None:
    flow = _flow()
    spans = _exported(flow.log)
    named = _by_name(spans)
    trace_id = trace_id_of("ticket-7")
    assert {s.context.trace_id for s in spans} == {trace_id}

    (root,) = named["run refund"]
    assert root.parent is None
    assert root.context.span_id == run_span_id(flow.run_id)
    assert root.start_time == T0 * 1_000_000
    assert root.end_time == flow.log[-1].ts * 1_000_000
    assert root.attributes is not None
    assert root.attributes["terranoha.run.status"] == "completed"
    assert root.attributes["terranoha.workflow.version"] == 2
    assert root.attributes["terranoha.cost"] == 0.75

    lookup, refund = named["step lookup"][0], named["step refund"][0]
    assert lookup.parent is not None and lookup.parent.span_id == root.context.span_id
    assert lookup.context.span_id == step_span_id(flow.run_id, "lookup", 1)
    attempts = sorted(named["task crm.get"], key=lambda s: s.start_time or 0)
    assert [a.attributes["terranoha.task.attempt"] for a in attempts if a.attributes] == [1, 2]
    assert all(
        a.parent is not None and a.parent.span_id == lookup.context.span_id for a in attempts
    )
    failed, ok = attempts
    assert failed.status.is_ok is False and failed.attributes is not None
    assert failed.attributes["terranoha.error.code"] == "HTTP_503"
    assert failed.attributes["terranoha.error.class"] == "transient"
    assert ok.attributes is not None and ok.attributes["terranoha.cost"] == 0.5
    assert [e.name for e in lookup.events] == ["retry scheduled"]

    assert [e.name for e in refund.events] == [
        "approval requested",
        "approval voted",
        "approval granted",
    ]
    (pay,) = named["task pay.refund"]
    assert pay.parent is not None and pay.parent.span_id == refund.context.span_id
    # the attempt span has the id the task record's traceparent names
    dispatched = next(
        e for e in flow.log if isinstance(e, ev.TaskDispatched) and e.step == "refund"
    )
    assert pay.context.span_id == attempt_span_id(dispatched.task_id)
    header = dict(trace_headers("ticket-7", dispatched.task_id, "default"))["traceparent"]
    assert header.decode() == (f"00-{pay.context.trace_id:032x}-{pay.context.span_id:016x}-01")
    # children end before their parents are handed out
    assert spans[-1] is not None and spans[-1].name == "run refund"


def test_translation_is_deterministic_and_ignores_redelivered_events() -> None:
    flow = _flow()
    first = RunSpans(_book()).apply(flow.log)
    again = RunSpans(_book())
    second = again.apply(flow.log[:5]) + again.apply(flow.log[3:])  # overlapping batches
    assert [s.to_json() for s in first] == [s.to_json() for s in second]
    assert len(again) == 0  # the run ended: nothing kept


def test_secrets_never_reach_span_attributes_or_events() -> None:
    flow = _flow()
    text = "\n".join(s.to_json() for s in _exported(flow.log))
    assert CARD not in text and CARD.replace(" ", "") not in text
    assert API_TOKEN not in text
    assert "[redacted]" in text  # the payloads are there, hidden


def test_escalation_sla_breach_and_rejection_fail_the_run() -> None:
    spec = load_spec(
        {
            "workflow": "esc",
            "version": 1,
            "sla": "1h",
            "steps": [
                {
                    "id": "pay",
                    "task": "pay.go",
                    "on_business_error": {"LIMIT": {"escalate": "leads"}},
                }
            ],
        }
    )
    flow = Flow(spec, run_id="run-esc")
    flow.given(flow.start())
    flow.after(100).when(flow.fail("pay", "business", "LIMIT", "over the limit"))
    flow.fire("run_sla")
    flow.after(100).when(flow.approve("pay", "lee", "leads", reject=True))
    named = _by_name(RunSpans(PolicyBook(SpecRegistry([spec]))).apply(flow.log))
    (root,) = named["run esc"]
    (pay,) = named["step pay"]
    assert [e.name for e in pay.events] == [
        "business error handled",
        "escalated",
        "approval requested",
        "approval rejected",
    ]
    assert [e.name for e in root.events] == ["sla breached"]
    assert root.attributes is not None
    assert root.attributes["terranoha.run.status"] == "failed"
    assert not root.status.is_ok
    (attempt,) = named["task pay.go"]
    assert attempt.attributes is not None
    assert attempt.attributes["terranoha.error.class"] == "business"


def test_a_run_seen_from_the_middle_starts_from_its_committed_state() -> None:
    flow = _flow()
    cut = next(i for i, e in enumerate(flow.log) if isinstance(e, ev.ApprovalRequested))
    state_at_cut = fold(flow.log[:cut])
    spans = RunSpans(_book(), state_of=lambda run_id: state_at_cut).apply(flow.log[cut:])
    named = _by_name(spans)
    (root,) = named["run refund"]
    assert root.start_time == T0 * 1_000_000
    assert root.context.span_id == run_span_id(flow.run_id)
    (refund,) = named["step refund"]
    assert refund.context.span_id == step_span_id(flow.run_id, "refund", 1)
    assert refund.parent is not None and refund.parent.span_id == root.context.span_id


def _registry() -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool("crm.get")
    def lookup(ctx: TaskContext) -> dict[str, Any]:
        if ctx.attempt == 1:
            raise TransientError("HTTP_503", f"gateway said no to {ctx.input['card']}")
        return {"api_token": API_TOKEN, "echo": ctx.input["card"]}

    @registry.tool("pay.refund")
    def refund(ctx: TaskContext) -> dict[str, Any]:
        return {"refund_id": "r-1"}

    return registry


def test_the_embedded_engine_hands_committed_events_to_telemetry(tmp_path: Path) -> None:
    clock = ManualClock(T0)
    engine = EmbeddedEngine(tmp_path / "e.db", clock=clock)
    engine.store.deploy(SPEC, clock.now_ms())
    engine.specs.add(SPEC)
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(SimpleSpanProcessor(exporter))
    telemetry.bind(engine.specs, engine.cache.get)
    engine.on_committed = telemetry.observe
    worker = EmbeddedWorker(tmp_path / "e.db", _registry(), clock=clock)
    engine.submit(
        Trigger(
            workflow="refund",
            idempotency_key="k",
            correlation_id="ticket-9",
            input={"order": "o-1", "card": CARD},
            requested_by="ann",
        )
    )
    run_id = run_id_for("default", "k")
    engine.drain()
    asyncio.run(worker.work_once())
    engine.drain()
    clock.advance(1_000)
    engine.drain()
    asyncio.run(worker.work_once())
    engine.drain()
    for who in ("bob", "carol"):
        engine.submit(
            DecideApproval(
                command_id=f"a-{who}",
                run_id=run_id,
                tenant="default",
                correlation_id="ticket-9",
                step="refund",
                approver=who,
                roles=("finance",),
            )
        )
        engine.drain()
    asyncio.run(worker.work_once())
    engine.drain()
    engine.close()
    worker.close()
    spans = list(exporter.get_finished_spans())
    named = _by_name(spans)
    assert set(named) == {
        "run refund",
        "step lookup",
        "step refund",
        "task crm.get",
        "task pay.refund",
    }
    assert len(named["task crm.get"]) == 2
    assert {s.context.trace_id for s in spans} == {trace_id_of("ticket-9")}
    text = "\n".join(s.to_json() for s in spans)
    assert CARD not in text and API_TOKEN not in text
    root = named["run refund"][0]
    assert root.attributes is not None
    assert json.loads(str(root.attributes["terranoha.run.input"]))["card"] == "[redacted]"


def test_a_command_refused_after_the_run_ended_opens_no_trace() -> None:
    flow = _flow()
    flow.after(100).when(flow.approve("refund", "dave", "finance"))
    late = flow.last
    assert [type(e) for e in late] == [ev.CommandRejectedV2]
    spans = RunSpans(_book())
    spans.apply(flow.log[:-1])
    assert spans.apply(late) == [] and len(spans) == 0


@pytest.mark.parametrize("event_type", list(ev.EVENT_TYPES.values()), ids=lambda t: t.__name__)
def test_every_event_type_changes_spans_becomes_a_span_event_or_is_known_to_do_neither(
    event_type: type[ev.Event],
) -> None:
    from engine.observability import spans

    roles = [
        event_type in spans._SPAN_CHANGES,
        event_type in spans._SPAN_EVENTS,
        event_type in spans.IGNORED,
    ]
    assert roles.count(True) == 1, (
        f"{event_type.__name__}: add it to exactly one of _SPAN_CHANGES, _SPAN_EVENTS "
        "(@_describes) or IGNORED in engine/observability/spans.py"
    )
