"""The worker SDK: write tools as plain functions, run them against any backend.

from engine.worker import tool, TaskContext, TransientError

@tool("crm.get_order")
async def get_order(ctx: TaskContext) -> dict:
    return await crm.fetch(ctx.input["order_id"], idempotency_key=ctx.idempotency_key)
"""

from engine.worker.sdk import (
    DEFAULT_REGISTRY,
    BusinessError,
    Ledger,
    LedgerEntry,
    MemoryLedger,
    PermanentError,
    TaskContext,
    TaskError,
    TaskResult,
    ToolRegistry,
    TransientError,
    execute,
    load_worker_modules,
    tool,
)

__all__ = [
    "DEFAULT_REGISTRY",
    "BusinessError",
    "Ledger",
    "LedgerEntry",
    "MemoryLedger",
    "PermanentError",
    "TaskContext",
    "TaskError",
    "TaskResult",
    "ToolRegistry",
    "TransientError",
    "execute",
    "load_worker_modules",
    "tool",
]
