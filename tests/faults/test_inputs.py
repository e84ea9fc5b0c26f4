"""Duplicate and poison inputs: the same trigger many times, the same task result twice,
and records of every broken kind on the triggers and run inputs topics."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest

from engine.codec import encode
from engine.core.commands import CompleteTask, StartRun
from engine.core.events import CommandRejected
from engine.core.records import Trigger
from engine.runtime.processor import MAX_INPUT_BYTES
from tests.faults.checkers import assert_checks, run_checks
from tests.faults.harness import Fleet, LogView

pytestmark = [pytest.mark.faults, pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


@pytest.mark.timeout(600)
def test_duplicate_triggers_and_results(
    fleet: Fleet, rng: random.Random, fault_seconds: float
) -> None:
    fleet.setup()
    fleet.start()
    fleet.start()
    keys = [f"{fleet.prefix}-dup-{i}" for i in range(int(20 * fault_seconds))]
    senders = [
        threading.Thread(
            target=fleet.trigger, args=(rng.sample(keys, len(keys)),), kwargs={"copies": 2}
        )
        for _ in range(4)
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    # Task results delivered again: once while most runs are still going, once after.
    again: list[CompleteTask] = []
    for when in ("mid-flight", "after"):
        if when == "after":
            fleet.wait_settled(240)
        else:
            time.sleep(rng.uniform(1.5, 3.0))
        seen = {c.command_id for c in again}
        results = [
            i.record
            for i in fleet.read_inputs()
            if isinstance(i.record, CompleteTask) and i.record.command_id not in seen
        ]
        batch = rng.sample(results, min(len(results), 50))
        fleet.send_commands(list(batch))
        again += batch
    resent = {c.command_id for c in again}

    def rejected_all(v: LogView) -> bool:
        seen = {e.record.causation_id for e in v.committed if isinstance(e.record, CommandRejected)}
        return resent <= seen

    view, _ = fleet.wait_settled(
        240,
        done=lambda v: (
            rejected_all(v)
            and all(r in v.states() and v.states()[r].terminal for r in fleet.sent.run_ids)
        ),
    )
    rejections = Counter(
        e.record.reason
        for e in view.committed
        if isinstance(e.record, CommandRejected) and e.record.causation_id in resent
    )
    print(
        f"drove {len(keys)} keys, each published 8 times by 4 concurrent senders "
        f"({fleet.sent.copies} trigger records); re-delivered {len(again)} task results "
        f"(half mid-flight): rejections {dict(rejections)}"
    )
    checks = run_checks(fleet, view)
    assert_checks(checks)
    assert sum(rejections.values()) == len(again), "every re-delivered result is rejected"


def _poison(rng: random.Random, template: bytes) -> dict[str, bytes]:
    return {
        "garbage": rng.randbytes(64),
        "truncated": template[: len(template) // 2],
        "unknown_schema": b"\x00\x7f\xff\xff\xf0" + template[5:],
    }


def _unknown_workflow_start(fleet: Fleet, number: int) -> bytes:
    return encode(
        StartRun(
            command_id=f"c-nowf-{number}",
            run_id=f"{fleet.prefix}-nowf-{number}",
            workflow="no-such-workflow",
            version=1,
        )
    )


@pytest.mark.timeout(600)
def test_poison_records(fleet: Fleet, rng: random.Random, fault_seconds: float) -> None:
    """Garbage, truncated Avro, an unknown schema id and an unknown workflow on both topics,
    under load: each becomes one dead letter with a diagnostic, the rest carries on."""
    fleet.setup()
    fleet.start()
    load = fleet.load(fault_seconds, rate=20)
    trigger = encode(Trigger(workflow="durable", idempotency_key="poison-template"))
    start = encode(
        StartRun(command_id="c-poison", run_id="r-poison", workflow="durable", version=1)
    )
    on_triggers = {
        **_poison(rng, trigger),
        "unknown_workflow": encode(
            Trigger(workflow="no-such-workflow", idempotency_key=f"{fleet.prefix}-nowf")
        ),
    }
    fleet.send_raw(fleet.topics.triggers, [(b"poison", v) for v in on_triggers.values()])
    for number in range(fleet.partitions):
        on_inputs = [*_poison(rng, start).values(), _unknown_workflow_start(fleet, number)]
        fleet.send_raw(fleet.topics.inputs, [(b"poison", v) for v in on_inputs], partition=number)
    load.join()
    expected = len(on_triggers) + 4 * fleet.partitions
    view, _ = fleet.wait_settled(
        240,
        done=lambda v: (
            len(v.dead) >= expected
            and all(r in v.states() and v.states()[r].terminal for r in fleet.sent.run_ids)
        ),
    )
    reasons = Counter((d.source.rsplit(".", 1)[-1], d.reason) for d in view.dead)
    print(
        f"drove {len(fleet.sent.triggers)} runs; poison: {sorted(on_triggers)} on the "
        f"triggers topic, the same (a StartRun for the unknown workflow) on each of "
        f"{fleet.partitions} run input partitions; dead letters {dict(reasons)}"
    )
    assert_checks(run_checks(fleet, view))
    for dead in view.dead:
        assert dead.detail, f"a dead letter without a diagnostic: {dead}"
    assert len(view.dead) == expected, f"expected {expected} dead letters: {dict(reasons)}"


@pytest.mark.timeout(600)
def test_oversize_poison(fleet: Fleet, rng: random.Random, fault_seconds: float) -> None:
    """An input over the engine's 1 MiB limit (topics that accept it) is dead-lettered, and
    the records after it in the same batch are processed too.

    Fails today: the DeadLetter carries the whole payload, so it is larger than the
    dead-letter topic accepts; the send fails with MessageSizeTooLargeError, but
    ``engine.kafka._util.send_batched`` never awaits the delivery futures, so
    ``run_transaction`` commits the transaction anyway: the input offsets move past records
    whose outputs were never written (a torn transaction)."""
    fleet.setup()
    fleet.allow_large(fleet.topics.triggers, fleet.topics.inputs)
    fleet.start()
    load = fleet.load(fault_seconds, rate=20)
    oversize = b"\x00" + bytes(MAX_INPUT_BYTES + 16)
    fleet.send_raw(fleet.topics.triggers, [(b"big", oversize)])
    for number in range(fleet.partitions):
        fleet.send_raw(
            fleet.topics.inputs,
            [(b"big", oversize), (b"after", _unknown_workflow_start(fleet, number))],
            partition=number,
        )
    load.join()
    expected = 1 + 2 * fleet.partitions
    view, _ = fleet.wait_settled(45, done=lambda v: len(v.dead) >= expected)
    reasons = Counter((d.source.rsplit(".", 1)[-1], d.reason) for d in view.dead)
    print(
        f"drove {len(fleet.sent.triggers)} runs; sent {len(oversize)}-byte records to the "
        f"triggers topic and to each run input partition, each followed by an unknown "
        f"workflow; dead letters {dict(reasons)}"
    )
    checks = run_checks(fleet, view)
    assert len(view.dead) == expected, (
        f"expected {expected} dead letters, found {dict(reasons)}; the engine log shows "
        f"{fleet.stderr().count('MessageSizeTooLargeError')} MessageSizeTooLargeError after "
        f"which the transaction was committed anyway"
    )
    assert_checks(checks)
