"""The admission processor on Kafka: the admission core as a keyed processor.

Every limit key (``tool:llm.classify``, ``tenant:acme``) lives on one partition of the
admission topics, keyed by the key's bytes, so one task of one process decides every
request of that key: a limit is global across run partitions and engine processes, and
a rebalance or a SIGKILL hands the key over with its state restored from the changelog
(``engine.kafka.keyed``). Requests (``Acquire``), releases, throttles, pauses and ticks
arrive on the admission inputs; each grant or refusal is also written, in the same
transaction, to the grants topic keyed by the request's ``reply_to`` (the run id), so it
lands on the partition of the run that asked; the same answer goes to the run inputs as
a ``GrantSlot`` or ``RefuseSlot`` command for that run; and each alert (a breaker opening or
closing, a budget warning or running out, a lease expiring) to the alerts topic.

Lease expiry, a rate or a throttle running out, a budget window turning and an open
breaker half-opening are ``Tick`` commands the key's timer writes to its own inputs.

The admission topics have the run-keyed partition count (``Topics.partitions``): a grant
is routed by Kafka's default partitioner over that count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import NewTopic

from engine.codec import decode, encode
from engine.core import admission as ad
from engine.core.alerts import alerts_of
from engine.core.flow import answer
from engine.kafka._util import stop_quietly
from engine.kafka.keyed import KeyedLogic, KeyedProcessor, KeyedTopics
from engine.kafka.topics import COMPACTED, RETAIN_FOREVER, Topics, ensure_topics
from engine.runtime.clock import Clock


@dataclass(frozen=True, slots=True)
class AdmissionTopics:
    """Where the admission processor lives, beside the run topics of ``topics``."""

    topics: Topics

    @property
    def keyed(self) -> KeyedTopics:
        p = self.topics.prefix
        return KeyedTopics(
            inputs=f"{p}.admission-inputs",
            events=f"{p}.admission-events",
            changelog=f"{p}.admission-state",
            dead_letters=f"{p}.admission-dead-letters",
            partitions=self.topics.partitions,
        )

    @property
    def alerts(self) -> str:
        """Alerts (``engine.core.alerts``), keyed by limit key."""
        return f"{self.topics.prefix}.alerts"

    @property
    def grants(self) -> str:
        """Grants and refusals, keyed by the request's ``reply_to``."""
        return f"{self.topics.prefix}.admission-grants"

    def new_topics(self) -> list[NewTopic]:
        k, n, r = self.keyed, self.topics.partitions, self.topics.replication
        return [
            NewTopic(k.inputs, n, r),
            NewTopic(k.events, n, r, topic_configs=dict(RETAIN_FOREVER)),
            NewTopic(k.changelog, n, r, topic_configs=dict(COMPACTED)),
            NewTopic(k.dead_letters, n, r, topic_configs=dict(RETAIN_FOREVER)),
            NewTopic(self.grants, n, r),
            NewTopic(self.alerts, n, r),
            NewTopic(self.topics.inputs, n, r),
        ]  # where the answers to runs go

    async def ensure(self, bootstrap: str) -> None:
        await ensure_topics(bootstrap, self.new_topics())


def _command(value: bytes) -> ad.AdmissionCommand:
    record = decode(value)
    if not isinstance(record, ad.COMMAND_TYPES):
        raise ValueError(f"a {type(record).__name__} is not an admission command")
    return record  # type: ignore[return-value]


def _state(value: bytes) -> ad.AdmissionState:
    record = decode(value)
    if not isinstance(record, ad.AdmissionState):
        raise ValueError(f"a {type(record).__name__} is not an admission state")
    return record


def admission_logic(
    topics: AdmissionTopics,
) -> KeyedLogic[ad.AdmissionCommand, ad.AdmissionState, ad.AdmissionEvent]:
    """The admission core in the form ``KeyedProcessor`` runs."""
    grants, alerts = topics.grants, topics.alerts

    run_inputs = topics.topics.inputs

    def outputs(event: ad.AdmissionEvent) -> Sequence[tuple[str, bytes, bytes]]:
        out = [(alerts, event.key.encode(), encode(alert)) for alert in alerts_of(event)]
        told = answer(event)
        if told is not None:
            run = told.run_id.encode()
            out.append((grants, run, encode(event)))
            out.append((run_inputs, run, encode(told)))
        return out

    return KeyedLogic(
        decode=_command,
        key=lambda c: c.key,
        decide=ad.decide,
        evolve=ad.evolve,
        encode_event=encode,
        encode_state=encode,
        decode_state=_state,
        encode_command=encode,
        outputs=outputs,
        timers=ad.timers,
    )


class AdmissionProcessor(KeyedProcessor[ad.AdmissionCommand, ad.AdmissionState, ad.AdmissionEvent]):
    """The admission core for the partitions the group ``<deployment>-admission``
    assigns this process."""

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        *,
        app: str = "terranoha",
        clock: Clock | None = None,
        instance_id: str | None = None,
        commit_timeout_s: float = 15.0,
    ) -> None:
        self.admission = AdmissionTopics(topics)
        super().__init__(
            bootstrap,
            "admission",
            admission_logic(self.admission),
            self.admission.keyed,
            app=topics.deployment(app),
            clock=clock,
            instance_id=instance_id,
            commit_timeout_s=commit_timeout_s,
        )


async def read_admission_states(bootstrap: str, topics: Topics) -> dict[str, ad.AdmissionState]:
    """The latest committed state of every limit key: reads the whole admission
    changelog (empty if the admission topics do not exist)."""
    keyed = AdmissionTopics(topics).keyed
    changelog = keyed.changelog
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        if changelog not in await consumer.topics():
            return {}
        tps = [TopicPartition(changelog, p) for p in range(keyed.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        latest: dict[str, bytes] = {}
        pending = [tp for tp in tps if end[tp] > 0]
        while pending:
            fetched = await consumer.getmany(*pending, timeout_ms=500, max_records=10_000)
            for messages in fetched.values():
                for m in messages:
                    if m.key is not None and m.value is not None:
                        latest[m.key.decode()] = m.value
            pending = [tp for tp in pending if await consumer.position(tp) < end[tp]]
        return {key: _state(value) for key, value in latest.items()}
    finally:
        await stop_quietly(consumer)
