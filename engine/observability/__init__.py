"""OpenTelemetry for Terranoha: run traces and engine metrics built from committed events.

- ``engine.observability.spans``: ``RunSpans``, committed events in, finished spans out
  (deterministic ids and times; payloads redacted with the run's policy).
- ``engine.observability.metrics``: ``EngineMetrics``, the counters, histograms and the
  consumer lag gauge.
- ``engine.observability.setup``: ``configure`` (exporters ``none``, ``console``,
  ``otlp``) and ``Telemetry``, the sink the backends hand committed events to.

What the lower layers need lives with them, so that none of them imports this package:
the tool spans of the workers with the worker SDK (``engine.worker.spans``), the ids every
process derives from the log in the core (``engine.core.trace_ids``), and the redaction
policies in the runtime (``engine.runtime.redaction``). The backends reach this package
only through a callable hook. They are re-exported here for one import of it all.
"""

from engine.core.trace_ids import (
    attempt_span_id,
    run_span_id,
    span_id_of,
    step_span_id,
    trace_id_of,
)
from engine.worker.spans import parent_context, run_tool_in_span

__all__ = [
    "attempt_span_id",
    "parent_context",
    "run_span_id",
    "run_tool_in_span",
    "span_id_of",
    "step_span_id",
    "trace_id_of",
]
