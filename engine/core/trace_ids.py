"""Trace and span ids derived from what the log already holds, so every process (the
orchestrator writing record headers, a worker running a tool, a projector translating
events into spans) arrives at the same ids without talking to the others.

The derivations match ``engine.kafka._util.trace_headers``: the trace id is
blake2b(correlation id, 16 bytes) and a record's span id blake2b(causation id, 8 bytes).
A task record's causation id is its task id, ``run/step/visit/phase/attempt``, so the
span of a task attempt has the id the task record's ``traceparent`` names.
"""

from __future__ import annotations

import hashlib


def trace_id_of(correlation_id: str) -> int:
    """The trace id of every record and span of a run with this correlation id."""
    return int.from_bytes(hashlib.blake2b(correlation_id.encode(), digest_size=16).digest())


def span_id_of(causation_id: str) -> int:
    """The span id a record caused by ``causation_id`` names in its ``traceparent``."""
    return _nonzero(hashlib.blake2b(causation_id.encode(), digest_size=8).digest())


def run_span_id(run_id: str) -> int:
    """The root span of a run."""
    return span_id_of(f"run\x1f{run_id}")


def step_span_id(run_id: str, step: str, visit: int) -> int:
    """The span of one visit of one step."""
    return span_id_of(f"step\x1f{run_id}\x1f{step}\x1f{visit}")


def attempt_span_id(task_id: str) -> int:
    """The span of one task attempt: the span id in the task record's ``traceparent``."""
    return span_id_of(task_id)


def _nonzero(digest: bytes) -> int:
    # An all-zero span id is invalid in W3C trace context; 2^-64 odds, but cheap to rule out.
    return int.from_bytes(digest) or 1
