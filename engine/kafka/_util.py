"""Small helpers shared by the Kafka adapters: trace headers, quiet shutdown, waits."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, NotEnoughReplicasError, ProducerFenced
from aiokafka.producer import sender as _aiokafka_sender

from engine.codec import encode
from engine.core.commands import StartRun
from engine.kafka.topics import Topics
from engine.runtime.processor import Input, origin_headers

log = logging.getLogger("terranoha.kafka")

CONCURRENT_TXN_RETRY_S = 0.002
"""How soon a transaction retries adding its first partition when the broker answers
CONCURRENT_TRANSACTIONS. The broker answers so while it is still writing the previous
transaction's commit markers (a millisecond or two on one machine), that is, to nearly
every transaction begun right after a commit. aiokafka waits 20 ms then (KAFKA-5477's
value): on loopback that wait was most of a transaction's time (23 ms instead of 4 ms for
back-to-back one-record transactions), and every processor here commits back to back."""

TXN_RETRY_BACKOFF_MS = 10
"""How soon a transactional producer retries a refused request (aiokafka's default is
100 ms). Kafka 4 brokers verify that a transaction holds a partition before writing to it
(KIP-890, part 1); a client speaking the older protocol, as aiokafka does, is refused with
a retriable error while the previous transaction's markers are still being written:
NOT_ENOUGH_REPLICAS for a produce, COORDINATOR_NOT_AVAILABLE for the offsets. Each
processor here commits back to back, so under load a few transactions in a hundred met
that refusal and waited 100 ms: the p99 of a transaction was 120 ms against a p50 of
18 ms (39 to 61 ms with a back-off of 5 to 20 ms). The retries are bounded by each
request's timeout."""


class _VerificationRefusals(logging.Filter):
    """Demotes to debug aiokafka's warning for each produce retried after a
    NOT_ENOUGH_REPLICAS answer: from a Kafka 4 broker to aiokafka's transactional
    producers, that answer is the routine refusal described at ``TXN_RETRY_BACKOFF_MS``,
    a few times in every hundred transactions, not a replication problem. Real
    under-replication still surfaces: as the broker's own metrics and, once the request
    times out, as a failed transaction in the engine's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.levelno == logging.WARNING
            and isinstance(record.args, tuple)
            and NotEnoughReplicasError in record.args
        ):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_REFUSALS = _VerificationRefusals()


def tune_aiokafka() -> None:
    """The two changes this project makes to aiokafka, in one place: the short
    CONCURRENT_TRANSACTIONS retry (``CONCURRENT_TXN_RETRY_S``) and the demoted warning
    for routine verification refusals (``_VerificationRefusals``). Called by every
    stream processor when it starts, and by ``transactional_producer``; idempotent."""
    if hasattr(_aiokafka_sender, "BACKOFF_OVERRIDE"):
        _aiokafka_sender.BACKOFF_OVERRIDE = CONCURRENT_TXN_RETRY_S
    sender_log = logging.getLogger("aiokafka.producer.sender")
    if _REFUSALS not in sender_log.filters:
        sender_log.addFilter(_REFUSALS)


Headers = list[tuple[str, bytes]]
Record = tuple[str, int, bytes | None, bytes | None, Headers]
"""(topic, partition, key, value, headers) ready to send; a None value is a tombstone
(a compacted changelog then forgets the key)."""


class Outcome(Enum):
    """How a transaction ended, and so what its owner must do next (the rules, and how
    each outcome is detected, are in ``engine.kafka.stream``'s module doc)."""

    COMMITTED = "committed"
    ABORTED = "aborted"
    """Refused before the commit request, and aborted: nothing is visible. Replace the
    producer (a new epoch) and seek back to the committed offsets."""
    UNKNOWN = "unknown"
    """The transaction may or may not commit: never abort. Replace the producer, which
    fences the old one and settles the transaction, then restore the state from the
    changelog and resume from the committed offsets."""
    FENCED = "fenced"
    """Another producer with the same transactional id exists: the task is not ours."""


async def gather_all(aws: Iterable[Awaitable[Any]]) -> None:
    """Await every one of ``aws`` to its end, then raise the first error if any: nothing is
    left running behind an error (``asyncio.gather`` alone lets the others run on)."""
    pending = list(aws)
    if len(pending) == 1:  # the common case: no task to create
        await pending[0]
        return
    for outcome in await asyncio.gather(*pending, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome


def group_consumer(
    bootstrap: str, group_id: str, instance_id: str | None = None, **options: Any
) -> AIOKafkaConsumer:
    """A consumer in group ``group_id`` for work whose progress is committed by hand:
    read_committed, no auto-commit, from the beginning when the group has no offset yet,
    and static membership (``group.instance.id``) when ``instance_id`` is given."""
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        group_instance_id=instance_id,
        **options,
    )


async def transactional_producer(bootstrap: str, transactional_id: str) -> AIOKafkaProducer:
    """A started producer for exactly-once processing: idempotent, ``acks=all``, a short
    linger (a processor sends a whole batch at once), large batches and requests (dead
    letters carry the original bytes), and the short retry back-off of
    ``TXN_RETRY_BACKOFF_MS``. Starting it (InitProducerId) fences older producers with the
    same ``transactional_id`` and settles their open transaction."""
    tune_aiokafka()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        transactional_id=transactional_id,
        enable_idempotence=True,
        acks="all",
        linger_ms=2,
        max_batch_size=512 * 1024,
        max_request_size=8 << 20,
        retry_backoff_ms=TXN_RETRY_BACKOFF_MS,
        transaction_timeout_ms=60_000,
    )
    try:
        await producer.start()
    except BaseException:
        await stop_quietly(producer)
        raise
    return producer


