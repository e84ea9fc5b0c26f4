"""Each ambiguous window of a Kafka transaction, faulted one request at a time.

The engine (``KafkaEngine``, in-process, ``commit_timeout_s=2``) bootstraps through
``tests.faults.kafka_proxy`` to the fault broker; admin clients, trigger publishers and
the log reader go straight to it. A transaction of partition p is AddPartitionsToTxn,
Produce, AddOffsetsToTxn, TxnOffsetCommit, EndTxn, all carrying the transactional id
``<app>-<run inputs topic>-<p>``. Each scenario faults one of those requests on partition
0 (held and released late, dropped, its answer dropped, sent twice, its connection cut),
heals, then publishes later triggers on every partition. Every scenario must end
"committed once or not at all": every trigger started exactly one run, no run's events
are in the log twice (``check_decided_once``), and the later triggers started too.

The proxy's log of the transaction requests is printed at the end of each scenario (run
with ``-s``): it shows what reached the broker when, and what the broker answered.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from engine.codec import encode
from engine.core.policies import run_id_for
from engine.core.records import Trigger
from engine.core.spec import load_spec
from engine.core.state import RunStatus
from engine.kafka.processor import KafkaEngine
from engine.kafka.topics import Topics, delete_topics, ensure_topics
from engine.runtime.specs import SpecRegistry
from tests.faults.checkers import check_decided_once
from tests.faults.harness import read_log
from tests.faults.infra import FaultInfra
from tests.faults.kafka_proxy import TXN_APIS, Action, Api, KafkaProxy, Request, Seen
from tests.kafka.helpers import Item, eventually, produce, running

pytestmark = [pytest.mark.faults, pytest.mark.kafka]

SPEC = load_spec(
    {
        "workflow": "hold",
        "version": 1,
        "steps": [{"id": "wait", "wait_event": {"name": "go", "timeout": "1h"}}],
    }
)
"""A run that starts and waits: one transaction per trigger, no worker, no timer due."""
COMMIT_TIMEOUT_S = 2.0
PARTITIONS = 2
FAULTED = 0
"""The partition whose transaction is faulted."""


@dataclass
class Window:
    """One scenario: its topics, the engine behind the proxy, the triggers it sent."""

    infra: FaultInfra
    proxy: KafkaProxy
    topics: Topics
    engine: KafkaEngine
    triggers: dict[str, str] = field(default_factory=dict)
    """Idempotency key -> run id of every trigger published."""
    _keys: int = 0

    def txn(self, partition: int = FAULTED) -> Callable[[Request], bool]:
        """Matches the requests of ``partition``'s transactions, whichever producer."""
        transactional_id = f"{self.engine.app}-{self.topics.inputs}-{partition}"
        return lambda request: request.transactional_id == transactional_id

    def key(self, partition: int = FAULTED) -> str:
        """A fresh idempotency key whose run lives on ``partition``."""
        while True:
            self._keys += 1
            key = f"{self.topics.prefix}-{self._keys}"
            if self.topics.partition_of(run_id_for("default", key)) == partition:
                return key

    async def trigger(self, *keys: str) -> None:
        """Publish one trigger per key, keyed by its run id (decided where it lands)."""
        items: list[Item] = []
        for key in keys:
            run_id = run_id_for("default", key)
            self.triggers[key] = run_id
            items.append(
                (
                    encode(Trigger(workflow="hold", idempotency_key=key)),
                    run_id.encode(),
                    self.topics.partition_of(run_id),
                )
            )
        await produce(self.infra.bootstrap, self.topics.triggers, items)

    def started(self, key: str) -> bool:
        state = self.engine.state(self.triggers[key])
        return state is not None and state.status is RunStatus.WAITING

    async def until_started(self, *keys: str, timeout_s: float = 30.0) -> None:
        assert await eventually(lambda: all(self.started(k) for k in keys), timeout_s), (
            f"not started within {timeout_s}s: {[k for k in keys if not self.started(k)]}"
        )

    async def answered(self, seen: Seen, timeout_s: float = 15.0) -> Seen:
        assert await eventually(lambda: seen.answered_at is not None, timeout_s), (
            f"#{seen.number} was not answered within {timeout_s}s"
        )
        return seen


Scenario = Callable[[Window], Awaitable[None]]


