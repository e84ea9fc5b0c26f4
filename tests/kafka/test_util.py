"""The Kafka helpers. ``stop_quietly`` never takes its owner down with a client being
thrown away: aiokafka's ``AIOKafkaConsumer.stop`` awaits its cancelled fetch task; when
the broker is down that task sits in a retry back-off and its ``CancelledError`` comes
out of ``stop`` (seen in the broker-restart fault scenario, where it killed the engine)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition

from engine.kafka._util import stop_quietly
from engine.kafka.topics import Topics
from tests.kafka.helpers import read_all


class _Client:
    def __init__(self, error: BaseException | None = None, hang: bool = False) -> None:
        self.error = error
        self.hang = hang
        self.stopped = False

    async def stop(self) -> None:
        self.stopped = True
        if self.hang:
            await asyncio.sleep(3600)
        if self.error is not None:
            raise self.error


def test_a_cancelled_inner_task_coming_out_of_stop_is_swallowed() -> None:
    client = _Client(asyncio.CancelledError())
    asyncio.run(stop_quietly(client))
    assert client.stopped


def test_errors_and_hangs_are_swallowed() -> None:
    asyncio.run(stop_quietly(_Client(RuntimeError("connection closed"))))
    asyncio.run(stop_quietly(_Client(hang=True), timeout_s=0.05))


def test_the_callers_own_cancellation_still_propagates() -> None:
    async def main() -> None:
        task = asyncio.create_task(stop_quietly(_Client(hang=True), timeout_s=60))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_the_concurrent_transactions_retry_is_short() -> None:
    """``tune_aiokafka`` (every processor's start) shortens aiokafka's
    CONCURRENT_TRANSACTIONS retry (see ``CONCURRENT_TXN_RETRY_S``); if aiokafka renames
    the constant, this says so."""
    from aiokafka.producer import sender

    from engine.kafka._util import CONCURRENT_TXN_RETRY_S, tune_aiokafka

    tune_aiokafka()

    assert sender.BACKOFF_OVERRIDE == CONCURRENT_TXN_RETRY_S


def test_gather_all_lets_every_one_finish_then_raises_the_first_error() -> None:
    from engine.kafka._util import gather_all

    finished: list[str] = []

    async def fail() -> None:
        raise RuntimeError("boom")

    async def slow() -> None:
        await asyncio.sleep(0.05)
        finished.append("slow")

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(gather_all([fail(), slow()]))
    assert finished == ["slow"]


def test_back_to_back_transactions_retry_refusals_soon(
    kafka_bootstrap: str,
    topics: Topics,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Kafka 4 broker refuses, with a retriable error, a write of a transaction begun
    while the previous one's markers are still being written (KIP-890 verification, as
    seen by aiokafka's older protocol). The engine's producer retries those soon, not after
    aiokafka's 100 ms default; and every transaction still commits exactly once."""
    from aiokafka.producer import sender

    from engine.kafka._util import (
        TXN_RETRY_BACKOFF_MS,
        Outcome,
        run_transaction,
        transactional_producer,
    )

    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float, *args: Any) -> Any:
        waits.append(delay)
        return await real_sleep(delay, *args)

    monkeypatch.setattr(sender.asyncio, "sleep", sleep)  # the sender's back-offs
    count, group = 120, f"{topics.prefix}-g"
    inputs = TopicPartition(topics.inputs, 0)

    async def main() -> list[Outcome]:
        producer = await transactional_producer(kafka_bootstrap, f"{topics.prefix}-txn")
        try:
            return [
                await run_transaction(
                    producer,
                    [(topics.events, 0, b"k", b"e%d" % i, []), (topics.state, 0, b"k", b"s", [])],
                    {inputs: i + 1},
                    group,
                    30.0,
                )
                for i in range(count)
            ]
        finally:
            await producer.stop()

    outcomes = asyncio.run(main())
    assert outcomes == [Outcome.COMMITTED] * count
    assert max(waits, default=0.0) <= TXN_RETRY_BACKOFF_MS / 1000
    events = asyncio.run(read_all(kafka_bootstrap, topics.events, topics.partitions))
    assert [m.value for m in events] == [b"e%d" % i for i in range(count)]


def test_verification_refusals_are_not_logged_as_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiokafka warns of every produce it retries; the routine refusals of a Kafka 4
    broker (NOT_ENOUGH_REPLICAS, see ``TXN_RETRY_BACKOFF_MS``) are demoted to debug, any
    other retried error still warns."""
    import logging

    from aiokafka.errors import NotEnoughReplicasError, NotLeaderForPartitionError

    from engine.kafka._util import tune_aiokafka

    tune_aiokafka()

    sender = logging.getLogger("aiokafka.producer.sender")
    message = "Got error produce response on topic-partition %s, retrying. Error: %s"
    tp = TopicPartition("t.run-events", 0)
    with caplog.at_level(logging.WARNING, logger="aiokafka.producer.sender"):
        sender.warning(message, tp, NotEnoughReplicasError)
        sender.warning(message, tp, NotLeaderForPartitionError)
    assert [r.getMessage() for r in caplog.records] == [message % (tp, NotLeaderForPartitionError)]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="aiokafka.producer.sender"):
        sender.warning(message, tp, NotEnoughReplicasError)
    assert [r.levelname for r in caplog.records] == ["DEBUG"]
