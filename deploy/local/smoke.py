#!/usr/bin/env python3
"""Smoke test for the local infrastructure started by deploy/local/infra.sh.

Checks, against the real servers:
  Kafka      - create a 3-partition topic with the admin client;
             - a transactional producer commits records;
             - another transactional producer writes records and aborts;
             - a read_committed consumer sees exactly the committed records
               (and a read_uncommitted one proves the aborted ones were written);
             - consumer offsets committed inside a transaction are visible.
  PostgreSQL - connect with the DSN and run `select 1`.

Needs aiokafka and psycopg (pip install aiokafka 'psycopg[binary]').
Connection settings come from TERRANOHA_KAFKA and TERRANOHA_POSTGRES
(defaults: the values infra.sh uses). Prints OK lines; exits 1 on failure.

Usage: python deploy/local/smoke.py [--topic NAME] [--keep]
  --topic NAME  use (or reuse) this topic instead of a fresh random one
  --keep        do not delete the topic at the end
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import uuid

DEFAULT_KAFKA = "127.0.0.1:29092"
DEFAULT_POSTGRES = "postgresql://terranoha:terranoha@127.0.0.1:25432/terranoha"
PARTITIONS = 3
TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code
TIMEOUT_S = 120


def ok(message: str) -> None:
    print(f"OK   {message}", flush=True)


class SmokeFailure(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


async def read_all(bootstrap: str, topic: str, isolation_level: str) -> list[str]:
    """Reads every record of every partition up to the current end offset."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level=isolation_level,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        # For read_committed this is the last stable offset.
        end = await consumer.end_offsets(partitions)
        values: list[str] = []

        async def behind() -> bool:
            for tp in partitions:
                if await consumer.position(tp) < end[tp]:
                    return True
            return False

        while await behind():
            batch = await consumer.getmany(*partitions, timeout_ms=1000)
            for records in batch.values():
                values.extend(r.value.decode() for r in records)
        return values
    finally:
        await consumer.stop()


