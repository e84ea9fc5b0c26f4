"""Deployed workflow specs on a compacted topic.

Each deployed (workflow, version) is one record on the specs topic: key
``<workflow>:<version>``, value the JSON of ``spec_to_data(spec)``. Deployed versions
never change, so compaction keeps exactly one record per version and the topic read from
the beginning is the set of deployed specs.

``publish_spec`` checks and writes under one transactional id shared by every deployer:
initialising it fences any concurrent deployer and settles its transaction, so the read
that follows sees every earlier deploy and two different bodies can never both be
accepted for one version. ``SpecFollower`` keeps a ``SpecRegistry`` in step with the
topic.
"""

from __future__ import annotations

import asyncio
import json
import logging

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from engine.core.errors import SpecError
from engine.core.spec import WorkflowSpec, load_deployed_spec, spec_to_data
from engine.embedded.store import SpecConflictError
from engine.kafka._util import stop_quietly, wait_or_stop
from engine.kafka.topics import Topics, ensure_topics
from engine.runtime.specs import SpecRegistry

log = logging.getLogger("terranoha.kafka.specs")

__all__ = ["SpecConflictError", "SpecFollower", "publish_spec", "queues_of", "spec_key"]

_DEPLOY_ATTEMPTS = 5


def queues_of(spec: WorkflowSpec) -> set[str]:
    """Every worker queue the spec's steps dispatch to."""
    queues: set[str] = set()
    for step in spec.steps:
        if step.task is not None:
            queues.add(step.task)
        if step.prepare_commit is not None:
            queues.add(step.prepare_commit.prepare)
            queues.add(step.prepare_commit.commit)
    return queues


def spec_key(workflow: str, version: int) -> bytes:
    return f"{workflow}:{version}".encode()


def _body(spec: WorkflowSpec) -> bytes:
    return json.dumps(spec_to_data(spec), sort_keys=True, separators=(",", ":")).encode()


def _same(stored: bytes, body: bytes) -> bool:
    try:
        return bool(json.loads(stored) == json.loads(body))
    except ValueError:
        return False


async def publish_spec(
    bootstrap: str,
    topics: Topics,
    spec: WorkflowSpec,
    *,
    app: str = "terranoha",
    visible_timeout_s: float = 10.0,
) -> bool:
    """Deploy ``spec``: True if it is new, False if this exact spec is deployed already.

    Raises ``SpecConflictError`` if the same (workflow, version) is deployed with a
    different definition. Creates the specs topic and the spec's task topics if missing.
    Returns once read_committed readers can see the spec, so a trigger sent after the
    deploy finds it.
    """
    core = [t for t in topics.core_topics() if t.name == topics.specs]
    await ensure_topics(bootstrap, [*core, *topics.task_topics(sorted(queues_of(spec)))])
    key, body = spec_key(*spec.key), _body(spec)
    for attempt in range(1, _DEPLOY_ATTEMPTS + 1):
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            transactional_id=f"{app}-{topics.specs}-deploy",
            enable_idempotence=True,
            acks="all",
        )
        reader = _TopicReader(bootstrap, topics.specs)
        try:
            await producer.start()  # fences a concurrent deployer, settles its transaction
            await reader.start()
            stored = _latest(await reader.read_to_end()).get(key)
            if stored is not None:
                if _same(stored, body):
                    return False
                raise SpecConflictError(
                    f"{spec.workflow} version {spec.version} is already deployed with a "
                    "different definition; deployed versions never change, bump version"
                )
            async with producer.transaction():
                delivery = await producer.send(topics.specs, body, key=key, partition=0)
                offset = (await delivery).offset
            await reader.wait_visible(offset, visible_timeout_s)
            return True
        except ProducerFenced:
            log.info(
                "spec deploy %s raced another deployer (attempt %d); checking again",
                key.decode(),
                attempt,
            )
        finally:
            await reader.stop()
            await stop_quietly(producer)
    raise SpecConflictError(
        f"could not deploy {spec.workflow} version {spec.version}: "
        f"{_DEPLOY_ATTEMPTS} concurrent deploys fenced it; try again"
    )


def _latest(records: list[tuple[bytes | None, bytes | None]]) -> dict[bytes, bytes]:
    """The latest value of every key."""
    return {key: value for key, value in records if key is not None and value is not None}


