"""The worker side: a tool runs in a span that is a child of the task record's
traceparent, so it joins the run's trace under the span of its task attempt."""

from __future__ import annotations

import asyncio

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from engine.core.outbox import TaskCommand
from engine.kafka._util import trace_headers
from engine.observability import attempt_span_id, parent_context, run_tool_in_span, trace_id_of
from engine.worker import PermanentError, TaskContext, ToolRegistry
from engine.worker.sdk import MemoryLedger, execute

SECRET = "sk-live-0123456789abcdef"


def _task(queue: str = "crm.get", attempt: int = 2) -> TaskCommand:
    run_id = "run-7"
    task_id = f"{run_id}/lookup/1/task/{attempt}"
    return TaskCommand(
        queue=queue,
        task_id=task_id,
        run_id=run_id,
        step="lookup",
        phase="task",
        attempt=attempt,
        idempotency_key=f"{run_id}/lookup/1",
        input={"password": SECRET},
        deadline=2**62,
        tenant="acme",
        correlation_id="ticket-7",
    )


def _tracer() -> tuple[trace.Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def test_the_parent_is_the_traceparent_of_the_record_headers() -> None:
    task = _task()
    headers = trace_headers(task.correlation_id, task.task_id, task.tenant)
    parent = trace.get_current_span(parent_context(headers)).get_span_context()
    assert parent.is_valid and parent.is_remote
    assert parent.trace_id == trace_id_of("ticket-7")
    assert parent.span_id == attempt_span_id(task.task_id)


def test_a_foreign_traceparent_is_followed_as_is() -> None:
    header = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    parent = trace.get_current_span(
        parent_context([("traceparent", header.encode())], _task())
    ).get_span_context()
    assert (parent.trace_id, parent.span_id) == (
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
    )


def test_without_headers_the_task_names_its_parent() -> None:
    task = _task()
    parent = trace.get_current_span(parent_context(None, task)).get_span_context()
    assert (parent.trace_id, parent.span_id) == (
        trace_id_of("ticket-7"),
        attempt_span_id(task.task_id),
    )
    assert not trace.get_current_span(parent_context(None)).get_span_context().is_valid


def test_the_tool_span_is_a_child_of_the_attempt_span() -> None:
    tracer, exporter = _tracer()
    registry = ToolRegistry()
    seen: list[trace.SpanContext] = []

    @registry.tool("crm.get")
    async def lookup(ctx: TaskContext) -> dict[str, str]:
        seen.append(trace.get_current_span().get_span_context())
        return {"ok": "yes"}

    task = _task()
    headers = trace_headers(task.correlation_id, task.task_id, task.tenant)
    outcome = asyncio.run(
        run_tool_in_span(
            task, headers, lambda: execute(task, registry, MemoryLedger(), lambda: 0), tracer
        )
    )
    assert outcome.called
    (span,) = exporter.get_finished_spans()
    assert span.name == "tool crm.get"
    assert span.parent is not None and span.parent.span_id == attempt_span_id(task.task_id)
    assert span.context.trace_id == trace_id_of("ticket-7")
    assert seen == [span.context]  # the tool itself runs inside the span
    assert span.attributes is not None and span.attributes["terranoha.task.attempt"] == 2
    assert SECRET not in span.to_json()


def test_a_failed_tool_marks_its_span_without_its_message() -> None:
    tracer, exporter = _tracer()
    registry = ToolRegistry()

    @registry.tool("crm.get")
    def lookup(ctx: TaskContext) -> None:
        raise PermanentError("BAD_INPUT", f"cannot use {ctx.input['password']}", field="x")

    task = _task()
    asyncio.run(
        run_tool_in_span(
            task, None, lambda: execute(task, registry, MemoryLedger(), lambda: 0), tracer
        )
    )
    (span,) = exporter.get_finished_spans()
    assert not span.status.is_ok
    assert span.attributes is not None and span.attributes["terranoha.error.code"] == "BAD_INPUT"
    assert SECRET not in span.to_json()
