"""``terranoha schedules``: create, list, show, pause, resume, trigger, backfill, delete.

On the embedded store a change is decided at once (with the runs it starts) unless a
``terranoha serve`` holds the store, which then decides it; on Kafka it is published to
the schedule inputs and the command waits for the schedule processor's answer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from engine.cli._backends import db_path, kafka_topics, processor_lock
from engine.cli._shared import CliError, json_arg, now_ms
from engine.core.schedule_records import (
    OverlapPolicy,
    ScheduleAdvanced,
    ScheduleCommandRejected,
    ScheduledRunBuffered,
    ScheduledRunCancelRequested,
    ScheduledRunEnded,
    ScheduledRunSkipped,
    ScheduledRunStarted,
    ScheduleEvent,
    ScheduleState,
    ScheduleTicksMissed,
)
from engine.runtime.schedule_service import ScheduleService
from engine.runtime.schedule_spec import (
    ScheduleSpecError,
    load_schedule,
    load_schedule_yaml,
    parse_time,
    schedule_to_data,
)

SHOWN_EVENTS = 30


@contextlib.contextmanager
def open_schedules(args: argparse.Namespace) -> Iterator[ScheduleService]:
    service: ScheduleService
    if args.kafka:
        from engine.kafka.schedules import KafkaScheduleService

        service = KafkaScheduleService(args.kafka, kafka_topics(args), app=args.app)
        try:
            yield service
        finally:
            service.close()
        return
    from engine.embedded.schedules import EmbeddedScheduleService

    db = db_path(args)
    with processor_lock(db, wait=False) as held:
        service = EmbeddedScheduleService(db, process=held)
        try:
            yield service
        finally:
            service.close()


def _spec_from_args(args: argparse.Namespace) -> Any:
    if args.file:
        if any(getattr(args, f) is not None for f in ("id", "workflow", "cron", "every")):
            raise CliError("give a schedule FILE or --id/--workflow/--cron/--every, not both")
        path = Path(args.file)
        if not path.exists():
            raise CliError(f"no schedule file {path}")
        return load_schedule_yaml(path.read_text())
    data: dict[str, Any] = {
        k: v
        for k, v in {
            "id": args.id,
            "workflow": args.workflow,
            "cron": args.cron,
            "interval": args.every,
            "timezone": args.timezone,
            "overlap": args.overlap,
            "catch_up_window": args.catch_up_window,
            "jitter": args.jitter,
            "tenant": args.tenant,
            "version": args.version,
        }.items()
        if v is not None
    }
    if args.input is not None:
        data["input"] = json_arg(args.input, "--input")
    if args.paused:
        data["paused"] = True
    return load_schedule(data)


def _outcome(
    events: Sequence[ScheduleEvent], out: TextIO, done: str, state: ScheduleState | None = None
) -> int:
    rejected = [e for e in events if isinstance(e, ScheduleCommandRejected)]
    for refusal in rejected:
        out.write(f"refused: {refusal.reason}: {refusal.detail}\n")
    if rejected:
        return 1
    for event in events:
        out.write(f"  {describe(event, state)}\n")
    out.write(f"{done}\n")
    return 0


def cmd_create(args: argparse.Namespace, out: TextIO) -> int:
    try:
        spec = _spec_from_args(args)
    except ScheduleSpecError as exc:
        raise CliError(str(exc)) from None
    with open_schedules(args) as service:
        events = service.create(spec)
        view = service.get(spec.schedule_id)
    if view is None:
        out.write(f"schedule {spec.schedule_id} queued (no processor has decided it yet)\n")
        return 0
    if not events and view.state.spec == spec:
        out.write(f"schedule {spec.schedule_id} exists already (unchanged)\n")
        return 0
    code = _outcome(events, out, f"schedule {spec.schedule_id} created", view.state)
    if code == 0:
        out.write(f"next: {_when(view.state.next_nominal, view.state)}\n")
    return code


def cmd_list(args: argparse.Namespace, out: TextIO) -> int:
    with open_schedules(args) as service:
        states = service.list_schedules()
    if not states:
        out.write("no schedules\n")
        return 0
    out.write(
        f"{'ID':<24} {'WORKFLOW':<20} {'WHEN':<22} {'STATUS':<7} {'STARTED':>7} "
        f"{'MISSED':>6}  NEXT\n"
    )
    for s in states:
        when = s.spec.cron or f"every {s.spec.interval // 1000}s"
        status = "paused" if s.paused else "active"
        out.write(
            f"{s.schedule_id:<24} {s.spec.workflow:<20} {when:<22} {status:<7} "
            f"{s.started:>7} {s.missed:>6}  {_when(s.next_nominal, s)}\n"
        )
    return 0


def cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    with open_schedules(args) as service:
        view = service.get(args.schedule)
    if view is None:
        raise CliError(f"no schedule {args.schedule!r}; list them with `terranoha schedules list`")
    s = view.state
    if args.json:
        json.dump(
            {
                "schedule": schedule_to_data(s.spec),
                "status": _status(s),
                "next_nominal": s.next_nominal,
                "running": [r.run_id for r in s.running],
                "buffered": s.buffered,
                "started": s.started,
                "skipped": s.skipped,
                "missed": s.missed,
                "events": [{"type": e.TYPE, "at": e.at, "text": describe(e)} for e in view.events],
            },
            out,
            indent=2,
        )
        out.write("\n")
        return 0
    out.write(f"schedule {s.schedule_id}: {_status(s)}\n")
    for key, value in schedule_to_data(s.spec).items():
        out.write(f"  {key}: {json.dumps(value) if key == 'input' else value}\n")
    out.write(f"next: {_when(s.next_nominal, s)}\n")
    out.write(f"started {s.started}, skipped {s.skipped}, missed {s.missed}")
    if s.buffered is not None:
        out.write(f", buffered {_when(s.buffered, s)}")
    out.write("\n")
    for run in s.running:
        out.write(f"running: {run.run_id} (nominal {_when(run.nominal, s)})\n")
    # The cursor's moves are bookkeeping; --json has them.
    events = [e for e in view.events if not isinstance(e, ScheduleAdvanced)]
    shown = events[-SHOWN_EVENTS:]
    out.write(f"events ({len(shown)} of {len(events)}, newest last):\n")
    for event in shown:
        out.write(f"  {_iso(event.at, 'UTC')}  {describe(event, s)}\n")
    return 0


def _simple(
    action: Callable[[ScheduleService, str], list[ScheduleEvent]], done: str
) -> Callable[[argparse.Namespace, TextIO], int]:
    def command(args: argparse.Namespace, out: TextIO) -> int:
        with open_schedules(args) as service:
            events = action(service, args.schedule)
            view = service.get(args.schedule)
        return _outcome(
            events, out, f"schedule {args.schedule} {done}", view.state if view else None
        )

    return command


cmd_pause = _simple(lambda s, i: s.pause(i, by="cli"), "paused")
cmd_resume = _simple(lambda s, i: s.resume(i, by="cli"), "resumed")
cmd_delete = _simple(lambda s, i: s.delete(i, by="cli"), "deleted")
cmd_trigger = _simple(lambda s, i: s.trigger(i, now_ms(), by="cli"), "triggered")


def cmd_backfill(args: argparse.Namespace, out: TextIO) -> int:
    try:
        start, end = parse_time(args.start), parse_time(args.end)
    except ValueError as exc:
        raise CliError(f"--from/--to: {exc}") from None
    with open_schedules(args) as service:
        events = service.backfill(args.schedule, start, end, by="cli")
        view = service.get(args.schedule)
    return _outcome(
        events, out, f"schedule {args.schedule} backfilled", view.state if view else None
    )


def _status(state: ScheduleState) -> str:
    return "deleted" if state.deleted else "paused" if state.paused else "active"


def _zone(state: ScheduleState | None) -> str:
    return state.spec.timezone if state is not None and state.spec.cron else "UTC"


def _iso(ms: int, zone: str) -> str:
    return datetime.fromtimestamp(ms / 1000, ZoneInfo(zone) if zone != "UTC" else UTC).isoformat(
        timespec="seconds"
    )


def _when(ms: int | None, state: ScheduleState | None = None) -> str:
    return "-" if ms is None else _iso(ms, _zone(state))


def describe(event: ScheduleEvent, state: ScheduleState | None = None) -> str:
    """One line for an event, nominal times in the schedule's time zone."""

    def w(ms: int | None) -> str:
        return _when(ms, state)

    if isinstance(event, ScheduledRunStarted):
        return f"started run {event.run_id} for {w(event.nominal)} ({event.reason.value})"
    if isinstance(event, ScheduledRunSkipped):
        return f"skipped {w(event.nominal)} ({event.reason.value})"
    if isinstance(event, ScheduledRunBuffered):
        return f"buffered {w(event.nominal)} until the running run ends"
    if isinstance(event, ScheduleTicksMissed):
        more = "+" if event.truncated else ""
        return (
            f"MISSED {event.count}{more} nominal time(s) {w(event.first)} .. "
            f"{w(event.last)} ({event.reason.value})"
        )
    if isinstance(event, ScheduledRunCancelRequested):
        return f"cancel requested for run {event.run_id} (overlap)"
    if isinstance(event, ScheduledRunEnded):
        return f"run {event.run_id} ended: {event.outcome}"
    if isinstance(event, ScheduleCommandRejected):
        return f"refused {event.command}: {event.reason}: {event.detail}"
    fields = {
        k: v
        for k, v in vars_of(event).items()
        if k in ("next_nominal", "start", "end", "count", "by") and v not in ("", None)
    }
    text = ", ".join(
        f"{k} {w(v) if k in ('next_nominal', 'start', 'end') else v}" for k, v in fields.items()
    )
    return f"{event.TYPE}{': ' + text if text else ''}"