async def kafka_smoke(bootstrap: str, topic: str, keep: bool) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    run = uuid.uuid4().hex[:8]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        # The admin client reports per-topic errors in the response.
        response = await admin.create_topics(
            [NewTopic(name=topic, num_partitions=PARTITIONS, replication_factor=1)]
        )
        _, error_code, error_message = response.topic_errors[0][:3]
        if error_code == TOPIC_ALREADY_EXISTS:
            created = "reusing existing"
        else:
            check(error_code == 0, f"create topic {topic}: error {error_code} {error_message}")
            created = "created"
        # Wait until every partition has a leader (metadata propagation).
        for _ in range(100):
            described = await admin.describe_topics([topic])
            partitions = described[0]["partitions"]
            if len(partitions) == PARTITIONS and all(p["leader"] >= 0 for p in partitions):
                break
            await asyncio.sleep(0.1)
        check(len(partitions) == PARTITIONS, f"topic {topic} has {len(partitions)} partitions")
        check(all(p["leader"] >= 0 for p in partitions), f"topic {topic} has leaderless partitions")
        ok(f"kafka {bootstrap}: {created} topic {topic} with {PARTITIONS} partitions")

        before = set(await read_all(bootstrap, topic, "read_committed"))

        # 1) committed transaction: one record per partition, then a second
        #    committed transaction after the aborted one.
        committed = [f"committed-{run}-{i}" for i in range(PARTITIONS)]
        committed_late = [f"committed-late-{run}-{i}" for i in range(PARTITIONS)]
        aborted = [f"aborted-{run}-{i}" for i in range(PARTITIONS)]

        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, transactional_id=f"terranoha-smoke-commit-{run}"
        )
        await producer.start()
        try:
            async with producer.transaction():
                for i, value in enumerate(committed):
                    await producer.send_and_wait(topic, value.encode(), partition=i)
            ok(f"kafka: transactional producer committed {len(committed)} records")

            # 2) aborted transaction from a second transactional producer; the
            #    records are flushed to the log before the abort.
            aborting = AIOKafkaProducer(
                bootstrap_servers=bootstrap, transactional_id=f"terranoha-smoke-abort-{run}"
            )
            await aborting.start()
            try:
                await aborting.begin_transaction()
                for i, value in enumerate(aborted):
                    await aborting.send_and_wait(topic, value.encode(), partition=i)
                await aborting.abort_transaction()
            finally:
                await aborting.stop()
            ok(f"kafka: transactional producer aborted {len(aborted)} written records")

            async with producer.transaction():
                for i, value in enumerate(committed_late):
                    await producer.send_and_wait(topic, value.encode(), partition=i)
        finally:
            await producer.stop()

        # 3) read_committed sees only committed records; read_uncommitted
        #    also sees the aborted ones (so they really were in the log).
        seen = set(await read_all(bootstrap, topic, "read_committed")) - before
        expected = set(committed) | set(committed_late)
        check(
            seen == expected,
            f"read_committed consumer saw {sorted(seen)}, expected {sorted(expected)}",
        )
        ok(f"kafka: read_committed consumer saw exactly the {len(expected)} committed records")
        raw = set(await read_all(bootstrap, topic, "read_uncommitted")) - before
        check(set(aborted) <= raw, "read_uncommitted consumer did not see the aborted records")
        ok("kafka: read_uncommitted consumer also sees the aborted records (abort was real)")

        # 4) consume-transform-produce: offsets committed inside a transaction.
        group = f"terranoha-smoke-group-{run}"
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=group,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, transactional_id=f"terranoha-smoke-ctp-{run}"
        )
        await producer.start()
        try:
            batch = await consumer.getmany(timeout_ms=10000)
            check(bool(batch), "group consumer received nothing")
            offsets = {tp: records[-1].offset + 1 for tp, records in batch.items()}
            async with producer.transaction():
                await producer.send_and_wait(topic, f"derived-{run}".encode(), partition=0)
                await producer.send_offsets_to_transaction(offsets, group)
            # Transactional offsets become visible once the commit markers
            # have been applied by the group coordinator.
            for tp, offset in offsets.items():
                for _ in range(100):
                    committed_offset = await consumer.committed(tp)
                    if committed_offset == offset:
                        break
                    await asyncio.sleep(0.1)
                check(
                    committed_offset == offset,
                    f"{tp}: committed offset {committed_offset}, expected {offset}",
                )
            ok(f"kafka: offsets for {len(offsets)} partitions committed inside a transaction")
        finally:
            await producer.stop()
            await consumer.stop()

    finally:
        try:
            if not keep:
                await admin.delete_topics([topic])
                ok(f"kafka: deleted topic {topic}")
        finally:
            await admin.close()


def postgres_smoke(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn, connect_timeout=10) as conn:
        (one,) = conn.execute("select 1").fetchone()
        check(one == 1, f"select 1 returned {one!r}")
        (version,) = conn.execute("show server_version").fetchone()
    host = dsn.rsplit("@", 1)[-1]
    ok(f"postgres {host}: select 1 -> 1 (PostgreSQL {version})")


def main() -> int:
    parser = argparse.ArgumentParser(description="Smoke test for deploy/local/infra.sh")
    parser.add_argument("--topic", help="topic to use (default: a fresh random name)")
    parser.add_argument("--keep", action="store_true", help="keep the topic afterwards")
    args = parser.parse_args()
    # aiokafka logs transient errors it retries (a new topic's leader not yet
    # known, the group coordinator still loading) as errors; failures that
    # matter surface as exceptions below.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    bootstrap = os.environ.get("TERRANOHA_KAFKA", DEFAULT_KAFKA)
    dsn = os.environ.get("TERRANOHA_POSTGRES", DEFAULT_POSTGRES)
    topic = args.topic or f"terranoha-smoke-{uuid.uuid4().hex[:8]}"
    try:
        import aiokafka  # noqa: F401
        import psycopg  # noqa: F401
    except ImportError as exc:
        print(f"FAIL missing Python package: {exc.name} (pip install aiokafka 'psycopg[binary]')")
        return 1
    try:
        asyncio.run(asyncio.wait_for(kafka_smoke(bootstrap, topic, args.keep), TIMEOUT_S))
        postgres_smoke(dsn)
    except Exception as exc:  # report any failure as one line, then exit non-zero
        print(f"FAIL {type(exc).__name__}: {exc}", flush=True)
        return 1
    print("OK   all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
