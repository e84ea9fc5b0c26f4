"""Just enough of the Kafka wire protocol to say what a request is: pure decoding, no I/O.

``parse_request`` reads the header of any request (API key and version, correlation id,
client id) and the body of the requests a transaction is made of: Produce (with the
producer id, epoch and sequence of each record batch), InitProducerId,
AddPartitionsToTxn, AddOffsetsToTxn, EndTxn, TxnOffsetCommit, FindCoordinator.
``parse_response`` reads the error codes of their answers. Both encodings are read:
classic, and the compact one of flexible versions (KIP-482). aiokafka 0.14 against a
Kafka 4.4 broker uses only classic ones for these: Produce v7, FindCoordinator v1, the
transaction APIs v0.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import TypeVar

import aiokafka.errors

T = TypeVar("T")


class Api(IntEnum):
    """The API keys the rules and the log name; any other key is forwarded as is."""

    PRODUCE = 0
    FETCH = 1
    LIST_OFFSETS = 2
    METADATA = 3
    OFFSET_COMMIT = 8
    OFFSET_FETCH = 9
    FIND_COORDINATOR = 10
    JOIN_GROUP = 11
    HEARTBEAT = 12
    LEAVE_GROUP = 13
    SYNC_GROUP = 14
    API_VERSIONS = 18
    INIT_PRODUCER_ID = 22
    ADD_PARTITIONS_TO_TXN = 24
    ADD_OFFSETS_TO_TXN = 25
    END_TXN = 26
    TXN_OFFSET_COMMIT = 28


TXN_APIS = frozenset(
    {
        Api.PRODUCE,
        Api.FIND_COORDINATOR,
        Api.INIT_PRODUCER_ID,
        Api.ADD_PARTITIONS_TO_TXN,
        Api.ADD_OFFSETS_TO_TXN,
        Api.END_TXN,
        Api.TXN_OFFSET_COMMIT,
    }
)
"""What a transaction is made of: the part of the log worth printing."""

FLEXIBLE_FROM = {
    Api.PRODUCE: 9,
    Api.FETCH: 12,
    Api.LIST_OFFSETS: 6,
    Api.METADATA: 9,
    Api.OFFSET_COMMIT: 8,
    Api.OFFSET_FETCH: 6,
    Api.FIND_COORDINATOR: 3,
    Api.JOIN_GROUP: 6,
    Api.HEARTBEAT: 4,
    Api.LEAVE_GROUP: 4,
    Api.SYNC_GROUP: 4,
    Api.API_VERSIONS: 3,
    Api.INIT_PRODUCER_ID: 2,
    Api.ADD_PARTITIONS_TO_TXN: 3,
    Api.ADD_OFFSETS_TO_TXN: 3,
    Api.END_TXN: 3,
    Api.TXN_OFFSET_COMMIT: 3,
}
"""First version of each API with compact encodings and tagged fields (KIP-482).
aiokafka 0.14 sends none of the parsed ones flexibly (Produce v7, the transaction APIs
v0, FindCoordinator v1), but the readers below handle both encodings."""

_ERROR_NAMES = {90: "PRODUCER_FENCED", 120: "TRANSACTION_ABORTABLE", 121: "INVALID_RECORD_STATE"}
"""Codes newer than aiokafka's error table."""


def api_name(api: int) -> str:
    try:
        return Api(api).name
    except ValueError:
        return f"API_{api}"


def error_name(code: int) -> str:
    if code in _ERROR_NAMES:
        return _ERROR_NAMES[code]
    error = aiokafka.errors.for_code(code)
    if error is aiokafka.errors.UnknownError and code != -1:
        return f"ERROR_{code}"
    return str(error.message)


@dataclass(frozen=True, slots=True)
class RecordBatchInfo:
    """The v2 record batch header of one batch in a Produce request."""

    topic: str
    partition: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    records: int
    transactional: bool

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}[seq {self.base_sequence}+{self.records}]"


