"""The notifier on Kafka against the real broker and PostgreSQL: consumer group
``<deployment>-notifier``, dead letters on ``<prefix>.dead-letters``, the PostgreSQL
ledger across a redelivery, and ``serve`` delivering a real run's approval request."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from standardwebhooks import Webhook

from engine.codec import decode, encode
from engine.core.policies import run_id_for
from engine.core.records import DeadLetter, Trigger
from engine.core.spec import load_spec
from engine.kafka.serve import Running, ServeOptions, serve
from engine.kafka.specs import publish_spec
from engine.kafka.topics import Topics
from engine.notify import UNDELIVERABLE, DeliverySettings, notification_id
from engine.notify.kafka import KafkaNotifier
from engine.notify.postgres import PostgresDeliveryLedger
from tests.kafka.helpers import eventually, produce, read_all, running
from tests.notify.helpers import FAST_RETRY, note, settings
from tests.notify.servers import Answer, new_secret, webhook_receiver

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def _two_endpoints(good: str, bad: str, secret: str) -> DeliverySettings:
    return settings(
        {
            "webhooks": {
                "ops": {"url": good, "secrets": ["env:S"]},
                "pager": {"url": bad, "secrets": ["env:S"]},
            },
            "routes": [
                {"recipients": ["finance"], "webhooks": ["ops"]},
                {"kinds": ["escalated"], "webhooks": ["pager"]},
            ],
        },
        {"S": secret},
    )


async def _rewind(bootstrap: str, group: str, topic: str, partitions: int) -> None:
    """As if the notifier had crashed before committing: the group starts over."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.commit(dict.fromkeys(tps, 0))
    finally:
        await consumer.stop()


def test_the_notifier_delivers_dead_letters_and_never_sends_a_redelivery_twice(
    kafka_bootstrap: str, postgres_dsn: str, topics: Topics
) -> None:
    secret = new_secret()
    asked = note(run_id="run-a")
    escalated = note(
        run_id="run-b",
        kind="escalated",
        approval_id="",
        recipients=["finance-leads"],
        message="step refund escalated",
    )
    both = note(run_id="run-c", kind="escalated", approval_id="", recipients=["finance"])
    records = [asked, escalated, both]
    deployment = f"app{uuid4().hex[:6]}"

    async def main() -> None:
        await produce(
            kafka_bootstrap,
            topics.notifications,
            [(encode(n), n.run_id.encode(), topics.partition_of(n.run_id)) for n in records],
        )
        ledger = PostgresDeliveryLedger(postgres_dsn, deployment=topics.deployment(deployment))
        await ledger.open()
        try:
            with (
                webhook_receiver() as good,
                webhook_receiver(default=Answer(410, body="gone")) as bad,
            ):
                delivery = _two_endpoints(good.url, bad.url, secret)
                notifier = KafkaNotifier(kafka_bootstrap, topics, delivery, ledger, app=deployment)
                assert notifier.group_id == f"{topics.deployment(deployment)}-notifier"
                async with running(notifier.run):
                    assert await eventually(lambda: notifier.stats.notifications == 3, 60)
                assert (notifier.stats.delivered, notifier.stats.dead_lettered) == (2, 2)
                assert sorted(r.headers["webhook-id"] for r in good.received) == sorted(
                    notification_id(n) for n in (asked, both)
                )
                for request in good.received:
                    Webhook(secret).verify(request.body, request.headers)
                assert len(bad.received) == 2

                await _rewind(
                    kafka_bootstrap, notifier.group_id, topics.notifications, topics.partitions
                )
                again = KafkaNotifier(kafka_bootstrap, topics, delivery, ledger, app=deployment)
                async with running(again.run):
                    assert await eventually(lambda: again.stats.notifications == 3, 60)
                assert again.stats.already_settled == 4
                assert (again.stats.delivered, again.stats.dead_lettered) == (0, 0)
                assert len(good.received) == 2 and len(bad.received) == 2
        finally:
            await ledger.close()
        dead = [
            decode(m.value)
            for m in await read_all(kafka_bootstrap, topics.dead_letters, topics.partitions)
        ]
        assert all(isinstance(d, DeadLetter) for d in dead)
        assert sorted(d.run_id for d in dead) == ["run-b", "run-c"]
        for letter in dead:
            assert letter.reason == UNDELIVERABLE
            assert letter.source == topics.notifications
            assert "answered 410 Gone: gone" in letter.detail
            assert decode(letter.payload) in records

    asyncio.run(main())


