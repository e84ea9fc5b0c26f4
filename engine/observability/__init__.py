"""OpenTelemetry for Terranoha: run traces and engine metrics built from committed events,
and tool spans on the workers that join the run's trace.

- ``engine.observability.spans``: ``RunSpans``, committed events in, finished spans out
  (deterministic ids and times; payloads redacted with the run's policy).
- ``engine.observability.metrics``: ``EngineMetrics``, the counters, histograms and the
  consumer lag gauge.
- ``engine.observability.tools``: ``run_tool_in_span``, the worker side (OpenTelemetry
  API only).
- ``engine.observability.setup``: ``configure`` (exporters ``none``, ``console``,
  ``otlp``) and ``Telemetry``, the sink the backends hand committed events to.

The worker side imports nothing from ``projections``; the backends reach this package
only through a callable hook, so the lower layers never import it.
"""

from engine.observability._ids import (
    attempt_span_id,
    run_span_id,
    span_id_of,
    step_span_id,
    trace_id_of,
)
from engine.observability.tools import parent_context, run_tool_in_span

__all__ = [
    "attempt_span_id",
    "parent_context",
    "run_span_id",
    "run_tool_in_span",
    "span_id_of",
    "step_span_id",
    "trace_id_of",
]
