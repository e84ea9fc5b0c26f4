"""``terranoha project``, ``projections rebuild`` and ``sla``: the read side.

On Kafka the projections live in PostgreSQL (``--postgres DSN``) and on the run timeline
and SLA metrics topics; on the embedded backend they live in the store file itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from engine.cli._backends import db_path
from engine.cli._process import (
    Health,
    configure_telemetry,
    health_of,
    health_option,
    otel_option,
    stop_on_signals,
)
from engine.cli._shared import CliError
from engine.kafka.specs import SpecFollower
from engine.kafka.topics import Topics, deployed_topics
from engine.observability.health import prometheus_meter_provider
from engine.observability.metrics import watch_projectors
from engine.observability.setup import Telemetry
from projections import postgres, query, sqlite
from projections.project import ProjectorStats
from projections.sla import render_sla
from projections.topics import TopicProjector


def _dsn(args: argparse.Namespace, required: bool = True) -> str | None:
    dsn: str | None = getattr(args, "postgres", None) or os.environ.get("TERRANOHA_POSTGRES")
    if dsn is None and required:
        raise CliError(
            "the Kafka backend projects into PostgreSQL: pass --postgres DSN "
            "(or set TERRANOHA_POSTGRES)"
        )
    return dsn


def _topics(args: argparse.Namespace) -> Topics:
    return Topics(prefix=args.topic_prefix, partitions=args.partitions)


def _progress_bar(what: str, out: TextIO) -> postgres.Progress:
    interactive = out is sys.stdout and sys.stdout.isatty()

    def show(done: int, total: int) -> None:
        width = 30
        filled = width if total <= 0 else min(width, width * done // total)
        line = f"\r{what} [{'#' * filled}{'.' * (width - filled)}] {done:,}/{max(total, done):,}"
        if interactive:
            out.write(line)
            out.flush()

    return show


def cmd_project(args: argparse.Namespace, out: TextIO) -> int:
    """Keep the projections up to date until SIGTERM; with ``--otel``, also translate the
    run events topic into telemetry."""
    health = health_of(args)
    telemetry = None
    if (getattr(args, "otel", "none") or "none") != "none":
        telemetry = configure_telemetry(args, health)
    if telemetry is None:
        return _project(args, out, health)
    if not args.kafka:
        telemetry.shutdown()
        raise CliError(
            "project --otel reads the Kafka run events topic; on the embedded "
            "store use `terranoha serve --db PATH --otel ...`"
        )
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def follow() -> None:
        try:
            loop.run_until_complete(_follow_events(args, telemetry, stop))
        except Exception as exc:
            print(f"error: telemetry from the run events topic stopped: {exc!r}", file=sys.stderr)
        finally:
            loop.close()

    thread = threading.Thread(target=follow, daemon=True, name="otel")
    thread.start()
    try:
        return _project(args, out, health, telemetry)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(15)
        telemetry.shutdown()


async def _follow_events(
    args: argparse.Namespace, telemetry: Telemetry, stop: asyncio.Event
) -> None:
    from engine.observability.follow import follow_events

    topics = await deployed_topics(args.kafka, _topics(args))
    await follow_events(args.kafka, topics, telemetry, stop, app=args.app)


def _project(
    args: argparse.Namespace,
    out: TextIO,
    health: Health | None = None,
    telemetry: Telemetry | None = None,
) -> int:
    if not args.kafka:
        db = db_path(args)
        if not db.exists():
            raise CliError(f"no store at {db}; pass --db PATH")

        async def follow_embedded() -> None:
            stop = stop_on_signals()
            if health is not None:
                health.start()
                health.readiness.started = True
            out.write(f"projecting {db}\n")
            out.flush()
            try:
                await sqlite.follow_store(db, stop)
            finally:
                if health is not None:
                    health.stop()

        asyncio.run(follow_embedded())
        return 0
    dsn = _dsn(args)
    assert dsn is not None

    async def follow_kafka() -> None:
        from engine.kafka.readiness import ACCEPTABLE_LAG, stream_check

        stop = stop_on_signals()
        if health is not None:
            health.start()
        topics = await deployed_topics(args.kafka, _topics(args))
        follower = SpecFollower(args.kafka, topics)
        await follower.start()
        parts = ["postgres"] + ([] if args.no_topics else ["timeline and SLA topics"])
        out.write(f"projecting {topics.events} into {', '.join(parts)}\n")
        out.flush()
        tables = postgres.PostgresProjector(args.kafka, topics, dsn, specs=follower.registry)
        reading = asyncio.Event()

        async def tables_ready() -> None:
            reading.set()

        runners = [follower.follow(stop), tables.run(stop, tables_ready)]
        watched = {"postgres": tables.stats}

        def tables_check() -> str | None:
            if not reading.is_set():
                return "reading its stored offsets"
            behind = tables.behind()
            unknown = sorted(p for p, lag in behind.items() if lag is None)
            if unknown:
                return f"waiting for the first fetch of {topics.events} partition(s) {unknown}"
            lagging = {
                p: lag for p, lag in behind.items() if lag is not None and lag > ACCEPTABLE_LAG
            }
            if lagging:
                return "catching up: " + ", ".join(
                    f"{topics.events}/{p} {lag} records behind"
                    for p, lag in sorted(lagging.items())
                )
            return None

        if health is not None:
            health.readiness.add("postgres", tables_check)
        if not args.no_topics:
            projector = TopicProjector(args.kafka, topics, app=args.app, specs=follower.registry)
            runners.append(projector.run(stop))
            watched["topics"] = projector.stats
            if health is not None:
                health.readiness.add("topics", stream_check(projector.processor))
        if health is not None:
            provider = telemetry.meter_provider if telemetry is not None else None
            watch_projectors(provider or prometheus_meter_provider(health.registry), watched)
            health.readiness.started = True
        try:
            await asyncio.gather(*runners)
        finally:
            await follower.stop()
            if health is not None:
                health.stop()

    asyncio.run(follow_kafka())
    return 0


def cmd_rebuild(args: argparse.Namespace, out: TextIO) -> int:
    """Drop the projections and fold the whole log again."""
    bar = _progress_bar("rebuilding", out)
    if not args.kafka:
        db = db_path(args)
        if not db.exists():
            raise CliError(f"no store at {db}; pass --db PATH")
        events = sqlite.rebuild_store(db, progress=bar)
        out.write(f"\nrebuilt the projections of {db} from {events:,} events\n")
        return 0
    dsn = _dsn(args)
    assert dsn is not None

    async def rebuild() -> ProjectorStats:
        topics = await deployed_topics(args.kafka, _topics(args))
        follower = SpecFollower(args.kafka, topics)
        await follower.start()
        try:
            return await postgres.rebuild(
                args.kafka, topics, dsn, progress=bar, specs=follower.registry
            )
        finally:
            await follower.stop()

    stats = asyncio.run(rebuild())
    out.write(f"\nrebuilt the PostgreSQL projections: {stats}\n")
    return 0


def cmd_sla(args: argparse.Namespace, out: TextIO) -> int:
    target: str | Path
    dsn = _dsn(args, required=False)
    if args.postgres or (dsn and not args.db):
        assert dsn is not None
        target = dsn
    else:
        target = db_path(args)
        if not Path(target).exists():
            raise CliError(f"no store at {target}; pass --db PATH or --postgres DSN")
        sqlite.project_store(target)
    rows = query.sla(target, workflow=args.workflow, tenant=args.tenant, window=args.window)
    out.write(render_sla(rows) + "\n")
    return 0


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    backend_options: Callable[[argparse.ArgumentParser], None],
) -> None:
    """``project``, ``projections rebuild`` and ``sla``, each with ``backend_options``."""
    add = backend_options
    p = sub.add_parser(
        "project",
        help="keep the projections up to date until stopped",
        description="project the run log into PostgreSQL and the projection "
        "topics (Kafka), or into the store file (embedded)",
    )
    add(p)
    p.add_argument("--postgres", help="PostgreSQL DSN (default $TERRANOHA_POSTGRES)")
    p.add_argument(
        "--no-topics",
        action="store_true",
        help="do not write the run timeline and SLA metrics topics",
    )
    otel_option(p)
    health_option(p)
    p.set_defaults(fn=cmd_project)

    proj = sub.add_parser("projections", help="manage the projections")
    proj_sub = proj.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = proj_sub.add_parser("rebuild", help="drop the projections and rebuild them from the log")
    add(p)
    p.add_argument("--postgres", help="PostgreSQL DSN (default $TERRANOHA_POSTGRES)")
    p.set_defaults(fn=cmd_rebuild)

    p = sub.add_parser("sla", help="SLA figures per workflow, tenant and time window")
    add(p)
    p.add_argument("--postgres", help="read the PostgreSQL projections at this DSN")
    p.add_argument("--workflow")
    p.add_argument("--tenant")
    p.add_argument("--window", default="1h", help="bucket width, e.g. 1m, 1h, 1d")
    p.set_defaults(fn=cmd_sla)
