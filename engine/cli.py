"""The ``terranoha`` command.

Every command that reads or writes runs takes ``--db PATH`` (the embedded store; default
``$TERRANOHA_DB`` or ``terranoha.db``). Commands that change a run append a command to
the run inputs; if no ``terranoha serve`` holds the store, they process it right away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from engine.core.commands import CancelRun, Command, DecideApproval, DeliverSignal
from engine.core.errors import SpecError, TerranohaError
from engine.core.evolve import fold
from engine.core.policies import run_id_for
from engine.core.records import Trigger
from engine.core.spec import WorkflowSpec, load_spec_yaml
from engine.core.state import RunState, Waiting
from engine.embedded import EmbeddedEngine, EmbeddedWorker, Store
from engine.runtime.replay import state_view, states, to_jsonable, verify
from engine.runtime.specs import SpecRegistry
from engine.worker import load_worker_modules
from projections.timeline import build_timeline, render_timeline


class CliError(TerranohaError):
    """Bad input on the command line; the message says what to fix."""


def _now() -> int:
    return time.time_ns() // 1_000_000


def _db_path(args: argparse.Namespace) -> Path:
    return Path(args.db or os.environ.get("TERRANOHA_DB") or "terranoha.db")


def _json_arg(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{what} is not valid JSON ({exc.msg} at column {exc.colno}): {text!r}")\
            from None


@contextlib.contextmanager
def processor_lock(db: Path, wait: bool) -> Iterator[bool]:
    """The embedded store has one processor at a time. Yields whether we hold the lock."""
    handle = open(f"{db}.lock", "a+")  # noqa: SIM115 - held for the block
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            held = True
        except BlockingIOError:
            held = False
        yield held
    finally:
        handle.close()


def _open_store(args: argparse.Namespace, must_exist: bool = True) -> Store:
    path = _db_path(args)
    if must_exist and not path.exists():
        raise CliError(f"no store at {path}; pass --db PATH (or run `terranoha demo` first)")
    return Store(path)


def _resolve_run(store: Store, text: str) -> str:
    run_id = store.find_run(text)
    if run_id is None:
        raise CliError(f"no run matches {text!r} in {store.path}; list runs with "
                       "`terranoha runs`")
    return run_id


def _submit_and_settle(args: argparse.Namespace, records: Sequence[Command | Trigger],
                       run_id: str, out: TextIO) -> RunState | None:
    """Append the records; process them here unless a server holds the store."""
    db = _db_path(args)
    store = Store(db)
    store.append_inputs(records, _now())
    store.close()
    with processor_lock(db, wait=False) as held:
        if held:
            engine = EmbeddedEngine(db)
            engine.drain()
            state = engine.cache.get(run_id)
            engine.close()
            return state
    # A server is processing: give it a moment to pick the command up.
    deadline = time.monotonic() + 3.0
    store = Store(db)
    try:
        last = store.last_input()
        while time.monotonic() < deadline and store.offset() < last:
            time.sleep(0.05)
        return store.state(run_id)
    finally:
        store.close()


def _print_state(state: RunState | None, out: TextIO, as_json: bool = False) -> None:
    if state is None:
        out.write("run not found\n")
        return
    if as_json:
        out.write(json.dumps(state_view(state), indent=2, default=str) + "\n")
        return
    current = state.current
    where = ""
    if current is not None:
        where = f" at step {current.step}"
        if current.waiting is Waiting.APPROVAL and current.approval is not None:
            a = current.approval
            where += (f" (waiting for approval by {', '.join(a.approvers)}; "
                      f"{len(a.votes)}/{a.quorum} approvals)")
        elif current.waiting is Waiting.SIGNAL:
            where += f" (waiting for signal {current.signal!r})"
        elif current.waiting is Waiting.TASK:
            where += f" (task {current.phase} attempt {current.attempt} dispatched)"
        elif current.waiting is Waiting.RETRY:
            where += f" (retry after attempt {current.attempt})"
    out.write(f"{state.run_id}  {state.workflow} v{state.version}  {state.status.value}{where}\n")
    if state.error:
        out.write(f"error: {state.error.get('code')}: {state.error.get('message')}\n")


# ---------------------------------------------------------------------- commands


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from engine.demo.run import run_demo

    db = Path(args.db or "terranoha-demo.db")
    with processor_lock(db, wait=False) as held:
        if not held:
            raise CliError(f"{db} is being served by another process; stop it or use --db")
        return asyncio.run(run_demo(db, say=lambda line: print(line, file=out)))


def _topics(args: argparse.Namespace) -> Any:
    from engine.kafka.topics import Topics

    return Topics(prefix=args.topic_prefix, partitions=args.partitions)


def cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    registry = load_worker_modules(args.workers or [])
    if args.kafka:
        return asyncio.run(_serve_kafka(args, registry, out))
    db = _db_path(args)
    with processor_lock(db, wait=False) as held:
        if not held:
            raise CliError(f"another process is already serving {db}")
        out.write(f"serving {db}; tools: {', '.join(registry.queues) or 'none'}\n")
        out.flush()
        return asyncio.run(_serve(db, registry, args.concurrency))


async def _serve_kafka(args: argparse.Namespace, registry: Any, out: TextIO) -> int:
    from engine.kafka.serve import Running, ServeOptions, serve

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    options = ServeOptions(
        bootstrap=args.kafka, topics=_topics(args), app=args.app, engine=not args.no_engine,
        router=not args.no_router, postgres=args.postgres or os.environ.get("TERRANOHA_POSTGRES"),
        registry=registry, concurrency=args.concurrency)

    async def ready(running: Running) -> None:
        parts = [name for name in ("engine", "router", "worker")
                 if getattr(running, name) is not None]
        out.write(f"serving kafka {args.kafka} ({', '.join(parts)}); "
                  f"tools: {', '.join(registry.queues) or 'none'}\n")
        out.flush()

    await serve(options, stop, ready=ready)
    return 0


async def _serve(db: Path, registry: Any, concurrency: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    engine = EmbeddedEngine(db)
    loops = [asyncio.create_task(engine.run(stop))]
    worker = None
    if registry.queues:
        worker = EmbeddedWorker(db, registry, concurrency=concurrency)
        loops.append(asyncio.create_task(worker.run(stop)))
    await asyncio.gather(*loops)
    engine.close()
    if worker is not None:
        worker.close()
    return 0


def _load_spec_file(path: str) -> WorkflowSpec:
    file = Path(path)
    if not file.exists():
        raise CliError(f"no spec file {path}")
    return load_spec_yaml(file.read_text())


def cmd_deploy(args: argparse.Namespace, out: TextIO) -> int:
    spec = _load_spec_file(args.spec)
    store = _open_store(args, must_exist=False)
    try:
        new = store.deploy(spec, _now())
    finally:
        store.close()
    word = "deployed" if new else "already deployed (unchanged)"
    out.write(f"{spec.workflow} version {spec.version} {word}\n")
    return 0


def cmd_workflows_list(args: argparse.Namespace, out: TextIO) -> int:
    store = _open_store(args)
    for spec in store.specs():
        out.write(f"{spec.workflow}\tv{spec.version}\t{len(spec.steps)} steps\n")
    store.close()
    return 0


def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    data = _json_arg(args.input, "--input")
    workflow, version = args.workflow, 0
    if workflow.endswith((".yaml", ".yml")) or Path(workflow).exists():
        spec = _load_spec_file(workflow)
        store = _open_store(args, must_exist=False)
        try:
            store.deploy(spec, _now())
        finally:
            store.close()
        workflow, version = spec.workflow, spec.version
    else:
        store = _open_store(args)
        known = {s.workflow for s in store.specs()}
        store.close()
        if workflow not in known:
            raise CliError(f"workflow {workflow!r} is not deployed; deploy it with "
                           "`terranoha workflows deploy SPEC` or pass the spec file")
    key = args.key or str(uuid.uuid4())
    trigger = Trigger(workflow=workflow, version=version, tenant=args.tenant,
                      idempotency_key=key, input=data, requested_by=args.as_user,
                      priority=args.priority, correlation_id=args.correlation_id or key)
    run_id = run_id_for(args.tenant, key)
    state = _submit_and_settle(args, [trigger], run_id, out)
    out.write(f"{run_id}\n")
    _print_state(state, out)
    return 0


def cmd_approve(args: argparse.Namespace, out: TextIO) -> int:
    store = _open_store(args)
    run_id = _resolve_run(store, args.run)
    state = store.state(run_id)
    store.close()
    roles = tuple(args.role or ())
    if not roles and state is not None and state.current and state.current.approval:
        # A local operator acting on the command line speaks for the groups asked.
        roles = state.current.approval.approvers
    command = DecideApproval(command_id=str(uuid.uuid4()), run_id=run_id,
                             tenant=state.tenant if state else "default", step=args.step,
                             approver=args.as_user, roles=roles, approve=not args.reject,
                             comment=args.comment)
    return _report_command(args, command, run_id, out)


def cmd_signal(args: argparse.Namespace, out: TextIO) -> int:
    data = _json_arg(args.data, "--data")
    store = _open_store(args)
    run_id = _resolve_run(store, args.run)
    store.close()
    command = DeliverSignal(command_id=str(uuid.uuid4()), run_id=run_id, name=args.name,
                            data=data)
    return _report_command(args, command, run_id, out)


def cmd_cancel(args: argparse.Namespace, out: TextIO) -> int:
    store = _open_store(args)
    run_id = _resolve_run(store, args.run)
    store.close()
    command = CancelRun(command_id=str(uuid.uuid4()), run_id=run_id, reason=args.reason,
                        by=args.as_user)
    return _report_command(args, command, run_id, out)


def _report_command(args: argparse.Namespace, command: Command, run_id: str,
                    out: TextIO) -> int:
    _submit_and_settle(args, [command], run_id, out)
    store = _open_store(args)
    events = [e for e in store.events(run_id) if e.causation_id == command.command_id]
    state = store.state(run_id)
    store.close()
    for event in events:
        reason = getattr(event, "reason", "")
        if event.TYPE == "CommandRejected":
            out.write(f"refused: {reason}: {getattr(event, 'detail', '')}\n")
            _print_state(state, out)
            return 1
    out.write(", ".join(e.TYPE for e in events) + "\n" if events else "queued\n")
    _print_state(state, out)
    return 0


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    store = _open_store(args)
    state = store.state(_resolve_run(store, args.run))
    store.close()
    _print_state(state, out, args.json)
    return 0


def cmd_runs(args: argparse.Namespace, out: TextIO) -> int:
    store = _open_store(args)
    for run_id in store.run_ids(args.status, args.limit):
        _print_state(store.state(run_id), out)
    store.close()
    return 0


def cmd_timeline(args: argparse.Namespace, out: TextIO) -> int:
    store = _open_store(args)
    events = store.events(_resolve_run(store, args.run))
    store.close()
    timeline = build_timeline(events)
    if args.json:
        out.write(json.dumps(to_jsonable(timeline), indent=2, default=str) + "\n")
    else:
        out.write(render_timeline(timeline) + "\n")
    return 0


def cmd_replay(args: argparse.Namespace, out: TextIO) -> int:
    store = _open_store(args)
    run_id = _resolve_run(store, args.run)
    events = store.events(run_id)
    recorded = store.recorded_commands(run_id)
    specs = SpecRegistry(store.specs())
    store.close()
    if args.at is not None:
        upto = [e for e in events if e.seq <= args.at]
        if not upto:
            raise CliError(f"run {run_id} has no event at or before seq {args.at}")
        state = fold(upto)
        assert state is not None
        if args.json:
            out.write(json.dumps(state_view(state), indent=2, default=str) + "\n")
        else:
            out.write(f"state after seq {upto[-1].seq} ({upto[-1].TYPE}):\n")
            _print_state(state, out)
        return 0
    steps = states(events)
    report = verify(run_id, events, recorded, specs) if args.verify else None
    if args.json:
        doc: dict[str, Any] = {
            "run_id": run_id,
            "events": [{"seq": e.seq, "type": e.TYPE, "ts": e.ts,
                        "status": s.status.value} for e, s in zip(events, steps, strict=True)],
            "final": state_view(steps[-1]) if steps else None,
        }
        if report is not None:
            doc["verify"] = {"ok": report.ok, "commands": report.commands,
                             "divergence": to_jsonable(report.divergence)}
        out.write(json.dumps(doc, indent=2, default=str) + "\n")
    else:
        for event, state in zip(events, steps, strict=True):
            step = getattr(event, "step", "") or ""
            out.write(f"{event.seq:>4}  {event.TYPE:<22}{step:<16}-> {state.status.value}\n")
        out.write("\n" + render_timeline(build_timeline(events)) + "\n")
        if report is not None:
            if report.ok:
                out.write(f"\nverify: OK, {report.commands} commands re-decided, "
                          f"{report.events} events identical\n")
            else:
                assert report.divergence is not None
                out.write("\nverify: DIVERGED\n" + report.divergence.describe() + "\n")
    return 0 if report is None or report.ok else 3


def cmd_dead_letters(args: argparse.Namespace, out: TextIO) -> int:
    store = _open_store(args)
    for dead in store.dead_letters():
        out.write(f"{dead.source}/{dead.partition}/{dead.offset}\t{dead.reason}\t{dead.detail}\n")
    store.close()
    return 0


# ---------------------------------------------------------------------- parser


def _kafka_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kafka", metavar="HOST:PORT",
                   help="use the Kafka backend at this bootstrap server "
                   "(without it, the embedded store)")
    p.add_argument("--topic-prefix", default=os.environ.get("TERRANOHA_TOPIC_PREFIX",
                                                            "terranoha"))
    p.add_argument("--partitions", type=int, default=6,
                   help="partitions of the run-keyed topics, when creating them")
    p.add_argument("--app", default="terranoha",
                   help="application id: consumer groups and transactional ids")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="terranoha", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--db", help="embedded store file (default $TERRANOHA_DB or terranoha.db)")
        p.set_defaults(fn=fn)
        return p

    add("demo", cmd_demo, "run the refund-agent demo on the embedded backend")
    p = add("serve", cmd_serve, "run the engine (and the tools of --workers) until stopped")
    p.add_argument("--workers", nargs="*", metavar="MODULE", help="modules defining @tool handlers")
    p.add_argument("--concurrency", type=int, default=8, help="tasks run at once per worker")
    _kafka_options(p)
    p.add_argument("--postgres", help="PostgreSQL DSN for the workers' ledger "
                   "(default $TERRANOHA_POSTGRES)")
    p.add_argument("--no-engine", action="store_true", help="do not run the orchestrator")
    p.add_argument("--no-router", action="store_true", help="do not run the trigger router")

    wf = sub.add_parser("workflows", help="deploy and list workflow specs")
    wf_sub = wf.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = wf_sub.add_parser("deploy", help="validate and deploy a spec file")
    p.add_argument("spec")
    p.add_argument("--db")
    p.set_defaults(fn=cmd_deploy)
    p = wf_sub.add_parser("list", help="list deployed specs")
    p.add_argument("--db")
    p.set_defaults(fn=cmd_workflows_list)

    p = add("run", cmd_run, "start a run of a spec file or a deployed workflow")
    p.add_argument("workflow", help="spec file (deployed first) or deployed workflow name")
    p.add_argument("--input", default="{}", help="run input as JSON")
    p.add_argument("--key", help="idempotency key (same key, same run)")
    p.add_argument("--tenant", default="default")
    p.add_argument("--as", dest="as_user", default="cli", help="requester")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--correlation-id")

    p = add("approve", cmd_approve, "approve (or --reject) a step waiting for approval")
    p.add_argument("run")
    p.add_argument("step")
    p.add_argument("--as", dest="as_user", required=True, help="approver")
    p.add_argument("--role", action="append", help="approver group (repeatable)")
    p.add_argument("--reject", action="store_true")
    p.add_argument("--comment", default="")

    p = add("signal", cmd_signal, "deliver a named signal to a run")
    p.add_argument("run")
    p.add_argument("name")
    p.add_argument("--data", default="null", help="signal data as JSON")

    p = add("cancel", cmd_cancel, "cancel a run")
    p.add_argument("run")
    p.add_argument("--reason", default="cancelled from the command line")
    p.add_argument("--as", dest="as_user", default="cli")

    for name, fn, text in (("status", cmd_status, "show a run's status"),
                           ("timeline", cmd_timeline, "show a run's timeline")):
        p = add(name, fn, text)
        p.add_argument("run")
        p.add_argument("--json", action="store_true")

    p = add("replay", cmd_replay, "rebuild a run from its log; --verify re-decides it")
    p.add_argument("run")
    p.add_argument("--verify", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--at", type=int, metavar="SEQ", help="show the state after event SEQ")

    p = add("runs", cmd_runs, "list runs")
    p.add_argument("--status")
    p.add_argument("--limit", type=int, default=20)

    add("dead-letters", cmd_dead_letters, "list dead letters with their reasons")
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    stream = out or sys.stdout
    try:
        code: int = args.fn(args, stream)
        return code
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TerranohaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _exit() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    _exit()
