"""Binary codecs for `_wire`: parameters encoded and result rows decoded as asyncpg
does, for the types the store's statements use (`Shape`: one statement's)."""

from __future__ import annotations

import datetime
import itertools
import struct
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["I16", "I32", "U32", "Shape", "Stale", "Unsupported", "WireRow"]


class Unsupported(Exception):
    """This connection or statement needs what `_wire` does not speak: use asyncpg."""


class Stale(Exception):
    """The server's rows no longer have the statement's described shape (a schema change
    under a prepared ``SELECT *``): describe it again."""


I32 = struct.Struct("!i")
I16 = struct.Struct("!h")
U32 = struct.Struct("!I")
_NULL = I32.pack(-1)

_EPOCH = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
_EPOCH_NAIVE = datetime.datetime(2000, 1, 1)
_I64 = struct.Struct("!q")


def _text(value: Any) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"expected a str, got {type(value).__name__}")
    return value.encode()


def _uuid(value: Any) -> bytes:
    return (value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))).bytes


def _bytea(value: Any) -> bytes:
    return value if type(value) is bytes else bytes(value)


def _micros(delta: datetime.timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _timestamptz(value: Any) -> bytes:
    if value.tzinfo is None:
        raise TypeError("expected an aware datetime")
    return _I64.pack(_micros(value - _EPOCH))


def _timestamp(value: Any) -> bytes:
    if value.tzinfo is not None:
        value = value.astimezone(datetime.UTC).replace(tzinfo=None)
    return _I64.pack(_micros(value - _EPOCH_NAIVE))


def _int8(value: Any) -> bytes:
    return _I64.pack(value)


def _jsonb(value: Any) -> bytes:
    return b"\x01" + (value.encode() if isinstance(value, str) else bytes(value))


_ENCODERS: dict[int, Callable[[Any], bytes]] = {
    16: lambda v: b"\x01" if v else b"\x00",
    17: _bytea,
    19: _text,
    20: _int8,
    21: I16.pack,
    23: I32.pack,
    25: _text,
    114: lambda v: v.encode() if isinstance(v, str) else bytes(v),
    1043: _text,
    1114: _timestamp,
    1184: _timestamptz,
    2950: _uuid,
    3802: _jsonb,
}

#: array type -> element type
_ARRAYS = {
    1000: 16,
    1001: 17,
    1003: 19,
    1016: 20,
    1005: 21,
    1007: 23,
    1009: 25,
    199: 114,
    1015: 1043,
    1115: 1114,
    1185: 1184,
    2951: 2950,
    3807: 3802,
}


def _fixed_width(element_struct: str, width: int) -> Callable[[Any], bytes]:
    pack = struct.Struct("!i" + element_struct).pack
    return lambda values: b"".join([pack(width, value) for value in values])


def _uuids(values: Any) -> bytes:
    return b"".join([b"\x00\x00\x00\x10" + value.bytes for value in values])


def _texts(values: Any) -> bytes:
    pack = I32.pack
    return b"".join([pack(len(data)) + data for data in [value.encode() for value in values]])


def _byteas(values: Any) -> bytes:
    # bytes only: the len() of another buffer (an array.array, a memoryview of one) may
    # count items wider than a byte, and would not be its size.
    pack = I32.pack
    parts = [pack(len(value)) + value for value in values if type(value) is bytes]
    if len(parts) != len(values):
        raise TypeError("not only bytes")
    return b"".join(parts)


#: element type -> its array's elements encoded in one pass, for arrays without NULLs
#: whose values are all of the usual type; it raises (TypeError, AttributeError,
#: struct.error, UnicodeError) on any other, and `_array_encoder` then encodes the array
#: the general way, which takes or refuses each value as `_ENCODERS` does.
_FAST_ARRAYS: dict[int, Callable[[Any], bytes]] = {
    17: _byteas,
    20: _fixed_width("q", 8),
    21: _fixed_width("h", 2),
    23: _fixed_width("i", 4),
    25: _texts,
    1043: _texts,
    2950: _uuids,
}


def _array_encoder(element: int) -> Callable[[Any], bytes]:
    encode = _ENCODERS[element]
    pack = I32.pack
    header = struct.Struct("!iiiii").pack
    fast = _FAST_ARRAYS.get(element)

    def encode_array(values: Any) -> bytes:
        if isinstance(values, str | bytes) or not isinstance(values, Sequence):
            raise TypeError(f"expected a sequence, got {type(values).__name__}")
        if not values:
            return struct.pack("!iii", 0, 0, element)
        if values[0] is None and values.count(None) == len(values):
            return header(1, 1, element, len(values), 1) + _NULL * len(values)
        if fast is not None:
            try:
                return header(1, 0, element, len(values), 1) + fast(values)
            except (TypeError, AttributeError, struct.error, UnicodeError):
                pass  # a NULL, or a value of another type: the general way
        parts = []
        nulls = 0
        for value in values:
            if value is None:
                parts.append(_NULL)
                nulls = 1
            else:
                data = encode(value)
                parts.append(pack(len(data)))
                parts.append(data)
        return header(1, nulls, element, len(values), 1) + b"".join(parts)

    return encode_array


def _decode_int(data: bytes) -> int:
    return int.from_bytes(data, "big", signed=True)


def _decode_timestamptz(data: bytes) -> datetime.datetime:
    return _EPOCH + datetime.timedelta(microseconds=_I64.unpack(data)[0])


def _decode_timestamp(data: bytes) -> datetime.datetime:
    return _EPOCH_NAIVE + datetime.timedelta(microseconds=_I64.unpack(data)[0])


#: integer types -> their struct code (`Shape.decode` reads rows of these in one unpack)
_INT_WIDTHS = {20: "q", 21: "h", 23: "i"}

_DECODERS: dict[int, Callable[[bytes], Any]] = {
    16: lambda d: d == b"\x01",
    17: bytes,
    19: lambda d: d.decode(),
    20: _decode_int,
    21: _decode_int,
    23: _decode_int,
    25: lambda d: d.decode(),
    26: lambda d: U32.unpack(d)[0],
    1043: lambda d: d.decode(),
    1114: _decode_timestamp,
    1184: _decode_timestamptz,
    2950: lambda d: uuid.UUID(bytes=d),
}


def _encoder(oid: int) -> Callable[[Any], bytes]:
    if oid in _ENCODERS:
        return _ENCODERS[oid]
    if oid in _ARRAYS:
        return _array_encoder(_ARRAYS[oid])
    raise Unsupported(f"parameter type {oid}")


class WireRow(tuple[Any, ...]):
    """A result row: by position, or by column name (as asyncpg's Record)."""

    __slots__ = ()
    names: dict[str, int]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self.names[key])
        return tuple.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        index = self.names.get(key)
        return default if index is None else tuple.__getitem__(self, index)

    def items(self) -> Iterable[tuple[str, Any]]:
        return [(name, tuple.__getitem__(self, i)) for name, i in self.names.items()]


