"""The demo's tools. The CRM, the model, the payment provider and the mailer are fakes
(they stand for systems outside the engine); the payment provider keeps its ledger in
the demo's SQLite file and applies each idempotency key once, as real providers do."""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

from engine.worker import PermanentError, TaskContext, TaskResult, ToolRegistry, TransientError

ORDERS = {
    "ord-1001": {
        "order_id": "ord-1001",
        "amount": 42.5,
        "currency": "EUR",
        "item": "ceramic teapot",
        "customer_email": "dana@example.com",
    },
    "ord-1002": {
        "order_id": "ord-1002",
        "amount": 1250.0,
        "currency": "EUR",
        "item": "espresso machine",
        "customer_email": "lee@example.com",
    },
}


class PaymentProvider:
    """A payment service that de-duplicates by idempotency key. Counts calls and effects."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(
            path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.Lock()
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS demo_refunds (idempotency_key TEXT PRIMARY KEY,"
            " order_id TEXT, amount REAL, refund_id TEXT);"
            "CREATE TABLE IF NOT EXISTS demo_refund_calls (idempotency_key TEXT, n INTEGER);"
        )

    def refund(self, key: str, order_id: str, amount: float) -> str:
        refund_id = f"rf_{abs(hash(key)) % 10**8:08d}"
        with self._lock:
            self._db.execute("INSERT INTO demo_refund_calls VALUES (?, 1)", (key,))
            self._db.execute(
                "INSERT OR IGNORE INTO demo_refunds VALUES (?, ?, ?, ?)",
                (key, order_id, amount, refund_id),
            )
            row = self._db.execute(
                "SELECT refund_id FROM demo_refunds WHERE idempotency_key = ?", (key,)
            ).fetchone()
        return str(row[0])

    def effects(self) -> dict[str, int]:
        rows = self._db.execute("SELECT idempotency_key, COUNT(*) FROM demo_refunds GROUP BY 1")
        return {k: n for k, n in rows}

    def calls(self) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT idempotency_key, COUNT(*) FROM demo_refund_calls GROUP BY 1"
        )
        return {k: n for k, n in rows}


def build_registry(payments: PaymentProvider) -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool("crm.get_order")
    def get_order(ctx: TaskContext) -> dict[str, Any]:
        if ctx.attempt == 1:
            raise TransientError("CRM_UNAVAILABLE", "CRM answered 503 Service Unavailable")
        order = ORDERS.get(ctx.input["order_id"])
        if order is None:
            raise PermanentError(
                "ORDER_NOT_FOUND", f"no order {ctx.input['order_id']}", field="input.order_id"
            )
        return order

    @registry.tool("llm.classify_refund")
    def classify(ctx: TaskContext) -> TaskResult:
        message = str(ctx.input["message"]).lower()
        category = "damaged_item" if "broken" in message or "cracked" in message else "other"
        confidence = 0.62 if category == "damaged_item" else 0.91
        return TaskResult(
            {
                "category": category,
                "confidence": confidence,
                "rationale": "customer reports the item arrived damaged",
            },
            cost=0.0031,
            confidence=confidence,
        )

    @registry.tool("payments.prepare_refund")
    def prepare(ctx: TaskContext) -> dict[str, Any]:
        order = ctx.input["order"]
        return {
            "order_id": order["order_id"],
            "amount": order["amount"],
            "currency": order["currency"],
            "method": "original_payment",
            "reason": ctx.input["category"],
        }

    @registry.tool("payments.commit_refund")
    def commit(ctx: TaskContext) -> TaskResult:
        change = ctx.input["change_set"]
        refund_id = payments.refund(ctx.idempotency_key, change["order_id"], change["amount"])
        return TaskResult({"refund_id": refund_id, "amount": change["amount"]}, cost=0.25)

    @registry.tool("mail.send")
    def send(ctx: TaskContext) -> dict[str, Any]:
        return {"message_id": f"msg-{ctx.run_id[:8]}-{ctx.step}", "to": ctx.input["to"]}

    return registry
