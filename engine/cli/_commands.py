"""The bodies of the ``terranoha`` commands. Each takes the parsed arguments and the
output stream and returns the exit code; the backend (``--db`` or ``--kafka``) is
chosen by ``open_backend``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

from engine.cli._api_client import api_url
from engine.cli._api_client import post as api_post
from engine.cli._backends import (
    Backend,
    KafkaBackend,
    db_path,
    kafka_topics,
    open_backend,
    processor_lock,
)
from engine.cli._notify import delivery_settings, postgres_dsn
from engine.cli._process import (
    Health,
    configure_logging,
    configure_telemetry,
    health_of,
    stop_on_signals,
)
from engine.cli._shared import (
    CliError,
    is_spec_file,
    json_arg,
    load_spec_file,
    print_state,
)
from engine.core.commands import CancelRun, Command, DecideApproval, DeliverSignal
from engine.core.events import CommandRejected, CommandRejectedV2, Event
from engine.core.evolve import fold
from engine.core.records import Trigger
from engine.core.spec import WorkflowSpec
from engine.core.state import RunState, RunStatus, Waiting
from engine.embedded import EmbeddedEngine, EmbeddedWorker
from engine.embedded.schedules import EmbeddedSchedules
from engine.notify import DeliverySettings, EmbeddedNotifier
from engine.observability.metrics import watch_counts
from engine.observability.setup import Telemetry, kafka_lag
from engine.runtime.redaction import PolicyBook, redact_events
from engine.runtime.replay import states, to_jsonable, verify
from engine.runtime.specs import SpecRegistry
from engine.runtime.starts import start_conflict
from engine.worker import load_worker_modules
from projections.postgres import timeline_from_postgres
from projections.timeline import Timeline, build_timeline, render_timeline, timeline_view
from projections.views import redacted_view

IN_PROGRESS = frozenset({RunStatus.PENDING, RunStatus.RUNNING, RunStatus.RETRY})
"""What ``run --wait`` waits out, with a sleep: a run in any other state needs someone
(an approver, a signal) or has ended."""

UNSUCCESSFUL = frozenset({RunStatus.FAILED, RunStatus.CANCELLED})

# Exit codes (the README's table): 2 is any error (``main``), 3 a replay divergence.
REFUSED = 1
"""A command was refused, or the run it started has failed or was cancelled."""
WAIT_TIMED_OUT = 4
KEY_CONFLICT = 5
"""The idempotency key names a run started with another input (the API's 409)."""


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
    health = health_of(args)
    telemetry = configure_telemetry(args, health)
    try:
        if args.kafka:
            return asyncio.run(_serve_kafka(args, registry, out, telemetry, notify, health))
        db = db_path(args)
        with processor_lock(db, wait=False) as held:
            if not held:
                raise CliError(f"another process is already serving {db}")
            out.write(f"serving {db}; tools: {', '.join(registry.queues) or 'none'}\n")
            out.flush()
            return asyncio.run(_serve(db, registry, args.concurrency, telemetry, notify, health))
    finally:
        if telemetry is not None:
            telemetry.shutdown()


async def _serve_kafka(
    args: argparse.Namespace,
    registry: Any,
    out: TextIO,
    telemetry: Telemetry | None = None,
    notify: DeliverySettings | None = None,
    health: Health | None = None,
) -> int:
    from engine.kafka.readiness import stream_check, worker_check
    from engine.kafka.serve import Running, ServeOptions, default_state_dir, serve

    stop = stop_on_signals()
    if health is not None:
        health.start()  # alive (and not ready) while the topics are checked
    options = ServeOptions(
        bootstrap=args.kafka,
        topics=kafka_topics(args),
        app=args.app,
        engine=not args.no_engine,
        router=not args.no_router,
        correlation=not args.no_correlation,
        postgres=args.postgres or os.environ.get("TERRANOHA_POSTGRES"),
        ledger_dsn=args.ledger_dsn,
        registry=registry,
        concurrency=args.concurrency,
        instance_id=args.instance_id,
        notify=notify,
        admission=not args.no_admission,
        state_dir=Path(args.state_dir) if args.state_dir else default_state_dir(),
    )

    async def ready(running: Running) -> None:
        if telemetry is not None and running.engine is not None:
            engine = running.engine
            telemetry.bind(
                running.follower.registry if running.follower else engine.specs, engine.state
            )
            telemetry.watch_lag(kafka_lag(engine))
            engine.on_committed = telemetry.observe
        if (
            telemetry is not None
            and telemetry.meter_provider is not None
            and running.worker is not None
        ):
            worker = running.worker
            watch_counts(
                telemetry.meter_provider,
                "terranoha.worker.tasks",
                "{task}",
                "Tasks this worker took: tool called, answered from the ledger, "
                "dropped past their deadline, or not a task",
                "outcome",
                lambda: {
                    "called": worker.calls,
                    "from_ledger": worker.answered_from_ledger,
                    "expired": worker.expired,
                    "undecodable": worker.undecodable,
                },
            )
        if health is not None:
            if running.engine is not None:
                health.readiness.add("engine", stream_check(running.engine))
            if running.router is not None:
                health.readiness.add("router", stream_check(running.router))
            if running.worker is not None:
                health.readiness.add("worker", worker_check(running.worker))
            health.readiness.started = True
        parts = [
            name
            for name in ("engine", "router", "correlation", "worker", "notifier", "schedules")
            if getattr(running, name) is not None
        ]
        out.write(
            f"serving kafka {args.kafka} ({', '.join(parts)}); "
            f"tools: {', '.join(registry.queues) or 'none'}\n"
        )
        out.flush()

    try:
        await serve(options, stop, ready=ready)
    finally:
        if health is not None:
            health.stop()
    return 0


async def _serve(
    db: Path,
    registry: Any,
    concurrency: int,
    telemetry: Telemetry | None = None,
    notify: DeliverySettings | None = None,
    health: Health | None = None,
) -> int:
    stop = stop_on_signals()
    engine = EmbeddedEngine(db)
    if health is not None:
        health.start()  # the store is one file: ready as soon as it is open
        health.readiness.started = True
    if telemetry is not None:
        telemetry.bind(engine.specs, engine.cache.get)
        engine.on_committed = telemetry.observe
    schedules = EmbeddedSchedules(db)
    loops = [asyncio.create_task(engine.run(stop)), asyncio.create_task(schedules.run(stop))]
    worker = None
    if registry.queues:
        worker = EmbeddedWorker(db, registry, concurrency=concurrency)
        loops.append(asyncio.create_task(worker.run(stop)))
    if notify is not None:
        loops.append(asyncio.create_task(EmbeddedNotifier(db, notify).run(stop)))
    try:
        await asyncio.gather(*loops)
    finally:
        if health is not None:
            health.stop()
    engine.close()
    schedules.close()
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
            raise CliError(
                f"workflow {workflow!r} is not deployed; deploy it with "
                "`terranoha workflows deploy SPEC` or pass the spec file"
            )
        key = args.key or str(uuid.uuid4())
        trigger = Trigger(
            workflow=workflow,
            version=version,
            tenant=args.tenant,
            idempotency_key=key,
            input=data,
            requested_by=args.as_user.strip(),
            priority=args.priority,
            correlation_id=args.correlation_id or key,
        )
        started = backend.start(trigger)
        run_id, state = started.run_id, started.state
        out.write(f"{run_id}\n")
        conflict = start_conflict(trigger, state) if started.existed else None
        if conflict is not None:
            print_state(state, out)
            print(
                f"error: run {run_id} already exists for key {key!r} of tenant "
                f"{args.tenant!r} and was started with {conflict}; the same key always "
                "gives the same run: use another --key for a new run",
                file=sys.stderr,
            )
            return KEY_CONFLICT
        if args.wait is not None:
            return _wait(backend, run_id, args.wait, out)
        if state is None:
            out.write(f"{backend.queued()}\n")
            return 0
        print_state(state, out)
        return _outcome(state)


def _outcome(state: RunState) -> int:
    """The exit code for a run the command started or found: REFUSED if it did not go
    well, saying why on stderr."""
    if state.status not in UNSUCCESSFUL:
        return 0
    print(f"error: run {state.run_id} is {state.status.value}", file=sys.stderr)
    return REFUSED


def _in_progress(state: RunState | None) -> bool:
    if state is None or state.status in IN_PROGRESS:
        return True
    return state.current is not None and state.current.waiting in (Waiting.TIMER, Waiting.SLOT)


def _wait(backend: Backend, run_id: str, seconds: float, out: TextIO) -> int:
    """Poll the run until it leaves Pending/Running/Retry and any sleep, or ``seconds``
    pass. On the embedded store with no server, the polling fires the due timers."""
    deadline = time.monotonic() + seconds
    state = backend.state(run_id)
    while _in_progress(state) and time.monotonic() < deadline:
        time.sleep(0.2)
        backend.advance()
        state = backend.state(run_id)
    if state is None:
        out.write(f"{backend.queued()}\n")
    else:
        print_state(state, out)
    if state is None or _in_progress(state):
        where = state.status.value if state is not None else "not started"
        print(f"error: run {run_id} is still {where} after {seconds:g}s", file=sys.stderr)
        return WAIT_TIMED_OUT
    return _outcome(state)


def cmd_approve(args: argparse.Namespace, out: TextIO) -> int:
    url = api_url(args.api)
    if url is not None:
        return _approve_through_api(args, url, out)
    if args.kafka:
        raise CliError(
            "on Kafka a decision goes through the API, which verifies who makes "
            "it: pass --api URL (or set $TERRANOHA_API) with an API key in "
            "$TERRANOHA_API_KEY"
        )
    if not args.as_user:
        raise CliError(
            "name the approver with --as USER (the local operator decides for "
            "them on the embedded store)"
        )
    with open_backend(args) as backend:
        state = backend.run(args.run)
        roles = tuple(args.role or ())
        if not roles and state.current is not None and state.current.approval is not None:
            # A local operator acting on the command line speaks for the groups asked.
            roles = state.current.approval.approvers
        command = DecideApproval(
            command_id=str(uuid.uuid4()),
            run_id=state.run_id,
            tenant=state.tenant,
            correlation_id=state.correlation_id,
            step=args.step,
            approver=args.as_user.strip(),
            roles=roles,
            approve=not args.reject,
            comment=args.comment,
        )
        return _report_command(backend, command, out)


def _approve_through_api(args: argparse.Namespace, url: str, out: TextIO) -> int:
    """The decision as the API key's subject, for its groups: no --as, no --role."""
    if args.as_user or args.role:
        raise CliError(
            "with --api the approver and its groups are those of the API key; drop --as and --role"
        )
    status, doc = api_post(
        url,
        f"/v1/approvals/{args.run}/{args.step}",
        {"approve": not args.reject, "comment": args.comment},
    )
    if status >= 400:
        out.write(f"refused: {doc.get('detail', '')}\n")
        return REFUSED
    out.write(", ".join(doc.get("events") or ()) + "\n" if doc.get("events") else "queued\n")
    run = doc.get("run") or {}
    if run:
        out.write(
            f"{run.get('run_id')}  {run.get('workflow')} v{run.get('version')}  "
            f"{run.get('status')}\n"
        )
    return 0


def cmd_signal(args: argparse.Namespace, out: TextIO) -> int:
    data = json_arg(args.data, "--data")
    with open_backend(args) as backend:
        state = backend.run(args.run)
        command = DeliverSignal(
            command_id=str(uuid.uuid4()),
            run_id=state.run_id,
            tenant=state.tenant,
            correlation_id=state.correlation_id,
            name=args.name,
            data=data,
        )
        return _report_command(backend, command, out)


def cmd_cancel(args: argparse.Namespace, out: TextIO) -> int:
    with open_backend(args) as backend:
        state = backend.run(args.run)
        command = CancelRun(
            command_id=str(uuid.uuid4()),
            run_id=state.run_id,
            tenant=state.tenant,
            correlation_id=state.correlation_id,
            reason=args.reason,
            by=args.as_user,
        )
        return _report_command(backend, command, out)


def _report_command(backend: Backend, command: Command, out: TextIO) -> int:
    events, state = backend.submit(command)
    for event in events or ():
        if event.TYPE == "CommandRejected":
            out.write(f"refused: {getattr(event, 'reason', '')}: {getattr(event, 'detail', '')}\n")
            print_state(state, out)
            return REFUSED
    out.write(", ".join(e.TYPE for e in events) + "\n" if events else "queued\n")
    print_state(state, out)
    return 0


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    with open_backend(args) as backend:
        state = backend.run(args.run)
        print_state(state, out, args.json, backend.specs() if args.json else ())
        stalled = backend.stalled(state)
    if stalled is not None:
        print(f"note: {stalled}", file=sys.stderr)
    return 0


def cmd_runs(args: argparse.Namespace, out: TextIO) -> int:
    with open_backend(args) as backend:
        found = backend.runs(args.status, args.limit + 1)
    for state in found[: args.limit]:
        print_state(state, out)
    if len(found) > args.limit:
        print(
            f"more runs exist than the {args.limit} most recent shown; pass --limit N for more",
            file=sys.stderr,
        )
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
            timeline = build_timeline(_redacted(backend.log(args.run).events, backend.specs()))
    if args.json:
        out.write(json.dumps(timeline_view(timeline), indent=2, default=str) + "\n")
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
    shown = _redacted(events, deployed)
    if args.json:
        doc: dict[str, Any] = {
            "run_id": run_id,
            "events": [
                {"seq": e.seq, "type": e.TYPE, "ts": e.ts, "status": s.status.value, **_refusal(e)}
                for e, s in zip(shown, steps, strict=True)
            ],
            "final": redacted_view(steps[-1], deployed) if steps else None,
        }
        if report is not None:
            doc["verify"] = {
                "ok": report.ok,
                "commands": report.commands,
                "divergence": to_jsonable(report.divergence),
            }
        out.write(json.dumps(doc, indent=2, default=str) + "\n")
    else:
        for event, state in zip(shown, steps, strict=True):
            step = getattr(event, "step", "") or getattr(event, "at_step", "") or ""
            line = f"{event.seq:>4}  {event.TYPE:<22}{step:<16}-> {state.status.value}"
            refusal = _refusal(event)
            if refusal:
                who = f" by {refusal['by']}" if refusal["by"] else ""
                line += (
                    f"  {refusal['command']}{who} refused: {refusal['reason']}: {refusal['detail']}"
                )
            out.write(line + "\n")
        out.write("\n" + render_timeline(build_timeline(shown)) + "\n")
        if report is not None:
            if report.ok:
                out.write(
                    f"\nverify: OK, {report.commands} commands re-decided, "
                    f"{report.events} events identical\n"
                )
            else:
                assert report.divergence is not None
                out.write("\nverify: DIVERGED\n" + report.divergence.describe() + "\n")
    return 0 if report is None or report.ok else 3


def _refusal(event: Event) -> dict[str, Any]:
    """What a ``CommandRejected`` says: the command, who sent it (version 2), why."""
    if not isinstance(event, CommandRejected):
        return {}
    by = event.by if isinstance(event, CommandRejectedV2) else ""
    return {"command": event.command_type, "by": by, "reason": event.reason, "detail": event.detail}


def cmd_dead_letters(args: argparse.Namespace, out: TextIO) -> int:
    with open_backend(args) as backend:
        for dead in backend.dead_letters():
            out.write(
                f"{dead.source}/{dead.partition}/{dead.offset}\t{dead.reason}\t{dead.detail}\n"
            )
    return 0
