"""Follow the run timelines topic and print every status change.

A downstream consumer of ``<prefix>.run-timelines`` with plain aiokafka: each record's
value is a ``RunTimeline`` (Avro, Confluent framing, schema id 41 in
``schemas/catalogue.json``), keyed by run id, payloads already redacted. The topic is
compacted and written in transactions, so read it with ``isolation_level=read_committed``
and expect to see a run's latest timeline, not every intermediate one.

    python examples/timeline_consumer.py --kafka 127.0.0.1:29092 [--topic-prefix terranoha]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from aiokafka import AIOKafkaConsumer

from engine.codec import decode
from engine.core.projection_records import RunTimeline


def status_change(value: bytes, seen: dict[str, str]) -> str | None:
    """A line describing the run's new status, or None if the record is not a timeline or
    the status did not change since the last record of that run in ``seen``."""
    record = decode(value)
    if not isinstance(record, RunTimeline):
        return None
    before = seen.get(record.run_id)
    if before == record.status:
        return None
    seen[record.run_id] = record.status
    line = (f"{record.run_id} {record.workflow} v{record.version} tenant={record.tenant}: "
            f"{before or 'new'} -> {record.status}")
    if record.status == "Waiting" and record.approval_id:
        line += f" (approval {record.approval_id})"
    if record.status == "Failed" and isinstance(record.error, dict):
        line += f" ({record.error.get('code')}: {record.error.get('message')})"
    if record.duration_ms is not None:
        line += f" after {record.duration_ms} ms, cost {record.cost:.4f}"
    return line


async def follow(bootstrap: str, prefix: str, group: str) -> None:
    consumer = AIOKafkaConsumer(
        f"{prefix}.run-timelines", bootstrap_servers=bootstrap, group_id=group,
        isolation_level="read_committed", auto_offset_reset="earliest")
    await consumer.start()
    seen: dict[str, str] = {}
    try:
        async for message in consumer:
            if message.value is None:  # a tombstone: nothing to show
                continue
            line = status_change(message.value, seen)
            if line is not None:
                print(line, flush=True)
    finally:
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kafka", default="127.0.0.1:29092", metavar="HOST:PORT")
    parser.add_argument("--topic-prefix", default="terranoha")
    parser.add_argument("--group", default="timeline-printer")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(follow(args.kafka, args.topic_prefix, args.group))


if __name__ == "__main__":
    main()
