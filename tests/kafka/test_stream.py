"""The exactly-once stream processor's four transaction outcomes, on the real broker,
through the smallest user of it: a keyed counter made of a pure decide/evolve pair
(``engine.kafka.keyed``). Each input carries an id; the checks read the events topic
read_committed and want every accepted id exactly once, and state equal to its fold."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any
from uuid import uuid4

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import NewTopic

from engine.codec import decode
from engine.core.records import DeadLetter
from engine.kafka.keyed import KeyedLogic, KeyedProcessor, KeyedTopics
from engine.kafka.stream import MAX_ABORTS
from engine.kafka.topics import COMPACTED, delete_topics, ensure_topics, key_partition
from tests.kafka.helpers import eventually, produce, read_all, running

pytestmark = pytest.mark.kafka

PARTITIONS = 2
ECHO_LIMIT = 2000
"""``max.message.bytes`` of the echo topic: an input asking for more is refused there."""


@dataclass(frozen=True)
class Counted:
    total: int = 0
    seen: tuple[str, ...] = ()
    reminder: int = 0
    fired: int = 0


def _decide(state: Counted | None, command: dict[str, Any], now: int) -> list[dict[str, Any]]:
    state = state or Counted()
    if command["id"] in state.seen:
        return []  # a duplicate: the core de-duplicates, as the run core does
    if command.get("fire"):
        return [command] if state.reminder else []  # a timer that no longer applies
    return [command]


def _evolve(state: Counted | None, event: dict[str, Any]) -> Counted:
    state = state or Counted()
    seen = (*state.seen, event["id"])
    if event.get("fire"):
        return replace(state, seen=seen, reminder=0, fired=state.fired + 1)
    return replace(
        state,
        total=state.total + event["add"],
        seen=seen,
        reminder=event.get("remind_at", state.reminder),
    )


def _state_bytes(state: Counted) -> bytes:
    return json.dumps([state.total, list(state.seen), state.reminder, state.fired]).encode()


def _state_of(value: bytes) -> Counted:
    total, seen, reminder, fired = json.loads(value)
    return Counted(total, tuple(seen), reminder, fired)


def _logic(echo_topic: str) -> KeyedLogic[dict[str, Any], Counted, dict[str, Any]]:
    return KeyedLogic(
        decode=json.loads,
        key=lambda c: c["key"],
        decide=_decide,
        evolve=_evolve,
        encode_event=lambda e: json.dumps(e).encode(),
        encode_state=_state_bytes,
        decode_state=_state_of,
        encode_command=lambda c: json.dumps(c, sort_keys=True).encode(),
        outputs=lambda e: [(echo_topic, e["key"].encode(), b"x" * e.get("echo", 1))],
        timers=lambda key, s: (
            [(s.reminder, {"id": f"fire:{s.reminder}", "key": key, "fire": True})]
            if s.reminder
            else []
        ),
    )


@pytest.fixture
def keyed(kafka_bootstrap: str) -> Iterator[tuple[KeyedTopics, str]]:
    prefix = f"k{uuid4().hex[:8]}"
    topics = KeyedTopics(
        inputs=f"{prefix}.counts",
        events=f"{prefix}.counted",
        changelog=f"{prefix}.count-state",
        dead_letters=f"{prefix}.dead",
        partitions=PARTITIONS,
    )
    echo = f"{prefix}.echo"
    asyncio.run(
        ensure_topics(
            kafka_bootstrap,
            [
                NewTopic(topics.inputs, PARTITIONS, 1),
                NewTopic(topics.events, PARTITIONS, 1),
                NewTopic(topics.changelog, PARTITIONS, 1, topic_configs=dict(COMPACTED)),
                NewTopic(topics.dead_letters, PARTITIONS, 1),
                NewTopic(echo, PARTITIONS, 1, topic_configs={"max.message.bytes": str(ECHO_LIMIT)}),
            ],
        )
    )
    yield topics, echo
    asyncio.run(delete_topics(kafka_bootstrap, prefix))


def _adds(n: int, start: int = 0, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"id": f"a{i}", "key": f"key-{i % 5}", "add": i, **extra} for i in range(start, start + n)
    ]


async def _send(bootstrap: str, topics: KeyedTopics, commands: Sequence[dict[str, Any]]) -> None:
    await produce(
        bootstrap,
        topics.inputs,
        [
            (
                json.dumps(c).encode(),
                c["key"].encode(),
                key_partition(c["key"].encode(), topics.partitions),
            )
            for c in commands
        ],
    )


async def _counted(bootstrap: str, topics: KeyedTopics) -> Counter[str]:
    records = await read_all(bootstrap, topics.events, topics.partitions)
    return Counter(json.loads(r.value)["id"] for r in records)


def _totals(commands: Sequence[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in commands:
        out[c["key"]] = out.get(c["key"], 0) + c.get("add", 0)
    return out


def _exactly_once(counted: Counter[str], commands: Sequence[dict[str, Any]]) -> None:
    doubled = {i: n for i, n in counted.items() if n > 1}
    missing = [c["id"] for c in commands if c["id"] not in counted]
    assert not doubled and not missing, f"committed twice: {doubled}; never: {missing}"


class Recording(KeyedProcessor[dict[str, Any], Counted, dict[str, Any]]):
    """Remembers each producer it makes, with the epoch the broker gave it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epochs: dict[int, list[int]] = {}

    async def _new_producer(self, number: int) -> AIOKafkaProducer:
        producer = await super()._new_producer(number)
        self.epochs.setdefault(number, []).append(producer._txn_manager.producer_epoch)
        return producer


