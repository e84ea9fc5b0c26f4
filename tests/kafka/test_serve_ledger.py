"""``serve`` keeps the workers' ledger where ``--ledger-dsn`` says, on the real broker
and PostgreSQL, and the command line takes it from ``$TERRANOHA_LEDGER_DSN``."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from engine.cli import build_parser
from engine.kafka.serve import Running, ServeOptions, serve
from engine.kafka.topics import Topics, ensure_topics
from engine.worker.sdk import ToolRegistry

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def _registry() -> ToolRegistry:
    registry = ToolRegistry()
    registry.register("crm.lookup", lambda ctx: {"ok": True})
    return registry


def test_the_ledger_uses_its_own_dsn_and_falls_back_to_postgres(
    kafka_bootstrap: str, postgres_dsn: str, topics: Topics
) -> None:
    asyncio.run(ensure_topics(kafka_bootstrap, topics.task_topics(["crm.lookup"])))
    elsewhere = postgres_dsn.replace("terranoha:terranoha@", "no_such_role:wrong@", 1)
    assert elsewhere != postgres_dsn

    async def started(ledger_dsn: str | None) -> str:
        stop = asyncio.Event()
        seen: list[str] = []

        async def ready(running: Running) -> None:
            assert running.worker is not None
            seen.append(running.worker.ledger.dsn)
            stop.set()

        await serve(
            ServeOptions(
                bootstrap=kafka_bootstrap,
                topics=topics,
                app=topics.prefix,
                engine=False,
                router=False,
                postgres=postgres_dsn,
                ledger_dsn=ledger_dsn,
                registry=_registry(),
            ),
            stop,
            ready=ready,
        )
        return seen[0]

    assert asyncio.run(started(None)) == postgres_dsn
    # A ledger DSN of its own is the one used: here a role that does not exist, so the
    # worker cannot start, although --postgres is fine.
    with pytest.raises(psycopg.OperationalError, match="no_such_role"):
        asyncio.run(started(elsewhere))


def test_the_command_line_takes_the_ledger_dsn_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TERRANOHA_LEDGER_DSN", "postgresql://ledger@db/terranoha")
    args = build_parser().parse_args(["serve", "--kafka", "k:9092"])
    assert args.ledger_dsn == "postgresql://ledger@db/terranoha"
    args = build_parser().parse_args(["serve", "--kafka", "k:9092", "--ledger-dsn", "other"])
    assert args.ledger_dsn == "other"
