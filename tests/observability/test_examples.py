"""The downstream consumer example decodes real run timeline records."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path
from types import ModuleType

from engine.codec import encode
from engine.runtime.redaction import redact_events
from projections.records import timeline_record
from projections.timeline import build_timeline
from tests.observability.test_spans import CARD, _book, _flow

ROOT = Path(__file__).resolve().parents[2]


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_consumer_prints_status_changes_of_real_timeline_records() -> None:
    example = _example("timeline_consumer")
    flow = _flow()
    events = redact_events(flow.log, _book())
    cut = next(i for i, e in enumerate(events) if e.TYPE == "ApprovalRequested") + 1
    waiting = encode(timeline_record(build_timeline(events[:cut])))
    done = encode(timeline_record(build_timeline(events)))
    catalogue = json.loads((ROOT / "schemas" / "catalogue.json").read_text())
    schema_id = next(
        s["id"] for s in catalogue["schemas"] if s["file"] == "projections/RunTimeline.v1.avsc"
    )
    assert struct.unpack(">BI", done[:5]) == (0, schema_id)  # the Confluent framing
    assert CARD.encode() not in done

    seen: dict[str, str] = {}
    first = example.status_change(waiting, seen)
    assert first is not None and first.startswith(f"{flow.run_id} refund v2 tenant=default:")
    assert "new -> Waiting (approval refund#1/" in first
    assert example.status_change(waiting, seen) is None  # same status: nothing to print
    last = example.status_change(done, seen)
    assert last is not None and "Waiting -> Completed after" in last and "cost 0.7500" in last


def test_records_that_are_not_timelines_are_skipped() -> None:
    example = _example("timeline_consumer")
    flow = _flow()
    assert example.status_change(encode(flow.log[0]), {}) is None
