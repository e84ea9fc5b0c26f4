"""The bodies of the ``terranoha`` commands. Each takes the parsed arguments and the
output stream and returns the exit code; the backend (``--db`` or ``--kafka``) is
chosen by ``open_backend``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

from engine.cli._backends import (
    Backend,
    KafkaBackend,
    db_path,
    kafka_topics,
    open_backend,
    processor_lock,
)
from engine.cli._notify import delivery_settings, postgres_dsn
from engine.cli._shared import (
    CliError,
    configure_logging,
    is_spec_file,
    json_arg,
    load_spec_file,
    print_state,
    redacted_view,
    stop_on_signals,
)
from engine.core.commands import CancelRun, Command, DecideApproval, DeliverSignal
from engine.core.events import Event
from engine.core.evolve import fold
from engine.core.records import Trigger
from engine.core.spec import WorkflowSpec
from engine.core.state import RunStatus
from engine.embedded import EmbeddedEngine, EmbeddedWorker
from engine.notify import DeliverySettings, EmbeddedNotifier
from engine.observability.setup import Telemetry, TelemetryError, configure, kafka_lag
from engine.runtime.replay import states, to_jsonable, verify
from engine.runtime.specs import SpecRegistry
from engine.worker import load_worker_modules
from projections.postgres import timeline_from_postgres
from projections.redaction import PolicyBook, redact_events
from projections.timeline import Timeline, build_timeline, render_timeline

IN_PROGRESS = frozenset({RunStatus.PENDING, RunStatus.RUNNING, RunStatus.RETRY})
"""What ``run --wait`` waits out: a run in any other status needs no more from it."""

WAIT_TIMED_OUT = 4


# ---------------------------------------------------------------------- processes


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from engine.demo.run import run_demo

    db = Path(args.db or "terranoha-demo.db")
    with processor_lock(db, wait=False) as held:
        if not held:
            raise CliError(f"{db} is being served by another process; stop it or use --db")
        return asyncio.run(run_demo(db, say=lambda line: print(line, file=out)))


def cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    configure_logging(args.log_level)
    registry = load_worker_modules(args.workers or [])
    notify = delivery_settings(args)
    if notify is not None and args.kafka:
        postgres_dsn(args, "serve --notify")
    telemetry = _telemetry(args)
    try:
        if args.kafka:
            return asyncio.run(_serve_kafka(args, registry, out, telemetry, notify))
        db = db_path(args)
        with processor_lock(db, wait=False) as held:
            if not held:
                raise CliError(f"another process is already serving {db}")
            out.write(f"serving {db}; tools: {', '.join(registry.queues) or 'none'}\n")
            out.flush()
            return asyncio.run(_serve(db, registry, args.concurrency, telemetry, notify))
    finally:
        if telemetry is not None:
            telemetry.shutdown()


def cmd_project(args: argparse.Namespace, out: TextIO) -> int:
    """``project``; with ``--otel``, also run telemetry from the run events topic."""
    from engine.cli._projections import cmd_project as project

    telemetry = _telemetry(args)
    if telemetry is None:
        return project(args, out)
    if not args.kafka:
        telemetry.shutdown()
        raise CliError("project --otel reads the Kafka run events topic; on the embedded "
                       "store use `terranoha serve --db PATH --otel ...`")
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def follow() -> None:
        try:
            loop.run_until_complete(_follow_events(args, telemetry, stop))
        except Exception as exc:
            print(f"error: telemetry from the run events topic stopped: {exc!r}",
                  file=sys.stderr)
        finally:
            loop.close()

    thread = threading.Thread(target=follow, daemon=True, name="otel")
    thread.start()
    try:
        return project(args, out)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(15)
        telemetry.shutdown()


async def _follow_events(args: argparse.Namespace, telemetry: Telemetry,
                         stop: asyncio.Event) -> None:
    from engine.kafka.topics import deployed_topics
    from engine.observability.follow import follow_events

    topics = await deployed_topics(args.kafka, kafka_topics(args))
    await follow_events(args.kafka, topics, telemetry, stop, app=args.app)


def _telemetry(args: argparse.Namespace) -> Telemetry | None:
    """OpenTelemetry as ``--otel`` asks (None for ``none``)."""
    try:
        return configure(getattr(args, "otel", "none") or "none")
    except TelemetryError as exc:
        raise CliError(str(exc)) from exc


async def _serve_kafka(args: argparse.Namespace, registry: Any, out: TextIO,
                       telemetry: Telemetry | None = None,
                       notify: DeliverySettings | None = None) -> int:
    from engine.kafka.serve import Running, ServeOptions, serve

    stop = stop_on_signals()
    options = ServeOptions(
        bootstrap=args.kafka, topics=kafka_topics(args), app=args.app,
        engine=not args.no_engine, router=not args.no_router,
        postgres=args.postgres or os.environ.get("TERRANOHA_POSTGRES"),
        registry=registry, concurrency=args.concurrency, instance_id=args.instance_id,
        notify=notify)

    async def ready(running: Running) -> None:
        if telemetry is not None and running.engine is not None:
            engine = running.engine
            telemetry.bind(running.follower.registry if running.follower else engine.specs,
                           engine.state)
            telemetry.watch_lag(kafka_lag(engine))
            engine.on_committed = telemetry.observe
        parts = [name for name in ("engine", "router", "worker", "notifier")
                 if getattr(running, name) is not None]
        out.write(f"serving kafka {args.kafka} ({', '.join(parts)}); "
                  f"tools: {', '.join(registry.queues) or 'none'}\n")
        out.flush()

    await serve(options, stop, ready=ready)
    return 0


async def _serve(db: Path, registry: Any, concurrency: int,
                 telemetry: Telemetry | None = None,
                 notify: DeliverySettings | None = None) -> int:
    stop = stop_on_signals()
    engine = EmbeddedEngine(db)
    if telemetry is not None:
        telemetry.bind(engine.specs, engine.cache.get)
        engine.on_committed = telemetry.observe
    loops = [asyncio.create_task(engine.run(stop))]
    worker = None
    if registry.queues:
        worker = EmbeddedWorker(db, registry, concurrency=concurrency)
        loops.append(asyncio.create_task(worker.run(stop)))
    if notify is not None:
        loops.append(asyncio.create_task(EmbeddedNotifier(db, notify).run(stop)))
    await asyncio.gather(*loops)
    engine.close()
    if worker is not None:
        worker.close()
    return 0


def cmd_topics_create(args: argparse.Namespace, out: TextIO) -> int:
    backend = KafkaBackend(args)
    try:
        report = backend.create_topics(kafka_topics(args))
    finally:
        backend.close()
    for topic in report:
        word = "created" if topic.created else "exists "
        plural = "" if topic.partitions == 1 else "s"
        out.write(f"{word}  {topic.name} ({topic.partitions} partition{plural})\n")
    return 0


# ---------------------------------------------------------------------- workflows


def cmd_deploy(args: argparse.Namespace, out: TextIO) -> int:
    spec = load_spec_file(args.spec)
    with open_backend(args) as backend:
        new = backend.deploy(spec)
    word = "deployed" if new else "already deployed (unchanged)"
    out.write(f"{spec.workflow} version {spec.version} {word}\n")
    return 0


def cmd_workflows_list(args: argparse.Namespace, out: TextIO) -> int:
    with open_backend(args) as backend:
        for spec in backend.specs():
            out.write(f"{spec.workflow}\tv{spec.version}\t{len(spec.steps)} steps\n")
    return 0


# ---------------------------------------------------------------------- runs


def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    data = json_arg(args.input, "--input")
    workflow, version = args.workflow, 0
    with open_backend(args) as backend:
        if is_spec_file(workflow):
            spec = load_spec_file(workflow)
            backend.deploy(spec)
            workflow, version = spec.workflow, spec.version
        elif workflow not in {s.workflow for s in backend.specs()}:
            raise CliError(f"workflow {workflow!r} is not deployed; deploy it with "
                           "`terranoha workflows deploy SPEC` or pass the spec file")
        key = args.key or str(uuid.uuid4())
        trigger = Trigger(workflow=workflow, version=version, tenant=args.tenant,
                          idempotency_key=key, input=data, requested_by=args.as_user,
                          priority=args.priority, correlation_id=args.correlation_id or key)
        run_id, state = backend.start(trigger)
        out.write(f"{run_id}\n")
        if args.wait is not None:
            return _wait(backend, run_id, args.wait, out)
        if state is None:
            out.write(f"{backend.queued()}\n")
        else:
            print_state(state, out)
    return 0


def _wait(backend: Backend, run_id: str, seconds: float, out: TextIO) -> int:
    """Poll the run until it leaves Pending/Running/Retry, or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    state = backend.state(run_id)
    while (state is None or state.status in IN_PROGRESS) and time.monotonic() < deadline:
        time.sleep(0.2)
        state = backend.state(run_id)
    if state is None:
        out.write(f"{backend.queued()}\n")
    else:
        print_state(state, out)
    if state is None or state.status in IN_PROGRESS:
        where = state.status.value if state is not None else "not started"
        print(f"error: run {run_id} is still {where} after {seconds:g}s", file=sys.stderr)
        return WAIT_TIMED_OUT
    return 0


