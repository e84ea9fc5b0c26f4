"""The exactly-once keyed stream processor that every Kafka component runs on.

A processor reads input topic-partitions and writes, for each batch, its output records,
its state changelog and its input offsets in ONE Kafka transaction. The run engine, the
trigger router and the topic projector are small users of it: each supplies a ``Task``
(its state, how inputs become records, which timers are due) and says which partitions
make a task. Everything about Kafka lives here: ownership, fencing, the producer's
lifecycle, changelog restore, the transaction and its outcomes, timers, dead letters.

Tasks and ownership
-------------------
* ``grouped=True`` (the engine, the router): task p reads partition p of every input
  topic (they are co-partitioned). A consumer group with the range assignor gives all of
  them to one member. Each task has its own transactional producer, ``transactional.id =
  transactional_id(p)`` (aiokafka has no KIP-447, so fencing is per task).
* ``grouped=False`` (the topic projector): one task reads every partition of its input
  topic, assigned by hand; it commits its offsets under ``group_id`` all the same.

Taking a task over: the partitions are paused and the task is taken over in the
background (not inside the rebalance callback, during which aiokafka sends no heartbeats:
a long restore there got the member evicted, over and over). First the producer is
initialised, which fences any previous owner and settles its open transaction; then the
task's state is restored from its changelog up to the last stable offset; then its
inputs are rewound to the committed offsets (the consumer may have fetched from an
offset read before that transaction settled); only then are they resumed.

The transaction and its four outcomes
-------------------------------------
``run_transaction`` sends the records and, with them, the input offsets
(``send_offsets_to_transaction``), waits until the broker acknowledged every one of
them, and only then asks for the commit. It never cancels a delivery: aiokafka's abort
and commit first wait for the batches in flight, and take a cancelled one for finished.

``COMMITTED``
    The commit request returned. Detected: ``commit_transaction`` returned within the
    timeout. Next: the batch's state becomes the task's committed state (``Step.commit``)
    and its inputs are done.
``ABORTED``
    The broker refused part of the transaction before the commit was asked for (a record
    too large, a request that failed) and the abort returned. Nothing of it is visible.
    Detected: a delivery or the offsets failed, then ``abort_transaction`` returned.
    Next: the task's state is as it was (nothing was applied); its inputs are rewound to
    the committed offsets; and the producer is REPLACED before the next transaction.
    aiokafka speaks the protocol from before KIP-890's part 2, so an abort leaves the
    producer epoch as it was: a produce request of the aborted transaction still on its
    way (retried after a reconnect, delayed in the network) would be accepted into the
    next transaction of that epoch as soon as it adds the same partition, and committed
    with it. A new producer's InitProducerId bumps the epoch, and the broker refuses any
    late request of the old one.
``UNKNOWN``
    The transaction may commit or not: a delivery, the offsets, the commit or the abort
    did not answer within the timeout, or the connection was lost during the commit.
    Detected: a timeout, or an error of ``commit_transaction``/``abort_transaction``.
    Next: never abort. Replace the producer: its InitProducerId fences the old one and
    settles the transaction (the coordinator completes a commit that was prepared and
    aborts one that was not). Then restore the task's state from its changelog and
    rewind its inputs to the committed offsets: both now say what happened.
``FENCED``
    Another producer with this transactional id exists: another process owns the task.
    Detected: ``ProducerFenced`` from any step. Next: the task is dropped. Grouped: its
    partitions are paused and taken back after a pause while the group still assigns
    them here. Not grouped: the processor stops with ``TaskFencedError``.

A replaced producer is stopped and its sender cancelled (``discard_producer``): a sender
left running would keep retrying the old transaction's requests.

Local state
-----------
Given a ``state_dir``, a task with ``local_state`` keeps its changelog in a local store
(``engine.kafka.localstore``): the keys it keeps in memory (``Step.changelog``'s active
ones) and those it keeps only on disk (the finished ones). Restoring then reads only the
changelog records after the store's checkpoint, and hands the task its active entries.
The store is written after a transaction COMMITTED, with the offsets the broker gave the
changelog records; an ABORTED or UNKNOWN transaction writes nothing to it, and the
restore that follows an UNKNOWN one reads the changelog from the store's checkpoint on,
so the store never holds a value the changelog does not have at the position it claims.

Poison inputs
-------------
A task turns inputs it cannot read into dead-letter records of the same transaction.
When a batch cannot be encoded, or ``MAX_ABORTS`` transactions in a row aborted, its
inputs are taken one by one, and one whose outcome Kafka refuses becomes a dead letter
(``Task.isolated``): the partition keeps moving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from engine.core.errors import TerranohaError
from engine.kafka._util import (
    Outcome,
    Record,
    discard_producer,
    group_consumer,
    run_transaction,
    seek_committed,
    stop_quietly,
    transactional_producer,
    tune_aiokafka,
)
from engine.kafka.localstore import (
    ChangelogWrite,
    Checkpoint,
    LocalStore,
    StoreIdentity,
    catch_up,
    record_digest,
)
from engine.runtime.clock import Clock, SystemClock
from engine.runtime.processor import Input

log = logging.getLogger("terranoha.kafka.stream")

MAX_ABORTS = 3
"""Aborted transactions in a row (each rewinds to the committed offsets, so each retried
the same inputs) before a task's inputs are isolated one by one."""

