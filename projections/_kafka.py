"""Kafka chores shared by the projectors."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient


async def topic_partitions(bootstrap: str, topic: str) -> list[int]:
    """The partition numbers of ``topic``; empty if it does not exist."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    for item in described:
        if item.get("topic") == topic and item.get("error_code", 0) == 0:
            return sorted(int(p["partition"]) for p in item.get("partitions", []))
    return []