def cmd_approve(args: argparse.Namespace, out: TextIO) -> int:
    with open_backend(args) as backend:
        state = backend.run(args.run)
        roles = tuple(args.role or ())
        if not roles and state.current is not None and state.current.approval is not None:
            # A local operator acting on the command line speaks for the groups asked.
            roles = state.current.approval.approvers
        command = DecideApproval(command_id=str(uuid.uuid4()), run_id=state.run_id,
                                 tenant=state.tenant, correlation_id=state.correlation_id,
                                 step=args.step, approver=args.as_user, roles=roles,
                                 approve=not args.reject, comment=args.comment)
        return _report_command(backend, command, out)


def cmd_signal(args: argparse.Namespace, out: TextIO) -> int:
    data = json_arg(args.data, "--data")
    with open_backend(args) as backend:
        state = backend.run(args.run)
        command = DeliverSignal(command_id=str(uuid.uuid4()), run_id=state.run_id,
                                tenant=state.tenant, correlation_id=state.correlation_id,
                                name=args.name, data=data)
        return _report_command(backend, command, out)


def cmd_cancel(args: argparse.Namespace, out: TextIO) -> int:
    with open_backend(args) as backend:
        state = backend.run(args.run)
        command = CancelRun(command_id=str(uuid.uuid4()), run_id=state.run_id,
                            tenant=state.tenant, correlation_id=state.correlation_id,
                            reason=args.reason, by=args.as_user)
        return _report_command(backend, command, out)