def test_committed_inputs_count_once_and_survive_a_restart(
    kafka_bootstrap: str, keyed: tuple[KeyedTopics, str]
) -> None:
    topics, echo = keyed
    first, second = _adds(40), _adds(20, start=40)

    async def main() -> None:
        await _send(kafka_bootstrap, topics, first)
        processor = KeyedProcessor(
            kafka_bootstrap, "counter", _logic(echo), topics, app=topics.inputs
        )
        async with running(processor.run):
            assert await eventually(
                lambda: all(
                    (s := processor.state(k)) is not None and s.total == v
                    for k, v in _totals(first).items()
                ),
                timeout_s=60,
            )
        # A new process restores each key from the changelog and goes on from there.
        again = KeyedProcessor(kafka_bootstrap, "counter", _logic(echo), topics, app=topics.inputs)
        async with running(again.run):
            await _send(kafka_bootstrap, topics, [*second, *first[:5]])  # 5 repeats
            assert await eventually(
                lambda: all(
                    (s := again.state(k)) is not None and s.total == v
                    for k, v in _totals(first + second).items()
                ),
                timeout_s=60,
            )
            assert again.stats.restored_states == 5
        _exactly_once(await _counted(kafka_bootstrap, topics), first + second)

    asyncio.run(main())


def test_an_aborted_transaction_gets_a_new_epoch_and_its_input_a_dead_letter(
    kafka_bootstrap: str, keyed: tuple[KeyedTopics, str]
) -> None:
    """ABORTED: the broker refuses the echo of ``poison`` (over the topic's size limit),
    so its transactions abort; each abort replaces the producer (a higher epoch), and
    after ``MAX_ABORTS`` the input is isolated and dead-lettered. Nothing of the aborted
    transactions is visible; the inputs around it commit once."""
    topics, echo = keyed
    poison = {"id": "poison", "key": "key-1", "add": 1000, "echo": ECHO_LIMIT * 2}
    commands = [*_adds(6), poison, *_adds(6, start=6)]

    async def main() -> None:
        processor = Recording(kafka_bootstrap, "counter", _logic(echo), topics, app=topics.inputs)
        async with running(processor.run):
            assert await eventually(lambda: len(processor.parts) == PARTITIONS, timeout_s=60)
            await _send(kafka_bootstrap, topics, commands)
            assert await eventually(lambda: processor.stats.dead_letters == 1, timeout_s=60)
            assert await eventually(
                lambda: all(
                    (s := processor.state(k)) is not None and s.total == v
                    for k, v in _totals([*_adds(6), *_adds(6, start=6)]).items()
                ),
                timeout_s=60,
            )
            home = key_partition(b"key-1", PARTITIONS)
            epochs = processor.epochs[home]
            assert processor.stats.aborted >= MAX_ABORTS
            assert len(epochs) == 1 + processor.stats.aborted, epochs
            assert epochs == sorted(set(epochs)), f"an abort reused an epoch: {epochs}"
        counted = await _counted(kafka_bootstrap, topics)
        assert "poison" not in counted
        _exactly_once(counted, [c for c in commands if c is not poison])
        dead = [
            decode(r.value)
            for r in await read_all(kafka_bootstrap, topics.dead_letters, PARTITIONS)
        ]
        assert [d.reason for d in dead if isinstance(d, DeadLetter)] == ["engine_error"]

    asyncio.run(main())