@dataclass(frozen=True, slots=True)
class Request:
    """What the proxy understood of one request. Fields not carried by its API stay empty;
    ``parsed`` is False when the body was not understood (only the header then)."""

    api: int
    version: int
    correlation_id: int
    client_id: str | None
    transactional_id: str | None = None
    producer_id: int | None = None
    producer_epoch: int | None = None
    partitions: tuple[tuple[str, int], ...] = ()
    """Produce, AddPartitionsToTxn, TxnOffsetCommit: the (topic, partition) pairs."""
    batches: tuple[RecordBatchInfo, ...] = ()
    commit: bool | None = None
    """EndTxn: True to commit, False to abort."""
    group_id: str | None = None
    offsets: tuple[tuple[str, int, int], ...] = ()
    """TxnOffsetCommit: (topic, partition, offset)."""
    key: str | None = None
    """FindCoordinator: the group or transactional id looked up."""
    parsed: bool = True

    @property
    def name(self) -> str:
        return api_name(self.api)

    @property
    def topics(self) -> frozenset[str]:
        return frozenset(topic for topic, _ in self.partitions)

    def touches(self, topic: str, partition: int | None = None) -> bool:
        return any(t == topic and (partition is None or p == partition) for t, p in self.partitions)

    def describe(self) -> str:
        parts = [
            f"{self.name} v{self.version}",
            f"cid={self.correlation_id}",
            self.client_id or "-",
        ]
        if self.transactional_id is not None:
            parts.append(f"txn={self.transactional_id}")
        if self.producer_id is not None:
            parts.append(f"pid={self.producer_id}/{self.producer_epoch}")
        if self.commit is not None:
            parts.append("COMMIT" if self.commit else "ABORT")
        if self.key is not None:
            parts.append(f"key={self.key}")
        if self.group_id is not None and self.api != Api.FIND_COORDINATOR:
            parts.append(f"group={self.group_id}")
        if self.batches:
            parts.append(" ".join(str(b) for b in self.batches))
        elif self.offsets:
            parts.append(" ".join(f"{t}/{p}@{o}" for t, p, o in self.offsets))
        elif self.partitions:
            parts.append(" ".join(f"{t}/{p}" for t, p in self.partitions))
        return " ".join(parts)


class _Reader:
    """Kafka primitive types, classic or compact (``flexible``) encodings."""

    def __init__(self, data: bytes, offset: int = 0, *, flexible: bool = False) -> None:
        self.data = data
        self.pos = offset
        self.flexible = flexible

    def _unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return int(value)

    def int8(self) -> int:
        return self._unpack(">b")

    def int16(self) -> int:
        return self._unpack(">h")

    def int32(self) -> int:
        return self._unpack(">i")

    def int64(self) -> int:
        return self._unpack(">q")

    def uvarint(self) -> int:
        value = shift = 0
        while True:
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7

    def _length(self, classic: Callable[[], int]) -> int:
        return self.uvarint() - 1 if self.flexible else classic()

    def nullable_string(self) -> str | None:
        size = self._length(self.int16)
        if size < 0:
            return None
        text = self.data[self.pos : self.pos + size].decode()
        self.pos += size
        return text

    def string(self) -> str:
        return self.nullable_string() or ""

    def classic_nullable_string(self) -> str | None:
        """The client id of a request header is never compact."""
        flexible, self.flexible = self.flexible, False
        try:
            return self.nullable_string()
        finally:
            self.flexible = flexible

    def bytes(self) -> bytes:
        size = self._length(self.int32)
        if size < 0:
            return b""
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out

    def array(self, item: Callable[[], T]) -> list[T]:
        size = self._length(self.int32)
        return [item() for _ in range(max(size, 0))]

    def tags(self) -> None:
        if self.flexible:
            for _ in range(self.uvarint()):
                self.uvarint()
                self.pos += self.uvarint()


def _flexible(api: int, version: int) -> bool:
    first = FLEXIBLE_FROM.get(api)  # type: ignore[call-overload]
    return first is not None and version >= first


