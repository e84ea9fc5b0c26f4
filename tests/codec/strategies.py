"""Hypothesis strategies that build any record from its dataclass type hints."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from enum import Enum
from typing import Any, Union, get_args, get_origin, get_type_hints

from hypothesis import strategies as st

from engine.core.commands import COMMAND_TYPES, Command

LONGS = st.integers(min_value=-(2**63), max_value=2**63 - 1)

JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
"""What a worker's JSON can hold; ``Any`` fields get these."""


def records(cls: type) -> st.SearchStrategy[Any]:
    """Instances of dataclass ``cls`` with every field drawn, defaults included."""
    hints = get_type_hints(cls)
    return st.builds(cls, **{f.name: of_type(hints[f.name]) for f in dataclasses.fields(cls)})


def of_type(tp: Any) -> st.SearchStrategy[Any]:
    if tp is Any:
        return JSON_VALUES
    simple: dict[Any, st.SearchStrategy[Any]] = {
        str: st.text(max_size=12),
        int: LONGS,
        bool: st.booleans(),
        bytes: st.binary(),
        float: st.floats(allow_nan=False),
    }
    if tp in simple:
        return simple[tp]
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union or origin is types.UnionType:
        (inner,) = (a for a in args if a is not type(None))
        return st.none() | of_type(inner)
    if origin is list:
        return st.lists(of_type(args[0]), max_size=3)
    if origin is tuple:
        return st.lists(of_type(args[0]), max_size=3).map(tuple)
    if origin is frozenset:
        return st.frozensets(of_type(args[0]), max_size=3)
    if origin in (dict, Mapping):
        return st.dictionaries(st.text(max_size=8), of_type(args[1]), max_size=3)
    if isinstance(tp, type) and issubclass(tp, Enum):
        return st.sampled_from(list(tp))
    if tp is Command:
        return st.one_of([records(c) for c in COMMAND_TYPES.values()])
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return records(tp)
    raise TypeError(f"no strategy for {tp!r}")
