"""Turning OpenTelemetry on: exporters (``none``, ``console``, ``otlp``) and ``Telemetry``,
the sink a backend hands its committed events to.

``otlp`` needs the optional extra (``pip install 'terranoha[otlp]'``) and reads the
standard ``OTEL_EXPORTER_OTLP_*`` environment variables (endpoint, headers); the service
name comes from ``OTEL_SERVICE_NAME`` (default ``terranoha``).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from prometheus_client import CollectorRegistry

from engine.core.errors import TerranohaError
from engine.core.events import Event
from engine.core.state import RunState
from engine.observability.health import prometheus_meter_provider
from engine.observability.metrics import EngineMetrics, LagSource
from engine.observability.spans import RunSpans
from engine.runtime.redaction import PolicyBook
from engine.runtime.specs import SpecRegistry

if TYPE_CHECKING:
    from engine.kafka.processor import KafkaEngine

log = logging.getLogger("terranoha.observability")

Exporter = Literal["none", "console", "otlp"]
EXPORTERS: tuple[Exporter, ...] = ("none", "console", "otlp")


class TelemetryError(TerranohaError):
    """OpenTelemetry cannot be set up as asked."""


class Telemetry:
    """Run spans and engine metrics from committed events.

    ``observe(events)`` is the hook a backend calls after each committed batch; it never
    raises (telemetry must not stop the engine). ``bind`` tells it where to find the
    deployed specs (for the redaction policies) and the committed state of runs that
    started before this process did.
    """

    def __init__(
        self,
        spans: SpanProcessor | None = None,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
        resource: Resource | None = None,
    ) -> None:
        self.resource = resource or Resource.create({"service.name": "terranoha"})
        self.span_processor = spans
        self.meter_provider = meter_provider
        self.tracer_provider = tracer_provider
        self.book = PolicyBook()
        self.runs = RunSpans(self.book, resource=self.resource)
        self.metrics = EngineMetrics(meter_provider) if meter_provider is not None else None

    def bind(
        self,
        specs: SpecRegistry | None = None,
        state_of: Callable[[str], RunState | None] | None = None,
    ) -> None:
        if specs is not None:
            self.book.specs = specs
        if state_of is not None:
            self.runs.state_of = state_of
            if self.metrics is not None:
                self.metrics.state_of = state_of

    def watch_lag(self, source: LagSource) -> None:
        if self.metrics is not None:
            self.metrics.watch_lag(source)

    def observe(self, events: Sequence[Event]) -> None:
        """Hand over the events of a committed batch."""
        try:
            if self.metrics is not None:
                self.metrics.record(events)
            if self.span_processor is not None:
                for span in self.runs.apply(events):
                    self.span_processor.on_end(span)
        except Exception:
            log.exception("translating %d committed events into telemetry failed", len(events))

    def shutdown(self) -> None:
        """Flush and stop the exporters."""
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        elif self.span_processor is not None:
            self.span_processor.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def _otlp() -> tuple[SpanExporter, MetricExporter]:
    try:
        traces = importlib.import_module("opentelemetry.exporter.otlp.proto.http.trace_exporter")
        metrics = importlib.import_module("opentelemetry.exporter.otlp.proto.http.metric_exporter")
    except ImportError as exc:
        raise TelemetryError(
            "--otel otlp needs the OTLP exporter, which is an optional extra: install it with "
            "`pip install 'terranoha[otlp]'` (opentelemetry-exporter-otlp-proto-http), or use "
            "--otel console"
        ) from exc
    span_exporter: SpanExporter = traces.OTLPSpanExporter()
    metric_exporter: MetricExporter = metrics.OTLPMetricExporter()
    return span_exporter, metric_exporter


def configure(
    exporter: str,
    *,
    set_global: bool = True,
    metrics_interval_ms: int | None = None,
    attributes: Mapping[str, Any] | None = None,
    prometheus: CollectorRegistry | None = None,
) -> Telemetry | None:
    """Telemetry exporting to ``exporter`` (None for ``none`` without ``prometheus``).

    With ``set_global`` the tracer provider becomes OpenTelemetry's global one, so the
    workers' tool spans (``engine.worker.spans``) go to the same exporter; a
    process can do that once. Metrics are exported every ``metrics_interval_ms``
    (default ``$OTEL_METRIC_EXPORT_INTERVAL`` or 60 s) and at shutdown. With
    ``prometheus`` the metrics are also read into that registry at each scrape of
    ``/metrics`` (``engine.observability.health``); with ``none`` they go only there,
    and no spans are made.
    """
    if exporter not in EXPORTERS:
        raise TelemetryError(f"--otel is one of {', '.join(EXPORTERS)}, not {exporter!r}")
    resource = Resource.create({"service.name": "terranoha", **(attributes or {})})
    if exporter == "none":
        if prometheus is None:
            return None
        return Telemetry(
            meter_provider=prometheus_meter_provider(prometheus, resource), resource=resource
        )
    processor: SpanProcessor
    reader: MetricReader
    if exporter == "console":
        processor = SimpleSpanProcessor(ConsoleSpanExporter())
        reader = PeriodicExportingMetricReader(
            ConsoleMetricExporter(), export_interval_millis=metrics_interval_ms
        )
    else:
        span_exporter, metric_exporter = _otlp()
        processor = BatchSpanProcessor(span_exporter)
        reader = PeriodicExportingMetricReader(
            metric_exporter, export_interval_millis=metrics_interval_ms
        )
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(processor)
    meter_provider = (
        MeterProvider(resource=resource, metric_readers=[reader])
        if prometheus is None
        else prometheus_meter_provider(prometheus, resource, (reader,))
    )
    if set_global:
        trace.set_tracer_provider(tracer_provider)
    return Telemetry(processor, meter_provider, tracer_provider, resource)


def kafka_lag(engine: KafkaEngine) -> LagSource:
    """Records behind per input partition of a ``KafkaEngine``: the high watermark minus
    the next offset to process, summed over the partitions read for it (run inputs, and
    triggers when co-partitioned; transaction markers count, so an idle partition may
    show 1)."""

    def lag() -> dict[int, int]:
        consumer = engine.consumer
        out: dict[int, int] = {}
        if consumer is None:
            return out
        for number, part in list(engine.parts.items()):
            for tp in part.tps:
                highwater = consumer.highwater(tp)
                if highwater is not None:
                    behind = max(0, int(highwater) - int(part.next_offsets.get(tp, 0)))
                    out[number] = out.get(number, 0) + behind
        return out

    return lag
