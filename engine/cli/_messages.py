"""``terranoha publish`` and ``terranoha messages``: events addressed by a business key."""

from __future__ import annotations

import argparse
import json
import uuid
from datetime import UTC, datetime
from typing import TextIO

from engine.cli._backends import open_backend
from engine.cli._shared import CliError, json_arg
from engine.core.correlation import DEFAULT_TTL_MS, MessageError, new_message, summarize
from engine.core.durations import format_duration, parse_duration

STATUSES = ("buffered", "delivered", "unmatched")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], add: object) -> None:
    """Register the commands; ``add`` is the CLI's parser factory (adds backend options)."""
    assert callable(add)
    p = add(
        sub,
        "publish",
        cmd_publish,
        "publish a message to the runs waiting for its name and correlation key",
    )
    p.add_argument("name", help="the message name a wait_event step waits for")
    p.add_argument(
        "--key", required=True, help="the correlation key (what the wait's key expression gave)"
    )
    p.add_argument("--data", default="null", help="message data as JSON")
    p.add_argument(
        "--ttl",
        default=format_duration(DEFAULT_TTL_MS),
        help="how long the message waits for a wait that names its key, e.g. "
        "30s, 1h; 0 delivers only to the waits open now (default 1h)",
    )
    p.add_argument(
        "--id",
        dest="message_id",
        help="message id: a second publish with the same id (same name and key, "
        "within an hour or the TTL) is the same message (default: a new UUID)",
    )
    p.add_argument("--tenant", default="default")

    p = add(
        sub,
        "messages",
        cmd_messages,
        "list published messages: buffered, delivered (to which runs) or unmatched",
    )
    p.add_argument("--status", choices=STATUSES, help="only messages with this status")
    p.add_argument("--name", help="only messages of this name")
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def _ttl(text: str) -> int:
    if text.strip() == "0":
        return 0
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise CliError(f"--ttl: {exc}") from None


def cmd_publish(args: argparse.Namespace, out: TextIO) -> int:
    data = json_arg(args.data, "--data")
    try:
        message = new_message(
            message_id=args.message_id or str(uuid.uuid4()),
            name=args.name,
            key=args.key,
            data=data,
            ttl_ms=_ttl(args.ttl),
            tenant=args.tenant,
        )
    except MessageError as exc:
        raise CliError(str(exc)) from None
    with open_backend(args) as backend:
        backend.publish(message)
    out.write(
        f"published message {message.message_id} ({message.name}, key "
        f"{message.key!r}, ttl {format_duration(message.ttl_ms)})\n"
    )
    return 0


def cmd_messages(args: argparse.Namespace, out: TextIO) -> int:
    with open_backend(args) as backend:
        messages = summarize(backend.message_events())
    for m in messages:
        if (args.status and m.status != args.status) or (args.name and m.name != args.name):
            continue
        if args.json:
            out.write(
                json.dumps(
                    {
                        "message_id": m.message_id,
                        "name": m.name,
                        "key": m.key,
                        "tenant": m.tenant,
                        "status": m.status,
                        "runs": m.runs,
                        "published_at": m.published_at,
                        "expires_at": m.expires_at,
                    }
                )
                + "\n"
            )
            continue
        when = datetime.fromtimestamp(m.published_at / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        runs = ", ".join(m.runs) if m.runs else "-"
        out.write(f"{when}\t{m.message_id}\t{m.name}\t{m.key}\t{m.status}\t{runs}\n")
    return 0
