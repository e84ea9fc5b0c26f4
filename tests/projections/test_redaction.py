"""Redaction: JSON paths, key patterns, built-in value patterns, hash mode, and no secret
in any projected row or topic value."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from engine.codec import encode
from engine.core import events as ev
from engine.runtime.redaction import (
    MARKER,
    PolicyBook,
    RedactionPolicy,
    luhn_ok,
    parse_path,
    redact,
    redact_events,
    redact_text,
)
from projections.project import json_text, project_batch, project_run, run_row, step_rows
from projections.records import timeline_record
from projections.sla import sla_aggregates
from projections.timeline import build_timeline, render_timeline, timeline_to_dict
from tests.projections.scenarios import (
    BASE,
    BOOK,
    CARD,
    IBAN,
    SECRETS,
    many_runs,
)


def test_json_paths_parse() -> None:
    assert parse_path("$.input.card_number") == ("input", "card_number")
    assert parse_path("$..card") == ("**", "card")
    assert parse_path("$.steps.*.result.items[0].pan") == (
        "steps",
        "*",
        "result",
        "items",
        "0",
        "pan",
    )
    assert parse_path("$.signals['bank details'][*]") == ("signals", "bank details", "*")
    with pytest.raises(ValueError, match="JSON path"):
        parse_path("$.input[")
    with pytest.raises(ValueError, match="starts with"):
        parse_path("input.card")


@pytest.mark.parametrize(
    "rule, at, value, expected",
    [
        (
            "$.input.card_number",
            "input",
            {"card_number": "x", "n": 1},
            {"card_number": MARKER, "n": 1},
        ),
        ("$.input", "input", {"a": 1}, MARKER),
        ("$.input.card_number", "steps.s.input", {"card_number": "x"}, {"card_number": "x"}),
        ("$..pan", "steps.s.result", {"a": {"b": [{"pan": "p"}]}}, {"a": {"b": [{"pan": MARKER}]}}),
        (
            "$.steps.*.result.iban",
            "steps.pay.result",
            {"iban": "i", "x": "y"},
            {"iban": MARKER, "x": "y"},
        ),
        (
            "$.steps.pay.result.items[1]",
            "steps.pay.result",
            {"items": ["a", "b", "c"]},
            {"items": ["a", MARKER, "c"]},
        ),
        ("$.signals.docs", "signals.docs", {"ssn": "1"}, MARKER),
        (
            "*token*",
            "input",
            {"Auth_Token": "t", "tokens_used": 5, "x": {"refresh_TOKEN": 1}},
            {"Auth_Token": MARKER, "tokens_used": MARKER, "x": {"refresh_TOKEN": MARKER}},
        ),
        ("ssn", "input", {"SSN": "1", "ssn_hint": "h"}, {"SSN": MARKER, "ssn_hint": "h"}),
    ],
)
def test_rules(rule: str, at: str, value: Any, expected: Any) -> None:
    assert RedactionPolicy.of([rule]).value(value, at) == expected


def test_built_in_keys_are_always_hidden_but_token_counts_are_not() -> None:
    value = {
        "password": "p",
        "db_secret": "s",
        "Authorization": "a",
        "api_key": "k",
        "prompt_tokens": 512,
    }
    assert redact(value) == {
        "password": MARKER,
        "db_secret": MARKER,
        "Authorization": MARKER,
        "api_key": MARKER,
        "prompt_tokens": 512,
    }


@pytest.mark.parametrize(
    "text, hidden",
    [
        ("card 4111 1111 1111 1111 thanks", True),
        ("card 4111-1111-1111-1111", True),
        ("amex 378282246310005", True),
        ("4111111111111112 fails luhn", False),
        ("order 1700000000000 placed at 1700000000123456", False),
        ("Authorization: Bearer abc.DEF-123_~+/=", True),
        ("token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig", True),
        ("a plain sentence", False),
    ],
)
def test_built_in_value_patterns(text: str, hidden: bool) -> None:
    out = redact_text(text)
    assert (out != text) is hidden
    if hidden:
        assert MARKER in out


def test_card_numbers_as_integers_and_luhn() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert redact({"pan": 4111111111111111, "ts": 1700000000000}) == {
        "pan": MARKER,
        "ts": 1700000000000,
    }


def test_hash_mode_keeps_equal_values_equal() -> None:
    policy = RedactionPolicy.of(["*token*"], mode="hash")
    out = policy.value({"a_token": "s3cret", "b_token": "s3cret", "c_token": "other"})
    assert out["a_token"] == out["b_token"] != out["c_token"]
    assert out["a_token"].startswith("sha256:") and len(out["a_token"]) == 19
    assert "4111" not in policy.text(f"pay with {CARD}")


def test_a_value_hidden_once_is_hidden_everywhere_in_the_run() -> None:
    policy = RedactionPolicy.of(["$.steps.pay.result.iban"])
    taint: set[str] = set()
    assert policy.value({"iban": IBAN}, "steps.pay.result", taint) == {"iban": MARKER}
    assert policy.value({"to": IBAN, "n": 3}, "output", taint) == {"to": MARKER, "n": 3}
    assert policy.value({"to": IBAN}, "output") == {"to": IBAN}  # another run


def test_events_are_redacted_and_unchanged_events_are_the_same_object() -> None:
    policy = RedactionPolicy.of(["$.input.card_number"])
    started = ev.RunStarted(
        run_id="r",
        seq=1,
        ts=0,
        tenant="t",
        correlation_id="r",
        causation_id="c",
        workflow="w",
        version=1,
        input={"card_number": "x", "ok": 1},
        idempotency_key="k",
        requested_by="a",
        priority=0,
    )
    assert policy.event(started).input == {"card_number": MARKER, "ok": 1}
    armed = ev.TimerArmed(
        run_id="r",
        seq=2,
        ts=0,
        tenant="t",
        correlation_id="r",
        causation_id="c",
        timer_id="x",
        kind="retry",
        step="s",
        ref="r",
        due_at=5,
    )
    assert policy.event(armed) is armed


def test_unknown_specs_get_the_built_in_rules() -> None:
    book = PolicyBook()
    policy = book.policy("nope", 1)
    assert policy.value({"password": "p", "card_number": "x"}) == {
        "password": MARKER,
        "card_number": "x",
    }


def test_the_cli_timeline_can_be_redacted() -> None:
    events = many_runs(7)["run-1"]
    text = render_timeline(build_timeline(redact_events(events, BOOK)))
    assert not [s for s in SECRETS if s in text]
    raw = json.dumps(timeline_to_dict(build_timeline(redact_events(events, BOOK))))
    assert not [s for s in SECRETS if s in raw]


def test_no_secret_in_any_projected_row_or_topic_value() -> None:
    """Secrets in run input, task inputs and results, signal data, error messages and the
    run output: none survives into rows, the stored fold state, the Avro timeline or the
    SLA figures."""
    runs = many_runs(21)
    logged = b"".join(encode(e) for events in runs.values() for e in events)
    assert [s for s in SECRETS if s.encode() in logged] == list(SECRETS), (
        "the run log itself keeps every secret"
    )
    out: list[str] = []
    rows = []
    for events in runs.values():
        timeline = project_run(events, BOOK)
        row = run_row(timeline)
        rows.append(row)
        out.append(json_text(row) or "")
        out += [json_text(r) or "" for r in step_rows(timeline)]
        out.append(encode(timeline_record(timeline)).decode("utf-8", "replace"))
    out += [json.dumps(dataclasses.asdict(m)) for m in sla_aggregates(rows, "1m", now_ms=BASE)]
    blob = "\n".join(out)
    leaked = [s for s in SECRETS if s in blob]
    assert not leaked, f"secrets in projections: {leaked}"


def test_the_taint_lives_in_the_fold_state_across_batches() -> None:
    events = many_runs(7)["run-0"]  # a completed run: the IBAN becomes the output
    first = project_batch({}, [(e, 0, i) for i, e in enumerate(events[:-2])], BOOK)
    assert first.touched["run-0"].redacted
    rest = project_batch(first.touched, [(e, 0, 100 + i) for i, e in enumerate(events[-2:])], BOOK)
    assert IBAN not in (json_text(run_row(rest.touched["run-0"])) or "")


@pytest.mark.parametrize(
    "value",
    [
        {"api_token": "tok-123"},
        {"access_token": "ya29.a0AfH6"},
        {"refresh_token": "1//0gLx"},
        {"ACCESS_TOKEN": "upper"},
        {"X-Auth-Token": "header-style"},
        {"tokenSecret": "camel"},
        {"id_token": ["a", "list", "of", "parts"]},
        {"session_token": {"value": "nested-object", "expires": 3600}},
        {"otp_token": 123456},  # a number, but not a count of tokens
        {"csrf_token": "123456"},  # a numeric string is still a string
        {"tokens": "a-string-under-a-plural-key"},
        {"deep": [{"x": {"github_token": "ghp_abc"}}]},
    ],
)
def test_built_in_token_keys_let_no_secret_through(value: dict[str, Any]) -> None:
    shown = redact(value)
    assert shown != value
    leaked = _leaves(value) & _leaves(shown)
    assert not leaked, f"{leaked} slipped through: {shown}"
    assert MARKER in json.dumps(shown)


def test_token_counts_stay_readable_unless_the_spec_hides_them() -> None:
    usage = {
        "usage": {
            "prompt_tokens": 512,
            "completion_tokens": 88,
            "total_tokens": 600,
            "cached_tokens": 0,
            "max_tokens": 4096.0,
            "token_count": 7,
        }
    }
    assert redact(usage) == usage
    everything = RedactionPolicy.of(["*token*"]).value(usage)
    assert everything == {"usage": {k: MARKER for k in usage["usage"]}}


def test_a_hidden_token_is_hidden_wherever_it_turns_up_in_the_run() -> None:
    taint: set[str] = set()
    policy = RedactionPolicy.of()
    assert policy.value({"access_token": "ya29.secret-value"}, "input", taint) == {
        "access_token": MARKER
    }
    assert policy.value({"note": "ya29.secret-value"}, "steps.call.input", taint) == {
        "note": MARKER
    }


def _leaves(value: Any) -> set[str]:
    """Every string and number in ``value`` (not its keys), as text."""
    if isinstance(value, dict):
        return set().union(*(_leaves(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_leaves(v) for v in value))
    return {str(value)} if isinstance(value, str | int | float) else set()
