"""Tool spans on the worker side: a tool runs inside a span whose parent is the task
record's W3C ``traceparent`` header, so it joins the run's trace under the span of its
task attempt (see ``engine.observability.spans``).

Uses the OpenTelemetry API only: with no SDK configured (``--otel none``), the spans are
no-ops.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from engine.core.commands import FailTask
from engine.core.outbox import TaskCommand
from engine.core.trace_ids import attempt_span_id, trace_id_of
from engine.worker.sdk import Outcome

Headers = Sequence[tuple[str, bytes]]
T = TypeVar("T")

_PROPAGATOR = TraceContextTextMapPropagator()


def parent_context(headers: Headers | None, task: TaskCommand | None = None) -> Context:
    """The trace context named by the record ``headers`` (``traceparent``/``tracestate``).

    Without a usable header, and given the ``task``, the context the engine gives every
    task record: trace id from the correlation id, span id from the task id.
    """
    carrier = {
        key.lower(): value.decode("latin-1")
        for key, value in headers or ()
        if key.lower() in ("traceparent", "tracestate")
    }
    context = _PROPAGATOR.extract(carrier) if carrier else Context()
    if trace.get_current_span(context).get_span_context().is_valid or task is None:
        return context
    remote = SpanContext(
        trace_id_of(task.correlation_id or task.run_id),
        attempt_span_id(task.task_id),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(remote))


async def run_tool_in_span(
    task: TaskCommand,
    headers: Headers | None,
    run: Callable[[], Awaitable[Outcome]],
    tracer: Tracer | None = None,
) -> Outcome:
    """Await ``run()`` (the tool's execution) inside a ``tool <queue>`` span, child of the
    task record's ``traceparent``; a failure report marks the span as an error."""
    tracer = tracer or trace.get_tracer("terranoha.worker")
    attributes: dict[str, AttributeValue] = {
        "terranoha.run_id": task.run_id,
        "terranoha.tenant": task.tenant,
        "terranoha.step": task.step,
        "terranoha.task.attempt": task.attempt,
        "terranoha.task.phase": task.phase,
        "terranoha.task.queue": task.queue,
        "terranoha.task.id": task.task_id,
    }
    with tracer.start_as_current_span(
        f"tool {task.queue}",
        parent_context(headers, task),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        outcome = await run()
        span.set_attribute("terranoha.tool.called", outcome.called)
        command = outcome.command
        if isinstance(command, FailTask):
            span.set_attributes(
                {
                    "error.type": command.code,
                    "terranoha.error.class": command.error_class,
                    "terranoha.error.code": command.code,
                }
            )
            span.set_status(Status(StatusCode.ERROR, command.code))
        return outcome