def run_window(infra: FaultInfra, scenario: Scenario) -> Window:
    """Run ``scenario`` against a fresh engine behind a fresh proxy, then heal: no rule
    fires any more, a later trigger on every partition must start its run, and the log
    must hold every trigger's run once."""
    topics = Topics(prefix=f"w{uuid.uuid4().hex[:10]}", partitions=PARTITIONS)
    specs = SpecRegistry()
    specs.add(SPEC)

    async def main() -> Window:
        await ensure_topics(infra.bootstrap, topics.core_topics())
        with KafkaProxy(infra.proxy_port, infra.proxied_port) as proxy:
            engine = KafkaEngine(
                infra.proxied_bootstrap,
                topics,
                specs,
                app=topics.prefix,
                commit_timeout_s=COMMIT_TIMEOUT_S,
            )
            window = Window(infra, proxy, topics, engine)
            try:
                async with running(engine.run):
                    assert await eventually(lambda: len(engine.parts) == PARTITIONS, 60), (
                        "the engine did not get its partitions"
                    )
                    await scenario(window)
                    for rule in proxy.rules:
                        rule.disarm()
                    later = [window.key(p) for p in range(PARTITIONS)]
                    await window.trigger(*later)
                    await window.until_started(*window.triggers, timeout_s=40)
            finally:
                print(
                    f"\n--- proxy log (transaction requests) ---\n"
                    f"{proxy.format_log(TXN_APIS)}\n--- engine: {engine.stats}"
                )
        view = await read_log(infra.bootstrap, topics)
        check = check_decided_once(view, window.triggers)
        print(check.report())
        assert check.ok, check.report()
        return window

    try:
        return asyncio.run(main())
    finally:
        asyncio.run(delete_topics(infra.bootstrap, topics.prefix))


def _summary(w: Window, *seen: Seen) -> None:
    """Print the lines of the requests a scenario is about."""
    print("\n".join(["--- faulted ---", *(s.line() for s in seen)]))


def _hold_or_drop_answer(
    api: Api, action: Action, release_after: Api
) -> Callable[[Window], Awaitable[None]]:
    """The scenario: the first ``api`` request of the engine's transaction is held (and
    released once a later ``release_after`` of the same transactional id was answered
    without error) or has its answer dropped."""

    async def scenario(w: Window) -> None:
        rule = w.proxy.arm(api, action, when=w.txn())
        await w.trigger(w.key())
        first = await rule.wait_fired()
        if action is Action.HOLD:
            added = await w.proxy.wait_seen(
                release_after, w.txn(), after=first.number, ok=True, timeout_s=40
            )
            rule.release()
            _summary(w, await w.answered(first), added)

    return scenario


@pytest.mark.timeout(90)
def test_a_produce_held_past_the_commit_timeout_is_not_committed_twice(
    fault_infra: FaultInfra,
) -> None:
    """Issue 12's suspected case. The Produce of partition 0's first transaction is held
    past ``commit_timeout_s``; it is released once partition 0's transactional id has
    added its partitions to the next transaction (AddPartitionsToTxn answered), so that
    a Produce of the first transaction, if the broker still took one, would land in the
    second. The stale Produce must not be committed.

    What to read in the printed log: whether the held Produce's producer sent an EndTxn
    before the release (an abort that did not wait for the batch), and the producer id
    and epoch of the next AddPartitionsToTxn (the same producer, or a new one after an
    unknown outcome). aiokafka 0.14's ``send_batch`` hands out ``asyncio.shield`` of each
    batch's future, so a timeout in ``run_transaction`` cancels only the shield and
    ``abort_transaction`` (``flush_for_commit``) still waits for the batch itself."""

    async def scenario(w: Window) -> None:
        rule = w.proxy.arm(
            Api.PRODUCE,
            Action.HOLD,
            when=lambda r: w.txn()(r) and r.touches(w.topics.events, FAULTED),
        )
        await w.trigger(w.key())
        held = await rule.wait_fired()
        added = await w.proxy.wait_seen(
            Api.ADD_PARTITIONS_TO_TXN, w.txn(), after=held.number, ok=True, timeout_s=40
        )
        aborts = [
            s
            for s in w.proxy.seen(Api.END_TXN, w.txn(), after=held.number)
            if s.request.client_id == held.request.client_id
        ]
        print(
            f"--- before the release: EndTxn of the held Produce's producer: "
            f"{[s.line() for s in aborts] or 'none'}; next AddPartitionsToTxn from "
            f"{added.request.client_id} pid={added.request.producer_id}/"
            f"{added.request.producer_epoch}"
        )
        rule.release()
        _summary(w, await w.answered(held), added)

    run_window(fault_infra, scenario)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", ["held-released-late", "response-dropped"])
