"""Deployed specs on the compacted specs topic, against the real broker."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from engine.core.spec import WorkflowSpec, load_spec
from engine.kafka.specs import SpecConflictError, SpecFollower, publish_spec, queues_of
from engine.kafka.topics import Topics
from tests.kafka.helpers import eventually, produce, running

pytestmark = pytest.mark.kafka


def refund(version: int = 1, lookup_queue: str = "crm.get_order") -> WorkflowSpec:
    return load_spec(
        {
            "workflow": "refund",
            "version": version,
            "steps": [
                {"id": "lookup", "task": lookup_queue},
                {"id": "pay", "prepare_commit": {"prepare": "pay.prepare", "commit": "pay.commit"}},
            ],
        }
    )


async def _topic_names(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def test_queues_of_names_task_and_prepare_commit_queues() -> None:
    assert queues_of(refund()) == {"crm.get_order", "pay.prepare", "pay.commit"}


def test_published_spec_reaches_a_follower_and_its_task_topics_exist(
    kafka_bootstrap: str, topics: Topics
) -> None:
    async def scenario() -> None:
        assert await publish_spec(kafka_bootstrap, topics, refund()) is True
        follower = SpecFollower(kafka_bootstrap, topics)
        try:
            assert await follower.start() == 1
            assert follower.registry.get("refund", 1) == refund()
            assert follower.registry.get("refund", 0) == refund()  # latest
        finally:
            await follower.stop()
        names = await _topic_names(kafka_bootstrap)
        assert {topics.tasks(q) for q in queues_of(refund())} <= names

    asyncio.run(scenario())


def test_versions_never_change(kafka_bootstrap: str, topics: Topics) -> None:
    async def scenario() -> None:
        assert await publish_spec(kafka_bootstrap, topics, refund()) is True
        assert await publish_spec(kafka_bootstrap, topics, refund()) is False
        with pytest.raises(SpecConflictError, match="never change"):
            await publish_spec(kafka_bootstrap, topics, refund(lookup_queue="crm.other"))
        assert (
            await publish_spec(kafka_bootstrap, topics, refund(2, lookup_queue="crm.other")) is True
        )

    asyncio.run(scenario())


def test_catch_up_reads_specs_deployed_after_start(kafka_bootstrap: str, topics: Topics) -> None:
    async def scenario() -> None:
        follower = SpecFollower(kafka_bootstrap, topics)
        try:
            assert await follower.start() == 0
            assert follower.registry.get("refund", 0) is None
            await publish_spec(kafka_bootstrap, topics, refund(1))
            await publish_spec(kafka_bootstrap, topics, refund(2, lookup_queue="crm.v2"))
            assert await follower.catch_up() == 2
            assert await follower.catch_up() == 0
            assert follower.registry.get("refund", 0) == refund(2, lookup_queue="crm.v2")
            assert topics.tasks("crm.v2") in await _topic_names(kafka_bootstrap)
        finally:
            await follower.stop()

    asyncio.run(scenario())


def test_records_that_are_not_valid_specs_are_skipped(kafka_bootstrap: str, topics: Topics) -> None:
    async def scenario() -> None:
        await produce(
            kafka_bootstrap,
            topics.specs,
            [
                (b"not json", b"broken:1", 0),
                (b'{"workflow": "broken", "version": 1, "steps": []}', b"broken:1", 0),
                (
                    b'{"workflow": "other", "version": 1, "steps": [{"id": "a", "task": "q"}]}',
                    b"mislabelled:7",
                    0,
                ),
            ],
        )
        await publish_spec(kafka_bootstrap, topics, refund())
        follower = SpecFollower(kafka_bootstrap, topics)
        try:
            assert await follower.start() == 1
            assert [s.key for s in follower.registry.all()] == [("refund", 1)]
        finally:
            await follower.stop()

    asyncio.run(scenario())


def test_follow_picks_up_new_specs_until_stopped(kafka_bootstrap: str, topics: Topics) -> None:
    async def scenario() -> None:
        follower = SpecFollower(kafka_bootstrap, topics, poll_s=0.1)
        await follower.start()
        try:
            async with running(follower.follow):
                await publish_spec(kafka_bootstrap, topics, refund())
                assert await eventually(
                    lambda: follower.registry.get("refund", 1) is not None, timeout_s=10
                )
        finally:
            await follower.stop()

    asyncio.run(scenario())
