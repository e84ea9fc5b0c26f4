"""Message correlation on Kafka: how fast published messages reach the runs waiting for
their key.

    .venv/bin/python bench/correlation.py [--runs N] [--partitions P]

On topics of its own (random prefix, deleted at the end), the orchestrator and the
correlation processor run in this process (as ``serve --kafka`` runs them). N runs of a
one-step workflow (``wait_event`` keyed on the run's order id) are started and waited
for until each has opened its subscription; then one message per order: for half of
the runs as fast as the broker takes them (deliveries per second, first publish to last
run completed, and the latency under that burst), for the other half at ``--rate`` a
second (the latency at low load). Latency is publish → run completed, from the record
timestamps of the message and of the run's ``RunCompleted``: the message's hop through
the correlation processor, the delivery, and the run's transaction. Written to
``bench/results/correlation.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench._common import infra_settings, percentiles
from engine.codec import decode, encode
from engine.core.correlation import PublishMessage, SubscriptionOpened
from engine.core.events import RunCompleted
from engine.core.policies import run_id_for
from engine.core.records import Trigger
from engine.core.spec import load_spec
from engine.kafka.correlation import CorrelationProcessor, message_record
from engine.kafka.processor import KafkaEngine
from engine.kafka.specs import SpecFollower, publish_spec
from engine.kafka.topics import Topics, delete_topics, ensure_topics

SPEC = load_spec(
    {
        "workflow": "bench-keyed",
        "version": 1,
        "input": {"order": "string"},
        "steps": [
            {"id": "pay", "wait_event": {"name": "payment", "key": "input.order", "timeout": "1h"}}
        ],
    }
)


async def _count(
    bootstrap: str, topic: str, partitions: int, kind: type, want: int, timeout_s: float
) -> dict[str, int]:
    """Read ``topic`` until ``want`` records of ``kind``; their run id -> record time."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen: dict[str, int] = {}
        deadline = time.monotonic() + timeout_s
        while len(seen) < want and time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=200)).values():
                for m in messages:
                    record = decode(m.value)
                    if isinstance(record, kind):
                        seen[record.run_id] = m.timestamp
        return seen
    finally:
        await consumer.stop()


async def _publish(
    producer: AIOKafkaProducer,
    topics: Topics,
    orders: list[str],
    published: dict[str, int],
    rate: float | None,
) -> None:
    """One message per order, as fast as possible (``rate`` None) or at ``rate`` a second;
    records each run's message timestamp."""
    sent = []
    for order in orders:
        topic, key, value = message_record(
            topics,
            PublishMessage(
                message_id=f"paid-{order}", name="payment", key=order, data={"ok": True}
            ),
        )
        sent.append((run_id_for("default", order), await producer.send(topic, value, key=key)))
        if rate is not None:
            await asyncio.sleep(1 / rate)
    for run_id, future in sent:
        published[run_id] = (await future).timestamp


async def main(runs: int, partitions: int, rate: float) -> dict[str, Any]:
    bootstrap, _ = infra_settings()
    topics = Topics(prefix=f"bc{uuid.uuid4().hex[:8]}", partitions=partitions)
    await ensure_topics(bootstrap, topics.core_topics())
    await publish_spec(bootstrap, topics, SPEC)
    follower = SpecFollower(bootstrap, topics)
    await follower.start()
    stop = asyncio.Event()
    engine = KafkaEngine(
        bootstrap, topics, follower.registry, app=topics.prefix, refresh_specs=follower.catch_up
    )
    correlation = CorrelationProcessor(bootstrap, topics, app=topics.prefix)
    tasks = [
        asyncio.create_task(engine.run(stop)),
        asyncio.create_task(correlation.run(stop)),
        asyncio.create_task(follower.follow(stop)),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        orders = [f"order-{i}" for i in range(runs)]
        for order in orders:
            run_id = run_id_for("default", order)
            await producer.send(
                topics.triggers,
                encode(
                    Trigger(workflow=SPEC.workflow, idempotency_key=order, input={"order": order})
                ),
                key=run_id.encode(),
            )
        await producer.flush()
        opened = await _count(
            bootstrap, topics.message_events, partitions, SubscriptionOpened, runs, 300
        )
        assert len(opened) == runs, f"only {len(opened)} of {runs} waits opened"
        burst, paced = orders[: runs // 2], orders[runs // 2 :]
        published: dict[str, int] = {}
        await _publish(producer, topics, burst, published, rate=None)
        await _publish(producer, topics, paced, published, rate=rate)
        completed = await _count(bootstrap, topics.events, partitions, RunCompleted, runs, 300)
        assert len(completed) == runs, f"only {len(completed)} of {runs} runs completed"
        burst_ids = [run_id_for("default", o) for o in burst]
        paced_ids = [run_id_for("default", o) for o in paced]
        first = min(published[r] for r in burst_ids)
        last = max(completed[r] for r in burst_ids)
        return {
            "runs": runs,
            "partitions": partitions,
            "burst_deliveries_per_s": round(len(burst) / max((last - first) / 1000, 1e-3), 1),
            "burst_publish_to_completed_ms": percentiles(
                [float(completed[r] - published[r]) for r in burst_ids]
            ),
            "paced_rate_per_s": rate,
            "paced_publish_to_completed_ms": percentiles(
                [float(completed[r] - published[r]) for r in paced_ids]
            ),
        }
    finally:
        await producer.stop()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await follower.stop()
        await delete_topics(bootstrap, topics.prefix)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument(
        "--rate",
        type=float,
        default=20.0,
        help="messages a second for the paced half (latency at low load)",
    )
    args = parser.parse_args()
    result = asyncio.run(main(args.runs, args.partitions, args.rate))
    print(json.dumps(result, indent=2))
    out = Path(__file__).resolve().parent / "results" / "correlation.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
