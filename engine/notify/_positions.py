"""Which position of each partition may be stored, when records finish out of order.

Notifications are delivered concurrently but a position is stored only up to the first
one not settled yet: a crash redelivers everything after it, and the ledger skips what
was settled already.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Positions(Generic[K]):
    """Per partition ``K``: offsets begun and whether each finished. ``next`` is one
    past the longest finished prefix, the offset to commit (Kafka's convention)."""

    def __init__(self) -> None:
        self._pending: dict[K, collections.OrderedDict[int, bool]] = {}
        self._next: dict[K, int] = {}
        self._stored: dict[K, int] = {}

    def begin(self, partition: K, offset: int) -> None:
        self._pending.setdefault(partition, collections.OrderedDict())[offset] = False

    def finish(self, partition: K, offset: int) -> None:
        pending = self._pending.get(partition)
        if pending is None or offset not in pending:
            return  # begun before the partition was forgotten (revoked)
        pending[offset] = True
        while pending:
            first, finished = next(iter(pending.items()))
            if not finished:
                break
            pending.popitem(last=False)
            self._next[partition] = first + 1

    def unstored(self, partitions: list[K] | None = None) -> dict[K, int]:
        """The ``next`` offsets that moved since they were last ``stored``."""
        keys = list(self._next) if partitions is None else partitions
        return {
            p: self._next[p]
            for p in keys
            if p in self._next and self._next[p] != self._stored.get(p)
        }

    def stored(self, offsets: dict[K, int]) -> None:
        self._stored.update(offsets)

    def forget(self, partition: K) -> None:
        self._pending.pop(partition, None)
        self._next.pop(partition, None)
        self._stored.pop(partition, None)