Fetched = Mapping[TopicPartition, Sequence[Any]]
"""Consumer records by partition, as ``getmany`` returns them."""


class TaskFencedError(TerranohaError):
    """Another process took this processor's task over (its producer was fenced)."""


def _nothing() -> None:
    return None


@dataclass(slots=True)
class Step:
    """What a task made of one batch (or of its due timers): the records to write in one
    transaction, and what to do once that transaction committed."""

    records: list[Record] = field(default_factory=list)
    commit: Callable[[], None] = _nothing
    """Makes the batch's state the task's committed state; called only after the commit."""
    events: int = 0
    forwards: int = 0
    dead_letters: int = 0
    changelog: ChangelogWrite | None = None
    """Local state: the values of ``records``' changelog records, split (see above)."""


class Task(ABC):
    """The per-purpose part of one task: its state and what inputs do to it. It does no
    Kafka I/O; ``process`` must not change committed state (``Step.commit`` does)."""

    local_state = False
    """True: the task can keep its changelog in a local store (``split``,
    ``Step.changelog``); the processor then sets ``store`` before ``restore``."""
    store: LocalStore | None = None

    def split(self, values: Mapping[bytes, bytes]) -> ChangelogWrite:
        """Local state: which changelog values stay in memory and which only on disk."""
        raise NotImplementedError(f"{type(self).__name__} keeps no local state")

    @abstractmethod
    async def restore(self, latest: Mapping[bytes, bytes]) -> int:
        """Rebuild the state from the changelog's latest value per key (with a local
        store: the active entries of the store); return how many entries it holds.
        Called once, before any input."""

    @abstractmethod
    async def process(self, inputs: Sequence[Input], now: int) -> Step:
        """Decide a batch of inputs. May raise if its outcome cannot be encoded; the
        processor then takes the inputs one by one."""

    @abstractmethod
    def isolated(self, item: Input, now: int, why: str) -> Step:
        """A dead letter for an input whose outcome cannot be written."""

    def next_due(self) -> int | None:
        """When the next timer is due (epoch ms), if any."""
        return None

    def due(self, now: int) -> Step | None:
        """The records of the timers due at ``now``, written without input offsets."""
        return None


