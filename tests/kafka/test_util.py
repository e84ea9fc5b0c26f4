"""The Kafka helpers. ``stop_quietly`` never takes its owner down with a client being
thrown away: aiokafka's ``AIOKafkaConsumer.stop`` awaits its cancelled fetch task; when
the broker is down that task sits in a retry back-off and its ``CancelledError`` comes
out of ``stop`` (seen in the broker-restart fault scenario, where it killed the engine)."""

from __future__ import annotations

import asyncio

import pytest

from engine.kafka._util import stop_quietly


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
    """Importing the Kafka adapters shortens aiokafka's CONCURRENT_TRANSACTIONS retry (see
    ``CONCURRENT_TXN_RETRY_S``); if aiokafka renames the constant, this says so."""
    from aiokafka.producer import sender

    from engine.kafka._util import CONCURRENT_TXN_RETRY_S

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