class LosingAnswers(KeyedProcessor[dict[str, Any], Counted, dict[str, Any]]):
    """The first ``failures`` commits reach the broker but their answer never comes back."""

    def __init__(self, *args: Any, failures: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures = failures

    async def _new_producer(self, number: int) -> AIOKafkaProducer:
        producer = await super()._new_producer(number)
        real_commit = producer.commit_transaction

        async def commit() -> None:
            await real_commit()
            if self.failures > 0:
                self.failures -= 1
                await asyncio.sleep(3600)  # the answer is lost: the processor times out

        producer.commit_transaction = commit  # type: ignore[method-assign]
        return producer


def test_an_unknown_outcome_restores_from_the_changelog_and_doubles_nothing(
    kafka_bootstrap: str, keyed: tuple[KeyedTopics, str]
) -> None:
    """UNKNOWN: a commit that happened but was never confirmed. The task replaces its
    producer and restores from the changelog, which has the batch: nothing is decided
    twice, nothing is lost."""
    topics, echo = keyed
    commands = _adds(30)

    async def main() -> None:
        processor = LosingAnswers(
            kafka_bootstrap,
            "counter",
            _logic(echo),
            topics,
            app=topics.inputs,
            commit_timeout_s=0.5,
            failures=3,
            max_batch=4,
        )
        async with running(processor.run):
            assert await eventually(lambda: len(processor.parts) == PARTITIONS, timeout_s=60)
            await _send(kafka_bootstrap, topics, commands)
            assert await eventually(
                lambda: all(
                    (s := processor.state(k)) is not None and s.total == v
                    for k, v in _totals(commands).items()
                ),
                timeout_s=60,
            )
            assert processor.stats.unknown_outcomes == 3
            assert processor.stats.restores == PARTITIONS + 3
        _exactly_once(await _counted(kafka_bootstrap, topics), commands)

    asyncio.run(main())


def test_a_fenced_task_is_taken_back_and_goes_on_exactly_once(
    kafka_bootstrap: str, keyed: tuple[KeyedTopics, str]
) -> None:
    """FENCED: a newer producer with a task's transactional id takes it; the task stops,
    and is taken back (after ``refence_pause_s``) while the group still assigns it here."""
    topics, echo = keyed
    commands = _adds(20)

    async def main() -> None:
        processor = KeyedProcessor(
            kafka_bootstrap, "counter", _logic(echo), topics, app=topics.inputs
        )
        processor.refence_pause_s = 0.5
        async with running(processor.run):
            assert await eventually(lambda: len(processor.parts) == PARTITIONS, timeout_s=60)
            intruder = AIOKafkaProducer(
                bootstrap_servers=kafka_bootstrap,
                transactional_id=f"{topics.inputs}-{topics.inputs}-0",
            )
            await intruder.start()
            await intruder.stop()
            await _send(kafka_bootstrap, topics, commands)
            assert await eventually(lambda: processor.stats.fenced == 1, timeout_s=30)
            assert await eventually(
                lambda: all(
                    (s := processor.state(k)) is not None and s.total == v
                    for k, v in _totals(commands).items()
                ),
                timeout_s=60,
            )
        _exactly_once(await _counted(kafka_bootstrap, topics), commands)

    asyncio.run(main())


def test_timers_fire_once_and_a_misrouted_input_says_where_it_belongs(
    kafka_bootstrap: str, keyed: tuple[KeyedTopics, str]
) -> None:
    topics, echo = keyed

    async def main() -> None:
        processor = KeyedProcessor(
            kafka_bootstrap, "counter", _logic(echo), topics, app=topics.inputs
        )
        async with running(processor.run):
            assert await eventually(lambda: len(processor.parts) == PARTITIONS, timeout_s=60)
            remind_at = processor.clock.now_ms() + 300
            await _send(
                kafka_bootstrap,
                topics,
                [{"id": "r", "key": "key-2", "add": 1, "remind_at": remind_at}],
            )
            home = key_partition(b"key-3", PARTITIONS)
            await produce(
                kafka_bootstrap,
                topics.inputs,
                [
                    (
                        json.dumps({"id": "lost", "key": "key-3", "add": 1}).encode(),
                        b"key-3",
                        1 - home,
                    )
                ],
            )
            assert await eventually(
                lambda: (s := processor.state("key-2")) is not None and s.fired == 1, timeout_s=30
            )
            assert await eventually(lambda: processor.stats.dead_letters == 1, timeout_s=30)
        dead = [
            decode(r.value)
            for r in await read_all(kafka_bootstrap, topics.dead_letters, PARTITIONS)
        ]
        assert len(dead) == 1 and isinstance(dead[0], DeadLetter)
        assert dead[0].reason == "wrong_partition"
        assert f"lives on partition {home}" in dead[0].detail

    asyncio.run(main())
