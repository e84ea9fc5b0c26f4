"""The admission processor on the real broker: a key's limit holds across processes,
survives a process stopping (its keys move with their state), and a lease whose release
never comes expires by the key's own timer."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from engine.codec import decode, encode
from engine.core import admission as ad
from engine.core.alerts import Alert, AlertKind
from engine.core.limits import KeyLimits
from engine.kafka.admission import AdmissionProcessor, AdmissionTopics
from engine.kafka.topics import Topics, delete_topics, key_partition
from tests.infra import kafka_bootstrap
from tests.kafka.helpers import eventually, produce, read_all, running

PARTITIONS = 3
KEYS = [f"tool:t{i}" for i in range(4)]


@pytest.fixture
def topics() -> Iterator[Topics]:
    bootstrap = kafka_bootstrap()
    t = Topics(prefix=f"a{uuid.uuid4().hex[:8]}", partitions=PARTITIONS)
    asyncio.run(AdmissionTopics(t).ensure(bootstrap))
    yield t
    asyncio.run(delete_topics(bootstrap, t.prefix))


async def _send(bootstrap: str, topics: Topics, commands: list[ad.AdmissionCommand]) -> None:
    inputs = AdmissionTopics(topics).keyed.inputs
    await produce(
        bootstrap,
        inputs,
        [(encode(c), c.key.encode(), key_partition(c.key.encode(), PARTITIONS)) for c in commands],
    )


async def _grants(bootstrap: str, topics: Topics) -> list[ad.Granted]:
    records = await read_all(bootstrap, AdmissionTopics(topics).grants, PARTITIONS)
    return [g for r in records if isinstance(g := decode(r.value), ad.Granted)]


def _acquire(key: str, n: int) -> ad.Acquire:
    return ad.Acquire(
        key,
        f"{key}/r{n}",
        tenant="acme",
        limits=KeyLimits(concurrency=2),
        version=1,
        reply_to=f"run-{key}-{n}",
    )


def test_a_keys_limit_holds_across_processes_and_a_process_leaving(topics: Topics) -> None:
    bootstrap = kafka_bootstrap()

    async def main() -> None:
        one, two = (AdmissionProcessor(bootstrap, topics, app=topics.prefix) for _ in "12")
        async with running(one.run), running(two.run):
            assert await eventually(
                lambda: len(one.parts) + len(two.parts) == PARTITIONS, timeout_s=60
            )
            await _send(bootstrap, topics, [_acquire(k, n) for n in range(5) for k in KEYS])

            async def granted() -> dict[str, list[str]]:
                out: dict[str, list[str]] = {}
                for g in await _grants(bootstrap, topics):
                    out.setdefault(g.key, []).append(g.request_id)
                return out

            for _ in range(300):
                if sum(map(len, (await granted()).values())) >= 2 * len(KEYS):
                    break
                await asyncio.sleep(0.1)
            first = await granted()
            assert first == {k: [f"{k}/r0", f"{k}/r1"] for k in KEYS}, (
                "a key granted past its limit"
            )
            # Every request knows where its grant went: the run that asked.
            assert all(g.reply_to.startswith("run-") for g in await _grants(bootstrap, topics))

        # Both processes stop; a third takes every key over from the changelog.
        three = AdmissionProcessor(bootstrap, topics, app=topics.prefix)
        async with running(three.run):
            assert await eventually(
                lambda: all(
                    (s := three.state(k)) is not None and s.executing == 2 and len(s.queue) == 3
                    for k in KEYS
                ),
                timeout_s=60,
            )
            await _send(bootstrap, topics, [ad.Release(k, f"{k}/r0") for k in KEYS])
            assert await eventually(
                lambda: all(
                    (s := three.state(k)) is not None and set(s.leases) == {f"{k}/r1", f"{k}/r2"}
                    for k in KEYS
                ),
                timeout_s=60,
            )
        grants = await _grants(bootstrap, topics)
        per_request: dict[str, int] = {}
        for g in grants:
            per_request[g.request_id] = per_request.get(g.request_id, 0) + 1
        assert all(n == 1 for n in per_request.values()), "a request was granted twice"
        assert len(grants) == 3 * len(KEYS)

    asyncio.run(main())


def test_a_lease_never_released_expires_and_its_slot_goes_to_the_next(topics: Topics) -> None:
    bootstrap = kafka_bootstrap()
    key = "tool:stuck"
    limits = KeyLimits(concurrency=1)

    async def main() -> None:
        processor = AdmissionProcessor(bootstrap, topics, app=topics.prefix)
        async with running(processor.run):
            await _send(
                bootstrap,
                topics,
                [
                    ad.Acquire(
                        key, "crashed", lease_ms=1_500, limits=limits, version=1, reply_to="run-a"
                    ),
                    ad.Acquire(key, "next", limits=limits, version=1, reply_to="run-b"),
                ],
            )
            assert await eventually(
                lambda: (s := processor.state(key)) is not None and "next" in s.leases, timeout_s=60
            )
            state = processor.state(key)
            assert state is not None and "crashed" in state.finished
        events = [
            decode(r.value)
            for r in await read_all(bootstrap, AdmissionTopics(topics).keyed.events, PARTITIONS)
        ]
        expired = [e for e in events if isinstance(e, ad.Released)]
        assert [(e.request_id, e.reason) for e in expired] == [
            ("crashed", ad.ReleaseReason.EXPIRED)
        ]
        alerts = [
            decode(r.value)
            for r in await read_all(bootstrap, AdmissionTopics(topics).alerts, PARTITIONS)
        ]
        assert [(a.kind, a.key) for a in alerts if isinstance(a, Alert)] == [
            (AlertKind.LEASE_EXPIRED, key)
        ]

    asyncio.run(main())
