"""Readiness of the Kafka components, for ``/readyz`` (``engine.observability.health``).

A stream processor (the engine, the trigger router, the topic projector) is ready when
the group has assigned its partitions, every task it owns has been restored from its
changelog, and each input partition is caught up: no more than ``max_lag`` records
behind the partition's end. The default is Kafka Streams' ``acceptable.recovery.lag``;
a partition under a heavy burst can fall behind that much and the process reports not
ready until it catches up, which is what readiness means: it is not keeping up yet.
The end counts transaction markers, so an idle partition may show a record or two.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.kafka.stream import StreamProcessor
from engine.kafka.worker import KafkaWorker

Check = Callable[[], str | None]
"""None when ready, else why not: what ``engine.observability.health.Readiness`` takes."""

ACCEPTABLE_LAG = 10_000
"""Records an input partition may be behind and still count as caught up."""


def stream_check(processor: StreamProcessor, max_lag: int = ACCEPTABLE_LAG) -> Check:
    """The readiness check of ``processor``."""

    def check() -> str | None:
        consumer = processor.consumer
        if consumer is None or not processor.started.is_set():
            return "starting"
        if processor.grouped and not processor.assigned.is_set():
            return "waiting for the consumer group to assign partitions"
        if not processor.grouped and not processor.ready.is_set():
            return "restoring"
        wanted = (
            {tp.partition for tp in consumer.assignment()}
            if processor.grouped
            else set(processor.parts) | {0}
        )
        restoring = sorted(wanted - set(processor.parts))
        if restoring:
            return f"restoring task(s) {restoring}"
        behind: dict[str, int] = {}
        for part in list(processor.parts.values()):
            for tp in part.tps:
                end = consumer.highwater(tp)
                if end is None:
                    return f"waiting for the first fetch of {tp.topic}/{tp.partition}"
                lag = int(end) - int(part.next_offsets.get(tp, 0))
                if lag > max_lag:
                    behind[f"{tp.topic}/{tp.partition}"] = lag
        if behind:
            return "catching up: " + ", ".join(
                f"{tp} {lag} records behind" for tp, lag in sorted(behind.items())
            )
        return None

    return check


def worker_check(worker: KafkaWorker) -> Check:
    """A worker is ready once it has joined its group (it restores nothing)."""
    return lambda: None if worker.started else "starting"
