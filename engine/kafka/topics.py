"""Topic names, partitioning and configs, and their idempotent creation.

All run-keyed topics (run inputs, run events, run state, task topics) have the same
partition count and are keyed by run id, so partition p of each holds the same runs:
one transaction per input partition can write all of them.

The triggers topic has that partition count too unless told otherwise. Then it is
co-partitioned with the run inputs: the orchestrator reads triggers partition p beside
inputs partition p and starts the runs that live there in the same transaction; a trigger
keyed by its run id (Kafka's default partitioner) always lands there. A triggers topic
with another partition count is read by the trigger router instead, one hop more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

log = logging.getLogger("terranoha.kafka")

RETAIN_FOREVER = {"retention.ms": "-1", "retention.bytes": "-1"}
DEAD_LETTER_BYTES = 8 << 20
"""Dead letters carry the original bytes of inputs that may be large themselves."""
COMPACTED = {
    "cleanup.policy": "compact",
    "min.cleanable.dirty.ratio": "0.1",
    "segment.ms": "600000",
}


@dataclass(frozen=True, slots=True)
class Topics:
    """Where everything lives. ``partitions`` is the run-keyed partition count;
    ``trigger_partitions`` the triggers topic's, the same when None (co-partitioned)."""

    prefix: str = "terranoha"
    partitions: int = 6
    trigger_partitions: int | None = None
    replication: int = 1

    @property
    def trigger_count(self) -> int:
        """The triggers topic's partition count."""
        return self.partitions if self.trigger_partitions is None else self.trigger_partitions

    @property
    def co_partitioned(self) -> bool:
        """True when triggers partition p goes with run inputs partition p: the
        orchestrator reads the triggers itself and no router is needed."""
        return self.trigger_count == self.partitions

    @property
    def inputs(self) -> str:
        return f"{self.prefix}.run-inputs"

    @property
    def events(self) -> str:
        return f"{self.prefix}.run-events"

    @property
    def state(self) -> str:
        return f"{self.prefix}.run-state"

    @property
    def triggers(self) -> str:
        return f"{self.prefix}.triggers"

    @property
    def notifications(self) -> str:
        return f"{self.prefix}.notifications"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}.dead-letters"

    @property
    def specs(self) -> str:
        return f"{self.prefix}.specs"

    @property
    def limits(self) -> str:
        """The deployed limits documents and paused keys (compacted, one partition);
        created by the first ``limits deploy`` or ``limits pause``."""
        return f"{self.prefix}.limits"

    def limits_topic(self) -> NewTopic:
        return NewTopic(self.limits, 1, self.replication, topic_configs=dict(COMPACTED))

    @property
    def messages(self) -> str:
        """Message correlation's inputs: published messages (``PublishMessage``, keyed by
        ``tenant/name/key``), the subscriptions the runs' keyed waits open and close, and
        the correlation keys' TTL timers."""
        return f"{self.prefix}.messages"

    @property
    def message_events(self) -> str:
        """What correlation did: messages published, delivered to a run, expired (with the
        runs they reached: none for a message nobody waited for), subscriptions."""
        return f"{self.prefix}.message-events"

    @property
    def message_state(self) -> str:
        """The correlation keys' state changelog (compacted)."""
        return f"{self.prefix}.message-state"

    def tasks(self, queue: str) -> str:
        return f"{self.prefix}.tasks.{queue}"

    def deployment(self, app: str) -> str:
        """The name of the deployment that runs as ``app`` on these topics: its consumer
        groups, the topic projector's transactional id and the workers' ledger keys are
        named by it, so two deployments on one broker and one database (another topic
        prefix, or another app) never share a group, a transactional id or a ledger
        entry. When the app and the prefix are alike (the default: both ``terranoha``)
        it is the app's name alone, as it always was."""
        return app if self.prefix == app else f"{app}.{self.prefix}"

    def partition_of(self, run_id: str) -> int:
        """The partition of a run on every run-keyed topic (Kafka's default partitioner)."""
        return key_partition(run_id.encode(), self.partitions)

    def core_topics(self) -> list[NewTopic]:
        n, r = self.partitions, self.replication
        return [
            NewTopic(self.inputs, n, r),
            NewTopic(self.events, n, r, topic_configs=dict(RETAIN_FOREVER)),
            NewTopic(self.state, n, r, topic_configs=dict(COMPACTED)),
            NewTopic(self.triggers, self.trigger_count, r),
            NewTopic(self.notifications, n, r),
            NewTopic(
                self.dead_letters,
                n,
                r,
                topic_configs={**RETAIN_FOREVER, "max.message.bytes": str(DEAD_LETTER_BYTES)},
            ),
            NewTopic(self.specs, 1, r, topic_configs=dict(COMPACTED)),
            NewTopic(self.messages, n, r),
            NewTopic(self.message_events, n, r, topic_configs=dict(RETAIN_FOREVER)),
            NewTopic(self.message_state, n, r, topic_configs=dict(COMPACTED)),
        ]

    def task_topics(self, queues: Iterable[str]) -> list[NewTopic]:
        return [NewTopic(self.tasks(q), self.partitions, self.replication) for q in queues]


def key_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``key`` among ``partitions``."""
    hashed: int = murmur2(key)
    return (hashed & 0x7FFFFFFF) % partitions


async def ensure_topics(bootstrap: str, topics: Iterable[NewTopic]) -> list[str]:
    """Create the topics that do not exist yet; return the names created. Idempotent."""
    wanted = list(topics)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t.name not in existing]
        created: list[str] = []
        for topic in missing:
            try:
                await admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        if created:
            await _wait_for_leaders(admin, created)
        return created
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, prefix: str) -> list[str]:
    """Delete every topic named ``<prefix>.*`` (a test's or a benchmark's own); return the
    names deleted."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [n for n in await admin.list_topics() if n.startswith(f"{prefix}.")]
        if names:
            await admin.delete_topics(names)
        return names
    finally:
        await admin.close()


async def deployed_topics(bootstrap: str, topics: Topics) -> Topics:
    """``topics`` with the partition counts the broker actually has. Routing by run id
    must use the real count: a different one sends runs to the wrong partition."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([topics.inputs, topics.triggers])
    finally:
        await admin.close()
    counts = {
        d["topic"]: len(d["partitions"])
        for d in described
        if d.get("error_code", 0) == 0 and d.get("partitions")
    }
    return replace(
        topics,
        partitions=counts.get(topics.inputs, topics.partitions),
        trigger_partitions=counts.get(topics.triggers, topics.trigger_count),
    )


async def _wait_for_leaders(
    admin: AIOKafkaAdminClient, names: list[str], timeout_s: float = 30.0
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        described = await admin.describe_topics(names)
        if all(
            t.get("error_code", 0) == 0
            and t.get("partitions")
            and all(p.get("leader", -1) >= 0 for p in t["partitions"])
            for t in described
        ):
            return
        await asyncio.sleep(0.1)
    log.warning("topics %s have no leader after %.0fs", names, timeout_s)
