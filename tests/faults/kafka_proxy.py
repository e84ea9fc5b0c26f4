"""A loopback TCP proxy that speaks enough of the Kafka protocol to fault one request.

Pausing or killing the broker hits every request at once; the windows of a transaction
are narrower than that: one Produce that arrives late, one EndTxn whose answer is lost.
This proxy sits between the clients and the broker's ``PROXIED`` listener (which
advertises the proxy's address, so metadata and coordinator look-ups lead back here),
reads the Kafka framing of every request and lets a test arm rules on them: hold a
request until released, delay, drop it, drop its response, send it twice, or cut the
connection around it. It records every request it sees, with the broker's answer, so a
test can wait for "the next AddPartitionsToTxn of this producer" and print what happened.

It runs its own event loop on its own thread: the tests run engines in-process under
``asyncio.run``, and the proxy must keep forwarding while the test's loop is busy (or
between two of them). A held request survives its client connection: the upstream
connection stays open until the request has been forwarded and answered, which is the
late write of a client that gave up on it.

Ordering on a connection is kept: a held or delayed request holds back the requests
behind it on that connection, as a stalled TCP stream would, and responses come back in
request order. The broker answers a connection's requests in order and aiokafka matches
a response to the oldest request in flight, so letting a later request overtake would
only make the client drop the connection (``CorrelationIdError``).

Usage::

    with KafkaProxy(infra.proxy_port, infra.proxied_port) as proxy:
        rule = proxy.arm(Api.PRODUCE, Action.HOLD, when=lambda r: r.touches(topic, 0))
        ...                                    # clients bootstrap to infra.proxied_bootstrap
        held = await rule.wait_fired(10)       # the Seen entry of the held request
        await proxy.wait_seen(Api.ADD_PARTITIONS_TO_TXN, after=held.number, answered=True)
        rule.release()
        print(proxy.format_log(TXN_APIS))
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType
from typing import Any

from tests.faults.kafka_wire import TXN_APIS, Api, Request, api_name, parse_request, parse_response

__all__ = ["TXN_APIS", "Action", "Api", "KafkaProxy", "Request", "Rule", "Seen"]

HOST = "127.0.0.1"


class Action(Enum):
    """What a rule does to the request it fires on."""

    FORWARD = "forward"
    """Nothing: the default for requests no rule fires on."""
    HOLD = "hold"
    """Keep the request (and what follows it on its connection) until ``Rule.release``."""
    DELAY = "delay"
    """Forward it ``Rule.delay_s`` late."""
    DROP = "drop"
    """Never forward it; keep the connection. The client gets no answer."""
    DROP_RESPONSE = "drop-response"
    """Forward it, swallow the broker's answer: done, and the client does not know."""
    DUPLICATE = "duplicate"
    """Forward it twice back to back; the client gets the first answer only."""
    DUPLICATE_LATE = "duplicate-late"
    """Forward it, and send a copy on a connection of its own once ``Rule.release`` is
    called: a retransmission that reaches the broker long after the original."""
    CUT_BEFORE = "cut-before"
    """Close the client connection without forwarding it."""
    CUT_AFTER = "cut-after"
    """Forward it, then close the client connection: the broker acts on the request
    (its answer is read and dropped), the client never hears."""


_LATE = frozenset({Action.HOLD, Action.DELAY, Action.DUPLICATE_LATE})


@dataclass(eq=False)
class Seen:
    """One request through the proxy: when it came, what was done to it, what the broker
    answered. Times are seconds since the proxy started. Updated from the proxy's thread."""

    number: int
    at: float
    conn: int
    request: Request
    action: Action
    copy_of: int | None = None
    forwarded_at: float | None = None
    answered_at: float | None = None
    delivered: bool = False
    errors: tuple[str, ...] = ()
    """The error names in the broker's answer, one per partition where it has several."""
    answer: str = ""

    @property
    def ok(self) -> bool:
        """Answered, and without an error."""
        return self.answered_at is not None and all(e == "NO_ERROR" for e in self.errors)

    def line(self) -> str:
        how = (
            self.action.value
            if self.copy_of is None
            else f"{self.action.value} copy of #{self.copy_of}"
        )
        out = f"#{self.number:<4} +{self.at:7.3f}s c{self.conn:<3} {self.request.describe()}"
        out += f"  [{how}]"
        if self.forwarded_at is None:
            out += " not forwarded"
        elif self.forwarded_at - self.at > 0.05 or self.action in _LATE:
            out += f" forwarded +{self.forwarded_at:.3f}s"
        if self.answered_at is not None:
            out += f" -> {self.answer}" + ("" if self.delivered else " (not delivered)")
        return out