class Shape:
    """What a statement takes and returns (learned once per store: `WireConnection.describe`)."""

    __slots__ = ("decoders", "encoders", "ints", "oids", "row", "widths")

    def __init__(self, oids: list[int], columns: list[tuple[str, int]]) -> None:
        self.oids = oids
        self.encoders = [_encoder(oid) for oid in oids]
        decoders = []
        for _name, oid in columns:
            if oid not in _DECODERS:
                raise Unsupported(f"result type {oid}")
            decoders.append(_DECODERS[oid])
        self.decoders = decoders
        #: the leading integer columns, read in one unpack when none of them is NULL
        #: (their length fields are then ``widths``)
        self.ints: struct.Struct | None = None
        self.widths: tuple[int, ...] = ()
        leading = list(itertools.takewhile(lambda c: c[1] in _INT_WIDTHS, columns))
        if leading:
            codes = [_INT_WIDTHS[oid] for _name, oid in leading]
            self.ints = struct.Struct("!h" + "".join("i" + code for code in codes))
            self.widths = tuple(struct.calcsize("!" + code) for code in codes)
        names: dict[str, int] = {}
        for i, (name, _oid) in enumerate(columns):
            names.setdefault(name, i)  # the first of two same-named columns, as asyncpg
        self.row = type("Row", (WireRow,), {"__slots__": (), "names": names})

    def bind_parameters(self, params: Sequence[object]) -> bytes:
        if len(params) != len(self.encoders):
            raise TypeError(f"expected {len(self.encoders)} parameters, got {len(params)}")
        pack = I32.pack
        parts = [I16.pack(1), I16.pack(1), I16.pack(len(params))]
        for encode, value in zip(self.encoders, params, strict=True):
            if value is None:
                parts.append(_NULL)
            else:
                data = encode(value)
                parts.append(pack(len(data)))
                parts.append(data)
        parts.append(I16.pack(1))
        parts.append(I16.pack(1))
        return b"".join(parts)

    def decode(self, body: bytes) -> WireRow:
        decoders = self.decoders
        ints = self.ints
        if ints is not None and len(body) >= ints.size:
            fields = ints.unpack_from(body)
            if fields[0] != len(decoders):
                raise Stale()
            if fields[1::2] == self.widths:  # none of them NULL
                values: list[Any] = list(fields[2::2])
                offset = ints.size
                decoders = decoders[len(values) :]
            else:
                values, offset = [], 2
        else:
            if I16.unpack_from(body)[0] != len(decoders):
                raise Stale()
            values, offset = [], 2
        unpack = I32.unpack_from
        for decode in decoders:
            (n,) = unpack(body, offset)
            offset += 4
            if n < 0:
                values.append(None)
            else:
                values.append(decode(body[offset : offset + n]))
                offset += n
        row: WireRow = self.row(values)
        return row
