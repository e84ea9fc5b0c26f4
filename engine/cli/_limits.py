"""``terranoha limits deploy|status|pause|resume``: the flow-control document.

On the embedded backend the documents and paused keys live in the store file; on Kafka on
the compacted limits topic (``engine.kafka.limits``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from engine.cli._backends import db_path, kafka_topics
from engine.cli._shared import CliError, now_ms
from engine.core import admission as ad
from engine.core.durations import format_duration
from engine.core.limits import LimitsDocument, check_key, load_limits_yaml, resolve
from engine.embedded.limits import LimitsStore
from engine.embedded.store import Store
from engine.kafka.admission import read_admission_states
from engine.kafka.limits import publish_limits, read_limits, set_paused
from engine.kafka.topics import deployed_topics


def _embedded(args: argparse.Namespace) -> LimitsStore:
    return LimitsStore(Store(db_path(args)))


def _key(text: str) -> str:
    try:
        return check_key(text)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def cmd_limits_deploy(args: argparse.Namespace, out: TextIO) -> int:
    file = Path(args.file)
    if not file.exists():
        raise CliError(f"no limits file {args.file}")
    document = load_limits_yaml(file.read_text())
    if args.kafka:
        version, new = asyncio.run(
            publish_limits(args.kafka, kafka_topics(args), document, app=args.app)
        )
    else:
        limits = _embedded(args)
        try:
            version, new = limits.deploy(document, now_ms())
        finally:
            limits.store.close()
    word = "deployed" if new else "already deployed (unchanged)"
    out.write(f"limits version {version} {word}: {len(document.rules)} rules\n")
    return 0


Read = tuple[int, LimitsDocument | None, dict[str, int], dict[str, ad.AdmissionState]]


def _read(args: argparse.Namespace) -> Read:
    if args.kafka:

        async def both() -> Read:
            topics = await deployed_topics(args.kafka, kafka_topics(args))
            deployed = await read_limits(args.kafka, topics)
            states = await read_admission_states(args.kafka, topics)
            return deployed.version, deployed.document, deployed.paused, states

        return asyncio.run(both())
    if not db_path(args).exists():
        return 0, None, {}, {}
    limits = _embedded(args)
    try:
        version, document = limits.latest()
        return version, document, limits.paused(), limits.admission.states()
    finally:
        limits.store.close()


def status_view(
    version: int,
    document: LimitsDocument | None,
    paused: dict[str, int],
    states: dict[str, ad.AdmissionState],
    now: int,
) -> dict[str, Any]:
    """What ``limits status --json`` prints: per key, the limits in force, whether it is
    paused, and what the admission core holds: tasks executing, requests queued and why,
    rate tokens left, budget spent and left, the breaker's state."""
    named = {r.key for r in document.rules} if document else set()
    keys = sorted(named | set(paused) | set(states))
    rows = []
    for key in keys:
        state = states.get(key)
        limits = (
            state.limits
            if state is not None and state.version >= version
            else resolve(document, key)
        )
        held = ad.hold(state, now) if state is not None else None
        spent = budget_left = None
        if state is not None and limits.budget is not None:
            spent = state.spent if now < state.window_end else 0.0  # a new window
            budget_left = limits.budget.amount - spent - state.reserved
        rows.append(
            {
                "key": key,
                "paused": key in paused,
                "executing": state.executing if state is not None else 0,
                "queued": len(state.queue) if state is not None else 0,
                "held": held.reason if held is not None else None,
                "rate_tokens": None
                if state is None or limits.rate is None
                else round(state.tokens(now), 3),
                "budget_spent": spent,
                "budget_left": budget_left,
                "breaker_state": None
                if limits.breaker is None
                else str(state.breaker if state is not None else ad.BreakerState.CLOSED),
                "concurrency": limits.concurrency,
                "rate": None
                if limits.rate is None
                else {
                    "count": limits.rate.count,
                    "period_ms": limits.rate.period_ms,
                    "burst": limits.burst or limits.rate.count,
                },
                "weight": limits.weight,
                "budget": None if limits.budget is None else asdict(limits.budget),
                "breaker": None if limits.breaker is None else asdict(limits.breaker),
            }
        )
    return {"version": version, "keys": rows}