def parse_request(frame: bytes) -> Request:
    """The header of any request; the body of the transaction-related ones."""
    r = _Reader(frame)
    api, version, correlation_id = r.int16(), r.int16(), r.int32()
    head = Request(api, version, correlation_id, r.classic_nullable_string(), parsed=False)
    r.flexible = _flexible(api, version)
    r.tags()  # the request header's tagged fields (header v2)
    try:
        return _parse_body(head, r) or head
    except (struct.error, ValueError, IndexError, UnicodeDecodeError):
        return head


def _parse_body(head: Request, r: _Reader) -> Request | None:
    api, version = head.api, head.version
    if api == Api.PRODUCE and 3 <= version < 13:  # v13 names topics by id
        return _parse_produce(head, r)
    if api == Api.INIT_PRODUCER_ID:
        transactional_id = r.nullable_string()
        r.int32()  # transaction timeout
        if version < 3:
            return replace(head, parsed=True, transactional_id=transactional_id)
        return replace(
            head,
            parsed=True,
            transactional_id=transactional_id,
            producer_id=r.int64(),
            producer_epoch=r.int16(),
        )
    if api == Api.ADD_PARTITIONS_TO_TXN and version <= 3:  # v4+ is the brokers' batch form
        transactional_id, producer_id, epoch = r.string(), r.int64(), r.int16()

        def added() -> list[tuple[str, int]]:
            name = r.string()
            numbers = r.array(r.int32)
            r.tags()
            return [(name, n) for n in numbers]

        partitions = tuple(tp for group in r.array(added) for tp in group)
        return replace(
            head,
            parsed=True,
            transactional_id=transactional_id,
            producer_id=producer_id,
            producer_epoch=epoch,
            partitions=partitions,
        )
    if api == Api.ADD_OFFSETS_TO_TXN:
        return replace(
            head,
            parsed=True,
            transactional_id=r.string(),
            producer_id=r.int64(),
            producer_epoch=r.int16(),
            group_id=r.string(),
        )
    if api == Api.END_TXN:
        return replace(
            head,
            parsed=True,
            transactional_id=r.string(),
            producer_id=r.int64(),
            producer_epoch=r.int16(),
            commit=bool(r.int8()),
        )
    if api == Api.TXN_OFFSET_COMMIT:
        return _parse_txn_offset_commit(head, r)
    if api == Api.FIND_COORDINATOR and version <= 3:
        return replace(head, parsed=True, key=r.string())
    return None


def _parse_produce(head: Request, r: _Reader) -> Request:
    transactional_id = r.nullable_string()
    r.int16(), r.int32()  # acks, timeout

    def partition(topic: str) -> list[RecordBatchInfo]:
        number, records = r.int32(), r.bytes()
        r.tags()
        return _batches(topic, number, records) or [
            RecordBatchInfo(topic, number, -1, -1, -1, 0, False)
        ]

    def topic() -> list[RecordBatchInfo]:
        name = r.string()
        batches = [b for group in r.array(lambda: partition(name)) for b in group]
        r.tags()
        return batches

    batches = tuple(b for group in r.array(topic) for b in group)
    first = batches[0] if batches else None
    partitions = tuple(dict.fromkeys((b.topic, b.partition) for b in batches))
    return replace(
        head,
        parsed=True,
        transactional_id=transactional_id,
        partitions=partitions,
        batches=batches,
        producer_id=first.producer_id if first else None,
        producer_epoch=first.producer_epoch if first else None,
    )


