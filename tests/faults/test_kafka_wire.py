"""The proxy's decoding, on the bytes aiokafka itself encodes (no broker): a rule that
matched the wrong request, or a log that misread an epoch, would fault the wrong window
without anyone noticing."""

from __future__ import annotations

import struct

from aiokafka.protocol.produce import ProduceRequest_v7, ProduceResponse_v7
from aiokafka.protocol.transaction import (
    AddPartitionsToTxnRequest_v0,
    EndTxnRequest_v0,
    EndTxnResponse_v0,
    InitProducerIdRequest_v0,
    InitProducerIdResponse_v0,
    TxnOffsetCommitRequest_v0,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from tests.faults.kafka_wire import Api, RecordBatchInfo, parse_request, parse_response


def _frame(
    request: object,
    correlation_id: int = 7,
    client_id: str = "aiokafka-producer-3",
) -> bytes:
    header = request.build_request_header(  # type: ignore[attr-defined]
        correlation_id=correlation_id, client_id=client_id
    )
    return bytes(header.encode() + request.encode())  # type: ignore[attr-defined]


def _batch(pid: int, epoch: int, sequence: int, records: int) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=1,
        producer_id=pid,
        producer_epoch=epoch,
        base_sequence=sequence,
        batch_size=1 << 16,
    )
    for offset in range(records):
        builder.append(offset, timestamp=None, key=b"k", value=b"v", headers=[])
    return bytes(builder.build())


def test_a_produce_names_its_partitions_and_each_batch_s_producer_state() -> None:
    request = ProduceRequest_v7(
        "app-inputs-0",
        -1,
        30_000,
        [
            ("app.run-events", [(0, _batch(12, 3, 40, 5))]),
            ("app.run-state", [(0, _batch(12, 3, 7, 1) + _batch(12, 3, 8, 2))]),
        ],
    )
    parsed = parse_request(_frame(request))
    assert (parsed.api, parsed.version, parsed.correlation_id, parsed.client_id) == (
        Api.PRODUCE,
        7,
        7,
        "aiokafka-producer-3",
    )
    assert parsed.transactional_id == "app-inputs-0"
    assert (parsed.producer_id, parsed.producer_epoch) == (12, 3)
    assert parsed.partitions == (("app.run-events", 0), ("app.run-state", 0))
    assert parsed.batches == (
        RecordBatchInfo("app.run-events", 0, 12, 3, 40, 5, True),
        RecordBatchInfo("app.run-state", 0, 12, 3, 7, 1, True),
        RecordBatchInfo("app.run-state", 0, 12, 3, 8, 2, True),
    )
    assert parsed.touches("app.run-events", 0) and not parsed.touches("app.run-events", 1)


def test_the_transaction_requests_carry_their_id_producer_and_subject() -> None:
    init = parse_request(_frame(InitProducerIdRequest_v0("app-inputs-0", 60_000)))
    assert (init.api, init.transactional_id) == (Api.INIT_PRODUCER_ID, "app-inputs-0")
    added = parse_request(
        _frame(
            AddPartitionsToTxnRequest_v0(
                "app-inputs-0", 12, 3, [("app.run-events", [0]), ("app.run-state", [0, 1])]
            )
        )
    )
    assert (added.producer_id, added.producer_epoch) == (12, 3)
    assert added.partitions == (("app.run-events", 0), ("app.run-state", 0), ("app.run-state", 1))
    offsets = parse_request(
        _frame(
            TxnOffsetCommitRequest_v0(
                "app-inputs-0", "app-engine", 12, 3, [("app.triggers", [(0, 41, "")])]
            )
        )
    )
    assert (offsets.group_id, offsets.offsets) == ("app-engine", (("app.triggers", 0, 41),))
    for result in (True, False):
        end = parse_request(_frame(EndTxnRequest_v0("app-inputs-0", 12, 3, result)))
        assert (end.api, end.commit, end.producer_epoch) == (Api.END_TXN, result, 3)


def test_a_flexible_version_is_read_with_compact_encodings() -> None:
    """EndTxn v3 (header v2): compact strings and tagged fields."""

    def compact(text: str) -> bytes:
        return bytes([len(text) + 1]) + text.encode()

    frame = (
        struct.pack(">hhih", Api.END_TXN, 3, 9, 2)
        + b"me"
        + b"\x00"
        + compact("app-inputs-0")
        + struct.pack(">qhb", 12, 3, 1)
        + b"\x00"
    )
    end = parse_request(frame)
    assert (end.parsed, end.client_id, end.transactional_id, end.commit) == (
        True,
        "me",
        "app-inputs-0",
        True,
    )


def test_answers_are_read_into_error_names() -> None:
    produce = parse_request(_frame(ProduceRequest_v7("t", -1, 1, [("e", [(0, b"")])])))
    answer = ProduceResponse_v7([("e", [(0, 47, -1, -1, -1)])], 0)
    errors, summary = parse_response(produce, struct.pack(">i", 7) + answer.encode())
    assert errors == ("INVALID_PRODUCER_EPOCH",) and summary == "e/0:INVALID_PRODUCER_EPOCH"
    end = parse_request(_frame(EndTxnRequest_v0("t", 1, 0, True)))
    assert parse_response(end, struct.pack(">i", 7) + EndTxnResponse_v0(0, 0).encode())[0] == (
        "NO_ERROR",
    )
    init = parse_request(_frame(InitProducerIdRequest_v0("t", 1)))
    answer_init = InitProducerIdResponse_v0(0, 51, -1, -1)
    assert parse_response(init, struct.pack(">i", 7) + answer_init.encode()) == (
        ("CONCURRENT_TRANSACTIONS",),
        "CONCURRENT_TRANSACTIONS pid=-1/-1",
    )