@dataclass(slots=True)
class TaskStats:
    batches: int = 0
    inputs: int = 0
    events: int = 0
    forwards: int = 0
    dead_letters: int = 0
    aborted: int = 0
    unknown_outcomes: int = 0
    fenced: int = 0
    restores: int = 0
    restored_states: int = 0
    restore_ms: int = 0

    def add(self, other: TaskStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(slots=True)
class OwnedTask:
    """A task this process owns: its partitions, producer, logic and progress."""

    number: int
    tps: tuple[TopicPartition, ...]
    producer: AIOKafkaProducer
    task: Task
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    """Records below these offsets are done: records fetched before a seek are dropped."""
    aborts: int = 0
    """Aborted transactions since the last commit."""
    stats: TaskStats = field(default_factory=TaskStats)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, processor: StreamProcessor) -> None:
        self.processor = processor

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        numbers = sorted({tp.partition for tp in revoked})
        await self.processor._cancel_takeovers(numbers)
        await self.processor._settle(numbers)  # the transactions in flight end first
        async with self.processor.lock:
            for number in numbers:
                await self.processor._release(number)
        self.processor._leaving.difference_update(numbers)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        # The takeover runs after this callback returns: aiokafka stops the group
        # heartbeat until it does (see the module doc).
        for number in sorted({tp.partition for tp in assigned}):
            self.processor._take_over(number)
        self.processor.assigned.set()


