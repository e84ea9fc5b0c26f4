"""A keyed processor from a pure decide/evolve pair and topic names.

The processors that serialise on something other than a run (a limit key, a schedule, a
correlation key) are this: commands keyed by that key on an inputs topic; per key, a
state folded from the events ``decide`` returns; the events on an events topic, the state
on a compacted changelog, the commands the events cause on their own topics, all in the
transaction of the batch (``engine.kafka.stream``). A timer is a command the state asks
to be written to its own inputs at a time; it is decided like any other, so a timer that
no longer applies is the core's to refuse.

The inputs, events and changelog topics are co-partitioned by key (Kafka's default
partitioner on the key's bytes). An input that reached the wrong partition, or does not
decode, becomes a dead letter that says why.
"""

from __future__ import annotations

import heapq
import logging
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from aiokafka import TopicPartition

from engine.codec import encode
from engine.core.records import DeadLetter
from engine.kafka._util import Record
from engine.kafka.stream import Step, StreamProcessor, Task
from engine.kafka.topics import key_partition
from engine.runtime.clock import Clock
from engine.runtime.processor import Input, dead_letter

C = TypeVar("C")
S = TypeVar("S")
E = TypeVar("E")

log = logging.getLogger("terranoha.kafka.keyed")

REFIRE_AFTER_MS = 10_000
"""A timer whose command did not change its state is written again after this long."""


@dataclass(frozen=True, slots=True)
class KeyedTopics:
    """Where a keyed processor lives; every topic has ``partitions`` partitions."""

    inputs: str
    events: str
    changelog: str
    dead_letters: str
    partitions: int


@dataclass(frozen=True)
class KeyedLogic(Generic[C, S, E]):
    """The pure part of a keyed processor, and how its records are encoded.

    ``decide(state, command, now)`` returns the events of a command (none to ignore it);
    it must not raise on bad input. ``evolve(state, event)`` folds one event into the
    state. ``outputs(event)`` lists the (topic, key, value) records an event causes.
    ``timers(key, state)`` lists (due_at, command) pairs to be written back to the inputs.
    ``empty(state)`` says a key has nothing left to keep: its changelog entry becomes a
    tombstone and the key leaves memory, so both follow live keys, not history."""

    decode: Callable[[bytes], C]
    """Raises on bytes that are not a command: the input becomes a dead letter."""
    key: Callable[[C], str]
    decide: Callable[[S | None, C, int], Sequence[E]]
    evolve: Callable[[S | None, E], S]
    encode_event: Callable[[E], bytes]
    encode_state: Callable[[S], bytes]
    decode_state: Callable[[bytes], S]
    encode_command: Callable[[C], bytes]
    outputs: Callable[[E], Sequence[tuple[str, bytes, bytes]]] = lambda event: ()
    timers: Callable[[str, S], Sequence[tuple[int, C]]] = lambda key, state: ()
    empty: Callable[[S], bool] = lambda state: False


@dataclass(slots=True)
class _Batch(Generic[S]):
    states: dict[str, S] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    events: int = 0
    dead: int = 0


