"""How the Python type of a record field maps to Avro.

``shape_of`` reads a field's type hint once into a ``Shape``. The generator turns shapes
into Avro schemas (``avro_type``, ``avro_default``); the codec turns them into the
Python expressions of its compiled converters (``encode_expr``, ``decode_expr``).

The mapping:

- ``str``, ``int``, ``float``, ``bool``, ``bytes``: ``string``, ``long``, ``double``,
  ``boolean``, ``bytes``.
- ``Any``, and any container of ``Any`` (``Mapping[str, Any]``): ``string`` holding JSON
  text, so arbitrary values (task input, results, signal data) stay arbitrary.
- ``list[T]``, ``tuple[T, ...]``, ``frozenset[T]``: ``array``. Sets are written sorted,
  so equal states encode to equal bytes; tuples and sets come back as tuples and sets.
- ``Mapping[str, T]``: ``map``.
- ``StrEnum``: ``enum`` whose symbols are the member *names* (values such as ``""``
  are not valid Avro symbols).
- a dataclass: a nested ``record``.
- a polymorphic record base (``Command``): ``bytes`` holding the value encoded by the
  codec itself, with its own schema id, so each embedded type keeps its own versions.
- ``T | None``: ``["null", T]``.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from enum import Enum
from typing import Any, Protocol, Union, get_args, get_origin, get_type_hints

from engine.codec._errors import SchemaError
from engine.codec._json import dumps

NAMESPACE = "terranoha"

JSON_DOC = "JSON text (UTF-8) of an arbitrary JSON value; JSON null stands for None."
EMBEDDED_DOC = (
    "A {name} encoded by the Terranoha codec: magic byte 0, 4-byte big-endian schema id, "
    "Avro binary body."
)
ENUM_DOC = "Symbols are the names of the Python enum members."
SET_DOC = "A set: distinct items, written sorted."

_PRIMITIVES: dict[object, str] = {
    str: "string",
    int: "long",
    float: "double",
    bool: "boolean",
    bytes: "bytes",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Shape:
    """``kind`` is one of primitive, json, array, map, enum, record, embedded, optional.

    ``avro`` names the primitive type; ``item`` is the element (array, map) or the
    non-null branch (optional); ``py`` is the container type of an array, the enum or
    dataclass of an enum or record, the base class of an embedded record.
    """

    kind: str
    avro: str = ""
    item: Shape | None = None
    py: Any = None

    @property
    def inner(self) -> Shape:
        assert self.item is not None
        return self.item


JSON = Shape("json")


def fields_of(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    """The dataclass fields of ``cls`` in order, each with its resolved type hint."""
    hints = get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def shape_of(tp: Any, embedded: frozenset[type], where: str) -> Shape:
    """The shape of type hint ``tp``; ``where`` names the field for error messages."""
    if tp is Any:
        return JSON
    primitive = _PRIMITIVES.get(tp)
    if primitive is not None:
        return Shape("primitive", avro=primitive)
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union or origin is types.UnionType:
        others = [a for a in args if a is not type(None)]
        if len(others) != 1 or len(args) != 2:
            raise SchemaError(f"{where}: only `T | None` unions map to Avro, not {tp!r}")
        return Shape("optional", item=shape_of(others[0], embedded, where))
    if origin in (list, tuple, frozenset):
        if origin is tuple and (len(args) != 2 or args[1] is not Ellipsis):
            raise SchemaError(f"{where}: only variadic tuples (tuple[T, ...]) map to Avro")
        item = shape_of(args[0], embedded, where)
        return JSON if item is JSON else Shape("array", item=item, py=origin)
    if origin in (dict, Mapping):
        if args[0] is not str:
            raise SchemaError(f"{where}: Avro map keys are strings, not {args[0]!r}")
        item = shape_of(args[1], embedded, where)
        return JSON if item is JSON else Shape("map", item=item)
    if isinstance(tp, type):
        if issubclass(tp, Enum):
            return Shape("enum", py=tp)
        if tp in embedded:
            return Shape("embedded", py=tp)
        if dataclasses.is_dataclass(tp):
            return Shape("record", py=tp)
    raise SchemaError(f"{where}: no Avro mapping for type {tp!r}")


# -- Avro schemas ---------------------------------------------------------------------


def record_schema(
    cls: type,
    name: str,
    embedded: frozenset[type],
    defined: set[str] | None = None,
) -> dict[str, Any]:
    """The Avro record schema of dataclass ``cls``. ``defined`` holds the named types
    already written in the enclosing schema: later uses refer to them by name."""
    defined = set() if defined is None else defined
    defined.add(name)
    schema: dict[str, Any] = {"type": "record", "name": name}
    doc = _class_doc(cls)
    if doc:
        schema["doc"] = doc
    fields = []
    for f, hint in fields_of(cls):
        shape = shape_of(hint, embedded, f"{cls.__qualname__}.{f.name}")
        fields.append(_field_schema(f, shape, embedded, defined))
    schema["fields"] = fields
    return schema


def _field_schema(
    f: dataclasses.Field[Any],
    shape: Shape,
    embedded: frozenset[type],
    defined: set[str],
) -> dict[str, Any]:
    where = f.name
    default = _default_of(f)
    avro = avro_type(shape, embedded, defined)
    if shape.kind == "optional" and default is not dataclasses.MISSING and default is not None:
        avro = [avro[1], "null"]  # Avro takes a union's default from its first branch
    out: dict[str, Any] = {"name": f.name, "type": avro}
    doc = _field_doc(shape)
    if doc:
        out["doc"] = doc
    if default is not dataclasses.MISSING:
        out["default"] = avro_default(shape, default, where)
    elif shape.kind == "optional":
        out["default"] = None
    return out


def avro_type(shape: Shape, embedded: frozenset[type], defined: set[str]) -> Any:
    """The Avro type of ``shape``; named types are written in full once per schema."""
    kind = shape.kind
    if kind == "primitive":
        return shape.avro
    if kind == "json":
        return "string"
    if kind == "embedded":
        return "bytes"
    if kind == "array":
        array: dict[str, Any] = {
            "type": "array",
            "items": avro_type(shape.inner, embedded, defined),
        }
        return array
    if kind == "map":
        return {"type": "map", "values": avro_type(shape.inner, embedded, defined)}
    if kind == "optional":
        return ["null", avro_type(shape.inner, embedded, defined)]
    name = shape.py.__name__
    if name in defined:
        return name
    if kind == "enum":
        defined.add(name)
        return {
            "type": "enum",
            "name": name,
            "doc": ENUM_DOC,
            "symbols": [member.name for member in shape.py],
        }
    return record_schema(shape.py, name, embedded, defined)


def avro_default(shape: Shape, value: Any, where: str) -> Any:
    """``value`` (a dataclass default) as an Avro schema default."""
    kind = shape.kind
    if kind == "json":
        return dumps(value)
    if kind == "primitive":
        return value.decode("latin-1") if isinstance(value, bytes) else value
    if kind == "optional":
        return None if value is None else avro_default(shape.inner, value, where)
    if kind == "enum":
        return value.name
    if kind == "array":
        items = [avro_default(shape.inner, v, where) for v in value]
        return sorted(items) if shape.py is frozenset else items
    if kind == "map":
        return {k: avro_default(shape.inner, v, where) for k, v in value.items()}
    raise SchemaError(f"{where}: a {kind} field cannot have a default in the schema")


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _field_doc(shape: Shape) -> str:
    if shape.kind == "optional":
        shape = shape.inner
    if shape.kind == "json":
        return JSON_DOC
    if shape.kind == "embedded":
        return EMBEDDED_DOC.format(name=shape.py.__name__)
    if shape.kind == "array" and shape.py is frozenset:
        return SET_DOC
    return ""


def _class_doc(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(cls.__name__ + "("):  # the signature dataclasses puts in
        return ""
    return " ".join(doc.split())


# -- converter expressions ------------------------------------------------------------


def encode_expr(shape: Shape, x: str, helpers: Helpers, depth: int = 0) -> str:
    """A Python expression turning the value of expression ``x`` into what fastavro
    writes. ``x`` is evaluated at most twice and has no side effects."""
    kind = shape.kind
    if kind == "primitive":
        return x
    if kind == "json":
        return f'("null" if {x} is None else _json({x}))'
    if kind == "optional":
        # (branch, value) tells fastavro which union branch to write; without it, it
        # validates the value against each branch, which costs ~10 us for a record.
        inner = (
            f"_json({x})"
            if shape.inner.kind == "json"
            else encode_expr(shape.inner, x, helpers, depth)
        )
        return f"(None if {x} is None else ({branch_name(shape.inner)!r}, {inner}))"
    if kind == "array":
        v = f"_v{depth}"
        item = encode_expr(shape.inner, v, helpers, depth + 1)
        items = x if item == v else f"[{item} for {v} in {x}]"
        return f"sorted({items})" if shape.py is frozenset else items
    if kind == "map":
        k, v = f"_k{depth}", f"_v{depth}"
        item = encode_expr(shape.inner, v, helpers, depth + 1)
        return x if item == v else f"{{{k}: {item} for {k}, {v} in {x}.items()}}"
    if kind == "enum":
        return f"{helpers.enum_names(shape.py)}[{x}]"
    if kind == "record":
        return f"{helpers.to_avro(shape.py)}({x})"
    return f"{helpers.embed(shape.py)}({x})"


def branch_name(shape: Shape) -> str:
    """The name fastavro knows the union branch of ``shape`` by."""
    kind = shape.kind
    if kind in ("enum", "record"):
        return f"{NAMESPACE}.{shape.py.__name__}"
    if kind in ("array", "map"):
        return kind
    return {"primitive": shape.avro, "json": "string", "embedded": "bytes"}.get(kind, kind)


def decode_expr(shape: Shape, x: str, helpers: Helpers, depth: int = 0) -> str:
    """A Python expression turning the value of expression ``x``, as fastavro read it,
    back into the field's Python value."""
    kind = shape.kind
    if kind == "primitive":
        return x
    if kind == "json":
        return f"_loads({x})"
    if kind == "optional":
        inner = decode_expr(shape.inner, x, helpers, depth)
        return x if inner == x else f"(None if {x} is None else {inner})"
    if kind == "array":
        v = f"_v{depth}"
        item = decode_expr(shape.inner, v, helpers, depth + 1)
        items = x if item == v else f"[{item} for {v} in {x}]"
        return items if shape.py is list else f"{shape.py.__name__}({items})"
    if kind == "map":
        k, v = f"_k{depth}", f"_v{depth}"
        item = decode_expr(shape.inner, v, helpers, depth + 1)
        return x if item == v else f"{{{k}: {item} for {k}, {v} in {x}.items()}}"
    if kind == "enum":
        return f"{helpers.enum_members(shape.py)}[{x}]"
    if kind == "record":
        return f"{helpers.from_avro(shape.py)}({x})"
    return f"{helpers.unembed(shape.py)}({x})"


class Helpers(Protocol):
    """Names the compiled converters use for the objects they need: converters of nested
    records, enum tables, the codec of embedded records."""

    def enum_names(self, enum: type[Enum]) -> str: ...

    def enum_members(self, enum: type[Enum]) -> str: ...

    def to_avro(self, cls: type) -> str: ...

    def from_avro(self, cls: type) -> str: ...

    def embed(self, base: type) -> str: ...

    def unembed(self, base: type) -> str: ...
