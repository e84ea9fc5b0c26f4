"""Run the Kafka backend's parts in one process: the orchestrator, the trigger router,
message correlation, the spec follower, given tools and PostgreSQL a worker, given
delivery settings and PostgreSQL the notifier, and given a deployed limits document the
admission processor. Each part can be left out to run them as separate processes.

The router runs only for a triggers topic whose partition count differs from the run
inputs': a co-partitioned triggers topic (the default) is read by the orchestrator."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from engine.kafka.admission import AdmissionProcessor
from engine.kafka.correlation import CorrelationProcessor
from engine.kafka.ledger import PostgresLedger
from engine.kafka.limits import LimitsFollower, read_limits
from engine.kafka.processor import KafkaEngine
from engine.kafka.router import TriggerRouter
from engine.kafka.schedules import ScheduleProcessor, check_partitions, schedule_new_topics
from engine.kafka.specs import SpecFollower
from engine.kafka.topics import Topics, deployed_topics, ensure_topics
from engine.kafka.worker import KafkaWorker
from engine.notify.kafka import KafkaNotifier
from engine.notify.postgres import PostgresDeliveryLedger
from engine.notify.settings import DeliverySettings
from engine.runtime.clock import Clock
from engine.worker import ToolRegistry

log = logging.getLogger("terranoha.kafka.serve")


@dataclass(frozen=True, slots=True)
class ServeOptions:
    bootstrap: str
    topics: Topics
    app: str = "terranoha"
    engine: bool = True
    router: bool = True
    correlation: bool = True
    """Run message correlation (matching published messages to keyed waits)."""
    postgres: str | None = None
    ledger_dsn: str | None = None
    """Where the workers keep their idempotency ledger (raw tool results, unredacted; see
    ``engine.kafka.ledger``); ``postgres`` when None."""
    registry: ToolRegistry | None = None
    concurrency: int = 8
    instance_id: str | None = None
    """Static consumer-group membership for the engine, the router, the worker and the
    notifier: give each process a stable id of its own (say the host or pod name) and a
    restart after a crash gets its partitions back at once, without waiting for the
    group's session timeout. Two live processes with one id fence each other; a stopped
    one keeps its partitions until the session timeout (10 s)."""
    notify: DeliverySettings | None = None
    """Delivery settings: run the notifier too (its ledger needs ``postgres``)."""
    state_dir: Path | None = None
    """Where the engine keeps each partition's local state store (finished runs on disk,
    a checkpoint that makes a restart read only the changelog's tail); None: no store,
    every restore reads the whole changelog and finished runs stay in memory."""
    schedules: bool = True
    """Run the schedule processor (``engine.kafka.schedules``)."""

    admission: bool = True
    """Run the admission processor (flow control) when a limits document is deployed;
    with none deployed at start, nothing of flow control runs."""


def default_state_dir() -> Path:
    """``$TERRANOHA_STATE_DIR``, else ``$XDG_STATE_HOME/terranoha``, else
    ``~/.local/state/terranoha``."""
    explicit = os.environ.get("TERRANOHA_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "terranoha"


@dataclass(slots=True)
class Running:
    """What ``serve`` started, for callers (tests, benchmarks) that look inside."""

    engine: KafkaEngine | None = None
    router: TriggerRouter | None = None
    correlation: CorrelationProcessor | None = None
    worker: KafkaWorker | None = None
    follower: SpecFollower | None = None
    notifier: KafkaNotifier | None = None
    admission: AdmissionProcessor | None = None
    schedules: ScheduleProcessor | None = None


async def serve(
    options: ServeOptions,
    stop: asyncio.Event,
    clock: Clock | None = None,
    ready: Callable[[Running], Awaitable[None]] | None = None,
) -> Running:
    """Run until ``stop`` is set; a clean stop finishes the batches in hand and leaves the
    consumer groups."""
    if options.notify is not None and options.postgres is None:
        raise ValueError(
            "the notifier keeps its delivery ledger in PostgreSQL: pass --postgres DSN"
        )
    await ensure_topics(options.bootstrap, options.topics.core_topics())
    topics = await deployed_topics(options.bootstrap, options.topics)
    if topics.partitions != options.topics.partitions:
        log.info(
            "run-keyed topics have %d partitions (not %d): using the broker's count",
            topics.partitions,
            options.topics.partitions,
        )
    options = replace(options, topics=topics)
    # The run engine writes to the schedule inputs whenever a scheduled run ends.
    await ensure_topics(options.bootstrap, schedule_new_topics(topics))
    await check_partitions(options.bootstrap, topics)
    running = Running()
    follower = SpecFollower(options.bootstrap, options.topics)
    await follower.start()
    running.follower = follower
    runners: list[Awaitable[None]] = [follower.follow(stop)]
    ledger: PostgresLedger | None = None
    limits: LimitsFollower | None = None
    if options.admission and (await read_limits(options.bootstrap, topics)).version > 0:
        limits = LimitsFollower(options.bootstrap, topics)
        await limits.catch_up()
        runners.append(limits.follow(stop))
    if options.engine:
        running.engine = KafkaEngine(
            options.bootstrap,
            options.topics,
            follower.registry,
            app=options.app,
            clock=clock,
            refresh_specs=follower.catch_up,
            instance_id=options.instance_id,
            state_dir=options.state_dir,
            flow=limits.current if limits is not None else None,
        )
        runners.append(running.engine.run(stop))
    if limits is not None:
        running.admission = AdmissionProcessor(
            options.bootstrap, topics, app=options.app, clock=clock, instance_id=options.instance_id
        )
        await running.admission.admission.ensure(options.bootstrap)
        runners.append(running.admission.run(stop))
    if options.correlation:
        running.correlation = CorrelationProcessor(
            options.bootstrap,
            options.topics,
            app=options.app,
            clock=clock,
            instance_id=options.instance_id,
        )
        runners.append(running.correlation.run(stop))
    if options.schedules:
        running.schedules = ScheduleProcessor(
            options.bootstrap,
            options.topics,
            app=options.app,
            clock=clock,
            instance_id=options.instance_id,
        )
        runners.append(running.schedules.run(stop))
    if options.router and topics.co_partitioned:
        log.info(
            "%s is co-partitioned with %s: the orchestrator reads the triggers, no router runs",
            topics.triggers,
            topics.inputs,
        )
    elif options.router:
        running.router = TriggerRouter(
            options.bootstrap,
            options.topics,
            app=options.app,
            clock=clock,
            instance_id=options.instance_id,
        )
        runners.append(running.router.run(stop))
    if options.registry is not None and options.registry.queues:
        ledger_dsn = options.ledger_dsn or options.postgres
        if ledger_dsn is None:
            raise ValueError(
                "workers keep their idempotency ledger in PostgreSQL: "
                "pass --ledger-dsn DSN (or --postgres DSN)"
            )
        if options.ledger_dsn is None:
            log.info(
                "the workers' ledger (raw tool results) shares the --postgres DSN; "
                "give it a role of its own with --ledger-dsn"
            )
        ledger = PostgresLedger(ledger_dsn, namespace=options.topics.deployment(options.app))
        await _opening(ledger.open(), runners, follower)
        running.worker = KafkaWorker(
            options.bootstrap,
            options.topics,
            options.registry,
            ledger,
            app=options.app,
            concurrency=options.concurrency,
            clock=clock,
            instance_id=options.instance_id,
        )
        runners.append(running.worker.run(stop))
    deliveries: PostgresDeliveryLedger | None = None
    if options.notify is not None and options.postgres is not None:
        deliveries = PostgresDeliveryLedger(
            options.postgres, deployment=options.topics.deployment(options.app)
        )
        await _opening(deliveries.open(), runners, follower)
        running.notifier = KafkaNotifier(
            options.bootstrap,
            options.topics,
            options.notify,
            deliveries,
            app=options.app,
            clock=clock,
            instance_id=options.instance_id,
        )
        runners.append(running.notifier.run(stop))
    if ready is not None:
        await ready(running)
    try:
        await asyncio.gather(*runners)
    finally:
        if running.engine is not None:
            stats = running.engine.stats
            log.info(
                "engine: %d inputs in %d transactions (%.1f each), %d events; %d aborted, "
                "%d unknown outcomes, %d fenced; %d restores (%d states, %d ms)",
                stats.inputs,
                stats.batches,
                stats.inputs / max(stats.batches, 1),
                stats.events,
                stats.aborted,
                stats.unknown_outcomes,
                stats.fenced,
                stats.restores,
                stats.restored_states,
                stats.restore_ms,
            )
        await follower.stop()
        if ledger is not None:
            await ledger.close()
        if deliveries is not None:
            await deliveries.close()
    return running


async def _opening(
    opened: Awaitable[None], runners: list[Awaitable[None]], follower: SpecFollower
) -> None:
    """Open a ledger; if it cannot be opened, undo what ``serve`` started before it (the
    spec follower, the parts not yet running) and raise."""
    try:
        await opened
    except BaseException:
        for runner in runners:
            if inspect.iscoroutine(runner) and (
                inspect.getcoroutinestate(runner) == inspect.CORO_CREATED
            ):
                runner.close()
        await follower.stop()
        raise
