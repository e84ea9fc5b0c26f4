"""The embedded backend: the whole engine in one process over one SQLite file."""

from engine.embedded.engine import EmbeddedEngine, EmbeddedWorker
from engine.embedded.store import SpecConflictError, Store, StoreError

__all__ = ["EmbeddedEngine", "EmbeddedWorker", "SpecConflictError", "Store", "StoreError"]