def _report_command(backend: Backend, command: Command, out: TextIO) -> int:
    events, state = backend.submit(command)
    for event in events or ():
        if event.TYPE == "CommandRejected":
            out.write(f"refused: {getattr(event, 'reason', '')}: "
                      f"{getattr(event, 'detail', '')}\n")
            print_state(state, out)
            return 1
    out.write(", ".join(e.TYPE for e in events) + "\n" if events else "queued\n")
    print_state(state, out)
    return 0


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    with open_backend(args) as backend:
        print_state(backend.run(args.run), out, args.json,
                    backend.specs() if args.json else ())
    return 0


def cmd_runs(args: argparse.Namespace, out: TextIO) -> int:
    with open_backend(args) as backend:
        for state in backend.runs(args.status, args.limit):
            print_state(state, out)
    return 0


def _redacted(events: list[Event], specs: list[WorkflowSpec]) -> list[Event]:
    """What people see: payloads under the run's redaction policy (the log keeps all)."""
    return redact_events(events, PolicyBook(SpecRegistry(specs)))


def cmd_timeline(args: argparse.Namespace, out: TextIO) -> int:
    timeline: Timeline | None
    if args.postgres:
        timeline = timeline_from_postgres(args.postgres, args.run)
        if timeline is None:
            raise CliError(f"no run {args.run!r} in the PostgreSQL projections")
    else:
        with open_backend(args) as backend:
            timeline = build_timeline(_redacted(backend.log(args.run).events,
                                                backend.specs()))
    if args.json:
        out.write(json.dumps(to_jsonable(timeline), indent=2, default=str) + "\n")
    else:
        out.write(render_timeline(timeline) + "\n")
    return 0


def cmd_replay(args: argparse.Namespace, out: TextIO) -> int:
    with open_backend(args) as backend:
        log = backend.log(args.run)
        deployed = backend.specs()
        specs = SpecRegistry(deployed)
    run_id, events = log.run_id, log.events
    if args.at is not None:
        upto = [e for e in events if e.seq <= args.at]
        if not upto:
            raise CliError(f"run {run_id} has no event at or before seq {args.at}")
        state = fold(upto)
        assert state is not None
        if args.json:
            out.write(json.dumps(redacted_view(state, deployed), indent=2, default=str) + "\n")
        else:
            out.write(f"state after seq {upto[-1].seq} ({upto[-1].TYPE}):\n")
            print_state(state, out)
        return 0
    steps = states(events)
    report = verify(run_id, events, log.recorded, specs) if args.verify else None
    if args.json:
        doc: dict[str, Any] = {
            "run_id": run_id,
            "events": [{"seq": e.seq, "type": e.TYPE, "ts": e.ts,
                        "status": s.status.value} for e, s in zip(events, steps, strict=True)],
            "final": redacted_view(steps[-1], deployed) if steps else None,
        }
        if report is not None:
            doc["verify"] = {"ok": report.ok, "commands": report.commands,
                             "divergence": to_jsonable(report.divergence)}
        out.write(json.dumps(doc, indent=2, default=str) + "\n")
    else:
        for event, state in zip(events, steps, strict=True):
            step = getattr(event, "step", "") or ""
            out.write(f"{event.seq:>4}  {event.TYPE:<22}{step:<16}-> {state.status.value}\n")
        out.write("\n" + render_timeline(build_timeline(_redacted(events, deployed))) + "\n")
        if report is not None:
            if report.ok:
                out.write(f"\nverify: OK, {report.commands} commands re-decided, "
                          f"{report.events} events identical\n")
            else:
                assert report.divergence is not None
                out.write("\nverify: DIVERGED\n" + report.divergence.describe() + "\n")
    return 0 if report is None or report.ok else 3


def cmd_dead_letters(args: argparse.Namespace, out: TextIO) -> int:
    with open_backend(args) as backend:
        for dead in backend.dead_letters():
            out.write(f"{dead.source}/{dead.partition}/{dead.offset}\t{dead.reason}\t"
                      f"{dead.detail}\n")
    return 0
