"""Deployed limits documents and paused keys on the compacted limits topic.

One partition; two kinds of record:

- ``doc:<version>`` (version zero-padded, so keys sort): the canonical JSON of a
  deployed limits document. Versions count up from 1 and never change.
- ``pause:<key>``: the JSON ``{"paused_at": ms, "by": who}``; a tombstone resumes the key.

Deploys and pauses write under one transactional id shared by every writer, as spec
deploys do (``engine.kafka.specs``): starting the producer fences a concurrent writer and
settles its transaction, so the read that follows sees every earlier deploy, and two
writers can never both take the same version number.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError, ProducerFenced

from engine.codec import encode
from engine.core import admission as ad
from engine.core.errors import TerranohaError
from engine.core.flow import FlowLimits
from engine.core.limits import (
    LimitsDocument,
    LimitsError,
    check_key,
    limits_body,
    load_limits,
    resolve,
)
from engine.kafka._util import stop_quietly, wait_or_stop
from engine.kafka.admission import AdmissionTopics
from engine.kafka.specs import _TopicReader
from engine.kafka.topics import Topics, deployed_topics, ensure_topics, key_partition

log = logging.getLogger("terranoha.kafka.limits")

_ATTEMPTS = 5
T = TypeVar("T")
_DOC = "doc:"
_PAUSE = "pause:"


class LimitsConflictError(TerranohaError):
    """Concurrent writers kept fencing this one."""

    retriable = True


@dataclass(slots=True)
class DeployedLimits:
    """The limits topic read to its end."""

    version: int = 0
    document: LimitsDocument | None = None
    paused: dict[str, int] = field(default_factory=dict)

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """Fold one record in; a record that does not validate is logged and skipped."""
        if key is None:
            return
        text = key.decode(errors="replace")
        if text.startswith(_PAUSE):
            name = text.removeprefix(_PAUSE)
            if value is None:
                self.paused.pop(name, None)
            else:
                try:
                    self.paused[name] = int(json.loads(value)["paused_at"])
                except (ValueError, KeyError, TypeError):
                    log.error("limits record %s is not a pause, skipped", text)
        elif text.startswith(_DOC) and value is not None:
            try:
                version = int(text.removeprefix(_DOC))
                document = load_limits(json.loads(value))
            except (ValueError, LimitsError) as exc:
                log.error("limits record %s is not a valid limits document, skipped: %s", text, exc)
                return
            if version > self.version:
                self.version, self.document = version, document


def doc_key(version: int) -> bytes:
    return f"{_DOC}{version:09d}".encode()


async def read_limits(bootstrap: str, topics: Topics) -> DeployedLimits:
    """The latest document and the paused keys (empty if nothing was ever deployed).
    Reading creates nothing: a deployment that never used flow control stays as it was."""
    deployed = DeployedLimits()
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        await probe.start()
        if topics.limits not in await probe.topics():
            return deployed
    finally:
        await stop_quietly(probe)
    reader = _TopicReader(bootstrap, topics.limits)
    try:
        await reader.start()
        for key, value in await reader.read_to_end():
            deployed.apply(key, value)
    finally:
        await reader.stop()
    return deployed


Out = tuple[str, bytes, bytes | None, int]
"""A record to write: (topic, key, value or None for a tombstone, partition)."""


def _command(admission: AdmissionTopics, command: ad.AdmissionCommand) -> Out:
    key = command.key.encode()
    return (
        admission.keyed.inputs,
        key,
        encode(command),
        key_partition(key, admission.keyed.partitions),
    )


async def publish_limits(
    bootstrap: str, topics: Topics, document: LimitsDocument, *, app: str = "terranoha"
) -> tuple[int, bool]:
    """Deploy ``document``: its version, and False if it equals the latest already.

    In the same transaction, every key a rule names by itself gets its new limits as a
    ``Configure`` on the admission inputs (a raised limit lets queued requests through at
    once); a key only a wildcard covers takes the new version with its next request."""
    body = limits_body(document)

    def change(
        deployed: DeployedLimits, admission: AdmissionTopics
    ) -> tuple[list[Out], tuple[int, bool], bool]:
        if deployed.document is not None and limits_body(deployed.document) == body:
            return [], (deployed.version, False), False
        version = deployed.version + 1
        named = sorted(
            {r.key for r in document.rules if not r.wildcard}
            | {
                r.key
                for r in (deployed.document.rules if deployed.document else [])
                if not r.wildcard
            }
        )
        configure = [
            _command(admission, ad.Configure(key, resolve(document, key), version)) for key in named
        ]
        return (
            [(topics.limits, doc_key(version), body.encode(), 0), *configure],
            (version, True),
            True,
        )

    return await _write(bootstrap, topics, app, change)


async def set_paused(
    bootstrap: str,
    topics: Topics,
    key: str,
    paused: bool,
    *,
    by: str,
    now: int,
    app: str = "terranoha",
) -> bool:
    """Pause or resume ``key``; False if it was in that state already. The record on the
    limits topic and the ``Pause``/``Resume`` the admission processor acts on are
    written in one transaction."""
    check_key(key)

    def change(
        deployed: DeployedLimits, admission: AdmissionTopics
    ) -> tuple[list[Out], bool, bool]:
        if (key in deployed.paused) == paused:
            return [], False, False
        value = json.dumps({"paused_at": now, "by": by}).encode() if paused else None
        command = ad.Pause(key) if paused else ad.Resume(key)
        return (
            [(topics.limits, f"{_PAUSE}{key}".encode(), value, 0), _command(admission, command)],
            True,
            True,
        )

    return await _write(bootstrap, topics, app, change)


async def _write(
    bootstrap: str,
    topics: Topics,
    app: str,
    change: Callable[[DeployedLimits, AdmissionTopics], tuple[list[Out], T, bool]],
) -> T:
    """Read the topic under the writers' transactional id, then write what ``change``
    says (records, the answer to return, whether to write at all)."""
    topics = await deployed_topics(bootstrap, topics)  # route keys by the real count
    admission = AdmissionTopics(topics)
    await ensure_topics(bootstrap, [topics.limits_topic(), *admission.new_topics()])
    for attempt in range(1, _ATTEMPTS + 1):
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            transactional_id=f"{app}-{topics.limits}-write",
            enable_idempotence=True,
            acks="all",
        )
        reader = _TopicReader(bootstrap, topics.limits)
        try:
            await producer.start()  # fences a concurrent writer, settles its transaction
            await reader.start()
            deployed = DeployedLimits()
            for key, value in await reader.read_to_end():
                deployed.apply(key, value)
            records, answer, write = change(deployed, admission)
            if not write:
                return answer
            async with producer.transaction():
                for topic, key, value, partition in records:
                    delivery = await producer.send(topic, value, key=key, partition=partition)
                    if topic == topics.limits:
                        mark = delivery
                offset = (await mark).offset
            await reader.wait_visible(offset, 10.0)  # a status read next must see it
            return answer
        except ProducerFenced:
            log.info("limits write raced another writer (attempt %d); reading again", attempt)
        finally:
            await reader.stop()
            await stop_quietly(producer)
    raise LimitsConflictError(
        f"could not write the limits topic: {_ATTEMPTS} concurrent "
        "writers fenced this one; try again"
    )


class LimitsFollower:
    """Keeps the latest deployed limits document, reading the limits topic every
    ``poll_s`` seconds, for the run engine to decide against (``current``)."""

    def __init__(self, bootstrap: str, topics: Topics, poll_s: float = 1.0) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.poll_s = poll_s
        self._current: FlowLimits | None = None

    def current(self) -> FlowLimits | None:
        return self._current

    async def catch_up(self) -> None:
        deployed = await read_limits(self.bootstrap, self.topics)
        if deployed.document is not None and (
            self._current is None or deployed.version > self._current.version
        ):
            self._current = FlowLimits(deployed.document, deployed.version)
            log.info("limits version %d in force", deployed.version)

    async def follow(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await wait_or_stop(stop, self.poll_s)
            if stop.is_set():
                break
            try:
                await self.catch_up()
            except (KafkaError, OSError, TimeoutError):
                log.exception("reading the limits topic failed; trying again")
