"""The triggers topic becomes run inputs, exactly once, when it is not co-partitioned.

A triggers topic with the run inputs' partition count is read by the orchestrator itself
(``engine.kafka.processor``). One created with another count (more partitions for the
producers, say) is read by this router: users publish ``Trigger`` records to it, and the
router turns each into one ``StartRun`` on the run inputs topic, keyed and partitioned by
its run id. The run id comes from (tenant, idempotency key), or from the trigger's
topic/partition/offset when it has no key, so the same trigger published twice, or read
twice, addresses one run: the orchestrator refuses the second ``StartRun``.

The router is a stateless task of the exactly-once stream processor
(``engine.kafka.stream``): task p reads triggers partition p (group ``<deployment>-router``,
``transactional.id = <app>-<triggers topic>-<p>``) and writes, in ONE transaction per
batch, its ``StartRun`` commands, its dead letters (bytes that are not a trigger) and the
consumer offset. Ownership, fencing and the transaction outcomes are the processor's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from engine.codec import encode
from engine.core.records import DeadLetter
from engine.kafka._util import Record, start_run_record
from engine.kafka.stream import Step, StreamProcessor, Task
from engine.kafka.topics import Topics
from engine.runtime.clock import Clock
from engine.runtime.processor import Input, Processor, StateCache, dead_letter_of
from engine.runtime.specs import SpecRegistry

log = logging.getLogger("terranoha.kafka.router")


class RouteTask(Task):
    """One triggers partition: no state; each trigger becomes the ``StartRun`` of its run."""

    def __init__(self, topics: Topics, number: int) -> None:
        self.topics = topics
        self.number = number
        self.reader = Processor(
            SpecRegistry(), StateCache(), owns=lambda run_id: False, triggers_source=topics.triggers
        )
        """The engine's reading of a trigger, with every run owned elsewhere: each trigger
        becomes a forward (its ``StartRun``), anything else a dead letter."""

    async def restore(self, latest: Mapping[bytes, bytes]) -> int:
        return 0

    async def process(self, inputs: Sequence[Input], now: int) -> Step:
        """Everything is encoded before the transaction begins: nothing can fail halfway
        through it for a reason that is not Kafka's."""
        step = Step()
        for item in inputs:
            batch = self.reader.process([item], now)
            letters = batch.dead_letters
            for start in batch.forwards:
                try:
                    step.records.append(start_run_record(self.topics, start, item))
                    step.forwards += 1
                except Exception as exc:
                    letters.append(
                        dead_letter_of(
                            item, "engine_error", f"encoding its StartRun failed: {exc!r}", now
                        )
                    )
            for letter in letters:
                self._dead(step, letter)
        return step

    def isolated(self, item: Input, now: int, why: str) -> Step:
        step = Step()
        self._dead(step, dead_letter_of(item, "engine_error", f"processing failed: {why}", now))
        return step

    def _dead(self, step: Step, letter: DeadLetter) -> None:
        log.warning(
            "dead letter %s/%d/%d: %s: %s",
            letter.source,
            letter.partition,
            letter.offset,
            letter.reason,
            letter.detail,
        )
        record: Record = (
            self.topics.dead_letters,
            self.number % self.topics.partitions,
            None,
            encode(letter),
            [("reason", letter.reason.encode())],
        )
        step.records.append(record)
        step.dead_letters += 1


class TriggerRouter(StreamProcessor):
    """Routes the triggers partitions the consumer group ``<deployment>-router`` assigns it."""

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        app: str = "terranoha",
        clock: Clock | None = None,
        *,
        max_batch: int = 500,
        poll_ms: int = 50,
        commit_timeout_s: float = 15.0,
        retry_s: float = 5.0,
        instance_id: str | None = None,
    ) -> None:
        self.topics = topics
        self.app = app
        super().__init__(
            bootstrap,
            name="router",
            inputs=[topics.triggers],
            group_id=f"{topics.deployment(app)}-router",
            transactional_id=lambda number: f"{app}-{topics.triggers}-{number}",
            make_task=lambda number: RouteTask(topics, number),
            clock=clock,
            max_batch=max_batch,
            poll_ms=poll_ms,
            commit_timeout_s=commit_timeout_s,
            refence_pause_s=retry_s,
            instance_id=instance_id,
        )

    @property
    def owned(self) -> list[int]:
        """The triggers partitions this router holds a ready producer for."""
        return sorted(self.parts)
