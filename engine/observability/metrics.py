"""Engine metrics from committed events (OpenTelemetry metrics SDK).

| instrument | kind | unit | attributes |
|---|---|---|---|
| ``terranoha.runs.started`` | counter | ``{run}`` | workflow, tenant |
| ``terranoha.runs.completed``, ``.failed``, ``.cancelled`` | counter | ``{run}`` | as above |
| ``terranoha.run.duration`` | histogram | ``ms`` | workflow, tenant, status |
| ``terranoha.step.duration`` | histogram | ``ms`` | workflow, step, status |
| ``terranoha.task.retries`` | counter | ``{retry}`` | workflow, step |
| ``terranoha.escalations`` | counter | ``{escalation}`` | workflow, step |
| ``terranoha.sla.breaches`` | counter | ``{breach}`` | workflow, scope |
| ``terranoha.cost`` | counter | ``1`` (the tools' cost unit) | workflow, step |
| ``terranoha.consumer.lag`` | gauge | ``{record}`` | partition |
| ``terranoha.projector.events``, ``.batches`` | counter | ``{event}``, ``{batch}`` | projector |
| ``terranoha.worker.tasks`` | counter | ``{task}`` | outcome |

Durations come from the events' timestamps. Consumer lag is read when the metrics are
collected, from a source the orchestrator provides (``watch_lag``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from engine.core import events as ev
from engine.core.state import RunState

LagSource = Callable[[], Mapping[int, int]]
"""Records behind per input partition."""


@dataclass(slots=True)
class _RunInfo:
    workflow: str
    tenant: str
    started_at: int
    steps: dict[str, int] = field(default_factory=dict)


class EngineMetrics:
    """The instruments above, fed with ``record(events)`` after each committed batch."""

    def __init__(
        self,
        provider: MeterProvider,
        state_of: Callable[[str], RunState | None] | None = None,
        max_runs: int = 100_000,
    ) -> None:
        meter = provider.get_meter("terranoha.engine")
        self.state_of = state_of
        self.max_runs = max_runs
        self.runs_started = meter.create_counter("terranoha.runs.started", "{run}", "Runs started")
        self.runs_ended = {
            ev.RunCompleted: meter.create_counter(
                "terranoha.runs.completed", "{run}", "Runs completed"
            ),
            ev.RunFailed: meter.create_counter("terranoha.runs.failed", "{run}", "Runs failed"),
            ev.RunCancelled: meter.create_counter(
                "terranoha.runs.cancelled", "{run}", "Runs cancelled"
            ),
        }
        self.run_duration = meter.create_histogram(
            "terranoha.run.duration", "ms", "Run duration, start to end"
        )
        self.step_duration = meter.create_histogram(
            "terranoha.step.duration", "ms", "Step latency, start to end"
        )
        self.retries = meter.create_counter(
            "terranoha.task.retries", "{retry}", "Task retries scheduled"
        )
        self.escalations = meter.create_counter(
            "terranoha.escalations", "{escalation}", "Escalations"
        )
        self.sla_breaches = meter.create_counter(
            "terranoha.sla.breaches", "{breach}", "SLA breaches"
        )
        self.cost = meter.create_counter("terranoha.cost", "1", "Cost reported by tools")
        self._lag: list[LagSource] = []
        meter.create_observable_gauge(
            "terranoha.consumer.lag",
            [self._observe_lag],
            "{record}",
            "Run input records not yet processed",
        )
        self._runs: dict[str, _RunInfo] = {}

    def watch_lag(self, source: LagSource) -> None:
        """Report ``source()`` as the consumer lag gauge, per partition."""
        self._lag.append(source)

    def _observe_lag(self, options: CallbackOptions) -> Iterable[Observation]:
        out: list[Observation] = []
        for source in self._lag:
            try:
                lag = dict(source())
            except RuntimeError:  # the partitions changed while being read: skip a beat
                continue
            out += [
                Observation(max(0, behind), {"partition": number})
                for number, behind in sorted(lag.items())
            ]
        return out

    def _run(self, event: ev.Event) -> _RunInfo:
        info = self._runs.get(event.run_id)
        if info is None:
            if len(self._runs) >= self.max_runs:
                self._runs.pop(next(iter(self._runs)))
            state = self.state_of(event.run_id) if self.state_of is not None else None
            info = (
                _RunInfo(state.workflow, state.tenant, state.started_at)
                if state
                else _RunInfo("", event.tenant, event.ts)
            )
            self._runs[event.run_id] = info
        return info

    def record(self, events: Iterable[ev.Event]) -> None:
        for e in events:
            if isinstance(e, ev.RunStarted):
                info = self._runs[e.run_id] = _RunInfo(e.workflow, e.tenant, e.ts)
                self.runs_started.add(1, {"workflow": e.workflow, "tenant": e.tenant})
                continue
            if isinstance(e, ev.CommandRejected):
                continue  # counts nothing, and often comes after the run ended
            info = self._run(e)
            step = getattr(e, "step", None) or ""
            where = {"workflow": info.workflow, "step": step}
            if isinstance(e, ev.StepStarted):
                info.steps[e.step] = e.ts
            elif isinstance(e, ev.StepCompleted | ev.StepFailed) or (
                isinstance(e, ev.BusinessErrorHandled) and e.action == "goto"
            ):
                self._step_ended(info, step, e)
            elif isinstance(e, ev.TaskCompleted | ev.TaskFailed):
                if e.cost > 0:
                    self.cost.add(e.cost, where)
            elif isinstance(e, ev.RetryScheduled):
                self.retries.add(1, where)
            elif isinstance(e, ev.Escalated):
                self.escalations.add(1, where)
            elif isinstance(e, ev.SlaBreached):
                self.sla_breaches.add(1, {"workflow": info.workflow, "scope": e.scope})
            elif isinstance(e, ev.RunCompleted | ev.RunFailed | ev.RunCancelled):
                run = {"workflow": info.workflow, "tenant": info.tenant}
                self.runs_ended[type(e)].add(1, run)
                status = type(e).__name__.removeprefix("Run").lower()
                self.run_duration.record(max(0, e.ts - info.started_at), {**run, "status": status})
                self._runs.pop(e.run_id, None)

    def _step_ended(self, info: _RunInfo, step: str, e: ev.Event) -> None:
        started = info.steps.pop(step, None)
        if started is None:
            return
        status = {ev.StepCompleted: "completed", ev.StepFailed: "failed"}.get(type(e), "branched")
        self.step_duration.record(
            max(0, e.ts - started), {"workflow": info.workflow, "step": step, "status": status}
        )


def watch_counts(
    provider: MeterProvider,
    name: str,
    unit: str,
    description: str,
    attribute: str,
    counts: Callable[[], Mapping[str, float]],
) -> None:
    """An observable counter ``name`` read from ``counts()`` at each collection: one
    series per key, under ``attribute``. For the totals a component already keeps."""
    meter = provider.get_meter("terranoha")

    def observe(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(value, {attribute: key}) for key, value in counts().items()]

    meter.create_observable_counter(name, [observe], unit, description)


class Projected(Protocol):
    """What a projector counts (``projections.project.ProjectorStats`` is one)."""

    events: int
    batches: int


def watch_projectors(provider: MeterProvider, stats: Mapping[str, Projected]) -> None:
    """``terranoha.projector.events`` and ``.batches``: what each named projector
    (``postgres``, ``topics``) has projected since the process started."""
    watch_counts(
        provider,
        "terranoha.projector.events",
        "{event}",
        "Run events projected",
        "projector",
        lambda: {name: s.events for name, s in stats.items()},
    )
    watch_counts(
        provider,
        "terranoha.projector.batches",
        "{batch}",
        "Batches of run events projected",
        "projector",
        lambda: {name: s.batches for name, s in stats.items()},
    )
