"""The admission core behind each backend: the embedded store decides in one SQLite
transaction; on Kafka the processor does. ``limits status`` shows what each key holds,
and ``limits pause`` reaches the admission core itself (recorded together with the pause),
so a paused key grants nothing until resumed."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

from engine.cli._shared import now_ms
from engine.codec import encode
from engine.core import admission as ad
from engine.core.alerts import AlertKind, Severity
from engine.core.limits import load_limits_yaml, resolve
from engine.embedded.admission import AdmissionStore
from engine.embedded.store import Store
from engine.kafka.admission import AdmissionProcessor, AdmissionTopics
from engine.kafka.topics import Topics, delete_topics, key_partition
from tests.cli.conftest import Cli
from tests.infra import kafka_bootstrap
from tests.kafka.helpers import eventually, produce, running

T0 = 1_700_000_000_000
KEY = "tool:llm.classify"
DOC = """\
limits: v1
rules:
  - key: tool:llm.classify
    concurrency: 2
    rate: 100/s
"""


def _acquires(limits_version: int = 1) -> list[ad.AdmissionCommand]:
    limits = resolve(load_limits_yaml(DOC), KEY)
    return [
        ad.Acquire(
            KEY, f"r{i}", tenant="acme", limits=limits, version=limits_version, reply_to=f"run-{i}"
        )
        for i in range(3)
    ]


def test_the_embedded_store_decides_and_stores_each_batch_in_one_transaction(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "s.db")
    admission = AdmissionStore(store)
    events = admission.apply(_acquires(), T0)
    assert [e.request_id for e in events if isinstance(e, ad.Granted)] == ["r0", "r1"]
    state = admission.state(KEY)
    assert state is not None and state.executing == 2 and len(state.queue) == 1
    assert admission.events(KEY) == events
    # A lease whose release never comes expires at the store's next tick.
    assert admission.tick(T0 + state.limits.lease - 1) == []
    expired = admission.tick(T0 + state.limits.lease)
    assert [
        (type(e).__name__, e.request_id) for e in expired if isinstance(e, ad.Released | ad.Granted)
    ] == [("Released", "r0"), ("Released", "r1"), ("Granted", "r2")]
    store.close()


def test_embedded_status_shows_what_each_key_holds_and_pause_reaches_the_core(
    cli: Cli, tmp_path: Path
) -> None:
    db = tmp_path / "s.db"
    doc = tmp_path / "limits.yaml"
    doc.write_text(DOC)
    assert cli("limits", "deploy", str(doc), "--db", str(db)).code == 0
    store = Store(db)
    AdmissionStore(store).apply(_acquires(), T0)
    out = cli("limits", "status", "--db", str(db)).out
    assert f"{KEY}\texecuting 2/2, queued 1, held (queued: {KEY} 2/2)" in out
    view = json.loads(cli("limits", "status", "--json", "--db", str(db)).out)
    row = next(k for k in view["keys"] if k["key"] == KEY)
    assert (row["executing"], row["queued"], row["held"]) == (2, 1, f"queued: {KEY} 2/2")

    cli("limits", "pause", KEY, "--db", str(db))
    admission = AdmissionStore(store)
    assert [
        e for e in admission.apply([ad.Release(KEY, "r0")], T0 + 1) if isinstance(e, ad.Granted)
    ] == []
    state = admission.state(KEY)
    assert state is not None and state.paused
    cli("limits", "resume", KEY, "--db", str(db))
    state = admission.state(KEY)
    assert state is not None and not state.paused and "r2" in state.leases
    store.close()


def test_a_raised_limit_deployed_lets_queued_requests_through_at_once(
    cli: Cli, tmp_path: Path
) -> None:
    db, doc = tmp_path / "s.db", tmp_path / "limits.yaml"
    doc.write_text(DOC)
    cli("limits", "deploy", str(doc), "--db", str(db))
    store = Store(db)
    AdmissionStore(store).apply(_acquires(), now_ms())  # the deploy below runs at now
    doc.write_text(DOC.replace("concurrency: 2", "concurrency: 3"))
    assert "version 2 deployed" in cli("limits", "deploy", str(doc), "--db", str(db)).out
    state = AdmissionStore(store).state(KEY)
    assert state is not None and state.executing == 3 and state.version == 2
    store.close()


def test_kafka_status_reads_the_admission_state_and_pause_reaches_the_processor(cli: Cli) -> None:
    bootstrap = kafka_bootstrap()
    topics = Topics(prefix=f"s{uuid.uuid4().hex[:8]}", partitions=3)
    where = ["--kafka", bootstrap, "--topic-prefix", topics.prefix, "--partitions", "3"]
    admission = AdmissionTopics(topics)

    async def main() -> None:
        await admission.ensure(bootstrap)
        processor = AdmissionProcessor(bootstrap, topics, app=topics.prefix)
        async with running(processor.run):
            await produce(
                bootstrap,
                admission.keyed.inputs,
                [(encode(c), KEY.encode(), key_partition(KEY.encode(), 3)) for c in _acquires()],
            )
            assert await eventually(
                lambda: (s := processor.state(KEY)) is not None and s.executing == 2, timeout_s=60
            )
            out = await asyncio.to_thread(cli, "limits", "status", *where)
            assert f"{KEY}\texecuting 2/2, queued 1, held (queued: {KEY} 2/2)" in out.out
            await asyncio.to_thread(cli, "limits", "pause", KEY, *where)
            assert await eventually(
                lambda: (s := processor.state(KEY)) is not None and s.paused, timeout_s=60
            )
            await asyncio.to_thread(cli, "limits", "resume", KEY, *where)
            assert await eventually(
                lambda: (s := processor.state(KEY)) is not None and not s.paused, timeout_s=60
            )

    try:
        asyncio.run(main())
    finally:
        asyncio.run(delete_topics(bootstrap, topics.prefix))


def test_alerts_are_stored_with_the_events_that_raise_them_once_per_id(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    admission = AdmissionStore(store)
    limits = resolve(
        load_limits_yaml(
            "limits: v1\nrules:\n  - key: tool:flaky\n    breaker: {failure_rate: 0.5, "
            "min_calls: 2, open_for: 10s}\n"
        ),
        "tool:flaky",
    )
    for i in range(2):
        admission.apply(
            [
                ad.Acquire("tool:flaky", f"c{i}", limits=limits, version=1),
                ad.Release("tool:flaky", f"c{i}", ad.Outcome.FAILED),
            ],
            T0 + i,
        )
    [opened] = admission.alerts()
    assert (opened.kind, opened.severity, opened.key) == (
        AlertKind.BREAKER_OPENED,
        Severity.CRITICAL,
        "tool:flaky",
    )
    assert "breaker of tool:flaky opened (100% of calls failed" in opened.message
    assert opened.alert_id == f"breaker_opened:tool:flaky:{T0 + 1}"
    store.close()