async def send_batched(producer: AIOKafkaProducer, records: Sequence[Record]) -> list[Delivery]:
    """Send records as one record batch per topic-partition (order kept within each),
    which costs far less per record than ``send``. Returns the deliveries: a transaction
    must not be committed before they all succeeded, because aiokafka commits a
    transaction even when one of its batches was refused."""
    groups: dict[tuple[str, int], list[Record]] = {}
    for record in records:
        groups.setdefault((record[0], record[1]), []).append(record)
    deliveries: list[Delivery] = []
    for (topic, number), group in groups.items():
        batch = producer.create_batch()
        count = 0
        for _, _, key, value, headers in group:
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                future = await producer.send_batch(batch, topic, partition=number)
                deliveries.append(Delivery(future, TopicPartition(topic, number), count))
                batch = producer.create_batch()  # an empty batch takes any first record
                batch.append(key=key, value=value, timestamp=None, headers=headers)
                count = 0
            count += 1
        future = await producer.send_batch(batch, topic, partition=number)
        deliveries.append(Delivery(future, TopicPartition(topic, number), count))
    return deliveries


@dataclass(frozen=True, slots=True)
class Delivery:
    """One record batch sent: its future (the broker's answer, with the batch's base
    offset), where it went, and how many records it holds."""

    future: asyncio.Future[Any]
    tp: TopicPartition
    count: int

    def end(self) -> int:
        """The offset after the batch's last record; only once the future succeeded."""
        return int(self.future.result().offset) + self.count


async def run_transaction(
    producer: AIOKafkaProducer,
    records: Sequence[Record],
    offsets: Mapping[TopicPartition, int] | None,
    group_id: str,
    timeout_s: float,
    positions: dict[TopicPartition, int] | None = None,
) -> Outcome:
    """One transaction holding ``records`` and, if given, the consumer ``offsets``; the
    outcomes and what each asks of the caller are in ``engine.kafka.stream``.

    Every record and the offsets must be acknowledged before the commit is requested: a
    refused batch (too large, say) would otherwise leave a committed, torn transaction.
    Nothing here cancels a delivery: aiokafka's abort and commit first wait for the
    batches in flight and take a cancelled one for finished, so an abort after a
    cancelled delivery goes out while that batch may still be written, into whatever
    transaction the producer has open by then. aiokafka waits for a commit without a
    limit; a paused or partitioned broker would hang it, so each stage is bounded by
    ``timeout_s`` and a timeout is an unknown outcome, never an abort.

    ``positions``, if given, receives for each topic-partition written the offset after
    its last record, once every record was acknowledged (a local state store records
    the changelog position it reflects with it; ``engine.kafka.localstore``).
    """
    try:
        await producer.begin_transaction()
        deliveries = await asyncio.wait_for(send_batched(producer, records), timeout_s)
        pending: list[asyncio.Future[Any]] = [d.future for d in deliveries]
        if offsets:
            pending.append(
                asyncio.ensure_future(producer.send_offsets_to_transaction(dict(offsets), group_id))
            )
        for future in pending:
            future.add_done_callback(_retrieve)
        done, waiting = await asyncio.wait(
            pending, timeout=timeout_s, return_when=asyncio.FIRST_EXCEPTION
        )
        for future in done:
            if not future.cancelled() and (error := future.exception()) is not None:
                raise error
        if waiting:
            log.warning(
                "%d of %d sends of a transaction unanswered after %.1fs; its outcome is unknown",
                len(waiting),
                len(pending),
                timeout_s,
            )
            return Outcome.UNKNOWN
        if positions is not None:
            for delivery in deliveries:
                positions[delivery.tp] = max(positions.get(delivery.tp, 0), delivery.end())
    except ProducerFenced:
        return Outcome.FENCED
    except TimeoutError:
        log.warning(
            "sending a transaction's records took over %.1fs; its outcome is unknown", timeout_s
        )
        return Outcome.UNKNOWN
    except Exception as exc:
        if was_fenced(producer):
            return Outcome.FENCED
        log.warning("transaction failed before commit (%r); aborting", exc)
        _retrieve_transaction_error(producer)
        try:
            await asyncio.wait_for(producer.abort_transaction(), timeout_s)
        except ProducerFenced:
            return Outcome.FENCED
        except Exception:
            return Outcome.FENCED if was_fenced(producer) else Outcome.UNKNOWN
        return Outcome.ABORTED
    try:
        await asyncio.wait_for(producer.commit_transaction(), timeout_s)
    except ProducerFenced:
        return Outcome.FENCED
    except (TimeoutError, KafkaError, OSError) as exc:
        log.warning("commit outcome unknown (%r)", exc)
        return Outcome.UNKNOWN
    return Outcome.COMMITTED


