"""Messages and keyed waits racing while the engine (run engine and message correlation in
one process) is SIGKILLed: each run gets the message of its own key exactly once, a run
whose key has no message keeps waiting, and each published message is one message."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from collections import Counter

import pytest
from aiokafka import TopicPartition

from engine.codec import decode
from engine.core.correlation import (
    DEFAULT_TTL_MS,
    MessageCorrelated,
    MessagePublished,
    PublishMessage,
)
from engine.core.events import CommandRejectedV2, SignalReceived
from engine.core.spec import load_spec
from engine.core.state import RunStatus
from tests.faults.checkers import Check, assert_checks, run_checks
from tests.faults.harness import Fleet, LogView, read_to_end

pytestmark = [
    pytest.mark.faults,
    pytest.mark.kafka,
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.chaos,
]

KEYED = load_spec(
    {
        "workflow": "keyed",
        "version": 1,
        "input": {"n": "integer", "order": "string"},
        "steps": [
            {
                "id": "pay",
                "wait_event": {"name": "payment", "key": "input.order", "timeout": "30m"},
            },
            {"id": "notify", "task": "test.notify"},
        ],
    }
)


def _order(key: str) -> str:
    return f"order-{key}"


def _message(key: str, copy: int = 0) -> PublishMessage:
    """The message for ``key``'s run; every copy has the same id (a producer's retry)."""
    return PublishMessage(
        message_id=f"paid-{key}",
        name="payment",
        key=_order(key),
        data={"order": _order(key), "copy": copy},
        ttl_ms=DEFAULT_TTL_MS,
    )


def check_correlation(
    fleet: Fleet, view: LogView, paid: set[str], unpaid: set[str], strangers: set[str]
) -> Check:
    """Each paid run received one message, its own; no unpaid run received one; no
    message is published twice or reaches a run twice; no stranger message reached a run."""
    check = Check("each keyed wait got its own message exactly once, no other wait any")
    states = view.states()
    received: Counter[str] = Counter()
    refused = 0
    for run_id, logged in view.events().items():
        for entry in logged:
            if isinstance(entry.record, SignalReceived):
                received[run_id] += 1
            elif (
                isinstance(entry.record, CommandRejectedV2)
                and entry.record.reason == "stale message"
            ):
                refused += 1
                check.fail(f"run {run_id}: a delivery was refused: {entry.record.detail}")
    for key in paid:
        run_id = fleet.sent.triggers[key]
        state = states.get(run_id)
        if state is None or state.status is not RunStatus.COMPLETED:
            check.fail(f"paid run {run_id} ({key}) is {state.status.value if state else 'missing'}")
            continue
        if received[run_id] != 1:
            check.fail(f"paid run {run_id} received {received[run_id]} messages")
        got = state.results.get("pay")
        if not isinstance(got, dict) or got.get("order") != _order(key):
            check.fail(f"paid run {run_id} ({key}) got another key's message: {got}")
    for key in unpaid:
        run_id = fleet.sent.triggers[key]
        state = states.get(run_id)
        if state is None or state.status is not RunStatus.WAITING or received[run_id]:
            check.fail(
                f"unpaid run {run_id} ({key}) is "
                f"{state.status.value if state else 'missing'} after "
                f"{received[run_id]} messages"
            )

    async def message_log() -> list[object]:
        parts = [TopicPartition(fleet.topics.message_events, p) for p in range(fleet.partitions)]
        return [
            decode(m.value)
            for _, m in await read_to_end(fleet.infra.bootstrap, parts, "read_committed")
        ]

    events = asyncio.run(message_log())
    published = Counter(e.message_id for e in events if isinstance(e, MessagePublished))
    correlated = Counter(
        (e.message_id, e.run_id) for e in events if isinstance(e, MessageCorrelated)
    )
    for message_id, n in published.items():
        if n != 1:
            check.fail(f"message {message_id} published {n} times (duplicates are one)")
    for (message_id, run_id), n in correlated.items():
        if n != 1:
            check.fail(f"message {message_id} correlated to {run_id} {n} times")
        if message_id.startswith("stray-"):
            check.fail(f"stray message {message_id} reached run {run_id}")
    missing = {f"paid-{k}" for k in paid} - set(published)
    if missing:
        check.fail(f"{len(missing)} published messages not in the log: {sorted(missing)[:5]}")
    check.found.append(
        f"{len(paid)} paid and {len(unpaid)} unpaid runs; {len(published)} "
        f"messages ({len(strangers)} for nobody), {len(correlated)} "
        f"deliveries, {refused} refused"
    )
    return check


@pytest.mark.timeout(600)
def test_messages_and_waits_race_while_the_engine_is_killed(
    fleet: Fleet, rng: random.Random, fault_seconds: float
) -> None:
    fleet.setup(KEYED)
    proc = fleet.start()
    keys = [f"{fleet.prefix}-{i}" for i in range(60)]
    early = {k for k in keys if rng.random() < 0.3}  # message before the run starts
    unpaid = {k for k in keys if k not in early and rng.random() < 0.2}
    paid = set(keys) - unpaid
    strangers = {f"stray-{i}" for i in range(10)}
    done = threading.Event()

    def load() -> None:
        fleet.publish([_message(k) for k in sorted(early)])
        pending = sorted(set(keys))
        rng.shuffle(pending)
        for i in range(0, len(pending), 6):
            batch = pending[i : i + 6]
            fleet.trigger(
                batch, workflow="keyed", input_of=lambda key: {"n": len(key), "order": _order(key)}
            )
            time.sleep(rng.uniform(0.0, fault_seconds / 10))
            # the message races the wait: sent right after the trigger, some twice
            fleet.publish(
                [
                    _message(k, copy)
                    for k in batch
                    if k in paid and k not in early
                    for copy in range(1 + (rng.random() < 0.3))
                ]
            )
        fleet.publish(
            [
                PublishMessage(message_id=s, name="payment", key=f"nobody-{s}", ttl_ms=0)
                for s in sorted(strangers)
            ]
        )
        fleet.publish([_message(k, 9) for k in sorted(early)])  # late duplicates
        done.set()

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    kills = 0
    while not done.is_set() or kills < 3:
        time.sleep(rng.uniform(0.5, 2.5))
        fleet.kill(proc, signal.SIGKILL)
        kills += 1
        proc = fleet.start()
    loader.join(120)
    expected = {fleet.sent.triggers[k] for k in paid}

    def settled(view: LogView) -> bool:
        states = view.states()
        return all(r in states and states[r].status is RunStatus.COMPLETED for r in expected)

    view, waited = fleet.wait_settled(240, done=settled)
    print(
        f"{len(keys)} runs, {len(early)} messages before their run, {kills} SIGKILLs; "
        f"settled {waited:.1f}s after the load"
    )
    checks = run_checks(
        fleet, view, allowed=frozenset({RunStatus.COMPLETED, RunStatus.WAITING}), writes=("notify",)
    )
    correlation = check_correlation(fleet, view, paid, unpaid, strangers)
    print(correlation.report())
    assert_checks([*checks, correlation])
