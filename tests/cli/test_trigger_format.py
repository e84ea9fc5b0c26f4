"""The README documents the triggers topic as a public interface: a producer that follows
it by hand (fastavro, the schema file, a 5-byte header) writes what the engine reads."""

from __future__ import annotations

import io
import json
import re
import struct
import uuid
from pathlib import Path

import fastavro

from engine.codec import decode, encode, schema_id
from engine.core.records import Trigger

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_the_documented_schema_id_is_the_triggers() -> None:
    documented = re.search(r"^TRIGGER_SCHEMA_ID = (\d+)", README, re.MULTILINE)
    assert documented is not None, "the README's fastavro example names the schema id"
    assert int(documented.group(1)) == schema_id(encode(Trigger(workflow="w")))
    assert f"`Trigger.v1` is id **{documented.group(1)}**" in README


def test_a_trigger_written_by_hand_decodes_as_the_engine_reads_it() -> None:
    schema = fastavro.parse_schema(
        json.loads((ROOT / "schemas" / "records" / "Trigger.v1.avsc").read_text())
    )
    out = io.BytesIO()
    out.write(struct.pack(">BI", 0, schema_id(encode(Trigger(workflow="w")))))
    fastavro.schemaless_writer(
        out,
        schema,
        {
            "workflow": "refund-agent",
            "tenant": "acme",
            "idempotency_key": "order-1001",
            "input": json.dumps({"order_id": "ord-1001"}),
            "requested_by": "support-bot",
        },
    )

    assert decode(out.getvalue()) == Trigger(
        workflow="refund-agent",
        version=0,
        tenant="acme",
        idempotency_key="order-1001",
        input={"order_id": "ord-1001"},
        requested_by="support-bot",
    )


def test_the_documented_run_id_is_the_engines() -> None:
    """The README keys triggers by run id (the short path): its recipe must agree."""
    from engine.core.policies import RUN_NAMESPACE, run_id_for

    documented = re.search(r'^RUN_NAMESPACE = uuid\.UUID\("([0-9a-f-]+)"\)', README, re.MULTILINE)
    assert documented is not None, "the README's fastavro example names the namespace"
    assert documented.group(1) == str(RUN_NAMESPACE)
    assert 'uuid.uuid5(RUN_NAMESPACE, "acme\\x1forder-1001")' in README
    assert run_id_for("acme", "order-1001") == str(uuid.uuid5(RUN_NAMESPACE, "acme\x1forder-1001"))