def _retrieve(future: asyncio.Future[Any] | None) -> None:
    """Mark a send's error as seen: a failed transaction is handled as a whole."""
    if future is not None and future.done() and not future.cancelled():
        future.exception()


def _retrieve_transaction_error(producer: AIOKafkaProducer) -> None:
    """aiokafka keeps a transaction's error in a future that an abort replaces and a
    fenced producer leaves behind, unread: its "exception was never retrieved" report
    would then come from the garbage collector at some random later moment (once, in the
    middle of a ``compile()``, where it broke pytest's assertion rewriting)."""
    _retrieve(getattr(getattr(producer, "_txn_manager", None), "_transaction_waiter", None))


def was_fenced(producer: AIOKafkaProducer) -> bool:
    """The producer's sender stopped because a newer producer took its transactional id.
    aiokafka then answers every later call with some other error (``IllegalOperation``:
    "not in transaction"), so the fencing is read from the sender itself."""
    task = getattr(getattr(producer, "_sender", None), "sender_task", None)
    if task is None or not task.done() or task.cancelled():
        return False
    return isinstance(task.exception(), ProducerFenced)


async def discard_producer(producer: AIOKafkaProducer, timeout_s: float = 5.0) -> None:
    """Throw away a producer whose transaction did not end in a clean commit. Its sender
    is cancelled first: ``stop`` would wait for the batches of that transaction (for
    ever while the broker is away), and a ``stop`` that times out leaves the sender
    running, retrying the old transaction's requests behind the new producer's back."""
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    if task is not None and not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=timeout_s)
    if task is not None and task.done() and not task.cancelled():
        task.exception()
    _retrieve_transaction_error(producer)
    await stop_quietly(producer, timeout_s)


class _Stoppable(Protocol):
    async def stop(self) -> Any: ...


def start_run_record(topics: Topics, start: StartRun, trigger: Input) -> Record:
    """A trigger's ``StartRun`` for the run inputs partition of its run, with headers
    naming the trigger it came from (``origin_headers``)."""
    value = encode(start)
    headers = trace_headers(start.correlation_id, start.command_id, start.tenant)
    headers += origin_headers(trigger, len(value))
    return (topics.inputs, topics.partition_of(start.run_id), start.run_id.encode(), value, headers)


def trace_headers(correlation_id: str, causation_id: str, tenant: str) -> Headers:
    """Correlation, causation and tenant, plus a W3C traceparent whose trace id is derived
    from the correlation id, so every record of a run joins one trace."""
    trace_id = hashlib.blake2b(correlation_id.encode(), digest_size=16).hexdigest()
    span_id = hashlib.blake2b(causation_id.encode(), digest_size=8).hexdigest()
    return [
        ("correlation_id", correlation_id.encode()),
        ("causation_id", causation_id.encode()),
        ("tenant", tenant.encode()),
        ("traceparent", f"00-{trace_id}-{span_id}-01".encode()),
    ]


async def stop_quietly(client: _Stoppable, timeout_s: float = 10.0) -> None:
    """Stop a producer or consumer, ignoring errors: it is being thrown away.

    aiokafka's ``stop`` cancels its fetch task and awaits it; when that task was in a
    retry back-off (the broker is down), the task's ``CancelledError`` comes out of
    ``stop``. That one is swallowed too; a cancellation of the caller itself is not."""
    try:
        await asyncio.wait_for(client.stop(), timeout_s)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception:
        log.debug("stopping %r failed; it is being discarded anyway", client, exc_info=True)


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def seek_committed(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int:
    """Move ``tp`` back to the group's committed offset (the beginning if none) and return
    the offset from which records are new (0 when nothing was committed).

    ``committed`` asks the group coordinator again rather than trusting the consumer's
    cache, so offsets committed by a transaction that was settled a moment ago count.
    """
    committed = await consumer.committed(tp)
    if committed is None or committed < 0:
        await consumer.seek_to_beginning(tp)
        return 0
    consumer.seek(tp, committed)
    return int(committed)
