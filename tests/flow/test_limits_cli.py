"""``terranoha limits deploy|status|pause|resume`` on both backends: versions count up,
an unchanged document is not a new version, a bad one is refused with its paths, and a
paused key shows as paused until resumed."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.kafka.topics import delete_topics
from tests.cli.conftest import Cli
from tests.infra import kafka_bootstrap

DOC = """\
limits: v1
rules:
  - key: tool:llm.classify
    concurrency: 8
    rate: 50/s
  - key: tenant:*
    concurrency: 20
  - key: tenant:acme
    weight: 3
"""


@pytest.fixture(params=["embedded", "kafka"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[str]]:
    if request.param == "embedded":
        yield ["--db", str(tmp_path / "store.db")]
        return
    bootstrap, prefix = kafka_bootstrap(), f"l{uuid.uuid4().hex[:10]}"
    yield ["--kafka", bootstrap, "--topic-prefix", prefix]
    asyncio.run(delete_topics(bootstrap, prefix))


def test_deploys_count_versions_and_an_unchanged_document_is_not_a_new_one(
    cli: Cli, where: list[str], tmp_path: Path
) -> None:
    doc = tmp_path / "limits.yaml"
    doc.write_text(DOC)
    assert cli("limits", "deploy", str(doc), *where).out == "limits version 1 deployed: 3 rules\n"
    assert "version 1 already deployed (unchanged)" in cli("limits", "deploy", str(doc), *where).out
    doc.write_text(DOC.replace("concurrency: 8", "concurrency: 4"))
    assert "limits version 2 deployed" in cli("limits", "deploy", str(doc), *where).out
    view = json.loads(cli("limits", "status", "--json", *where).out)
    assert view["version"] == 2
    tool = next(k for k in view["keys"] if k["key"] == "tool:llm.classify")
    assert tool["concurrency"] == 4
    assert tool["rate"] == {"count": 50, "period_ms": 1000, "burst": 50}
    acme = next(k for k in view["keys"] if k["key"] == "tenant:acme")
    assert (acme["concurrency"], acme["weight"]) == (20, 3.0)


def test_a_bad_document_is_refused_with_the_path_of_each_field(
    cli: Cli, where: list[str], tmp_path: Path
) -> None:
    doc = tmp_path / "limits.yaml"
    doc.write_text(
        "limits: v1\nrules:\n  - key: tool:a\n    concurrency: -1\n"
        "  - key: tenant:*\n    rate: often\n"
    )
    result = cli("limits", "deploy", str(doc), *where)
    assert result.code == 2
    assert "rules[0](tool:a).concurrency" in result.err
    assert "rules[1](tenant:*).rate: bad rate 'often'" in result.err
    assert "no limits deployed" in cli("limits", "status", *where).out


def test_a_paused_key_shows_paused_until_resumed(cli: Cli, where: list[str]) -> None:
    assert cli("limits", "pause", "tool:crm.refund", *where).out == "tool:crm.refund paused\n"
    assert "paused already" in cli("limits", "pause", "tool:crm.refund", *where).out
    assert "tool:crm.refund\tPAUSED" in cli("limits", "status", *where).out
    assert cli("limits", "resume", "tool:crm.refund", *where).out == "tool:crm.refund resumed\n"
    assert "PAUSED" not in cli("limits", "status", *where).out
    assert "resumed already" in cli("limits", "resume", "tool:crm.refund", *where).out


def test_pausing_a_malformed_key_is_refused(cli: Cli, where: list[str]) -> None:
    result = cli("limits", "pause", "llm", *where)
    assert result.code == 2 and "write kind:name" in result.err
