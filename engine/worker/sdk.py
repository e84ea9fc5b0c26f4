"""Tools, their context and errors, and ``execute``: one task command in, one result
command out.

Workers are at-least-once: a task can be delivered again (a lease ran out, a worker
died). Two things keep effects single:

* the idempotency key, stable across retries of a step, is handed to the tool so the
  system it writes to can de-duplicate (as payment APIs do);
* the ledger remembers completed results by key; a redelivered task whose key already
  completed is answered from the ledger without calling the tool again.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from engine.codec import EncodeError, encode
from engine.core.commands import Command, CompleteTask, FailTask
from engine.core.errors import TerranohaError
from engine.core.outbox import TaskCommand
from engine.runtime.processor import MAX_INPUT_BYTES


class TaskError(TerranohaError):
    """Raised by a tool to report a failure of a given class."""

    error_class = "transient"

    def __init__(
        self, code: str, message: str = "", field: str | None = None, cost: float = 0.0
    ) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message or code
        self.field = field
        self.cost = cost


class TransientError(TaskError):
    """Worth retrying: a timeout, a 503, a rate limit. Retried with backoff."""

    error_class = "transient"
    retriable = True


class PermanentError(TaskError):
    """Retrying cannot help: bad parameters, a schema violation. The run fails fast;
    name the offending ``field`` so the diagnostic says what to fix."""

    error_class = "permanent"


class BusinessError(TaskError):
    """A business rule said no (``code`` such as AMOUNT_OVER_LIMIT). The spec decides:
    another step, a wait for more input, or an escalation."""

    error_class = "business"


@dataclass(frozen=True, slots=True)
class TaskResult:
    """A tool's result with what it cost and, for model outputs, how confident it is."""

    value: Any
    cost: float = 0.0
    confidence: float | None = None


@dataclass(frozen=True, slots=True)
class TaskContext:
    run_id: str
    step: str
    attempt: int
    idempotency_key: str
    deadline: int
    input: Any
    task_id: str
    queue: str
    tenant: str
    correlation_id: str
    phase: str = "task"


Handler = Callable[[TaskContext], Any]


class ToolRegistry:
    def __init__(self) -> None:
        self._tools: dict[str, Handler] = {}

    def register(self, queue: str, handler: Handler) -> None:
        if queue in self._tools and self._tools[queue] is not handler:
            raise TerranohaError(f"tool {queue!r} is registered twice; queue names are unique")
        self._tools[queue] = handler

    def get(self, queue: str) -> Handler | None:
        return self._tools.get(queue)

    @property
    def queues(self) -> list[str]:
        return sorted(self._tools)

    def tool(self, queue: str) -> Callable[[Handler], Handler]:
        def decorate(fn: Handler) -> Handler:
            self.register(queue, fn)
            return fn

        return decorate


DEFAULT_REGISTRY = ToolRegistry()


def tool(queue: str, registry: ToolRegistry | None = None) -> Callable[[Handler], Handler]:
    """Register ``fn`` as the handler of task queue ``queue``. Sync or async functions."""
    return (registry or DEFAULT_REGISTRY).tool(queue)


def load_worker_modules(modules: Iterable[str]) -> ToolRegistry:
    """Import the given modules (their ``@tool`` decorators register into the default
    registry) and return it."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise TerranohaError(f"cannot import worker module {name!r}: {exc}") from exc
    return DEFAULT_REGISTRY


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    idempotency_key: str
    result: Any
    cost: float
    confidence: float | None


class Ledger(Protocol):
    """Completed results by idempotency key."""

    def lookup(self, idempotency_key: str) -> LedgerEntry | None: ...


class MemoryLedger:
    def __init__(self) -> None:
        self.entries: dict[str, LedgerEntry] = {}

    def lookup(self, idempotency_key: str) -> LedgerEntry | None:
        return self.entries.get(idempotency_key)

    def record(self, entry: LedgerEntry) -> None:
        self.entries.setdefault(entry.idempotency_key, entry)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What executing a task produced: the command to send (``payload``: encoded, and
    known to fit the engine's input limit), and the ledger entry to write in the same
    atomic unit as that command (None when there is nothing new to record)."""

    command: Command
    entry: LedgerEntry | None
    called: bool
    payload: bytes = b""