class _TopicReader:
    """Reads partition 0 of a topic from the beginning, without a group, read_committed."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.tp = TopicPartition(topic, 0)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
        )

    async def start(self) -> None:
        try:
            await self.consumer.start()
            self.consumer.assign([self.tp])
            await self.consumer.seek_to_beginning(self.tp)
        except BaseException:
            await stop_quietly(self.consumer)
            raise

    async def stop(self) -> None:
        await stop_quietly(self.consumer)

    async def read_to_end(self) -> list[tuple[bytes | None, bytes | None]]:
        """Everything from the current position up to the last stable offset as it is now."""
        end = (await self.consumer.end_offsets([self.tp]))[self.tp]
        out: list[tuple[bytes | None, bytes | None]] = []
        while await self.consumer.position(self.tp) < end:
            fetched = await self.consumer.getmany(self.tp, timeout_ms=500, max_records=1000)
            out.extend((m.key, m.value) for m in fetched.get(self.tp, []))
        return out

    async def wait_visible(self, offset: int, timeout_s: float) -> None:
        """Wait until a record at ``offset`` is below the last stable offset. A commit
        returns once the coordinator has decided; the markers that make the records
        readable are written just after."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (await self.consumer.end_offsets([self.tp]))[self.tp] <= offset:
            if loop.time() > deadline:
                log.warning(
                    "%s offset %d is committed but not yet readable after %.0fs",
                    self.tp.topic,
                    offset,
                    timeout_s,
                )
                return
            await asyncio.sleep(0.01)


class SpecFollower:
    """Keeps ``registry`` equal to the specs deployed on the specs topic.

    ``start`` reads the whole topic; ``catch_up`` reads what arrived since; ``follow``
    calls ``catch_up`` until stopped. A record that does not validate is logged and
    skipped; a second, different body for a deployed version is refused (the first one
    read wins, as versions never change).
    """

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        registry: SpecRegistry | None = None,
        *,
        poll_s: float = 1.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.registry = registry if registry is not None else SpecRegistry()
        self.poll_s = poll_s
        self._bodies: dict[bytes, bytes] = {}
        self._queues_to_create: set[str] = set()
        self._reader: _TopicReader | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> int:
        """Read every deployed spec into the registry; return how many were added."""
        core = [t for t in self.topics.core_topics() if t.name == self.topics.specs]
        await ensure_topics(self.bootstrap, core)
        reader = _TopicReader(self.bootstrap, self.topics.specs)
        await reader.start()
        self._reader = reader
        return await self.catch_up()

    async def catch_up(self) -> int:
        """Read up to the current end of the topic; return how many new specs were added."""
        if self._reader is None:
            raise RuntimeError("SpecFollower.start() must be awaited before catch_up()")
        async with self._lock:
            added = [
                spec
                for key, value in await self._reader.read_to_end()
                if (spec := self._accept(key, value)) is not None
            ]
            for spec in added:
                self.registry.add(spec)
                self._queues_to_create |= queues_of(spec)
                log.info("spec %s version %d deployed", spec.workflow, spec.version)
            await self._create_task_topics()
            return len(added)

    async def _create_task_topics(self) -> None:
        """``publish_spec`` creates them first; this covers specs written by other means.
        On failure the queues are kept and tried again on the next catch-up."""
        if not self._queues_to_create:
            return
        try:
            await ensure_topics(
                self.bootstrap, self.topics.task_topics(sorted(self._queues_to_create))
            )
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning(
                "creating task topics for %s failed (%r); trying again later",
                sorted(self._queues_to_create),
                exc,
            )
            return
        self._queues_to_create.clear()

    def _accept(self, key: bytes | None, value: bytes | None) -> WorkflowSpec | None:
        where = key.decode(errors="replace") if key is not None else "<no key>"
        if key is None or value is None:
            return None
        known = self._bodies.get(key)
        if known is not None:
            if not _same(known, value):
                log.error(
                    "spec %s was published again with a different body; keeping the "
                    "first one (deployed versions never change)",
                    where,
                )
            return None
        try:
            spec = load_deployed_spec(json.loads(value))
        except (ValueError, SpecError) as exc:
            log.error("spec record %s is not a valid spec, skipped: %s", where, exc)
            return None
        if spec_key(*spec.key) != key:
            log.error(
                "spec record %s holds %s version %d, skipped", where, spec.workflow, spec.version
            )
            return None
        self._bodies[key] = value
        return spec

    async def follow(self, stop: asyncio.Event) -> None:
        """Catch up every ``poll_s`` seconds until ``stop`` is set."""
        while not stop.is_set():
            await wait_or_stop(stop, self.poll_s)
            if stop.is_set():
                break
            try:
                await self.catch_up()
            except (KafkaError, OSError, TimeoutError):
                log.exception("reading the specs topic failed; trying again")

    async def stop(self) -> None:
        if self._reader is not None:
            await self._reader.stop()
            self._reader = None