class KeyedTask(Task, Generic[C, S, E]):
    """The keys of one partition: their committed state and armed timers."""

    def __init__(self, logic: KeyedLogic[C, S, E], topics: KeyedTopics, number: int) -> None:
        self.logic = logic
        self.topics = topics
        self.number = number
        self.states: dict[str, S] = {}
        self._timers: list[tuple[int, str, bytes]] = []

    async def restore(self, latest: Mapping[bytes, bytes]) -> int:
        for raw, value in latest.items():
            self.states[raw.decode()] = self.logic.decode_state(value)
        for key, state in self.states.items():
            self._arm(key, state)
        return len(self.states)

    async def process(self, inputs: Sequence[Input], now: int) -> Step:
        batch: _Batch[S] = _Batch()
        for item in inputs:
            self._one(batch, item, now)
        for key, state in batch.states.items():
            value = None if self.logic.empty(state) else self.logic.encode_state(state)
            batch.records.append((self.topics.changelog, self.number, key.encode(), value, []))
        return Step(
            batch.records,
            commit=lambda: self._commit(batch.states),
            events=batch.events,
            dead_letters=batch.dead,
        )

    def _one(self, batch: _Batch[S], item: Input, now: int) -> None:
        logic = self.logic
        try:
            command = logic.decode(item.payload)
        except Exception as exc:
            self._dead(batch, item, "undecodable", f"not a command: {exc}", now)
            return
        key = logic.key(command)
        home = key_partition(key.encode(), self.topics.partitions)
        if home != self.number:
            self._dead(
                batch,
                item,
                "wrong_partition",
                f"key {key!r} lives on partition {home}, not {self.number}: key the "
                "record by it with Kafka's default partitioner (murmur2)",
                now,
            )
            return
        state = batch.states[key] if key in batch.states else self.states.get(key)
        try:
            events = logic.decide(state, command, now)
            for event in events:
                state = logic.evolve(state, event)
        except Exception as exc:  # a defect in the logic: keep the partition moving
            detail = "".join(traceback.format_exception_only(exc)).strip()
            self._dead(batch, item, "engine_error", detail, now)
            return
        if not events:
            return
        assert state is not None
        batch.states[key] = state
        batch.events += len(events)
        for event in events:
            batch.records.append(
                (self.topics.events, self.number, key.encode(), logic.encode_event(event), [])
            )
            for topic, out_key, value in logic.outputs(event):
                batch.records.append(
                    (topic, key_partition(out_key, self.topics.partitions), out_key, value, [])
                )

    def _dead(self, batch: _Batch[S], item: Input, reason: str, detail: str, now: int) -> None:
        letter = dead_letter(
            item.source, item.partition, item.offset, reason, detail, item.payload, now
        )
        batch.records.append(self._dead_record(letter))
        batch.dead += 1

    def _dead_record(self, letter: DeadLetter) -> Record:
        log.warning(
            "dead letter %s/%d/%d: %s: %s",
            letter.source,
            letter.partition,
            letter.offset,
            letter.reason,
            letter.detail,
        )
        return (
            self.topics.dead_letters,
            self.number,
            None,
            encode(letter),
            [("reason", letter.reason.encode())],
        )

    def isolated(self, item: Input, now: int, why: str) -> Step:
        letter = dead_letter(
            item.source,
            item.partition,
            item.offset,
            "engine_error",
            f"processing failed: {why}",
            item.payload,
            now,
        )
        return Step([self._dead_record(letter)], dead_letters=1)

    def _commit(self, states: Mapping[str, S]) -> None:
        for key, state in states.items():
            if self.logic.empty(state):
                self.states.pop(key, None)  # its timers are no longer armed (``_armed``)
                continue
            self.states[key] = state
            self._arm(key, state)

    def _arm(self, key: str, state: S) -> None:
        for due_at, command in self.logic.timers(key, state):
            heapq.heappush(self._timers, (due_at, key, self.logic.encode_command(command)))

    def _armed(self, key: str, value: bytes) -> bool:
        state = self.states.get(key)
        return state is not None and any(
            self.logic.encode_command(c) == value for _, c in self.logic.timers(key, state)
        )

    def next_due(self) -> int | None:
        return self._timers[0][0] if self._timers else None

    def due(self, now: int) -> Step | None:
        records: list[Record] = []
        while self._timers and self._timers[0][0] <= now and len(records) < 1000:
            _, key, value = heapq.heappop(self._timers)
            if self._armed(key, value):
                records.append((self.topics.inputs, self.number, key.encode(), value, []))
                heapq.heappush(self._timers, (now + REFIRE_AFTER_MS, key, value))
        return Step(records) if records else None


class KeyedProcessor(StreamProcessor, Generic[C, S, E]):
    """A ``KeyedLogic`` on its topics, exactly once (consumer group ``<app>-<name>``)."""

    def __init__(
        self,
        bootstrap: str,
        name: str,
        logic: KeyedLogic[C, S, E],
        topics: KeyedTopics,
        *,
        app: str = "terranoha",
        clock: Clock | None = None,
        commit_timeout_s: float = 15.0,
        instance_id: str | None = None,
        max_batch: int = 1000,
    ) -> None:
        self.logic = logic
        self.topics = topics
        super().__init__(
            bootstrap,
            name=name,
            inputs=[topics.inputs],
            group_id=f"{app}-{name}",
            transactional_id=lambda number: f"{app}-{topics.inputs}-{number}",
            make_task=lambda number: KeyedTask(logic, topics, number),
            changelog=self._changelog,
            clock=clock,
            commit_timeout_s=commit_timeout_s,
            instance_id=instance_id,
            max_batch=max_batch,
        )

    async def _changelog(self, number: int) -> list[TopicPartition]:
        return [TopicPartition(self.topics.changelog, number)]

    def state(self, key: str) -> S | None:
        """The committed state of ``key``, if this process owns its partition."""
        part = self.parts.get(key_partition(key.encode(), self.topics.partitions))
        if part is None or not isinstance(part.task, KeyedTask):
            return None
        state: S | None = part.task.states.get(key)
        return state