def _fail(
    task: TaskCommand,
    error_class: str,
    code: str,
    message: str,
    field: str | None = None,
    cost: float = 0.0,
) -> FailTask:
    return FailTask(
        command_id=f"result:{task.task_id}",
        run_id=task.run_id,
        tenant=task.tenant,
        correlation_id=task.correlation_id,
        step=task.step,
        task_id=task.task_id,
        error_class=error_class,
        code=code,
        message=message,
        field=field,
        cost=cost,
    )


def _complete(
    task: TaskCommand, result: Any, cost: float, confidence: float | None
) -> CompleteTask:
    return CompleteTask(
        command_id=f"result:{task.task_id}",
        run_id=task.run_id,
        tenant=task.tenant,
        correlation_id=task.correlation_id,
        step=task.step,
        task_id=task.task_id,
        result=result,
        cost=cost,
        confidence=confidence,
    )


async def execute(
    task: TaskCommand, registry: ToolRegistry, ledger: Ledger, now_ms: Callable[[], int]
) -> Outcome:
    """Run the tool for ``task`` (unless its key already completed) and build the report.

    Every backend sends what this returns, so a result that cannot travel fails the same
    way everywhere, at once and without a ledger entry: ``RESULT_NOT_JSON`` (not a JSON
    value), ``RESULT_NOT_ENCODABLE`` (the codec refuses it: NaN, infinity),
    ``RESULT_TOO_LARGE`` (over the engine's input limit)."""
    return _deliverable(task, await _execute(task, registry, ledger, now_ms))


def _deliverable(task: TaskCommand, outcome: Outcome) -> Outcome:
    try:
        payload = encode(outcome.command)
    except EncodeError as exc:
        code = "RESULT_NOT_ENCODABLE"
        problem = f"{task.queue} returned a result the engine cannot encode: {exc}"
    else:
        if len(payload) <= MAX_INPUT_BYTES:
            return replace(outcome, payload=payload)
        code = "RESULT_TOO_LARGE"
        problem = (
            f"{task.queue} returned a {len(payload)} byte result; the limit is "
            f"{MAX_INPUT_BYTES} bytes"
        )
    failed = _fail(task, "permanent", code, problem)
    return Outcome(failed, None, outcome.called, encode(failed))


async def _execute(
    task: TaskCommand, registry: ToolRegistry, ledger: Ledger, now_ms: Callable[[], int]
) -> Outcome:
    known = ledger.lookup(task.idempotency_key)
    if known is not None:
        return Outcome(_complete(task, known.result, 0.0, known.confidence), None, called=False)
    handler = registry.get(task.queue)
    if handler is None:
        return Outcome(
            _fail(
                task, "permanent", "UNKNOWN_TOOL", f"no tool registered for queue {task.queue!r}"
            ),
            None,
            called=False,
        )
    ctx = TaskContext(
        run_id=task.run_id,
        step=task.step,
        attempt=task.attempt,
        idempotency_key=task.idempotency_key,
        deadline=task.deadline,
        input=task.input,
        task_id=task.task_id,
        queue=task.queue,
        tenant=task.tenant,
        correlation_id=task.correlation_id,
        phase=task.phase,
    )
    timeout = max(0.001, (task.deadline - now_ms()) / 1000)
    try:
        value = await asyncio.wait_for(_call(handler, ctx), timeout)
    except TaskError as exc:
        failed = _fail(task, exc.error_class, exc.code, exc.message, exc.field, exc.cost)
        return Outcome(failed, None, called=True)
    except TimeoutError:
        failed = _fail(task, "transient", "TOOL_TIMEOUT", f"{task.queue} ran past its deadline")
        return Outcome(failed, None, called=True)
    except Exception as exc:  # unexpected errors are worth a retry
        failed = _fail(task, "transient", "UNEXPECTED_ERROR", f"{type(exc).__name__}: {exc}")
        return Outcome(failed, None, called=True)
    result = value if isinstance(value, TaskResult) else TaskResult(value)
    try:
        json.dumps(result.value)
    except (TypeError, ValueError) as exc:
        failed = _fail(
            task,
            "permanent",
            "RESULT_NOT_JSON",
            f"{task.queue} returned a value that is not JSON: {exc}",
        )
        return Outcome(failed, None, called=True)
    entry = LedgerEntry(task.idempotency_key, result.value, result.cost, result.confidence)
    return Outcome(
        _complete(task, result.value, result.cost, result.confidence), entry, called=True
    )


async def _call(handler: Handler, ctx: TaskContext) -> Any:
    if inspect.iscoroutinefunction(handler):
        return await handler(ctx)
    result = await asyncio.to_thread(handler, ctx)
    if inspect.isawaitable(result):
        return await result
    return result
