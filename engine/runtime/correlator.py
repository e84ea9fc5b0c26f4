"""Message correlation for a backend that keeps it beside the runs (the embedded one).

``correlate`` decides a batch's correlation commands against the committed state of
their keys plus the batch's own changes, exactly as the Kafka correlation processor
does for one partition. The caller writes the states, the events and the deliveries
(``CorrelateMessage`` commands for the runs' inputs) in the same atomic unit as the run
batch that caused them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from engine.core.commands import CorrelateMessage
from engine.core.correlation import (
    CorrelationCommand,
    CorrelationEvent,
    CorrelationState,
    MessageCorrelated,
    decide,
    delivery,
    evolve,
    key_of,
)


@dataclass(slots=True)
class CorrelationBatch:
    """What a batch of correlation commands produced."""

    states: dict[str, CorrelationState] = field(default_factory=dict)
    events: list[CorrelationEvent] = field(default_factory=list)
    deliveries: list[CorrelateMessage] = field(default_factory=list)
    now: int = 0


def correlate(
    commands: Iterable[CorrelationCommand], load: Callable[[str], CorrelationState | None], now: int
) -> CorrelationBatch:
    """Decide and evolve ``commands`` in order; ``load`` reads a key's committed state."""
    batch = CorrelationBatch(now=now)
    for command in commands:
        key = key_of(command)
        state = batch.states[key] if key in batch.states else load(key)
        events = decide(state, command, now)
        for event in events:
            state = evolve(state, event)
            if isinstance(event, MessageCorrelated):
                batch.deliveries.append(delivery(event))
        if events:
            assert state is not None
            batch.states[key] = state
            batch.events.extend(events)
    return batch
