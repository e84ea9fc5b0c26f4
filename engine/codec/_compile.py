"""Converters between record objects and the dicts fastavro writes and reads.

Each record class gets a pair of functions generated from its fields when the codec
loads, the way ``dataclasses`` generates ``__init__``: encoding is one dict display
(``{"run_id": o.run_id, "input": _json(o.input), ...}``) and decoding sets each field
once. This is the hot path, so there is no per-record loop over fields, no type dispatch
and no intermediate copies.

A slotted dataclass without ``__post_init__`` is decoded without calling its
``__init__``: each field goes straight into its slot, which is what the frozen
``__init__`` does too, minus its ``object.__setattr__`` call per field (a third of the
time to decode a run state).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

from engine.codec._errors import DecodeError, EncodeError, SchemaError
from engine.codec._json import dumps, loads
from engine.codec._shapes import decode_expr, encode_expr, fields_of, shape_of

ToAvro = Callable[[Any], dict[str, Any]]
FromAvro = Callable[[Any], Any]
Encode = Callable[[object], bytes]
Decode = Callable[[bytes], object]


class Converters:
    """Compiles and keeps the converters of record classes and of what they nest.

    ``embedded`` maps each polymorphic base (``Command``) to the codec functions that
    write and read such a field as framed bytes.
    """

    def __init__(self, embedded: Mapping[type, tuple[Encode, Decode]]) -> None:
        self._embedded = embedded
        self._ns: dict[str, Any] = {"_json": dumps, "_loads": loads, "_new": object.__new__}
        self._names: dict[tuple[str, object], str] = {}

    def pair(self, cls: type) -> tuple[ToAvro, FromAvro]:
        """The (to_avro, from_avro) functions of dataclass ``cls``."""
        to_avro: ToAvro = self._ns[self.to_avro(cls)]
        from_avro: FromAvro = self._ns[self.from_avro(cls)]
        return to_avro, from_avro

    # Helpers: each returns the name under which the compiled code finds an object.

    def to_avro(self, cls: type) -> str:
        self._compile(cls)
        return self._names[("to", cls)]

    def from_avro(self, cls: type) -> str:
        self._compile(cls)
        return self._names[("from", cls)]

    def enum_names(self, enum: type[Enum]) -> str:
        return self._bind("names", enum, {member: member.name for member in enum})

    def enum_members(self, enum: type[Enum]) -> str:
        return self._bind("members", enum, dict(enum.__members__))

    def embed(self, base: type) -> str:
        encode = self._embedded[base][0]

        def embed(record: object) -> bytes:
            if not isinstance(record, base):
                raise EncodeError(f"a {base.__name__} field holds a {type(record).__name__}")
            return encode(record)

        return self._bind("embed", base, embed)

    def unembed(self, base: type) -> str:
        decode = self._embedded[base][1]

        def unembed(data: bytes) -> object:
            record = decode(data)
            if not isinstance(record, base):
                raise DecodeError(
                    "corrupt", f"a {base.__name__} field holds a {type(record).__name__}"
                )
            return record

        return self._bind("unembed", base, unembed)

    def _bind(self, role: str, obj: object, value: object) -> str:
        key = (role, obj)
        name = self._names.get(key)
        if name is None:
            label = getattr(obj, "__name__", "obj")
            name = f"_{role}_{label}_{len(self._names)}"
            self._names[key] = name
            self._ns[name] = value
        return name

    def _compile(self, cls: type) -> None:
        if ("to", cls) in self._names:
            return
        n = len(self._names)
        to_name, from_name = f"_to_{cls.__name__}_{n}", f"_from_{cls.__name__}_{n}"
        # Named before compiling, so a record that nests itself refers to these names.
        self._names[("to", cls)], self._names[("from", cls)] = to_name, from_name
        cls_name = self._bind("cls", cls, cls)
        slots = _slots(cls)
        encoded, decoded = [], []
        for f, hint in fields_of(cls):
            if not f.init:
                raise SchemaError(
                    f"{cls.__qualname__}.{f.name}: init=False fields cannot be decoded"
                )
            shape = shape_of(hint, frozenset(self._embedded), f"{cls.__qualname__}.{f.name}")
            encoded.append(f"{f.name!r}: {encode_expr(shape, f'o.{f.name}', self)}")
            value = decode_expr(shape, f"d[{f.name!r}]", self)
            if slots is None:
                decoded.append(f"{f.name}={value}")
            else:
                setter = self._bind("set", slots[f.name], slots[f.name].__set__)
                decoded.append(f"    {setter}(o, {value})\n")
        if slots is None:
            build = f"    return {cls_name}({', '.join(decoded)})\n"
        else:
            build = f"    o = _new({cls_name})\n{''.join(decoded)}    return o\n"
        source = (
            f"def {to_name}(o):\n    return {{{', '.join(encoded)}}}\n\n"
            f"def {from_name}(d):\n{build}"
        )
        exec(compile(source, f"<codec converters of {cls.__qualname__}>", "exec"), self._ns)


def _slots(cls: type) -> dict[str, types.MemberDescriptorType] | None:
    """The slot of each field when instances can be built without ``__init__``."""
    if hasattr(cls, "__post_init__"):
        return None
    slots = {}
    for f in dataclasses.fields(cls):
        name = f.name
        owner = next((k for k in cls.__mro__ if name in k.__dict__), None)
        slot = owner.__dict__[name] if owner is not None else None
        if not isinstance(slot, types.MemberDescriptorType):
            return None
        slots[name] = slot
    return slots
