"""Message correlation on Kafka: ``engine.core.correlation`` as a keyed processor.

Its inputs are ``<prefix>.messages``, keyed by correlation key (``tenant/name/key``):
the messages outside systems publish, the ``OpenSubscription``/``CloseSubscription``
commands the run engine writes in the transaction of the run batch whose keyed wait
began or ended, and the keys' own TTL timers. A delivery (``CorrelateMessage``) goes to
the run's inputs topic, keyed by run id, in the transaction of the batch that matched
it, beside the events (``<prefix>.message-events``) and the key's state
(``<prefix>.message-state``): each delivery is written exactly once.

The messages topic has the run-keyed partition count (``Topics.partitions``), so a
delivery's run inputs partition is computed with the same count.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.codec import decode, encode
from engine.core import correlation as core
from engine.core.correlation import CorrelationCommand, CorrelationEvent, CorrelationState
from engine.kafka.keyed import KeyedLogic, KeyedProcessor, KeyedTopics
from engine.kafka.topics import Topics
from engine.runtime.clock import Clock


def _decode_command(raw: bytes) -> CorrelationCommand:
    record = decode(raw)
    if not isinstance(record, core.CORRELATION_COMMANDS):
        raise ValueError(
            f"{type(record).__name__} is not a message-correlation command "
            "(PublishMessage, OpenSubscription, CloseSubscription, "
            "ExpireMessages)"
        )
    command: CorrelationCommand = record  # type: ignore[assignment]
    return command


def _decode_state(raw: bytes) -> CorrelationState:
    state = decode(raw)
    if not isinstance(state, CorrelationState):
        raise ValueError(f"{type(state).__name__} is not a CorrelationState")
    return state


def _timers(key: str, state: CorrelationState) -> Sequence[tuple[int, CorrelationCommand]]:
    armed = core.timer(state)
    return [armed] if armed is not None else []


def correlation_topics(topics: Topics) -> KeyedTopics:
    return KeyedTopics(
        inputs=topics.messages,
        events=topics.message_events,
        changelog=topics.message_state,
        dead_letters=topics.dead_letters,
        partitions=topics.partitions,
    )


def correlation_logic(
    topics: Topics,
) -> KeyedLogic[CorrelationCommand, CorrelationState, CorrelationEvent]:
    """The core with its codecs; a match becomes a delivery on the run's inputs."""

    def outputs(event: CorrelationEvent) -> Sequence[tuple[str, bytes, bytes]]:
        if isinstance(event, core.MessageCorrelated):
            return [(topics.inputs, event.run_id.encode(), encode(core.delivery(event)))]
        return []

    return KeyedLogic(
        decode=_decode_command,
        key=core.key_of,
        decide=core.decide,
        evolve=core.evolve,
        encode_event=encode,
        encode_state=encode,
        decode_state=_decode_state,
        encode_command=encode,
        outputs=outputs,
        timers=_timers,
        empty=core.is_empty,
    )


class CorrelationProcessor(KeyedProcessor[CorrelationCommand, CorrelationState, CorrelationEvent]):
    """Matches messages and subscriptions, exactly once (group ``<deployment>-correlation``)."""

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
        super().__init__(
            bootstrap,
            "correlation",
            correlation_logic(topics),
            correlation_topics(topics),
            app=topics.deployment(app),
            clock=clock,
            instance_id=instance_id,
            commit_timeout_s=commit_timeout_s,
        )


def message_record(topics: Topics, message: core.PublishMessage) -> tuple[str, bytes, bytes]:
    """(topic, key, value) of a published message: what any producer writes."""
    return topics.messages, core.key_of(message).encode(), encode(message)