def _line(row: dict[str, Any]) -> str:
    parts = []
    if row["paused"]:
        parts.append("PAUSED")
    if row["executing"] or row["queued"]:
        limit = f"/{row['concurrency']}" if row["concurrency"] is not None else ""
        parts.append(f"executing {row['executing']}{limit}, queued {row['queued']}")
    if row["held"]:
        parts.append(f"held ({row['held']})")
    if row["breaker_state"] not in (None, "closed"):
        parts.append(f"breaker {row['breaker_state']}")
    if row["concurrency"] is not None:
        parts.append(f"concurrency {row['concurrency']}")
    if row["rate"] is not None:
        rate = row["rate"]
        parts.append(
            f"rate {rate['count']}/{format_duration(rate['period_ms'])} burst {rate['burst']}"
        )
    if row["weight"] != 1.0:
        parts.append(f"weight {row['weight']:g}")
    if row["budget"] is not None:
        b = row["budget"]
        left = f", {row['budget_left']:g} left" if row["budget_left"] is not None else ""
        parts.append(
            f"budget {b['amount']:g} per {b['per']} ({b['timezone']}, "
            f"on exhausted {b['on_exhausted']}{left})"
        )
    if row["breaker"] is not None:
        parts.append(f"breaker at {row['breaker']['failure_rate']:.0%} failures")
    return f"{row['key']}\t{', '.join(parts) or 'no limit'}\n"


def cmd_limits_status(args: argparse.Namespace, out: TextIO) -> int:
    view = status_view(*_read(args), now=now_ms())
    if args.json:
        out.write(json.dumps(view, indent=2) + "\n")
        return 0
    if view["version"] == 0:
        out.write("no limits deployed")
    else:
        out.write(f"limits version {view['version']}")
    out.write("\n")
    for row in view["keys"]:
        out.write(_line(row))
    return 0


def _pause(args: argparse.Namespace, out: TextIO, paused: bool) -> int:
    key = _key(args.key)
    if args.kafka:
        changed = asyncio.run(
            set_paused(
                args.kafka,
                kafka_topics(args),
                key,
                paused,
                by=args.as_user,
                now=now_ms(),
                app=args.app,
            )
        )
    else:
        limits = _embedded(args)
        try:
            changed = (
                limits.pause(key, args.as_user, now_ms())
                if paused
                else limits.resume(key, now_ms())
            )
        finally:
            limits.store.close()
    word = "paused" if paused else "resumed"
    out.write(f"{key} {word}\n" if changed else f"{key} was {word} already\n")
    return 0


def cmd_limits_pause(args: argparse.Namespace, out: TextIO) -> int:
    return _pause(args, out, True)


def cmd_limits_resume(args: argparse.Namespace, out: TextIO) -> int:
    return _pause(args, out, False)


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    backend_options: Callable[[argparse.ArgumentParser], None],
) -> None:
    """``limits deploy|status|pause|resume``, each with ``backend_options``."""
    limits = sub.add_parser(
        "limits",
        help="flow control: concurrency, rate, budget and breaker limits per tool and tenant",
    )
    limits_sub = limits.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = limits_sub.add_parser(
        "deploy",
        help="validate and deploy a limits document (the next version, unless it is unchanged)",
    )
    backend_options(p)
    p.add_argument("file")
    p.set_defaults(fn=cmd_limits_deploy)
    p = limits_sub.add_parser("status", help="per key: the limits in force, paused or not")
    backend_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_limits_status)
    for name, fn, text in (
        ("pause", cmd_limits_pause, "hold every new grant on KEY"),
        ("resume", cmd_limits_resume, "let KEY's requests through again"),
    ):
        p = limits_sub.add_parser(name, help=text)
        backend_options(p)
        p.add_argument("key", metavar="KEY", help="a limit key, e.g. tool:llm.classify")
        p.add_argument("--as", dest="as_user", default="cli", help="who does it (default cli)")
        p.set_defaults(fn=fn)