def test_add_partitions_to_txn(fault_infra: FaultInfra, fault: str) -> None:
    """The first request of a transaction. Held: the records wait for it (aiokafka sends
    no Produce before the partition is added), the commit times out, the engine takes
    the partition back with a new producer, and the held request reaches the broker
    after the new producer's own AddPartitionsToTxn. Response dropped: the broker added
    the partitions, the client never learns it."""
    action = Action.HOLD if fault == "held-released-late" else Action.DROP_RESPONSE

    run_window(
        fault_infra,
        _hold_or_drop_answer(Api.ADD_PARTITIONS_TO_TXN, action, Api.ADD_PARTITIONS_TO_TXN),
    )


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", ["dropped", "response-dropped", "cut-after-forwarding"])
def test_produce(fault_infra: FaultInfra, fault: str) -> None:
    """The records of the first transaction. Dropped: the broker never gets them.
    Response dropped, and the connection cut once the request is forwarded: the broker
    wrote them in the first transaction, the client never learns it. Whatever aiokafka
    sends again of those batches (same producer id, epoch and sequence) is printed."""
    action = {
        "dropped": Action.DROP,
        "response-dropped": Action.DROP_RESPONSE,
        "cut-after-forwarding": Action.CUT_AFTER,
    }[fault]

    async def scenario(w: Window) -> None:
        rule = w.proxy.arm(
            Api.PRODUCE, action, when=lambda r: w.txn()(r) and r.touches(w.topics.events, FAULTED)
        )
        first_key = w.key()
        await w.trigger(first_key)
        first = await rule.wait_fired()
        await w.until_started(first_key)
        again = w.proxy.seen(
            Api.PRODUCE,
            lambda r: bool(set(r.batches) & set(first.request.batches)),
            after=first.number,
        )
        _summary(w, first, *again)

    run_window(fault_infra, scenario)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", ["held-released-late", "response-dropped"])
def test_txn_offset_commit(fault_infra: FaultInfra, fault: str) -> None:
    """The input offsets, sent to the group coordinator. Held: released after the next
    transaction of the partition has added the group (AddOffsetsToTxn answered), where
    a late offset commit of the same producer epoch would join it. Response dropped: the
    broker holds the offsets in the first transaction, the client never learns it."""
    action = Action.HOLD if fault == "held-released-late" else Action.DROP_RESPONSE

    run_window(
        fault_infra, _hold_or_drop_answer(Api.TXN_OFFSET_COMMIT, action, Api.ADD_OFFSETS_TO_TXN)
    )


@pytest.mark.timeout(90)
def test_add_offsets_to_txn_response_dropped(fault_infra: FaultInfra) -> None:
    """The broker added the consumer group to the transaction; the client never learns
    it, so its TxnOffsetCommit and commit never come."""

    async def scenario(w: Window) -> None:
        rule = w.proxy.arm(Api.ADD_OFFSETS_TO_TXN, Action.DROP_RESPONSE, when=w.txn())
        await w.trigger(w.key())
        await rule.wait_fired()

    run_window(fault_infra, scenario)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "fault",
    [
        "request-dropped",
        "response-dropped",
        "duplicated",
        "duplicated-late",
        "cut-after-forwarding",
    ],
)
def test_end_txn_commit(fault_infra: FaultInfra, fault: str) -> None:
    """The commit itself, where the outcome is unknown to the client. Dropped: never
    committed. Response dropped, and the connection cut right after the request was
    forwarded: committed, the client never hears. Duplicated: the broker gets the commit
    twice in a row. Duplicated late: a copy of the first commit reaches the broker once
    the next transaction of the partition has written its records (Produce answered)
    and before it adds its offsets: the same producer id and epoch, so to a broker on
    the pre-KIP-890 protocol it is that transaction's commit."""
    action = {
        "request-dropped": Action.DROP,
        "response-dropped": Action.DROP_RESPONSE,
        "duplicated": Action.DUPLICATE,
        "duplicated-late": Action.DUPLICATE_LATE,
        "cut-after-forwarding": Action.CUT_AFTER,
    }[fault]

    async def scenario(w: Window) -> None:
        rule = w.proxy.arm(Api.END_TXN, action, when=lambda r: w.txn()(r) and bool(r.commit))
        first_key = w.key()
        await w.trigger(first_key)
        first = await rule.wait_fired()
        if action is not Action.DUPLICATE_LATE:
            return
        await w.until_started(first_key)
        offsets = w.proxy.arm(Api.ADD_OFFSETS_TO_TXN, Action.HOLD, when=w.txn())
        await w.trigger(w.key())
        held = await offsets.wait_fired()
        written = await w.proxy.wait_seen(Api.PRODUCE, w.txn(), after=first.number, ok=True)
        rule.release()
        copy = await w.answered(
            w.proxy.seen(Api.END_TXN, lambda r: r == first.request, after=first.number)[0]
        )
        offsets.release()
        _summary(w, first, written, copy, await w.answered(held))

    run_window(fault_infra, scenario)