def vars_of(event: ScheduleEvent) -> dict[str, Any]:
    return {name: getattr(event, name) for name in event.__dataclass_fields__}


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    backend_options: Callable[[argparse.ArgumentParser], None],
) -> None:
    top = sub.add_parser("schedules", help="cron and interval schedules that start runs")
    schedules = top.add_subparsers(dest="action", required=True, metavar="ACTION")

    def add(
        name: str, fn: Callable[[argparse.Namespace, TextIO], int], text: str, with_id: bool = True
    ) -> argparse.ArgumentParser:
        p = schedules.add_parser(name, help=text, description=text)
        p.set_defaults(fn=fn)
        if with_id:
            p.add_argument("schedule", metavar="ID")
        backend_options(p)
        return p

    p = add(
        "create", cmd_create, "create a schedule from a FILE (YAML) or from options", with_id=False
    )
    p.add_argument("file", nargs="?", metavar="FILE")
    p.add_argument("--id", help="the schedule id")
    p.add_argument("--workflow", help="the deployed workflow it starts")
    p.add_argument("--version", type=int, help="workflow version (default: latest)")
    p.add_argument("--cron", help="cron expression: 5 fields, or 6 with seconds first")
    p.add_argument("--every", metavar="DURATION", help="an interval instead, e.g. 15m")
    p.add_argument("--timezone", help="IANA time zone of the cron expression (default UTC)")
    p.add_argument("--input", help="run input as JSON")
    p.add_argument(
        "--overlap",
        choices=[o.value for o in OverlapPolicy],
        help="while a run is going: skip (default), buffer_one, allow_all, cancel_other",
    )
    p.add_argument(
        "--catch-up-window",
        metavar="DURATION",
        help="how late a nominal time may still run (default 1h)",
    )
    p.add_argument(
        "--jitter",
        metavar="DURATION",
        help="fire up to this much after each nominal time (deterministic)",
    )
    p.add_argument("--tenant", help="the tenant of its runs (default default)")
    p.add_argument("--paused", action="store_true", help="create it paused")
    add("list", cmd_list, "list schedules", with_id=False)
    p = add(
        "show",
        cmd_show,
        "show a schedule, its counts and its recent events (missed nominal times included)",
    )
    p.add_argument("--json", action="store_true")
    add(
        "pause",
        cmd_pause,
        "pause a schedule (its nominal times until resume are recorded as missed)",
    )
    add("resume", cmd_resume, "resume a paused schedule")
    add("trigger", cmd_trigger, "start a run now (the overlap policy applies)")
    p = add("backfill", cmd_backfill, "start a run for every nominal time in a range")
    p.add_argument(
        "--from",
        dest="start",
        required=True,
        metavar="TIME",
        help="ISO 8601 time (without an offset: UTC)",
    )
    p.add_argument(
        "--to", dest="end", required=True, metavar="TIME", help="ISO 8601 time, inclusive"
    )
    add("delete", cmd_delete, "delete a schedule (its runs keep going)")