class StreamProcessor:
    """Runs ``make_task(number)`` for each task this process owns (see the module doc).

    ``inputs``: the input topics, co-partitioned (grouped) or one topic (not grouped).
    ``changelog(number)``: the partitions to restore task ``number`` from (none: no state).
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        name: str,
        inputs: Sequence[str],
        group_id: str,
        transactional_id: Callable[[int], str],
        make_task: Callable[[int], Task],
        changelog: Callable[[int], Awaitable[list[TopicPartition]]] | None = None,
        grouped: bool = True,
        clock: Clock | None = None,
        max_batch: int = 1000,
        poll_ms: int = 20,
        commit_timeout_s: float = 15.0,
        refence_pause_s: float = 5.0,
        instance_id: str | None = None,
        partitions_of: Callable[[str], Awaitable[list[int]]] | None = None,
        on_ready: Callable[[], Awaitable[None]] | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.name = name
        self.inputs = tuple(inputs)
        self.group_id = group_id
        self.transactional_id = transactional_id
        self.make_task = make_task
        self.changelog = changelog
        self.grouped = grouped
        self.clock = clock or SystemClock()
        self.max_batch = max_batch
        self.poll_ms = poll_ms
        self.commit_timeout_s = commit_timeout_s
        self.refence_pause_s = refence_pause_s
        self.instance_id = instance_id
        """Static group membership (``group.instance.id``): a process restarted under the
        same id gets its partitions back at once instead of after the session timeout."""
        self.partitions_of = partitions_of
        """Not grouped: the partition numbers of the input topic."""
        self.on_ready = on_ready
        """Not grouped: called once the task is taken over, before the first poll."""
        self.state_dir = state_dir
        """Where the local stores of tasks with ``local_state`` live (None: no store)."""
        self._stores: dict[int, LocalStore] = {}
        """The open local store of each task number, kept across its restores."""
        self.lock = asyncio.Lock()
        """Held while tasks are installed or released."""
        self.parts: dict[int, OwnedTask] = {}
        self._busy: dict[int, asyncio.Task[None]] = {}
        """Tasks with a batch (or timers) in hand, until its transaction ends."""
        self._leaving: set[int] = set()
        """Tasks being revoked: no new batch starts for them."""
        self._freed = asyncio.Event()
        """Set when a task's work ends, so the loop hands it its next batch."""
        self._takeovers: dict[int, asyncio.Task[None]] = {}
        """Tasks being taken over (paused until their state is restored)."""
        self._manual: tuple[TopicPartition, ...] = ()
        """Not grouped: the partitions of the one task."""
        self.retired = TaskStats()
        """Counts of the tasks this process no longer owns."""
        self._waiting: dict[int, TaskStats] = {}
        """Counts of the tasks paused until they can be taken back."""
        self.consumer: AIOKafkaConsumer | None = None
        self.started = asyncio.Event()
        self.ready = asyncio.Event()
        """Not grouped: set once the task is taken over."""
        self.assigned = asyncio.Event()
        """Grouped: set once the group has given this member its partitions (perhaps
        none: a group with more members than partitions)."""

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Process until ``stop`` is set; then finish the batches in hand and leave."""
        tune_aiokafka()
        self.consumer = group_consumer(
            self.bootstrap,
            self.group_id,
            f"{self.instance_id}-{self.name}" if self.instance_id and self.grouped else None,
            max_partition_fetch_bytes=4 << 20,
            partition_assignment_strategy=(RangePartitionAssignor,),
        )
        await self.consumer.start()
        try:
            if self.grouped:
                self.consumer.subscribe(list(self.inputs), listener=_Rebalance(self))
            else:
                await self._assign_all()
            self.started.set()
            while not stop.is_set():
                self._dispatch(await self._poll())
        finally:
            await self._cancel_takeovers()
            await self._settle()
            async with self.lock:
                for number in list(self.parts):
                    await self._release(number)
            for number in list(self._stores):
                self._close_store(number)
            await stop_quietly(self.consumer)

    async def _assign_all(self) -> None:
        """Not grouped: assign every partition of the input topic and take the one task
        over before the first poll."""
        assert self.consumer is not None and self.partitions_of is not None
        numbers = await self.partitions_of(self.inputs[0])
        self._manual = tuple(TopicPartition(self.inputs[0], n) for n in numbers)
        self.consumer.assign(list(self._manual))
        self.consumer.pause(*self._manual)
        async with self.lock:
            part = await self._prepare(0, None)
            await self._install(part)
        self.consumer.resume(*self._manual)
        self.ready.set()
        if self.on_ready is not None:
            await self.on_ready()

    @property
    def stats(self) -> TaskStats:
        total = TaskStats()
        total.add(self.retired)
        for stats in [*(part.stats for part in self.parts.values()), *self._waiting.values()]:
            total.add(stats)
        return total

    # ------------------------------------------------------------------ ownership

    def _tps(self, number: int) -> tuple[TopicPartition, ...]:
        """The partitions read for task ``number``, in the order of ``inputs``."""
        if not self.grouped:
            return self._manual
        return tuple(TopicPartition(topic, number) for topic in self.inputs)

    def _assigned(self, number: int) -> list[TopicPartition]:
        assert self.consumer is not None
        assignment = self.consumer.assignment()
        return [tp for tp in self._tps(number) if tp in assignment]

    def _still_assigned(self, number: int) -> bool:
        """Every partition read for ``number`` is still assigned to this member."""
        return len(self._assigned(number)) == len(self._tps(number))

    async def _prepare(self, number: int, stats: TaskStats | None) -> OwnedTask:
        """A new producer (which fences the previous owner's and settles its transaction),
        then the task's state restored from its changelog. Touches nothing shared."""
        producer = await self._new_producer(number)
        try:
            task = self.make_task(number)
            started = self.clock.now_ms()
            restored = await self._restore(number, task)
        except BaseException:
            await discard_producer(producer)
            raise
        part = OwnedTask(
            number=number,
            tps=self._tps(number),
            producer=producer,
            task=task,
            stats=stats or TaskStats(),
        )
        part.stats.restores += 1
        part.stats.restored_states += restored
        part.stats.restore_ms += self.clock.now_ms() - started
        return part

    async def _new_producer(self, number: int) -> AIOKafkaProducer:
        """A started transactional producer for task ``number``: its initialisation
        fences every older producer of the task and settles their open transaction."""
        return await transactional_producer(self.bootstrap, self.transactional_id(number))

    async def _restore(self, number: int, task: Task) -> int:
        tps = await self.changelog(number) if self.changelog is not None else []
        if self.state_dir is not None and task.local_state and len(tps) == 1:
            store = await self._restore_local(number, task, tps[0])
            task.store = store
            return await task.restore(dict(store.active()))
        latest = await self._read_changelog(number)
        return await task.restore(latest)

    def _open_store(self, number: int, tp: TopicPartition) -> LocalStore:
        store = self._stores.get(number)
        if store is None:
            assert self.state_dir is not None
            store = LocalStore(self.state_dir, StoreIdentity(self.group_id, tp.topic, tp.partition))
            self._stores[number] = store
        return store

    def _close_store(self, number: int) -> None:
        store = self._stores.pop(number, None)
        if store is not None:
            store.close()

    async def _restore_local(self, number: int, task: Task, tp: TopicPartition) -> LocalStore:
        """The task's local store, brought up to the changelog's last stable offset."""
        store = self._open_store(number, tp)
        await catch_up(store, self.bootstrap, tp, task.split)
        return store

    async def _read_changelog(self, number: int) -> dict[bytes, bytes]:
        """The latest value of each key of the task's changelog, up to its last stable
        offset (a tombstone removes its key)."""
        tps = await self.changelog(number) if self.changelog is not None else []
        latest: dict[bytes, bytes] = {}
        if not tps:
            return latest
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            isolation_level="read_committed",
            enable_auto_commit=False,
            max_partition_fetch_bytes=8 << 20,
        )
        await consumer.start()
        try:
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end = await consumer.end_offsets(tps)
            for tp in tps:
                while await consumer.position(tp) < end[tp]:
                    fetched = await consumer.getmany(tp, timeout_ms=500, max_records=10_000)
                    for message in fetched.get(tp, []):
                        key = message.key or b""
                        if message.value is None:
                            latest.pop(key, None)
                        else:
                            latest[key] = message.value
        finally:
            await stop_quietly(consumer)
        return latest

    async def _install(self, part: OwnedTask) -> None:
        # aiokafka may already have fetched these partitions from a committed offset read
        # before the previous owner's transaction settled: resume from a fresh one.
        try:
            await self._rewind(part)
        except BaseException:
            await discard_producer(part.producer)
            raise
        self.parts[part.number] = part
        log.info(
            "%s task %d acquired: %d entries restored in %d ms",
            self.name,
            part.number,
            part.stats.restored_states,
            part.stats.restore_ms,
        )

    def _take_over(self, number: int) -> None:
        """Pause the newly assigned task and take it over in the background, while the
        consumer keeps polling (and the group keeps hearing from this member)."""
        assert self.consumer is not None
        if number in self.parts or number in self._takeovers:
            return
        tps = self._assigned(number)
        if len(tps) < len(self._tps(number)):
            log.error(
                "%s task %d: assigned %s without its pair; the group mixes assignors "
                "or the topics' partition counts changed",
                self.name,
                number,
                tps,
            )
        self.consumer.pause(*tps)
        task = asyncio.get_running_loop().create_task(self._take_over_task(number))
        self._takeovers[number] = task
        task.add_done_callback(
            lambda done: (
                self._takeovers.pop(number) if self._takeovers.get(number) is done else None
            )
        )

    async def _take_over_task(self, number: int) -> None:
        assert self.consumer is not None
        stats = TaskStats()
        part: OwnedTask | None = None
        try:
            part = await self._prepare(number, stats)
            async with self.lock:
                if self._still_assigned(number) and number not in self.parts:
                    await self._install(part)
                    self.consumer.resume(*part.tps)
                    part = None  # installed: the producer is the task's now
        except Exception as exc:
            log.warning(
                "%s task %d: cannot take it over yet (%r); retrying", self.name, number, exc
            )
            self._pause_and_reclaim(number, stats)
        finally:
            if part is not None:  # revoked, cancelled or failed: the producer is not ours
                await discard_producer(part.producer)

    async def _cancel_takeovers(self, numbers: Iterable[int] | None = None) -> None:
        """Stop the takeovers of ``numbers`` (all if None) and wait for them to end."""
        tasks = [
            task
            for number, task in list(self._takeovers.items())
            if numbers is None or number in numbers
        ]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _release(self, number: int) -> None:
        part = self.parts.pop(number, None)
        self._close_store(number)
        if part is None:
            return
        self.retired.add(part.stats)
        await stop_quietly(part.producer)

    def _pause_and_reclaim(self, number: int, stats: TaskStats) -> None:
        assert self.consumer is not None
        if self._still_assigned(number):
            self.consumer.pause(*self._tps(number))
            self._waiting[number] = stats
            asyncio.get_running_loop().create_task(self._reclaim_later(number, stats))
        else:
            self.retired.add(stats)

    async def _reclaim_later(self, number: int, stats: TaskStats) -> None:
        """Take a paused task back after a pause, for as long as it stays assigned."""
        delay = self.refence_pause_s
        while True:
            await asyncio.sleep(delay)
            async with self.lock:
                assert self.consumer is not None
                if not self._still_assigned(number) or number in self.parts:
                    if self._waiting.pop(number, None) is stats:
                        self.retired.add(stats)
                    return
                try:
                    await self._install(await self._prepare(number, stats))
                except Exception as exc:
                    log.warning(
                        "%s task %d: still cannot take it over (%r)", self.name, number, exc
                    )
                else:
                    self._waiting.pop(number, None)
                    self.consumer.resume(*self._tps(number))
                    return
            delay = min(delay * 2, 30.0)

    async def _rewind(self, part: OwnedTask) -> None:
        """Seek each of the task's inputs back to its committed offset."""
        assert self.consumer is not None
        for tp in part.tps:
            part.next_offsets[tp] = await seek_committed(self.consumer, tp)

    # ------------------------------------------------------------------ outcomes

    async def _renew(self, part: OwnedTask) -> None:
        """ABORTED: a new producer (a new epoch) in place of the old, inputs rewound."""
        await discard_producer(part.producer)
        try:
            part.producer = await self._new_producer(part.number)
            await self._rewind(part)
        except Exception as exc:
            await self._take_back(part, f"renewing its producer failed ({exc!r})")

    async def _take_back(self, part: OwnedTask, why: str) -> None:
        """UNKNOWN: a new producer (fencing the old one and settling its transaction),
        the state restored from the changelog, inputs rewound to the committed offsets."""
        log.warning(
            "%s task %d: %s; recreating its producer and restoring", self.name, part.number, why
        )
        self.parts.pop(part.number, None)
        await discard_producer(part.producer)
        if not self._still_assigned(part.number):
            self.retired.add(part.stats)
            return
        async with self.lock:
            try:
                await self._install(await self._prepare(part.number, part.stats))
            except Exception as exc:
                log.warning(
                    "%s task %d: cannot take it over yet (%r); retrying",
                    self.name,
                    part.number,
                    exc,
                )
                self._pause_and_reclaim(part.number, part.stats)

    async def _fenced(self, part: OwnedTask) -> None:
        part.stats.fenced += 1
        log.warning("%s task %d: producer fenced; another process owns it", self.name, part.number)
        self.parts.pop(part.number, None)
        await discard_producer(part.producer)
        if not self.grouped:
            self.retired.add(part.stats)
            raise TaskFencedError(
                f"another {self.name} took over (its producer fenced "
                f"{self.transactional_id(part.number)}); this one stops"
            )
        self._pause_and_reclaim(part.number, part.stats)

    async def _transact(
        self,
        part: OwnedTask,
        records: list[Record],
        offsets: Mapping[TopicPartition, int] | None,
        positions: dict[TopicPartition, int] | None = None,
    ) -> bool:
        """One transaction: the records, and the input offsets if given. True if committed;
        otherwise the outcome's rule (module doc) has been applied. ``positions`` receives
        where the records ended on each partition (``run_transaction``)."""
        outcome = await run_transaction(
            part.producer, records, offsets, self.group_id, self.commit_timeout_s, positions
        )
        if outcome is Outcome.FENCED:
            await self._fenced(part)
        elif outcome is Outcome.ABORTED:
            part.stats.aborted += 1
            part.aborts += 1
            await self._renew(part)
        elif outcome is Outcome.UNKNOWN:
            part.stats.unknown_outcomes += 1
            await self._take_back(part, "transaction outcome unknown")
        return outcome is Outcome.COMMITTED

    # ------------------------------------------------------------------ processing

    async def _poll(self) -> Fetched:
        """Records of the tasks with nothing in hand. Returns early, with nothing, when a
        busy task finishes, so that it gets its next batch at once instead of after the
        others' poll timeout."""
        assert self.consumer is not None
        self._reap()
        idle = [
            tp
            for number, part in self.parts.items()
            if number not in self._busy and number not in self._leaving
            for tp in part.tps
        ]
        self._freed.clear()
        if not idle:
            if self._busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), self.poll_ms / 1000)
            else:
                await asyncio.sleep(self.poll_ms / 1000)
            return {}
        fetch = self.consumer.getmany(*idle, timeout_ms=self.poll_ms, max_records=self.max_batch)
        if not self._busy:
            fetched: Fetched = await fetch
            return fetched
        getter: asyncio.Future[Fetched] = asyncio.ensure_future(fetch)
        freed = asyncio.ensure_future(self._freed.wait())
        try:
            await asyncio.wait((getter, freed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            freed.cancel()
        if getter.done():
            return getter.result()
        # aiokafka hands records out without awaiting once it has them, so a getmany
        # cancelled while it waits has taken nothing from its buffers.
        getter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            return await getter
        return {}

    def _number_of(self, tp: TopicPartition) -> int:
        return tp.partition if self.grouped else 0

    def _dispatch(self, records: Fetched) -> None:
        """Start the work of each idle task that has records or timers due: one asyncio
        task per processor task, so one commit round trip holds back only its own next
        batch, and the transactions of different tasks overlap."""
        fetched: dict[int, dict[TopicPartition, Sequence[Any]]] = {}
        for tp, messages in records.items():
            if messages:
                fetched.setdefault(self._number_of(tp), {})[tp] = messages
        now = self.clock.now_ms()
        for number, part in self.parts.items():
            if number in self._busy or number in self._leaving:
                continue  # its records stay in the consumer's buffer (not polled)
            due = part.task.next_due()
            by_tp = fetched.get(number)
            if by_tp or (due is not None and due <= now):
                task = asyncio.get_running_loop().create_task(self._work(part, by_tp or {}))
                self._busy[number] = task

    async def _work(self, part: OwnedTask, fetched: Mapping[TopicPartition, Sequence[Any]]) -> None:
        try:
            if fetched:
                await self._process(part, fetched)
            if self.parts.get(part.number) is part:
                await self._fire_timers(part)
        finally:
            self._freed.set()

    def _reap(self) -> None:
        """Forget the asyncio tasks that ended; an error in one stops the processor."""
        for number, task in list(self._busy.items()):
            if task.done():
                del self._busy[number]
                error = None if task.cancelled() else task.exception()
                if error is not None:
                    raise error

    async def _settle(self, numbers: Iterable[int] | None = None) -> None:
        """Stop starting work for ``numbers`` (all if None) and wait for what is in hand."""
        leaving = list(self._busy if numbers is None else numbers)
        self._leaving.update(leaving)
        tasks = [self._busy[n] for n in leaving if n in self._busy]
        if tasks:
            await asyncio.wait(tasks)
        self._reap()
        if numbers is None:
            self._leaving.clear()

    async def _process(
        self, part: OwnedTask, fetched: Mapping[TopicPartition, Sequence[Any]]
    ) -> None:
        inputs = [
            Input(tp.topic, tp.partition, m.offset, m.value or b"", m.headers)
            for tp in part.tps
            for m in fetched.get(tp, ())
            if m.offset >= part.next_offsets.get(tp, 0)
        ]
        if not inputs:
            return
        if part.aborts >= MAX_ABORTS:
            log.warning(
                "%s task %d: %d transactions in a row aborted; isolating its %d inputs",
                self.name,
                part.number,
                part.aborts,
                len(inputs),
            )
            await self._process_one_by_one(part, inputs)
            return
        try:
            step = await part.task.process(inputs, self.clock.now_ms())
        except Exception:
            log.exception(
                "%s task %d: encoding a batch failed; isolating the inputs", self.name, part.number
            )
            await self._process_one_by_one(part, inputs)
            return
        offsets = _next_offsets(inputs)
        positions: dict[TopicPartition, int] = {}
        if await self._transact(part, step.records, offsets, positions):
            self._committed(part, step, len(inputs), positions)
            part.next_offsets.update(offsets)
            part.aborts = 0

    async def _process_one_by_one(self, part: OwnedTask, inputs: list[Input]) -> None:
        """Each input in a transaction of its own; an input whose outcome cannot be
        encoded or written becomes a dead letter, so the task keeps moving."""
        for item in inputs:
            tp = TopicPartition(item.source, item.partition)
            offsets = {tp: item.offset + 1}
            positions: dict[TopicPartition, int] = {}
            try:
                step = await part.task.process([item], self.clock.now_ms())
                committed = await self._transact(part, step.records, offsets, positions)
            except Exception as exc:
                log.exception(
                    "%s task %d: input %s/%d cannot be processed",
                    self.name,
                    part.number,
                    item.source,
                    item.offset,
                )
                committed = False
                step = part.task.isolated(item, self.clock.now_ms(), f"{exc!r}")
            still_ours = self.parts.get(part.number) is part  # not taken back or fenced
            if not committed and still_ours and part.next_offsets.get(tp) == item.offset:
                step = part.task.isolated(
                    item, self.clock.now_ms(), "its outcome was refused by Kafka"
                )
                positions.clear()
                committed = await self._transact(part, step.records, offsets, positions)
            if not committed:
                return
            self._committed(part, step, 1, positions)
            part.next_offsets[tp] = item.offset + 1
        part.aborts = 0

    def _committed(
        self, part: OwnedTask, step: Step, inputs: int, positions: Mapping[TopicPartition, int]
    ) -> None:
        # The transaction is durable: only now does its state become the committed state.
        step.commit()
        self._store_committed(part.task, step, positions)
        stats = part.stats
        stats.batches += 1
        stats.inputs += inputs
        stats.events += step.events
        stats.forwards += step.forwards
        stats.dead_letters += step.dead_letters

    async def _fire_timers(self, part: OwnedTask) -> None:
        step = part.task.due(self.clock.now_ms())
        positions: dict[TopicPartition, int] = {}
        if (
            step is not None
            and step.records
            and await self._transact(part, step.records, None, positions)
        ):
            step.commit()
            self._store_committed(part.task, step, positions)

    @staticmethod
    def _store_committed(task: Task, step: Step, positions: Mapping[TopicPartition, int]) -> None:
        """Write a committed step's changelog records to the task's local store, with the
        position the broker gave the last of them."""
        store = task.store
        if store is None or step.changelog is None:
            return
        topic, number = store.identity.topic, store.identity.partition
        position = positions.get(TopicPartition(topic, number))
        last = None
        for record in step.records:
            if record[0] == topic and record[1] == number:
                last = record
        if position is None or last is None:
            return
        store.write(
            step.changelog.active,
            step.changelog.finished,
            (),
            Checkpoint(position, position - 1, record_digest(last[2], last[3])),
        )


def _next_offsets(inputs: Sequence[Input]) -> dict[TopicPartition, int]:
    """The offsets to commit once ``inputs`` are done: one past the last of each partition."""
    return {TopicPartition(item.source, item.partition): item.offset + 1 for item in inputs}
