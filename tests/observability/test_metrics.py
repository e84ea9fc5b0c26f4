"""Engine metrics from committed events, read with the SDK's in-memory reader."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from engine.observability.setup import Telemetry
from tests.observability.test_spans import _flow


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    out: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out[metric.name] = list(metric.data.data_points)
    return out


def test_counters_histograms_and_lag() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    telemetry = Telemetry(meter_provider=provider)
    telemetry.watch_lag(lambda: {0: 3, 1: 0})
    flow = _flow()
    telemetry.observe(flow.log[:4])
    telemetry.observe(flow.log[4:])
    points = _points(reader)

    (started,) = points["terranoha.runs.started"]
    assert started.value == 1
    assert dict(started.attributes) == {"workflow": "refund", "tenant": "default"}
    assert points["terranoha.runs.completed"][0].value == 1
    assert "terranoha.runs.failed" not in points
    (retries,) = points["terranoha.task.retries"]
    assert retries.value == 1 and retries.attributes["step"] == "lookup"
    assert sum(p.value for p in points["terranoha.cost"]) == 0.75
    steps = {p.attributes["step"]: p for p in points["terranoha.step.duration"]}
    assert set(steps) == {"lookup", "refund"}
    assert steps["lookup"].count == 1 and steps["lookup"].sum == 1800  # 500 + 1000 + 300
    (run,) = points["terranoha.run.duration"]
    assert run.sum == flow.log[-1].ts - flow.log[0].ts
    lag = {p.attributes["partition"]: p.value for p in points["terranoha.consumer.lag"]}
    assert lag == {0: 3, 1: 0}
    provider.shutdown()