class Rule:
    """Fires ``action`` on the ``nth`` request of ``api`` matching ``when`` (every one
    if ``nth`` is None). Armed with ``KafkaProxy.arm``; safe to use from any thread."""

    def __init__(
        self,
        api: int,
        action: Action,
        when: Callable[[Request], bool] | None,
        nth: int | None,
        delay_s: float,
    ) -> None:
        if nth is not None and nth < 1:
            raise ValueError("nth counts from 1 (None: every matching request)")
        self.api = api
        self.action = action
        self.when = when
        self.nth = nth
        self.delay_s = delay_s
        self.matched = 0
        """Matching requests seen so far, fired on or not."""
        self.hits: list[Seen] = []
        """The requests it fired on."""
        self._released = threading.Event()
        self._disarmed = False

    def _fires(self, request: Request) -> bool:
        """Count a request and say whether the action applies (under the proxy's lock)."""
        if self._disarmed or request.api != self.api:
            return False
        if self.when is not None and not self.when(request):
            return False
        self.matched += 1
        return self.nth is None or self.matched == self.nth

    def release(self) -> None:
        """Let held requests (or the late copy) go, and fire no more."""
        self._disarmed = True
        self._released.set()

    def disarm(self) -> None:
        """Fire no more; requests already held stay held until ``release``."""
        self._disarmed = True

    @property
    def released(self) -> bool:
        return self._released.is_set()

    async def wait_fired(self, timeout_s: float = 15.0) -> Seen:
        """The first request the rule fired on, waiting for it on the caller's loop."""
        deadline = time.monotonic() + timeout_s
        while not self.hits:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the {self.action.value} rule on {api_name(self.api)} "
                    f"did not fire within {timeout_s}s ({self.matched} "
                    "matching requests)"
                )
            await asyncio.sleep(0.01)
        return self.hits[0]

    async def _gate(self, stopping: threading.Event) -> bool:
        """Wait for ``release``; False if the proxy stops first. (Polled: ``release``
        comes from another thread.)"""
        return (
            await _until(lambda: self._released.is_set() or stopping.is_set())
            and self._released.is_set()
        )


@dataclass(eq=False)
class _Item:
    frame: bytes
    seen: Seen
    rule: Rule | None


@dataclass(eq=False)
class _Link:
    """One client connection and the upstream connection dedicated to it."""

    id: int
    client: asyncio.StreamWriter
    client_reader: asyncio.StreamReader
    upstream: asyncio.StreamWriter
    upstream_reader: asyncio.StreamReader
    outbox: asyncio.Queue[_Item | None] = field(default_factory=asyncio.Queue)
    expected: deque[tuple[Seen, bool]] = field(default_factory=deque)
    """(request, deliver its answer?) in the order the answers will come."""
    client_open: bool = True

    def close_client(self) -> None:
        if self.client_open:
            self.client_open = False
            self.client.close()

    def close(self) -> None:
        self.close_client()
        self.upstream.close()


