"""The triggers topic becomes run inputs, exactly once, when it is not co-partitioned.

A triggers topic with the run inputs' partition count is read by the orchestrator itself
(``engine.kafka.processor``). One created with another count (more partitions for the
producers, say) is read by this router: users publish ``Trigger`` records to it, and the
router turns each into one ``StartRun`` on the run inputs topic, keyed and partitioned by
its run id. The run id
comes from (tenant, idempotency key), or from the trigger's topic/partition/offset when
it has no key, so the same trigger published twice, or read twice, addresses one run:
the orchestrator refuses the second ``StartRun``.

For each assigned triggers partition p there is one transactional producer,
``transactional.id = <app>-<triggers topic>-<p>`` (aiokafka has no KIP-447, so fencing
is per partition). A partition batch is written in ONE transaction: its StartRun
commands, its dead letters (bytes that are not a trigger) and the consumer offset.

Failure rules, as in the orchestrator:

* an error before the commit request: abort, seek back to the committed offset;
* a commit whose outcome is unknown (timeout, lost connection): never abort. Recreate
  the producer, whose initialisation fences the old one and settles its transaction,
  then seek back to the committed offset, which now says what happened;
* a fenced producer: another router owns the partition. Drop the producer and pause the
  partition until the group assigns it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from engine.codec import encode
from engine.kafka._util import (
    Outcome,
    Record,
    gather_all,
    run_transaction,
    seek_committed,
    start_run_record,
    stop_quietly,
    transactional_producer,
)
from engine.kafka.topics import Topics
from engine.runtime.clock import Clock, SystemClock
from engine.runtime.processor import Input, Processor, StateCache, dead_letter
from engine.runtime.specs import SpecRegistry

log = logging.getLogger("terranoha.kafka.router")


@dataclass(slots=True)
class RouterStats:
    """What the router did since it started (committed transactions only)."""

    transactions: int = 0
    started: int = 0
    dead_letters: int = 0
    aborted: int = 0
    unknown_outcomes: int = 0
    fenced: int = 0


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, router: TriggerRouter) -> None:
        self.router = router

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        async with self.router.lock:  # waits for an in-flight transaction to finish
            for tp in revoked:
                await self.router._release(tp.partition)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        async with self.router.lock:
            for tp in sorted(assigned):
                await self.router._acquire(tp)


class TriggerRouter:
    """Routes the triggers partitions the consumer group ``<app>-router`` assigns it."""

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        app: str = "terranoha",
        clock: Clock | None = None,
        *,
        max_batch: int = 500,
        poll_ms: int = 50,
        commit_timeout_s: float = 15.0,
        retry_s: float = 5.0,
        instance_id: str | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.instance_id = instance_id
        """Static group membership, as for the engine (``KafkaEngine.instance_id``)."""
        self.topics = topics
        self.app = app
        self.group_id = f"{app}-router"
        self.clock = clock or SystemClock()
        self.max_batch = max_batch
        self.poll_ms = poll_ms
        self.commit_timeout_s = commit_timeout_s
        self.retry_s = retry_s
        self.stats = RouterStats()
        self.lock = asyncio.Lock()
        self._producers: dict[int, AIOKafkaProducer] = {}
        self._next: dict[int, int] = {}
        self._retry_at: dict[int, float] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._reader = Processor(SpecRegistry(), StateCache(), owns=lambda run_id: False,
                                 triggers_source=topics.triggers)
        """The engine's reading of a trigger, with every run owned elsewhere: each trigger
        becomes a forward (its ``StartRun``), anything else a dead letter."""

    async def run(self, stop: asyncio.Event) -> None:
        """Route until ``stop`` is set; then finish the batch in hand and leave the group."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            group_instance_id=f"{self.instance_id}-router" if self.instance_id else None,
        )
        self._consumer = consumer
        try:
            await consumer.start()
            consumer.subscribe([self.topics.triggers], listener=_Rebalance(self))
            while not stop.is_set():
                fetched = await consumer.getmany(timeout_ms=self.poll_ms,
                                                 max_records=self.max_batch)
                if not fetched and not self._retry_at:
                    continue
                async with self.lock:
                    # Each partition has its own producer and transaction: they run
                    # concurrently, so one commit's round trip does not delay the others.
                    await gather_all(self._route(tp, messages)
                                     for tp, messages in fetched.items() if messages)
                    if self._retry_at:
                        await self._retry_acquire()
        finally:
            async with self.lock:
                for number in list(self._producers):
                    await self._release(number)
            await stop_quietly(consumer)
            self._consumer = None

    @property
    def owned(self) -> list[int]:
        """The triggers partitions this router holds a ready producer for."""
        return sorted(self._producers)

    # ------------------------------------------------------------------ ownership

    def _transactional_id(self, number: int) -> str:
        return f"{self.app}-{self.topics.triggers}-{number}"

    async def _new_producer(self, number: int) -> AIOKafkaProducer:
        return await transactional_producer(self.bootstrap, self._transactional_id(number))

    async def _acquire(self, tp: TopicPartition) -> None:
        """Initialise the partition's producer, which settles any transaction a previous
        owner left open, and only then read the committed offset and seek to it: the
        offset the consumer fetched on its own during the rebalance may predate that
        transaction. If that fails the partition is paused and tried again later."""
        assert self._consumer is not None
        try:
            if tp.partition not in self._producers:
                self._producers[tp.partition] = await self._new_producer(tp.partition)
            self._next[tp.partition] = await seek_committed(self._consumer, tp)
        except Exception as exc:  # aiokafka also raises AssertionError while bootstrapping
            await self._park(tp, exc)
            return
        self._retry_at.pop(tp.partition, None)
        self._consumer.resume(tp)
        log.info("triggers partition %d acquired at offset %d", tp.partition,
                 self._next[tp.partition])

    async def _park(self, tp: TopicPartition, exc: BaseException) -> None:
        """Drop the partition's producer and pause it; ``run`` takes it again later."""
        assert self._consumer is not None
        log.warning("triggers partition %d: cannot take it (%r); retrying in %.0fs",
                    tp.partition, exc, self.retry_s)
        await self._release(tp.partition)
        if tp in self._consumer.assignment():
            self._consumer.pause(tp)
            self._retry_at[tp.partition] = asyncio.get_running_loop().time() + self.retry_s

    async def _retry_acquire(self) -> None:
        assert self._consumer is not None
        now = asyncio.get_running_loop().time()
        assignment = self._consumer.assignment()
        for number, due in list(self._retry_at.items()):
            tp = TopicPartition(self.topics.triggers, number)
            if tp not in assignment:
                self._retry_at.pop(number, None)
            elif due <= now:
                await self._acquire(tp)

    async def _release(self, number: int) -> None:
        self._next.pop(number, None)
        self._retry_at.pop(number, None)
        producer = self._producers.pop(number, None)
        if producer is not None:
            await stop_quietly(producer)

    # ------------------------------------------------------------------ routing

    async def _route(self, tp: TopicPartition, messages: Sequence[Any]) -> None:
        producer = self._producers.get(tp.partition)
        if producer is None:
            return  # revoked or fenced while the batch was in hand
        # Records below the committed offset were fetched before the seek in _acquire.
        first = self._next.get(tp.partition, 0)
        messages = [m for m in messages if m.offset >= first]
        if not messages:
            return
        records, started, dead = self._records(tp, messages)
        next_offset = messages[-1].offset + 1
        if await self._transact(tp, producer, records, next_offset):
            self._next[tp.partition] = next_offset
            self.stats.transactions += 1
            self.stats.started += started
            self.stats.dead_letters += dead

    def _records(self, tp: TopicPartition, messages: Sequence[Any]) -> tuple[list[Record], int,
                                                                              int]:
        """Everything is encoded before the transaction begins: nothing can fail halfway
        through it for a reason that is not Kafka's."""
        out: list[Record] = []
        started = dead = 0
        now = self.clock.now_ms()
        for message in messages:
            item = Input(tp.topic, tp.partition, message.offset, message.value or b"")
            batch = self._reader.process([item], now)
            letters = batch.dead_letters
            for start in batch.forwards:
                try:
                    out.append(start_run_record(self.topics, start))
                    started += 1
                except Exception as exc:
                    letters.append(dead_letter(
                        tp.topic, tp.partition, message.offset, "engine_error",
                        f"encoding its StartRun failed: {exc!r}", item.payload, now))
            for letter in letters:
                log.warning("dead letter %s/%d/%d: %s: %s", tp.topic, tp.partition,
                            message.offset, letter.reason, letter.detail)
                out.append((self.topics.dead_letters, tp.partition % self.topics.partitions,
                            None, encode(letter), [("reason", letter.reason.encode())]))
                dead += 1
        return out, started, dead

    async def _transact(self, tp: TopicPartition, producer: AIOKafkaProducer,
                        records: list[Record], next_offset: int) -> bool:
        """One transaction: the records and the consumer offset. True if committed."""
        outcome = await run_transaction(producer, records, {tp: next_offset}, self.group_id,
                                        self.commit_timeout_s)
        if outcome is Outcome.FENCED:
            await self._fenced(tp)
        elif outcome is Outcome.ABORTED:
            self.stats.aborted += 1
            await self._rewind(tp)
        elif outcome is Outcome.UNKNOWN:
            self.stats.unknown_outcomes += 1
            await self._take_back(tp, "transaction outcome unknown")
        return outcome is Outcome.COMMITTED

    async def _rewind(self, tp: TopicPartition) -> None:
        assert self._consumer is not None
        try:
            self._next[tp.partition] = await seek_committed(self._consumer, tp)
        except Exception as exc:
            await self._park(tp, exc)

    async def _take_back(self, tp: TopicPartition, why: str) -> None:
        """Never abort here: a new producer with the same transactional id fences the old
        one and settles its transaction; the committed offset then tells where to resume."""
        log.warning("triggers partition %d: %s; recreating its producer", tp.partition, why)
        old = self._producers.pop(tp.partition, None)
        if old is not None:
            await stop_quietly(old)
        assert self._consumer is not None
        if tp not in self._consumer.assignment():
            self._next.pop(tp.partition, None)
            return
        await self._acquire(tp)

    async def _fenced(self, tp: TopicPartition) -> None:
        self.stats.fenced += 1
        log.warning("triggers partition %d: producer fenced; another router owns it now",
                    tp.partition)
        await self._release(tp.partition)
        assert self._consumer is not None
        if tp in self._consumer.assignment():
            # Fetched records of a paused partition are dropped; the next assignment
            # resumes it from the committed offset.
            self._consumer.pause(tp)
