"""Encode and decode throughput of the codec on two hot-path records.

    python bench/codec.py [--rounds 5] [--records 50000]

Prints records/s (median of the rounds, one core) for a TaskDispatched event, which
every task costs, and for a RunState snapshot of a run in flight, which every processed
batch writes to the changelog.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

from engine.codec import default_codec
from engine.core.events import TaskDispatched
from engine.core.state import Approval, RunState, StepState, Timer, Waiting

T0 = 1_700_000_000_000


def task_dispatched() -> TaskDispatched:
    return TaskDispatched(
        run_id="run-7f3c2a9e",
        seq=14,
        ts=T0,
        tenant="acme",
        correlation_id="corr-51d2",
        causation_id="cmd-0a11",
        step="classify",
        phase="task",
        attempt=2,
        task_id="run-7f3c2a9e/classify/1/2",
        queue="llm.classify_refund",
        idempotency_key="run-7f3c2a9e/classify/1",
        input={
            "order_id": "o-99812",
            "customer_message": "The parcel arrived damaged, I would like a refund please.",
            "amount": 129.9,
            "currency": "EUR",
        },
        timeout_at=T0 + 30_000,
    )


def run_state() -> RunState:
    """A refund run at its approval step: three results, a signal, two timers."""
    return RunState(
        run_id="run-7f3c2a9e",
        tenant="acme",
        correlation_id="corr-51d2",
        workflow="refund-agent",
        version=3,
        idempotency_key="order-o-99812",
        requested_by="support-bot",
        priority=1,
        input={"order_id": "o-99812", "customer_message": "The parcel arrived damaged."},
        started_at=T0,
        seq=31,
        current=StepState(
            step="refund",
            visit=1,
            kind="prepare_commit",
            started_at=T0 + 9_000,
            waiting=Waiting.APPROVAL,
            phase="prepare",
            attempt=1,
            task_id="run-7f3c2a9e/refund/1/1",
            idempotency_key="run-7f3c2a9e/refund/1",
            change_set={"refund": {"amount": 129.9, "currency": "EUR", "to": "card-4242"}},
            approval=Approval(
                approval_id="run-7f3c2a9e/refund/1",
                reason="prepare_commit",
                approvers=("finance",),
                quorum=2,
                exclude_requester=True,
                requested_at=T0 + 9_500,
                expires_at=T0 + 86_400_000,
                votes=("alice",),
                reminders=1,
            ),
        ),
        results={
            "lookup": {"order": {"id": "o-99812", "total": 129.9, "items": 2}},
            "classify": {"label": "damaged", "confidence": 0.93},
            "policy": {"eligible": True, "limit": 500},
        },
        signals={"bank_details": {"iban": "DE89370400440532013000"}},
        visits={"lookup": 1, "classify": 1, "policy": 1, "refund": 1},
        timers={
            "t-remind": Timer(
                "t-remind", "approval_reminder", "refund", "run-7f3c2a9e/refund/1", T0 + 1_809_500
            ),
            "t-expire": Timer(
                "t-expire", "approval_expiry", "refund", "run-7f3c2a9e/refund/1", T0 + 86_409_500
            ),
        },
        cost=0.0142,
        attempts=5,
    )


def rate(work: Callable[[], object], count: int, rounds: int) -> float:
    """Median records/s over ``rounds`` runs of ``count`` calls."""
    results = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(count):
            work()
        results.append(count / (time.perf_counter() - start))
    return statistics.median(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--records", type=int, default=50_000)
    args = parser.parse_args()
    codec = default_codec()
    for label, record in (("TaskDispatched", task_dispatched()), ("RunState", run_state())):
        data = codec.encode(record)
        assert codec.decode(data) == record
        encode_rate = rate(partial(codec.encode, record), args.records, args.rounds)
        decode_rate = rate(partial(codec.decode, data), args.records, args.rounds)
        print(
            f"{label:<15} {len(data):>4} bytes  encode {encode_rate:>9,.0f}/s  "
            f"decode {decode_rate:>9,.0f}/s"
        )


if __name__ == "__main__":
    main()
