"""The ``terranoha`` command.

Every command that reads or writes runs takes ``--db PATH`` (the embedded store; default
``$TERRANOHA_DB`` or ``terranoha.db``) or ``--kafka HOST:PORT`` (the Kafka backend, with
``--topic-prefix``). On the embedded store, commands that change a run append a command
to the run inputs and, if no ``terranoha serve`` holds the store, process it right away;
on Kafka they publish it and wait a few seconds for the orchestrator's answer.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, TextIO

from engine.cli._api import add_commands as add_api_commands
from engine.cli._commands import (
    cmd_approve,
    cmd_cancel,
    cmd_dead_letters,
    cmd_demo,
    cmd_deploy,
    cmd_replay,
    cmd_run,
    cmd_runs,
    cmd_serve,
    cmd_signal,
    cmd_status,
    cmd_timeline,
    cmd_topics_create,
    cmd_workflows_list,
)
from engine.cli._limits import add_commands as add_limits_commands
from engine.cli._messages import add_commands as add_message_commands
from engine.cli._notify import cmd_notify
from engine.cli._process import health_option, otel_option
from engine.cli._projections import add_commands
from engine.cli._schedules import add_commands as add_schedule_commands
from engine.cli._shared import CliError
from engine.core.errors import TerranohaError
from engine.core.state import RunStatus

__all__ = ["CliError", "build_parser", "main"]

Command = Callable[[argparse.Namespace, TextIO], int]


def _backend_options(p: argparse.ArgumentParser, kafka_only: bool = False) -> None:
    """``--db`` or ``--kafka`` (not both), and the Kafka settings."""
    if kafka_only:
        p.add_argument(
            "--kafka", metavar="HOST:PORT", required=True, help="the Kafka bootstrap server"
        )
    else:
        where = p.add_mutually_exclusive_group()
        where.add_argument(
            "--db", help="embedded store file (default $TERRANOHA_DB or terranoha.db)"
        )
        where.add_argument(
            "--kafka",
            metavar="HOST:PORT",
            help="use the Kafka backend at this bootstrap server (without it, the embedded store)",
        )
    p.add_argument(
        "--topic-prefix",
        default=os.environ.get("TERRANOHA_TOPIC_PREFIX", "terranoha"),
        help="prefix of the topic names (default $TERRANOHA_TOPIC_PREFIX or terranoha)",
    )
    p.add_argument(
        "--partitions",
        type=int,
        default=6,
        help="partitions of the run-keyed topics, when creating them",
    )
    p.add_argument(
        "--app", default="terranoha", help="application id: consumer groups and transactional ids"
    )
    p.add_argument(
        "--index",
        metavar="DSN",
        default=os.environ.get("TERRANOHA_INDEX"),
        help="Kafka: the PostgreSQL projections (`terranoha project`) whose event "
        "index finds a run's records by offset, for status, timeline, replay, "
        "approve, signal and cancel; without it they read the run's partition "
        "from its beginning (default $TERRANOHA_INDEX)",
    )


def _status(text: str) -> str:
    for status in RunStatus:
        if status.value.casefold() == text.strip().casefold():
            return status.value
    raise argparse.ArgumentTypeError(
        f"unknown status {text!r}; use one of {', '.join(s.value for s in RunStatus)}"
    )


EXIT_CODES = """exit codes: 0 done; 1 refused, or the run failed or was cancelled; 2 bad input or
an error (the message says what to fix); 3 replay --verify found a divergence; 4 run --wait
gave up; 5 the idempotency key names a run started with another input; 141 the reader of
the output went away (a closed pipe)"""


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or "The terranoha command."
    parser = argparse.ArgumentParser(
        prog="terranoha", description=doc.splitlines()[0], epilog=EXIT_CODES
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        parent: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        fn: Command,
        help_text: str,
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        _backend_options(p)
        return p

    p = sub.add_parser("demo", help="run the refund-agent demo on the embedded backend")
    p.add_argument("--db", help="embedded store file (default terranoha-demo.db)")
    p.set_defaults(fn=cmd_demo)

    p = add(sub, "serve", cmd_serve, "run the engine (and the tools of --workers) until stopped")
    p.add_argument("--workers", nargs="*", metavar="MODULE", help="modules defining @tool handlers")
    p.add_argument("--concurrency", type=int, default=8, help="tasks run at once per worker")
    p.add_argument(
        "--postgres",
        help="PostgreSQL DSN (default $TERRANOHA_POSTGRES): the "
        "notifier's delivery ledger, and the workers' ledger without --ledger-dsn",
    )
    p.add_argument(
        "--ledger-dsn",
        metavar="DSN",
        default=os.environ.get("TERRANOHA_LEDGER_DSN"),
        help="Kafka: PostgreSQL DSN for the workers' idempotency ledger, which keeps "
        "tool results unredacted (schema terranoha_ledger); give it a role of its "
        "own (default $TERRANOHA_LEDGER_DSN, else the --postgres DSN)",
    )
    p.add_argument("--no-engine", action="store_true", help="do not run the orchestrator")
    p.add_argument(
        "--no-admission",
        action="store_true",
        help="Kafka: do not run the admission processor (flow control; it runs "
        "only when a limits document is deployed)",
    )
    p.add_argument(
        "--no-router",
        action="store_true",
        help="do not run the trigger router (it runs only for a triggers topic "
        "whose partition count differs from the run inputs')",
    )
    p.add_argument(
        "--no-correlation",
        action="store_true",
        help="do not run message correlation (it matches published messages "
        "to the waits that name their key)",
    )
    p.add_argument(
        "--instance-id",
        default=os.environ.get("TERRANOHA_INSTANCE_ID"),
        help="Kafka: a stable id of this process (static group membership): "
        "restarted after a crash, it takes its partitions back at once instead of "
        "after the session timeout; one id per live process "
        "(default $TERRANOHA_INSTANCE_ID)",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="Kafka: where the engine keeps each partition's local state (finished "
        "runs on disk, and a checkpoint so that a restart reads only the tail of "
        "the state changelog); one per process, never shared (default "
        "$TERRANOHA_STATE_DIR, else $XDG_STATE_HOME/terranoha, else "
        "~/.local/state/terranoha)",
    )
    p.add_argument(
        "--notify",
        metavar="SETTINGS",
        help="also deliver notifications (approval requests, reminders, "
        "escalations) by this delivery settings file; on Kafka the delivery "
        "ledger needs --postgres",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("TERRANOHA_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="what serve logs on stderr: partitions acquired and released, "
        "restores, specs deployed and the totals at a clean stop at info; "
        "retries, dead letters and fencing at warning "
        "(default $TERRANOHA_LOG_LEVEL or info)",
    )
    otel_option(p)
    health_option(p)

    p = add(
        sub,
        "notify",
        cmd_notify,
        "deliver notifications by webhook and email until stopped (--once: those waiting now)",
    )
    p.add_argument("settings", metavar="SETTINGS", help="the delivery settings file (YAML)")
    p.add_argument(
        "--postgres",
        help="Kafka: PostgreSQL DSN for the delivery ledger (default $TERRANOHA_POSTGRES)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the settings, resolve their secrets and print the routes; send nothing",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="embedded store: deliver the notifications waiting now, then exit",
    )
    p.add_argument(
        "--instance-id",
        default=os.environ.get("TERRANOHA_INSTANCE_ID"),
        help="Kafka: a stable id of this process (static group membership), as "
        "for serve (default $TERRANOHA_INSTANCE_ID)",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("TERRANOHA_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="what notify logs on stderr: retries at info, dead letters and "
        "notifications no route matches at warning (default $TERRANOHA_LOG_LEVEL "
        "or info)",
    )

    topics = sub.add_parser("topics", help="create the Kafka topics")
    topics_sub = topics.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = topics_sub.add_parser("create", help="create the core topics that are missing (idempotent)")
    p.set_defaults(fn=cmd_topics_create)
    _backend_options(p, kafka_only=True)

    wf = sub.add_parser("workflows", help="deploy and list workflow specs")
    wf_sub = wf.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = add(wf_sub, "deploy", cmd_deploy, "validate and deploy a spec file")
    p.add_argument("spec")
    add(wf_sub, "list", cmd_workflows_list, "list deployed specs")

    p = add(sub, "run", cmd_run, "start a run of a spec file or a deployed workflow")
    p.add_argument("workflow", help="spec file (deployed first) or deployed workflow name")
    p.add_argument("--input", default="{}", help="run input as JSON")
    p.add_argument("--key", help="idempotency key (same key, same run)")
    p.add_argument(
        "--tenant",
        default="default",
        help="the tenant the run belongs to, part of its identity with the key (default default)",
    )
    p.add_argument(
        "--as",
        dest="as_user",
        default="cli",
        help="who requests the run (its requested_by; default cli): an approval "
        "that excludes the requester refuses this name",
    )
    p.add_argument(
        "--priority",
        type=int,
        default=0,
        help="the run's priority, recorded on the run (default 0)",
    )
    p.add_argument(
        "--correlation-id", help="the id the run's records and trace carry (default the key)"
    )
    p.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="wait until the run has ended or waits for someone (an approval, "
        "a signal), through retries and sleeps (exit 4 if it has not after "
        "SECONDS); on the embedded store without serve, fire due timers meanwhile",
    )

    p = add(sub, "approve", cmd_approve, "approve (or --reject) a step waiting for approval")
    p.add_argument("run")
    p.add_argument("step")
    p.add_argument(
        "--as",
        dest="as_user",
        help="embedded store: the approver (compared without case and "
        "surrounding spaces); with --api the approver is the key's subject",
    )
    p.add_argument(
        "--role",
        action="append",
        help="embedded store: a group the approver acts for (repeatable); "
        "without it, the command acts for the groups the approval asks for, as "
        "the local operator",
    )
    p.add_argument(
        "--api",
        metavar="URL",
        help="decide through the HTTP API at URL with the key in "
        "$TERRANOHA_API_KEY (default $TERRANOHA_API); required on Kafka",
    )
    p.add_argument("--reject", action="store_true")
    p.add_argument("--comment", default="")

    p = add(sub, "signal", cmd_signal, "deliver a named signal to a run")
    p.add_argument("run")
    p.add_argument("name")
    p.add_argument("--data", default="null", help="signal data as JSON")

    p = add(sub, "cancel", cmd_cancel, "cancel a run")
    p.add_argument("run")
    p.add_argument("--reason", default="cancelled from the command line")
    p.add_argument("--as", dest="as_user", default="cli")

    for name, fn, text in (
        ("status", cmd_status, "show a run's status"),
        ("timeline", cmd_timeline, "show a run's timeline (payloads redacted)"),
    ):
        p = add(sub, name, fn, text)
        p.add_argument("run")
        p.add_argument("--json", action="store_true")
    p.add_argument(
        "--postgres", metavar="DSN", help="read the timeline from the PostgreSQL projections"
    )

    p = add(sub, "replay", cmd_replay, "rebuild a run from its log; --verify re-decides it")
    p.add_argument("run")
    p.add_argument("--verify", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--at", type=int, metavar="SEQ", help="show the state after event SEQ")

    p = add(sub, "runs", cmd_runs, "list runs (on Kafka: reads the whole state changelog)")
    p.add_argument(
        "--status",
        type=_status,
        help=f"only runs in this status: {', '.join(s.value for s in RunStatus)} (any case)",
    )
    p.add_argument(
        "--limit", type=int, default=20, help="how many of the most recent runs (default 20)"
    )

    add(sub, "dead-letters", cmd_dead_letters, "list dead letters with their reasons")
    add_message_commands(sub, add)
    add_commands(sub, _backend_options)
    add_api_commands(sub, _backend_options)
    add_limits_commands(sub, _backend_options)
    add_schedule_commands(sub, _backend_options)
    return parser


BROKEN_PIPE = 141
"""128 + SIGPIPE: what a shell reports for a tool whose reader went away."""


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    stream = out or sys.stdout
    try:
        code: int = args.fn(args, stream)
        stream.flush()
        return code
    except TerranohaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `terranoha runs | head -1`: the reader has all it wanted. Stop quietly, and point
        # stdout at /dev/null so the flush at exit does not fail again.
        if stream is sys.stdout:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return BROKEN_PIPE


def _exit() -> NoReturn:
    sys.exit(main())
