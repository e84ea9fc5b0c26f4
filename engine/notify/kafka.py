"""The notifier on Kafka: ``<prefix>.notifications`` in, deliveries out, at least once.

A ``KafkaNotifier`` reads the notifications topic in consumer group
``<deployment>-notifier`` (``Topics.deployment(app)``), read_committed, with manual
commits. Each notification is delivered to its targets (``engine.notify.deliver``);
its offset becomes committable only once every target is settled, delivered or
written to ``<prefix>.dead-letters`` (and acknowledged by the broker). Notifications
are handled concurrently, so each partition is committed up to its first notification
still in hand. A crash redelivers the rest; the PostgreSQL delivery ledger skips what
was settled already.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError

from engine.codec import DecodeError, decode, encode
from engine.core.outbox import Notification
from engine.core.records import DeadLetter
from engine.kafka._util import group_consumer, stop_quietly
from engine.kafka.topics import Topics, ensure_topics
from engine.notify._positions import Positions
from engine.notify.channel import Delivery
from engine.notify.deliver import (
    UNDELIVERABLE,
    Deliverer,
    NotifierStats,
    open_deliverer,
    persistently,
)
from engine.notify.ledger import DeliveryLedger
from engine.notify.settings import DeliverySettings
from engine.runtime.clock import Clock, SystemClock
from engine.runtime.processor import dead_letter

log = logging.getLogger("terranoha.notify.kafka")


def _kafka_transient(exc: Exception) -> bool:
    return isinstance(exc, KafkaError) and (exc.retriable or isinstance(exc, KafkaTimeoutError))


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, notifier: KafkaNotifier) -> None:
        self.notifier = notifier

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        await self.notifier._revoke(revoked)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        pass


class KafkaNotifier:
    """Delivers the notifications of the partitions the group assigns it."""

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        settings: DeliverySettings,
        ledger: DeliveryLedger,
        app: str = "terranoha",
        clock: Clock | None = None,
        *,
        concurrency: int = 8,
        poll_ms: int = 100,
        drain_s: float = 10.0,
        instance_id: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.bootstrap = bootstrap
        self.topics = topics
        self.settings = settings
        self.ledger = ledger
        self.group_id = f"{topics.deployment(app)}-notifier"
        self.clock = clock or SystemClock()
        self.concurrency = concurrency
        self.poll_ms = poll_ms
        self.drain_s = drain_s
        self.instance_id = instance_id
        """Static group membership, as for the engine and the workers: a notifier
        restarted under the same id gets its partitions back at once, instead of after
        the session timeout."""
        self.stats = NotifierStats()
        self.undecodable = 0
        """Records on the notifications topic that are not notifications (dead-lettered)."""
        self._positions: Positions[TopicPartition] = Positions()
        self._running: dict[TopicPartition, set[asyncio.Task[None]]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._deliverer: Deliverer | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set; then finish the notifications in hand for up
        to ``drain_s``, commit, leave the group."""
        await ensure_topics(self.bootstrap, self.topics.core_topics())
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, enable_idempotence=True, acks="all"
        )
        consumer = group_consumer(
            self.bootstrap,
            self.group_id,
            f"{self.instance_id}-notifier" if self.instance_id else None,
        )
        try:
            async with open_deliverer(
                self.settings, self.ledger, self.clock, self.stats
            ) as deliverer:
                self._deliverer = deliverer
                await producer.start()
                await consumer.start()
                self._producer, self._consumer = producer, consumer
                consumer.subscribe([self.topics.notifications], listener=_Rebalance(self))
                await self._loop(stop, consumer)
                running = self._all_running()
                if running:
                    await asyncio.wait(running, timeout=self.drain_s)
                await self._commit()
        finally:
            running = self._all_running()
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running)
            await stop_quietly(consumer)
            await stop_quietly(producer)
            self._consumer = self._producer = self._deliverer = None

    def _all_running(self) -> set[asyncio.Task[None]]:
        return set().union(*self._running.values())

    async def _loop(self, stop: asyncio.Event, consumer: AIOKafkaConsumer) -> None:
        while not stop.is_set():
            running = self._all_running()
            room = self.concurrency - len(running)
            if room <= 0:
                await asyncio.wait(
                    running, timeout=self.poll_ms / 1000, return_when=asyncio.FIRST_COMPLETED
                )
            else:
                fetched = await consumer.getmany(timeout_ms=self.poll_ms, max_records=room)
                for tp, messages in fetched.items():
                    for message in messages:
                        self._spawn(tp, message.offset, message.value or b"")
            await self._commit()

    def _spawn(self, tp: TopicPartition, offset: int, payload: bytes) -> None:
        self._positions.begin(tp, offset)
        task = asyncio.get_running_loop().create_task(self._handle(tp, offset, payload))
        tasks = self._running.setdefault(tp, set())
        tasks.add(task)

        def finished(done: asyncio.Task[None]) -> None:
            tasks.discard(done)
            if done.cancelled():
                return  # redelivered to whoever owns the partition next
            error = done.exception()
            if error is not None:
                # Its offset is never committed: the partition's commits stop there and a
                # restart delivers it again, rather than a notification being lost.
                log.error(
                    "notification at %s/%d/%d failed in the notifier: %r",
                    tp.topic,
                    tp.partition,
                    offset,
                    error,
                )
                return
            self._positions.finish(tp, offset)

        task.add_done_callback(finished)

    async def _handle(self, tp: TopicPartition, offset: int, payload: bytes) -> None:
        assert self._deliverer is not None
        try:
            note = decode(payload)
        except DecodeError as exc:
            self.undecodable += 1
            await self._dead_letter(self._dead(tp, offset, payload, exc.reason, str(exc)))
            return
        if not isinstance(note, Notification):
            self.undecodable += 1
            await self._dead_letter(
                self._dead(
                    tp,
                    offset,
                    payload,
                    "unexpected_record",
                    f"a {type(note).__name__} on {tp.topic}; only Notification records belong "
                    "there",
                )
            )
            return

        async def sink(delivery: Delivery, detail: str) -> None:
            await self._dead_letter(
                self._dead(tp, offset, payload, UNDELIVERABLE, detail, note.run_id)
            )

        await self._deliverer.deliver(note, sink)

    def _dead(
        self,
        tp: TopicPartition,
        offset: int,
        payload: bytes,
        reason: str,
        detail: str,
        run_id: str = "",
    ) -> DeadLetter:
        return dead_letter(
            tp.topic, tp.partition, offset, reason, detail, payload, self.clock.now_ms(), run_id
        )

    async def _dead_letter(self, dead: DeadLetter) -> None:
        value = encode(dead)

        async def send() -> None:
            assert self._producer is not None
            delivery = await self._producer.send(
                self.topics.dead_letters,
                value,
                key=dead.run_id.encode() or None,
                headers=[("reason", dead.reason.encode())],
            )
            await delivery

        await persistently("writing a dead letter", send, _kafka_transient)

    async def _commit(self, tps: Sequence[TopicPartition] | None = None) -> None:
        """Commit every partition up to its first notification still in hand."""
        offsets = self._positions.unstored(list(tps) if tps is not None else None)
        if not offsets or self._consumer is None:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:
            # Redelivered to whoever owns the partitions next; the ledger skips them.
            log.warning(
                "committing notification offsets failed (%r); they will be "
                "delivered again and skipped by the ledger",
                exc,
            )
            return
        self._positions.stored(offsets)

    async def _revoke(self, revoked: Sequence[TopicPartition]) -> None:
        """Give the revoked partitions' deliveries a little time, commit what finished,
        and cancel the rest: the next owner delivers them again, and only one process
        delivers a partition at a time."""
        running: set[asyncio.Task[None]] = set()
        for tp in revoked:
            running |= self._running.get(tp, set())
        if running:
            await asyncio.wait(running, timeout=self.drain_s)
        await self._commit(list(revoked))
        for task in running:
            task.cancel()
        for tp in revoked:
            self._running.pop(tp, None)
            self._positions.forget(tp)
