"""The processor loop's transport-agnostic parts: batches, state cache, timers, clocks.

Backends (``engine.embedded``, ``engine.kafka``) read inputs, hand a batch to
``Processor.process``, write everything the batch produced plus the input position in
one atomic unit, and only then ``commit`` the batch into the ``StateCache``.
"""

from engine.runtime.clock import Clock, ManualClock, SystemClock
from engine.runtime.processor import Batch, Input, Processor, StateCache
from engine.runtime.specs import SpecRegistry
from engine.runtime.timers import TimerService

__all__ = [
    "Batch",
    "Clock",
    "Input",
    "ManualClock",
    "Processor",
    "SpecRegistry",
    "StateCache",
    "SystemClock",
    "TimerService",
]