class KafkaProxy:
    """Forwards ``HOST:listen_port`` to the broker at ``HOST:upstream_port``, applying
    armed rules. A context manager: the proxy runs between ``__enter__`` and ``__exit__``."""

    def __init__(self, listen_port: int, upstream_port: int) -> None:
        self.listen_port = listen_port
        self.upstream_port = upstream_port
        self.log: list[Seen] = []
        self.rules: list[Rule] = []
        self._lock = threading.Lock()
        self._links: dict[int, _Link] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._next_conn = 0
        self._started = time.monotonic()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> KafkaProxy:
        self._thread = threading.Thread(
            target=self._run, daemon=True, name=f"kafka-proxy-{self.listen_port}"
        )
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"the proxy on {HOST}:{self.listen_port} did not start")
        if self._failure is not None:
            raise RuntimeError(
                f"the proxy cannot listen on {HOST}:{self.listen_port}: {self._failure}"
            ) from self._failure
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Close every connection and end the thread. Held requests are never forwarded:
        release them first if the broker should see them."""
        self._stopping.set()
        if self._loop is not None and self._stop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(15)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        try:
            server = await asyncio.start_server(self._accept, HOST, self.listen_port)
        except OSError as exc:
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            self._stopping.set()
            server.close()
            for link in list(self._links.values()):
                link.close()
            # Closed connections end their tasks; a task cancelled instead would upset
            # asyncio's own callback for the connection (Python 3.11).
            if self._tasks:
                _, stuck = await asyncio.wait(set(self._tasks), timeout=5)
                for task in stuck:
                    task.cancel()
                await asyncio.gather(*stuck, return_exceptions=True)
            await server.wait_closed()
            await asyncio.sleep(0.05)  # closed transports finish closing

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ test API

    def arm(
        self,
        api: int,
        action: Action,
        *,
        when: Callable[[Request], bool] | None = None,
        nth: int | None = 1,
        delay_s: float = 0.0,
    ) -> Rule:
        """A rule firing ``action`` on the ``nth`` request of ``api`` matching ``when``
        (every matching one if ``nth`` is None). The first armed rule that fires wins."""
        rule = Rule(api, action, when, nth, delay_s)
        with self._lock:
            self.rules.append(rule)
        return rule

    def seen(
        self,
        api: int | None = None,
        when: Callable[[Request], bool] | None = None,
        *,
        after: int = 0,
    ) -> list[Seen]:
        """The logged requests of ``api`` matching ``when`` numbered above ``after``."""
        with self._lock:
            entries = list(self.log[after:])
        return [
            s
            for s in entries
            if (api is None or s.request.api == api) and (when is None or when(s.request))
        ]

    async def wait_seen(
        self,
        api: int,
        when: Callable[[Request], bool] | None = None,
        *,
        after: int = 0,
        answered: bool = False,
        ok: bool = False,
        timeout_s: float = 15.0,
    ) -> Seen:
        """The first request of ``api`` matching ``when`` after number ``after`` (and
        answered, or answered without error, if asked), waiting on the caller's loop."""
        deadline = time.monotonic() + timeout_s
        while True:
            for entry in self.seen(api, when, after=after):
                if (not answered or entry.answered_at is not None) and (not ok or entry.ok):
                    return entry
            if time.monotonic() > deadline:
                state = "answered without error" if ok else "answered" if answered else ""
                raise AssertionError(
                    f"no {api_name(api)} {state} after #{after} within {timeout_s}s; the "
                    f"proxy saw:\n{self.format_log(TXN_APIS, last=40)}"
                )
            await asyncio.sleep(0.01)

    def cut(self, conn: int) -> None:
        """Close client connection ``conn`` (a ``Seen.conn``): the heal of a lost answer,
        which on a real network ends in a reset connection."""
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._cut, conn)

    def _cut(self, conn: int) -> None:
        link = self._links.get(conn)
        if link is not None:
            link.close_client()

    def format_log(self, apis: Iterable[int] | None = None, *, last: int | None = None) -> str:
        wanted = None if apis is None else set(apis)
        entries = [s for s in self.seen() if wanted is None or s.request.api in wanted]
        if last is not None:
            entries = entries[-last:]
        return "\n".join(s.line() for s in entries)

    # ------------------------------------------------------------------ forwarding

    def _now(self) -> float:
        return time.monotonic() - self._started

    def _admit(
        self, conn: int, request: Request, copy_of: int | None = None, action: Action | None = None
    ) -> tuple[Seen, Rule | None]:
        """Log the request and pick the rule that fires on it, if any."""
        with self._lock:
            fired = None
            if action is None:
                action = Action.FORWARD
                for rule in self.rules:
                    try:
                        fires = rule._fires(request)
                    except Exception:  # a predicate's bug must not kill the connection
                        fires = False
                    if fires and fired is None:
                        fired, action = rule, rule.action
            seen = Seen(len(self.log) + 1, self._now(), conn, request, action, copy_of)
            self.log.append(seen)
            if fired is not None:
                fired.hits.append(seen)
        return seen, fired

    async def _accept(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # so that stop() ends it too
        try:
            upstream_reader, upstream = await asyncio.open_connection(HOST, self.upstream_port)
        except OSError:
            client.close()
            self._tasks.discard(task)
            return
        self._next_conn += 1
        link = _Link(self._next_conn, client, client_reader, upstream, upstream_reader)
        self._links[link.id] = link
        try:
            await asyncio.gather(
                self._pump_requests(link), self._send_upstream(link), self._pump_responses(link)
            )
        finally:
            link.close()
            self._links.pop(link.id, None)
            self._tasks.discard(task)

    async def _pump_requests(self, link: _Link) -> None:
        """Client -> outbox: parse, log, decide. The decision is made on arrival, so the
        Nth request is the Nth to arrive even if an earlier one is held."""
        try:
            while (frame := await _read_frame(link.client_reader)) is not None:
                seen, rule = self._admit(link.id, parse_request(frame))
                await link.outbox.put(_Item(frame, seen, rule))
        except (ConnectionError, OSError):
            pass
        finally:
            link.close_client()
            await link.outbox.put(None)

    async def _send_upstream(self, link: _Link) -> None:
        """Outbox -> broker, in order, applying each request's action. Once the client is
        gone, what it sent before going is still forwarded (when released), and the
        upstream connection closes only after those requests were answered."""
        while (item := await link.outbox.get()) is not None:
            action, rule = item.seen.action, item.rule
            if rule is not None and not await self._wait_turn(action, rule):
                break  # the proxy is stopping: a held request is never forwarded
            if action is Action.DROP:
                continue
            if action is Action.CUT_BEFORE:
                link.close()
                return
            self._forward(
                link,
                item.frame,
                item.seen,
                deliver=action not in (Action.DROP_RESPONSE, Action.CUT_AFTER),
            )
            if action is Action.DUPLICATE:
                copy, _ = self._admit(link.id, item.seen.request, item.seen.number, action)
                self._forward(link, item.frame, copy, deliver=False)
            elif action is Action.DUPLICATE_LATE and rule is not None:
                copy, _ = self._admit(link.id, item.seen.request, item.seen.number, action)
                self._spawn(self._send_late_copy(item.frame, copy, rule))
            if action is Action.CUT_AFTER:
                link.close_client()
            with contextlib.suppress(ConnectionError, OSError):
                await link.upstream.drain()
        await _until(lambda: not link.expected or self._stopping.is_set())
        link.upstream.close()

    async def _wait_turn(self, action: Action, rule: Rule) -> bool:
        """Hold or delay the request as its rule says; False if the proxy stops first."""
        if action is Action.HOLD:
            return await rule._gate(self._stopping)
        if action is Action.DELAY:
            return not await _until(self._stopping.is_set, rule.delay_s)
        return True

    def _forward(self, link: _Link, frame: bytes, seen: Seen, *, deliver: bool) -> None:
        link.upstream.write(struct.pack(">i", len(frame)) + frame)
        seen.forwarded_at = self._now()
        link.expected.append((seen, deliver))

    async def _pump_responses(self, link: _Link) -> None:
        """Broker -> client, each answer parsed into its request's log entry."""
        try:
            while (frame := await _read_frame(link.upstream_reader)) is not None:
                if not link.expected:
                    continue  # nothing asked on this connection: cannot happen
                seen, deliver = link.expected.popleft()
                self._record_answer(seen, frame)
                if deliver and link.client_open:
                    seen.delivered = True
                    link.client.write(struct.pack(">i", len(frame)) + frame)
        except (ConnectionError, OSError):
            pass
        finally:
            link.expected.clear()
            link.close_client()

    def _record_answer(self, seen: Seen, frame: bytes) -> None:
        seen.answered_at = self._now()
        (correlation_id,) = struct.unpack_from(">i", frame)
        if correlation_id != seen.request.correlation_id:
            seen.answer = f"answer to cid={correlation_id}?"
            return
        try:
            seen.errors, seen.answer = parse_response(seen.request, frame)
        except (struct.error, ValueError, IndexError, UnicodeDecodeError):
            seen.answer = "(answer not understood)"

    async def _send_late_copy(self, frame: bytes, copy: Seen, rule: Rule) -> None:
        if not await rule._gate(self._stopping):
            return
        reader, writer = await asyncio.open_connection(HOST, self.upstream_port)
        try:
            writer.write(struct.pack(">i", len(frame)) + frame)
            copy.forwarded_at = self._now()
            answer = await asyncio.wait_for(_read_frame(reader), 30)
            if answer is not None:
                self._record_answer(copy, answer)
        finally:
            writer.close()


async def _until(condition: Callable[[], bool], timeout_s: float | None = None) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not condition():
        if deadline is not None and time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def _read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """One size-prefixed Kafka frame, or None at the end of the stream."""
    try:
        head = await reader.readexactly(4)
        (size,) = struct.unpack(">i", head)
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None