def test_serve_with_notify_delivers_a_runs_approval_request(
    kafka_bootstrap: str, postgres_dsn: str, topics: Topics
) -> None:
    secret = new_secret()
    spec = load_spec(
        {
            "workflow": "sign-off",
            "version": 1,
            "steps": [
                {"id": "sign_off", "approval": {"approvers": ["finance"], "expires_after": "1h"}}
            ],
        }
    )
    key = f"order-{uuid4().hex[:6]}"
    run_id = run_id_for("acme", key)

    async def main() -> None:
        with webhook_receiver() as receiver:
            delivery = settings(
                {
                    "webhooks": {"ops": {"url": receiver.url, "secrets": ["env:S"]}},
                    "routes": [{"webhooks": ["ops"]}],
                    "retry": FAST_RETRY,
                },
                {"S": secret},
            )
            started: list[Running] = []

            async def ready(parts: Running) -> None:
                started.append(parts)

            stop = asyncio.Event()
            server = asyncio.create_task(
                serve(
                    ServeOptions(
                        bootstrap=kafka_bootstrap,
                        topics=topics,
                        app=topics.prefix,
                        postgres=postgres_dsn,
                        notify=delivery,
                    ),
                    stop,
                    ready=ready,
                )
            )
            try:
                assert await eventually(lambda: bool(started) or server.done(), 60)
                assert started and started[0].notifier is not None
                engine = started[0].engine
                assert await eventually(
                    lambda: engine is not None and len(engine.parts) == topics.partitions, 60
                )
                await publish_spec(kafka_bootstrap, topics, spec)
                await produce(
                    kafka_bootstrap,
                    topics.triggers,
                    [
                        (
                            encode(
                                Trigger(
                                    workflow="sign-off",
                                    tenant="acme",
                                    idempotency_key=key,
                                    requested_by="support-bot",
                                )
                            ),
                            run_id.encode(),
                            topics.partition_of(run_id),
                        )
                    ],
                )
                assert await eventually(lambda: bool(receiver.received), 60), (
                    "the approval request never arrived"
                )
            finally:
                stop.set()
                await asyncio.wait_for(server, 60)
        (request,) = receiver.received
        event = Webhook(secret).verify(request.body, request.headers)
        assert event["type"] == "notification.approval_requested"
        assert event["data"]["step"] == "sign_off"
        assert (event["data"]["run_id"], event["data"]["tenant"]) == (run_id, "acme")

    asyncio.run(main())


def test_an_offset_is_committed_only_once_its_notification_is_settled(
    kafka_bootstrap: str, postgres_dsn: str, topics: Topics
) -> None:
    secret = new_secret()
    sent = note(run_id=f"run-{uuid4().hex[:6]}")
    tp = TopicPartition(topics.notifications, topics.partition_of(sent.run_id))
    deployment = f"app{uuid4().hex[:6]}"

    async def committed(group: str) -> int | None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False
        )
        await consumer.start()
        try:
            offset: int | None = await consumer.committed(tp)
            return offset
        finally:
            await consumer.stop()

    async def main() -> None:
        await produce(
            kafka_bootstrap,
            topics.notifications,
            [(encode(sent), sent.run_id.encode(), tp.partition)],
        )
        ledger = PostgresDeliveryLedger(postgres_dsn, deployment=topics.deployment(deployment))
        await ledger.open()
        try:
            with webhook_receiver(default=Answer(503)) as receiver:
                slow = settings(
                    {
                        "webhooks": {"ops": {"url": receiver.url, "secrets": ["env:S"]}},
                        "routes": [{"webhooks": ["ops"]}],
                        "retry": {"max_attempts": 5, "initial": "1h", "jitter": "none"},
                    },
                    {"S": secret},
                )
                first = KafkaNotifier(
                    kafka_bootstrap, topics, slow, ledger, app=deployment, drain_s=0.1
                )
                async with running(first.run):
                    assert await eventually(lambda: first.stats.retries == 1, 60)
                # Stopped while it waits to retry: nothing settled, nothing committed.
                assert first.stats.notifications == 0
                assert await committed(first.group_id) is None
                receiver.default = Answer(200)
                second = KafkaNotifier(kafka_bootstrap, topics, slow, ledger, app=deployment)
                async with running(second.run):
                    assert await eventually(lambda: second.stats.notifications == 1, 60)
                assert second.stats.delivered == 1
            assert [r.headers["webhook-id"] for r in receiver.received] == [
                notification_id(sent)
            ] * 2
        finally:
            await ledger.close()
        assert await committed(second.group_id) == 1

    asyncio.run(main())
