"""``terranoha notify``: deliver notifications by the delivery settings, on its own or
(``serve --notify SETTINGS``) beside the engine."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import TextIO

from engine.cli._backends import db_path, kafka_topics
from engine.cli._process import configure_logging, stop_on_signals
from engine.cli._shared import CliError
from engine.notify import DeliverySettings, EmbeddedNotifier, NotifierStats, load_settings


def delivery_settings(
    args: argparse.Namespace, attribute: str = "notify"
) -> DeliverySettings | None:
    """The settings file named by ``--notify`` (or ``notify``'s argument), loaded and
    checked now: a bad file or a missing secret stops the command before anything runs."""
    path = getattr(args, attribute, None)
    return load_settings(path) if path else None


def postgres_dsn(args: argparse.Namespace, what: str) -> str:
    dsn: str | None = getattr(args, "postgres", None) or os.environ.get("TERRANOHA_POSTGRES")
    if not dsn:
        raise CliError(
            f"{what} keeps its delivery ledger in PostgreSQL on Kafka: pass "
            "--postgres DSN (or set $TERRANOHA_POSTGRES)"
        )
    return dsn


def describe(settings: DeliverySettings) -> list[str]:
    """What the settings send where, for ``--check``: names, hosts and addresses, never
    a secret or a URL's path."""
    lines = [
        f"webhook {name}: {endpoint.origin}, {len(endpoint.secrets)} secret(s), "
        f"timeout {endpoint.timeout} ms"
        for name, endpoint in settings.webhooks.items()
    ]
    if settings.smtp is not None:
        smtp = settings.smtp
        lines.append(
            f"smtp: {smtp.host}:{smtp.effective_port} ({smtp.tls.value}) from "
            f"{smtp.sender}" + (f" as {smtp.username}" if smtp.username else "")
        )
    for index, route in enumerate(settings.routes):
        when = [
            f"{name} in {', '.join(values)}"
            for name, values in (
                ("recipient", route.recipients),
                ("kind", route.kinds),
                ("tenant", route.tenants),
            )
            if values
        ]
        to = [f"webhook {name}" for name in route.webhooks] + route.email
        lines.append(
            f"route {index}: {' and '.join(when) or 'every notification'} -> {', '.join(to)}"
        )
    retry = settings.retry
    lines.append(
        f"retry: {retry.max_attempts} attempts, {retry.initial} ms doubling by "
        f"{retry.multiplier} up to {retry.max} ms, jitter {retry.jitter}; "
        f"Retry-After honoured up to {settings.max_retry_after} ms"
    )
    return lines


def cmd_notify(args: argparse.Namespace, out: TextIO) -> int:
    configure_logging(args.log_level)
    settings = delivery_settings(args, "settings")
    assert settings is not None
    if args.check:
        out.write(f"{args.settings}: valid\n")
        for line in describe(settings):
            out.write(f"  {line}\n")
        return 0
    if args.kafka:
        if args.once:
            raise CliError(
                "--once is for the embedded store; on Kafka the notifier runs until stopped"
            )
        return asyncio.run(_notify_kafka(args, settings, out))
    db = db_path(args)
    if not db.exists():
        raise CliError(f"no store at {db}; pass --db PATH")
    return asyncio.run(_notify_embedded(db, settings, args.once, out))


async def _notify_embedded(db: Path, settings: DeliverySettings, once: bool, out: TextIO) -> int:
    stop = stop_on_signals()
    notifier = EmbeddedNotifier(db, settings)
    if not once:
        out.write(f"delivering notifications from {db}\n")
        out.flush()
    await notifier.run(stop, once=once)
    out.write(summary(notifier.stats) + "\n")
    return 0


async def _notify_kafka(args: argparse.Namespace, settings: DeliverySettings, out: TextIO) -> int:
    from engine.kafka.topics import deployed_topics
    from engine.notify.kafka import KafkaNotifier
    from engine.notify.postgres import PostgresDeliveryLedger

    dsn = postgres_dsn(args, "the notifier")
    stop = stop_on_signals()
    topics = await deployed_topics(args.kafka, kafka_topics(args))
    ledger = PostgresDeliveryLedger(dsn, deployment=topics.deployment(args.app))
    await ledger.open()
    try:
        notifier = KafkaNotifier(
            args.kafka, topics, settings, ledger, app=args.app, instance_id=args.instance_id
        )
        out.write(
            f"delivering notifications from {topics.notifications} (group {notifier.group_id})\n"
        )
        out.flush()
        await notifier.run(stop)
    finally:
        await ledger.close()
    out.write(summary(notifier.stats) + "\n")
    return 0


def summary(stats: NotifierStats) -> str:
    return (
        f"{stats.notifications} notifications: {stats.delivered} delivered, "
        f"{stats.already_settled} already settled, {stats.dead_lettered} dead-lettered, "
        f"{stats.unrouted} matched no route; {stats.retries} retries"
    )
