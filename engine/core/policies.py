"""Pure policies: retry backoff with deterministic jitter, and the ids the core derives."""

from __future__ import annotations

import hashlib
import uuid

from engine.core.spec import RetryPolicy

RUN_NAMESPACE = uuid.UUID("6f1c1d56-8a43-4c55-9a8e-1e2f5b8c0a11")


def unit_interval(*parts: object) -> float:
    """A number in [0, 1) drawn from a hash of ``parts``: the same parts, the same number.

    This stands in for randomness wherever the core needs it, so replay is exact.
    """
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def backoff_ms(policy: RetryPolicy, run_id: str, step: str, attempt: int) -> int:
    """Delay before the attempt after ``attempt`` (1-based): capped exponential, then
    full jitter (uniform in [0, delay)) seeded by (run id, step, attempt)."""
    ceiling = min(float(policy.max), policy.initial * policy.multiplier ** (attempt - 1))
    if policy.jitter == "none":
        return int(ceiling)
    return int(ceiling * unit_interval(run_id, step, attempt))


def run_id_for(tenant: str, idempotency_key: str) -> str:
    """The run id of a start request: the same (tenant, key) always yields the same run."""
    return str(uuid.uuid5(RUN_NAMESPACE, f"{tenant}\x1f{idempotency_key}"))


def task_id(run_id: str, step: str, visit: int, phase: str, attempt: int) -> str:
    return f"{run_id}/{step}/{visit}/{phase}/{attempt}"


def idempotency_key(run_id: str, step: str, visit: int, phase: str) -> str:
    """Stable across retries of the same step visit. The commit of a prepare/commit step
    uses the step's own key; the prepare phase gets a key of its own."""
    base = f"{run_id}/{step}/{visit}"
    return f"{base}/prepare" if phase == "prepare" else base


def identity(name: str) -> str:
    """Who a name stands for when approvers are counted and compared with the requester:
    runs of whitespace become one space, the ends are stripped, the case is folded.
    ``" Alice"``, ``"ALICE"`` and ``"alice\\t"`` are one person; ``""`` is nobody."""
    return " ".join(name.split()).casefold()