def _parse_txn_offset_commit(head: Request, r: _Reader) -> Request:
    transactional_id, group_id = r.string(), r.string()
    producer_id, epoch = r.int64(), r.int16()
    if head.version >= 3:
        r.int32(), r.string(), r.nullable_string()  # generation, member, instance

    def committed(name: str) -> tuple[str, int, int]:
        number, offset = r.int32(), r.int64()
        if head.version >= 2:
            r.int32()  # leader epoch
        r.nullable_string()  # metadata
        r.tags()
        return name, number, offset

    def topic_offsets() -> list[tuple[str, int, int]]:
        name = r.string()
        out = r.array(lambda: committed(name))
        r.tags()
        return out

    offsets = tuple(o for group in r.array(topic_offsets) for o in group)
    return replace(
        head,
        parsed=True,
        transactional_id=transactional_id,
        group_id=group_id,
        producer_id=producer_id,
        producer_epoch=epoch,
        offsets=offsets,
        partitions=tuple((t, p) for t, p, _ in offsets),
    )


def _batches(topic: str, partition: int, records: bytes) -> list[RecordBatchInfo]:
    """The headers of the v2 record batches in one partition's records."""
    out = []
    pos = 0
    while pos + 61 <= len(records):
        (length,) = struct.unpack_from(">i", records, pos + 8)
        if records[pos + 16] != 2:  # magic: only v2 batches carry producer state
            break
        (attributes,) = struct.unpack_from(">h", records, pos + 21)
        pid, epoch, sequence, count = struct.unpack_from(">qhii", records, pos + 43)
        out.append(
            RecordBatchInfo(topic, partition, pid, epoch, sequence, count, bool(attributes & 0x10))
        )
        pos += 12 + length
    return out


def parse_response(request: Request, frame: bytes) -> tuple[tuple[str, ...], str]:
    """The error names of the answer to ``request``, and a one-line summary."""
    flexible = _flexible(request.api, request.version) and request.api != Api.API_VERSIONS
    r = _Reader(frame, 4, flexible=flexible)
    r.tags()  # response header v1
    api, version = request.api, request.version
    if api == Api.PRODUCE and 3 <= version < 13:

        def record_error() -> None:
            r.int32(), r.nullable_string()  # batch index, message
            r.tags()

        def partition(topic: str) -> tuple[str, int, int, int]:
            number, code, offset = r.int32(), r.int16(), r.int64()
            r.int64()  # log append time
            if version >= 5:
                r.int64()  # log start offset
            if version >= 8:
                r.array(record_error)
                r.nullable_string()
            r.tags()
            return topic, number, code, offset

        def topic() -> list[tuple[str, int, int, int]]:
            name = r.string()
            out = r.array(lambda: partition(name))
            r.tags()
            return out

        results = [p for group in r.array(topic) for p in group]
        errors = tuple(error_name(code) for _, _, code, _ in results)
        summary = " ".join(
            f"{t}/{p}:{error_name(c)}" + (f"@{o}" if c == 0 else "") for t, p, c, o in results
        )
        return errors, summary
    if api == Api.INIT_PRODUCER_ID:
        r.int32()
        code, pid, epoch = r.int16(), r.int64(), r.int16()
        return (error_name(code),), f"{error_name(code)} pid={pid}/{epoch}"
    if api in (Api.ADD_PARTITIONS_TO_TXN, Api.TXN_OFFSET_COMMIT) and version <= 3:
        r.int32()

        def partition_error(name: str) -> tuple[str, int, int]:
            number, code = r.int32(), r.int16()
            r.tags()
            return name, number, code

        def topic_errors() -> list[tuple[str, int, int]]:
            name = r.string()
            out = r.array(lambda: partition_error(name))
            r.tags()
            return out

        by_partition = [e for group in r.array(topic_errors) for e in group]
        errors = tuple(error_name(code) for _, _, code in by_partition)
        if len(set(errors)) == 1:
            return errors, errors[0]
        return errors, " ".join(f"{t}/{p}:{error_name(c)}" for t, p, c in by_partition)
    if api in (Api.ADD_OFFSETS_TO_TXN, Api.END_TXN):
        r.int32()
        code = r.int16()
        return (error_name(code),), error_name(code)
    if api == Api.FIND_COORDINATOR and version <= 3:
        if version >= 1:
            r.int32()
        code = r.int16()
        return (error_name(code),), error_name(code)
    return (), "answered"
