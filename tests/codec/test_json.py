"""The codec's JSON helpers behave exactly like the json module with the codec's options."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.codec._json import dumps, loads
from tests.codec.strategies import JSON_VALUES


def reference(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@given(JSON_VALUES)
def test_dumps_is_compact_json_dumps(value: Any) -> None:
    assert dumps(value) == reference(value)
    assert loads(dumps(value)) == value


@given(JSON_VALUES, st.sampled_from(["", " ", "\n", "\t "]))
def test_loads_is_json_loads_for_any_spacing(value: Any, space: str) -> None:
    text = space + json.dumps(value, indent=1) + space
    assert loads(text) == json.loads(text)


@pytest.mark.parametrize("text", ["", " ", "{", "[1,", "nul", "1x", "{} {}", "'a'"])
def test_loads_refuses_what_json_loads_refuses(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    with pytest.raises(json.JSONDecodeError):
        loads(text)


@pytest.mark.parametrize("value", [float("nan"), float("-inf"), object(), {"a": {1, 2}}])
def test_dumps_refuses_what_is_not_json(value: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        dumps(value)


def test_dumps_refuses_a_cycle() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(RecursionError):
        dumps(cycle)
