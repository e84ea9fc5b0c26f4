"""One admission scenario per rule kind, run on both backends: the embedded store (the
core in its SQLite transaction, time passed by ``tick``) and the admission processor on
the real broker (a manual clock, time passed by its own timers). Each must give exactly
the events the pure core gives for the same commands at the same times."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from engine.codec import decode, encode
from engine.core import admission as ad
from engine.embedded.admission import AdmissionStore
from engine.embedded.store import Store
from engine.kafka.admission import AdmissionProcessor, AdmissionTopics
from engine.kafka.topics import Topics, delete_topics, key_partition
from engine.runtime.clock import ManualClock
from tests.flow.admission_harness import T0, limits
from tests.infra import kafka_bootstrap
from tests.kafka.helpers import produce, read_all

KEY = "tool:t"
Step = tuple[int, ad.AdmissionCommand | None]
"""(ms to let pass first, the command to send then; None: only let the time pass)."""


def acquire(rid: str, version: int = 1, **fields: Any) -> ad.AdmissionCommand:
    rule = fields.pop("rule", {"concurrency": 1, "lease": "1m"})
    return ad.Acquire(
        KEY, rid, limits=limits(**rule), version=version, reply_to=f"run-{rid}", **fields
    )


def release(rid: str, outcome: str = "ok", **fields: Any) -> ad.AdmissionCommand:
    return ad.Release(KEY, rid, ad.Outcome(outcome), **fields)


SCENARIOS: dict[str, list[Step]] = {
    "concurrency": [(0, acquire("a")), (0, acquire("b")), (5, release("a")), (5, release("b"))],
    "priority": [
        (0, acquire("hold")),
        (0, acquire("low")),
        (0, acquire("high", priority=3)),
        (5, release("hold")),
        (5, release("high")),
    ],
    "fairness": [
        (0, acquire("hold", tenant="x")),
        *[(0, acquire(f"heavy{i}", tenant="heavy")) for i in range(3)],
        (0, acquire("light0", tenant="light")),
        (5, release("hold")),
        (5, release("heavy0")),
        (5, release("light0")),
    ],
    "pause_resume": [(0, ad.Pause(KEY)), (0, acquire("a")), (5, ad.Resume(KEY))],
    "lease_expiry": [(0, acquire("crashed", lease_ms=2_000)), (0, acquire("next")), (2_000, None)],
    "rate": [
        (0, acquire("a", rule={"rate": "1/s"})),
        (0, acquire("b", rule={"rate": "1/s"})),
        (1_000, None),
    ],
    "retry_after": [(0, ad.Throttle(KEY, T0 + 1_500)), (0, acquire("a")), (1_500, None)],
    "budget_fail": [
        (
            0,
            acquire(
                "a",
                rule={"budget": {"amount": 1, "per": "day", "estimate": 1, "on_exhausted": "fail"}},
            ),
        ),
        (0, acquire("b")),
    ],
    "breaker": [
        *[
            step
            for i in range(2)
            for step in (
                (
                    0,
                    acquire(
                        f"c{i}",
                        rule={"breaker": {"failure_rate": 0.5, "min_calls": 2, "open_for": "3s"}},
                    ),
                ),
                (5, release(f"c{i}", "failed")),
            )
        ],
        (0, acquire("waits")),
        (3_000, None),
        (5, release("waits")),
    ],
}


def oracle(steps: list[Step]) -> list[ad.AdmissionEvent]:
    """What the pure core gives: time passing is a Tick when a timer is due."""
    state: ad.AdmissionState | None = None
    now, out = T0, []
    for wait, command in steps:
        now += wait
        for c in (
            [ad.Tick(KEY, now)]
            if state is not None and (d := ad.next_due(state)) is not None and d <= now
            else []
        ) + ([command] if command else []):
            events = ad.decide(state, c, now)
            for e in events:
                state = ad.evolve(state, e)
            out.extend(events)
    return out


class Backend(Protocol):
    def play(
        self, steps: list[Step], expected: list[ad.AdmissionEvent]
    ) -> list[ad.AdmissionEvent]: ...


class Embedded:
    def __init__(self, path: Path) -> None:
        self.store = Store(path)
        self.admission = AdmissionStore(self.store)

    def play(self, steps: list[Step], expected: list[ad.AdmissionEvent]) -> list[ad.AdmissionEvent]:
        now = T0
        for wait, command in steps:
            now += wait
            self.admission.tick(now)
            if command is not None:
                self.admission.apply([command], now)
        return self.admission.events()


class OnKafka:
    """The processor in a thread of its own, on a manual clock the test moves."""

    def __init__(self, topics: Topics) -> None:
        self.bootstrap = kafka_bootstrap()
        self.topics = topics
        self.clock = ManualClock(T0)
        self.processor = AdmissionProcessor(
            self.bootstrap, topics, app=topics.prefix, clock=self.clock
        )
        self.stop = asyncio.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self.processor.run(self.stop),), daemon=True
        )

    def start(self) -> None:
        asyncio.run(AdmissionTopics(self.topics).ensure(self.bootstrap))
        self.thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(timeout=60)
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def events(self) -> list[ad.AdmissionEvent]:
        keyed = AdmissionTopics(self.topics).keyed
        records = asyncio.run(read_all(self.bootstrap, keyed.events, self.topics.partitions))
        return [e for r in records if isinstance(e := decode(r.value), ad.EVENT_TYPES)]

    def _until(self, done: Callable[[list[ad.AdmissionEvent]], bool]) -> list[Any]:
        for _ in range(600):
            got = self.events()
            if done(got):
                return got
            threading.Event().wait(0.1)
        return self.events()

    def play(self, steps: list[Step], expected: list[ad.AdmissionEvent]) -> list[ad.AdmissionEvent]:
        inputs = AdmissionTopics(self.topics).keyed.inputs
        partition = key_partition(KEY.encode(), self.topics.partitions)
        # Walk the steps; before each one, wait for the events the oracle says come first.
        walked: list[Step] = []
        for wait, command in steps:
            walked.append((wait, command))
            self.clock.advance(wait)
            if command is not None:
                asyncio.run(
                    produce(self.bootstrap, inputs, [(encode(command), KEY.encode(), partition)])
                )
            count = len(oracle(walked))
            self._until(lambda got, n=count: len(got) >= n)
        return self._until(lambda got: len(got) >= len(expected))


@pytest.fixture(params=["embedded", "kafka"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "embedded":
        embedded = Embedded(tmp_path / "s.db")
        yield embedded
        embedded.store.close()
        return
    topics = Topics(prefix=f"c{uuid.uuid4().hex[:8]}", partitions=2)
    kafka = OnKafka(topics)
    kafka.start()
    try:
        yield kafka
    finally:
        kafka.close()
        asyncio.run(delete_topics(kafka.bootstrap, topics.prefix))


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_each_backend_gives_the_events_the_core_gives(name: str, backend: Backend) -> None:
    steps = SCENARIOS[name]
    expected = oracle(steps)
    assert any(isinstance(e, ad.Granted) for e in expected), "the scenario grants nothing"
    assert backend.play(steps, expected) == expected
