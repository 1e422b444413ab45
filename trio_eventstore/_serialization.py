"""Serialization: the `Serializer` protocol, the cattrs-based `JsonSerializer`, and
`load_serializer` (a serializer named in configuration).

A serializer turns event data into bytes and back, given the stored ``event_type``.
The default writes UTF-8 JSON (what the Elixir ``JsonSerializer`` writes into bytea,
and what a jsonb column holds), through its own cattrs converter.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import math
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar, overload, runtime_checkable

import attrs
import cattrs
from cattrs.preconf.json import make_converter

from ._errors import SerializationError, UnknownEventTypeError
from ._imports import import_named
from ._types import check_text

__all__ = ["MAX_JSON_DEPTH", "JsonSerializer", "Serializer", "load_serializer"]

C = TypeVar("C", bound=type)


@runtime_checkable
class Serializer(Protocol):
    """How event data and metadata become bytes, and back."""

    def event_type_of(self, data: object) -> str:
        """The event type stored for ``data`` (raise `SerializationError` if none)."""
        ...

    def serialize(self, data: object) -> bytes:
        """Encode event data (raise `SerializationError` if it cannot be)."""
        ...

    def deserialize(self, payload: bytes, event_type: str) -> object:
        """Decode event data stored under ``event_type``."""
        ...

    def serialize_metadata(self, metadata: Mapping[str, Any] | None) -> bytes:
        """Encode metadata (None becomes JSON ``null``)."""
        ...

    def deserialize_metadata(self, payload: bytes | None) -> Mapping[str, Any] | None:
        """Decode metadata."""
        ...


def _is_record_class(cls: type) -> bool:
    if cls is dict:  # the usual plain data: spare the two lookups (an append's hot path)
        return False
    return attrs.has(cls) or dataclasses.is_dataclass(cls)


#: Modules whose name says nothing to another program: a script run as ``python x.py``
#: (and its copy in multiprocessing's spawned children).
_SCRIPT_MODULES = frozenset({"__main__", "__mp_main__"})


def _default_event_type(cls: type) -> str | None:
    """``"<module>.<qualname>"``, or None for a class defined in a script."""
    if cls.__module__ in _SCRIPT_MODULES:
        return None
    return f"{cls.__module__}.{cls.__qualname__}"


def _structure_decimal(value: object, _: type) -> decimal.Decimal:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"expected a decimal string or number, got {type(value).__name__}")
    return decimal.Decimal(str(value))


def _structure_uuid(value: object, _: type) -> uuid.UUID:
    if not isinstance(value, str):
        raise TypeError(f"expected a UUID string, got {type(value).__name__}")
    return uuid.UUID(value)


def _structure_datetime(value: object, _: type) -> datetime.datetime:
    if not isinstance(value, str):
        raise TypeError(f"expected an ISO 8601 string, got {type(value).__name__}")
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


#: What a converter's hooks raise on a value of the wrong type, besides cattrs's own errors:
#: ``'str' object has no attribute 'isoformat'`` (a str in a datetime field), an
#: IndexError (a short list in a tuple field), a type with no hook at all.
_HOOK_ERRORS = (
    TypeError,
    ValueError,
    KeyError,
    IndexError,
    AttributeError,
    RecursionError,
    cattrs.BaseValidationError,
    cattrs.StructureHandlerNotFoundError,
)


def _new_converter() -> cattrs.Converter:
    converter = make_converter()
    converter.register_unstructure_hook(decimal.Decimal, str)
    converter.register_structure_hook(decimal.Decimal, _structure_decimal)
    converter.register_unstructure_hook(uuid.UUID, str)
    converter.register_structure_hook(uuid.UUID, _structure_uuid)
    converter.register_structure_hook(datetime.datetime, _structure_datetime)
    return converter


_decoder = json.JSONDecoder()
_raw_decode = _decoder.raw_decode


def _stdlib_loads(payload: bytes) -> Any:
    """json.loads, faster for the compact JSON stores hold: no encoding sniffing, and
    the whitespace scan only when the payload needs it."""
    text = payload.decode("utf-8")
    try:
        value, end = _raw_decode(text)
    except ValueError:
        return _decoder.decode(text)  # leading whitespace, or an error worth its message
    if end != len(text) and text[end:].strip():
        return _decoder.decode(text)  # raises "Extra data"
    return value


_orjson: Any
try:  # the `fast` extra: orjson decodes two to three times faster
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the installation
    _orjson = None


#: 19 digits in a row may be an integer beyond 64 bits, which orjson would turn into a
#: float (silently losing digits): such payloads go to the standard library. Found by
#: mapping ASCII digits to "0" and everything else to " " (several times faster than
#: a regular expression).
_DIGITS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_RUN = b"0" * 19


def _loads(payload: bytes) -> Any:
    if _orjson is not None and _LONG_RUN not in payload.translate(_DIGITS):
        try:
            return _orjson.loads(payload)
        except _orjson.JSONDecodeError:
            pass  # NaN and other liberties the standard library accepts: it decides
    return _stdlib_loads(payload)


def _loads_many(payloads: list[bytes]) -> list[Any] | None:
    """`_loads` of each payload in one pass, or None: decode them one by one (no
    orjson, a long number somewhere, or a payload orjson refuses)."""
    if _orjson is None or _LONG_RUN in b" ".join(payloads).translate(_DIGITS):
        return None
    try:
        return list(map(_orjson.loads, payloads))
    except _orjson.JSONDecodeError:
        return None


#: Which JSON decoder reads events (``"orjson"`` with the `fast` extra).
JSON_DECODER = "orjson" if _orjson is not None else "json"


#: ``json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)``,
#: without building an encoder for each call
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _dumps(value: object) -> bytes:
    return _ENCODE(value).encode()


def _dumps_plain(value: object) -> bytes:
    """`_dumps` of plain JSON values (checked by `_check_plain`), by orjson when it is
    installed (ten times faster; the same bytes, but for how a float is spelled, e.g.
    ``0.00001`` for ``1e-05``: the same number). What orjson refuses (an integer beyond 64
    bits, a lone surrogate, nesting past its limit of 254) goes to the standard library,
    which takes it or says why not."""
    if _orjson is not None:
        try:
            result: bytes = _orjson.dumps(value)
        except TypeError:
            pass
        else:
            return result
    return _dumps(value)


def _bools_kept(sent: object, back: object) -> bool:
    """Whether ``sent`` (JSON values, as stored) and ``back`` (what the converter
    unstructures from what they read back as; equal as Python values) hold their bools in
    the same places: ``True`` stored in an ``int`` field reads back as ``1``, ``1`` in a
    ``bool`` field as ``True``. ``back`` may hold tuples (a ``tuple`` field) where ``sent``
    has lists, and keys that JSON writes as strings (a ``dict[int, ...]`` field)."""
    if type(sent) is bool or type(back) is bool:
        return type(sent) is type(back)
    if type(sent) is dict and isinstance(back, dict):
        if any(key not in back for key in sent):
            back = {_json_key(key): item for key, item in back.items()}
        return all(key not in back or _bools_kept(item, back[key]) for key, item in sent.items())
    if type(sent) is list and isinstance(back, list | tuple):
        return all(map(_bools_kept, sent, back))
    return True


def _json_key(key: object) -> object:
    """The string JSON writes for the dict key ``key`` (``1`` -> ``"1"``, ``True`` ->
    ``"true"``), or ``key`` itself if JSON takes no such key."""
    if isinstance(key, str):
        return key
    try:
        return _dumps(key).decode()
    except (TypeError, ValueError):
        return key


# -- plain JSON values -----------------------------------------------------------------------

#: Values that are JSON as they are (bool is an int; floats are checked to be finite).
_JSON_LEAVES = frozenset({str, int, bool, type(None)})


#: How deeply plain JSON values may nest. Fixed, so that whether an append is taken does
#: not depend on how deep the caller's stack is, and below what every reader decodes
#: (the standard library's decoder recurses once a level, within Python's recursion
#: limit, 1,000 by default, less the reader's own stack; orjson stops at 1,024).
MAX_JSON_DEPTH = 500


class _NotJson(Exception):
    """Raised by `_check_plain` with what is wrong; the path is collected on the way out."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what
        self.path: list[str | int] = []


def _check_plain(value: object, depth: int = 1) -> None:
    """Raise `_NotJson` unless ``value`` is made of JSON values only (dicts with str keys,
    lists, str, int, finite float, bool, None), nested at most `MAX_JSON_DEPTH` levels:
    exactly what reads back."""
    cls = type(value)
    if cls in _JSON_LEAVES:
        return
    if isinstance(value, float) and cls is float:
        if not math.isfinite(value):
            raise _NotJson(f"{value!r} is not a JSON number")
        return
    if depth > MAX_JSON_DEPTH and isinstance(value, dict | list):
        raise _NotJson(f"nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, dict):
        for key, item in value.items():
            if type(key) is not str:
                raise _NotJson(f"key {key!r} ({type(key).__name__}) is not a str")
            if type(item) not in _JSON_LEAVES:
                try:
                    _check_plain(item, depth + 1)
                except _NotJson as exc:
                    exc.path.append(key)
                    raise
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            if type(item) not in _JSON_LEAVES:
                try:
                    _check_plain(item, depth + 1)
                except _NotJson as exc:
                    exc.path.append(index)
                    raise
        return
    article = "an" if cls.__name__[:1] in "aeiouAEIO" else "a"
    raise _NotJson(f"{article} {cls.__name__} value is not JSON{_hint(value)}")


def _hint(value: object) -> str:
    if isinstance(value, bytes):
        return " (it would read back as a str): decode it, or use a registered class"
    if isinstance(value, (datetime.date, datetime.time, decimal.Decimal, uuid.UUID)):
        return " (it would read back as a str): convert it, or use a registered class"
    if isinstance(value, enum.Enum):
        return (
            " (an enum member would read back as its value): use its .value, or a registered class"
        )
    if isinstance(value, (tuple, set, frozenset)):
        return " (it would read back as a list): use a list"
    if _is_record_class(type(value)):
        return " (it would read back as a dict): register its class and append it as the data"
    return ""


def _path_text(root: str, path: list[str | int]) -> str:
    text = root
    for part in reversed(path):
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.isidentifier():
            text += f".{part}"
        else:
            text += f"[{part!r}]"
    return text


def _cycle(value: object) -> list[str | int] | None:
    """The path of the first dict or list in ``value`` that holds one of the dicts or
    lists it sits in, or None (for the message of a value too deep to check)."""
    on_path: set[int] = set()
    path: list[str | int] = []

    def visit(node: object) -> bool:
        if not isinstance(node, dict | list):
            return False
        if id(node) in on_path:
            return True
        on_path.add(id(node))
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, item in items:
            path.append(key)
            if visit(item):
                return True
            path.pop()
        on_path.discard(id(node))
        return False

    try:
        return path[::-1] if visit(value) else None  # innermost first, as `_NotJson.path`
    except RecursionError:  # deep, not cyclic
        return None


def _unencodable(value: object, root: str, exc: Exception) -> SerializationError:
    """The error for plain values the encoder refused (checked JSON values: a str with a
    lone surrogate, which UTF-8 cannot hold, or an int too long to write), naming the
    first such value and where it is."""
    path: list[str | int] = []

    def find(node: object) -> str | None:
        if isinstance(node, str):
            try:
                node.encode()
            except UnicodeEncodeError as error:
                char = error.object[error.start]
                return f"a str holding a lone surrogate ({char!r}), which UTF-8 cannot encode"
            return None
        if isinstance(node, int) and not isinstance(node, bool):
            try:
                str(node)
            except ValueError:
                return "an int too long to write"
            return None
        items = (
            node.items()
            if isinstance(node, dict)
            else enumerate(node)
            if isinstance(node, list)
            else ()
        )
        for key, item in items:
            path.append(key)
            if isinstance(key, str) and (why := find(key)) is not None:
                return f"its key: {why}"
            if (why := find(item)) is not None:
                return why
            path.pop()
        return None

    try:
        why = find(value)
    except RecursionError:
        why = None
    if why is None:
        return SerializationError(f"{root}: cannot serialize: {exc}")
    return SerializationError(f"{_path_text(root, path[::-1])}: {why}")


def _plain_json(value: object, root: str) -> object:
    """``value`` itself, once checked to hold JSON values only (raise SerializationError
    naming the first value that is not)."""
    try:
        _check_plain(value)
    except _NotJson as exc:
        if len(exc.path) >= MAX_JSON_DEPTH:
            cycle = _cycle(value)
            if cycle is not None:  # what went too deep is a list or dict inside itself
                raise SerializationError(
                    f"{_path_text(root, cycle)}: contains itself (a list or dict inside "
                    "itself is not JSON)"
                ) from None
            raise SerializationError(f"{root}: {exc.what}") from None
        raise SerializationError(f"{_path_text(root, exc.path)}: {exc.what}") from None
    except RecursionError:
        raise SerializationError(f"{root}: nested too deeply") from None
    return value


class JsonSerializer:
    """JSON through a private cattrs converter, with an event-type registry.

    Register event classes (attrs classes or dataclasses), optionally with the stored
    type name (e.g. ``"Elixir.MyApp.Events.Deposited"``, so an Elixir reader decodes
    them)::

        serializer = JsonSerializer()

        @serializer.register
        @attrs.frozen
        class Deposited: ...

        @serializer.register(event_type="Elixir.MyApp.Events.Withdrawn")
        @attrs.frozen
        class Withdrawn: ...

    Without a given name the type is ``"<module>.<qualname>"``; a class defined in a
    script (module ``__main__``) needs an explicit ``event_type``, since no other program
    could read ``"__main__.X"`` back. On read, a type with no registered class comes back
    as plain JSON values, or raises `UnknownEventTypeError` when ``strict=True``.
    """

    def __init__(self, *, strict: bool = False, converter: cattrs.Converter | None = None) -> None:
        self.strict = strict
        self.converter = converter if converter is not None else _new_converter()
        self._by_type: dict[str, type] = {}
        self._by_class: dict[type, str] = {}

    @overload
    def register(self, cls: C, /, *, event_type: str | None = None) -> C: ...

    @overload
    def register(
        self, cls: None = None, /, *, event_type: str | None = None
    ) -> Callable[[C], C]: ...

    def register(
        self, cls: C | None = None, /, *, event_type: str | None = None
    ) -> C | Callable[[C], C]:
        """Register an event class (as a call or a decorator, with or without arguments).

        Raises:
            TypeError: ``cls`` is not an attrs class or dataclass.
            ValueError: the name is already taken by another class, or ``cls`` is defined
                in a script (``__main__``) and no ``event_type`` is given.
        """

        def decorate(klass: C) -> C:
            if not isinstance(klass, type) or not _is_record_class(klass):
                raise TypeError(f"register: {klass!r} is not an attrs class or a dataclass")
            name = event_type or _default_event_type(klass)
            if name is None:
                raise ValueError(
                    f"register: {klass.__qualname__} is defined in {klass.__module__!r} (a "
                    "script), a module name no other program can read back; pass "
                    f"event_type=..., e.g. register(event_type={klass.__qualname__!r}) or "
                    "an Elixir module name such as 'Elixir.MyApp.Events."
                    f"{klass.__qualname__}'"
                )
            if not isinstance(name, str) or not name:
                raise TypeError("event_type: expected a non-empty str")
            check_text("event_type", name)
            taken = self._by_type.get(name)
            if taken is not None and taken is not klass:
                raise ValueError(f"event_type {name!r} is already registered for {taken!r}")
            self._by_type[name] = klass
            self._by_class[klass] = name
            return klass

        return decorate if cls is None else decorate(cls)

    def event_class(self, event_type: str) -> type | None:
        return self._by_type.get(event_type)

    def event_type_of(self, data: object) -> str:
        cls = type(data)
        name = self._by_class.get(cls)
        if name is not None:
            return name
        if _is_record_class(cls):
            if self.strict:
                raise UnknownEventTypeError(
                    f"{cls.__qualname__} is not registered: a strict serializer reads only "
                    "registered event types, so it does not write others either"
                )
            default = _default_event_type(cls)
            if default is not None:
                return default
            raise SerializationError(
                f"cannot name the event type of a {cls.__qualname__} defined in "
                f"{cls.__module__!r} (a script): register its class with event_type=..."
            )
        raise SerializationError(
            f"cannot name the event type of a {cls.__name__}: register its class, or give "
            "EventData(event_type=...) for plain JSON values"
        )

    def check_readable(self, data: object, event_type: str) -> None:
        """Raise unless ``data`` stored as ``event_type`` reads back. Appends and snapshots
        call it when the caller names the event type.

        Raises:
            UnknownEventTypeError: the serializer is strict and no class is registered
                for ``event_type``.
            SerializationError: ``data`` is not an instance of the class registered for
                ``event_type`` and does not fit it either.
        """
        cls = self._by_type.get(event_type)
        if cls is None:
            if self.strict:
                raise UnknownEventTypeError(
                    f"no class registered for event type {event_type!r}: a strict serializer "
                    "would not read it back"
                )
            return
        if type(data) is cls:
            return
        own = self._by_class.get(type(data))
        if own is not None:
            raise SerializationError(
                f"a {type(data).__name__} (registered as event type {own!r}) given "
                f"event_type={event_type!r}, the type registered for {cls.__name__}: "
                f"it would read back as a {cls.__name__} (leave event_type out, or give "
                "it the class's own)"
            )
        try:
            self.converter.structure(_loads(self.serialize(data)), cls)
        except _HOOK_ERRORS as exc:
            raise SerializationError(
                f"{event_type!r} data does not fit {cls.__qualname__}, the class registered "
                f"for it, so it would not read back: {exc}"
            ) from exc

    def serialize(self, data: object) -> bytes:
        """Encode ``data``: an attrs/dataclass instance through the converter (its typed
        fields round-trip); anything else must be plain JSON values.

        Raises:
            SerializationError: the data cannot be encoded, or holds a value that would
                not read back as itself (in plain values: bytes, datetime, UUID, Decimal,
                tuple, set, a key that is not a str...); the message says where.
        """
        cls = type(data)
        if _is_record_class(cls):
            try:
                payload = _dumps(self.converter.unstructure(data))
            except _HOOK_ERRORS as exc:
                raise SerializationError(f"cannot serialize {cls.__name__}: {exc}") from exc
            if cls in self._by_class:
                self._check_round_trip(data, cls, payload)
            return payload
        plain = _plain_json(data, "$")
        try:
            return _dumps_plain(plain)
        except (ValueError, RecursionError) as exc:  # a lone surrogate, an int too long
            raise _unencodable(plain, "$", exc) from exc

    def _check_round_trip(self, data: object, cls: type, payload: bytes) -> None:
        """A registered class's instance must read back as itself: cattrs writes a field
        whatever its value, so ``qty="ten"`` in an ``int`` field would be stored and then
        fail every read of its stream (and ``qty=1.7`` would read back as ``1``)."""
        try:
            sent = _loads(payload)
            back: object = self.converter.structure(sent, cls)
        except _HOOK_ERRORS as exc:
            why = (
                "; ".join(cattrs.transform_error(exc))
                if isinstance(exc, cattrs.BaseValidationError)
                else str(exc)
            )
            raise SerializationError(
                f"{data!r} would not read back (a field does not hold its declared type): {why}"
            ) from exc
        if getattr(cls, "__eq__", None) is not object.__eq__:  # attrs/dataclasses' default
            try:
                same = bool(back == data)
            except Exception:  # an exotic __eq__: the structuring above is the check
                same = True
            if same:  # equality cannot tell True from 1: a bool must read back as a bool
                try:
                    same = _bools_kept(sent, self.converter.unstructure(back))
                except _HOOK_ERRORS as exc:  # nested deeper than the stack takes it again
                    raise SerializationError(f"cannot serialize {cls.__name__}: {exc}") from exc
            else:
                # Unequal: a value that is not equal to itself (a Decimal's NaN), which
                # then must write the same bytes; or a value that reads back as another
                # (0.1, a float, in a Decimal field: Decimal('0.1') is not 0.1).
                try:
                    again: object = self.converter.structure(sent, cls)
                    same = not bool(again == back) and (
                        _dumps(self.converter.unstructure(back)) == payload
                    )
                except _HOOK_ERRORS:
                    same = False
                except Exception:  # an exotic __eq__
                    same = False
            if not same:
                raise SerializationError(
                    f"{data!r} would read back as {back!r} (a field does not hold its "
                    "declared type)"
                )

    def deserialize(self, payload: bytes, event_type: str) -> object:
        try:
            value = _loads(payload)
        except ValueError as exc:
            raise SerializationError(f"stored {event_type!r} data is not JSON: {exc}") from exc
        except RecursionError as exc:
            raise SerializationError(
                f"stored {event_type!r} data is nested too deeply to decode"
            ) from exc
        return self._structure(value, event_type)

    def deserialize_many(self, payloads: list[bytes], event_types: list[str]) -> list[object]:
        """`deserialize` of each payload (reads decode a page in one pass)."""
        values = _loads_many(payloads)
        if values is None:
            return [self.deserialize(p, t) for p, t in zip(payloads, event_types, strict=True)]
        if not self.strict and self._by_type.keys().isdisjoint(event_types):
            return values  # no registered class: the JSON values themselves
        structure = self._structure
        return [structure(v, t) for v, t in zip(values, event_types, strict=True)]

    def _structure(self, value: Any, event_type: str) -> object:
        cls = self._by_type.get(event_type)
        if cls is None:
            if self.strict:
                raise UnknownEventTypeError(event_type=event_type)
            return value
        try:
            return self.converter.structure(value, cls)
        except _HOOK_ERRORS as exc:
            raise SerializationError(
                f"stored {event_type!r} data does not fit {cls.__qualname__}: {exc}"
            ) from exc

    def serialize_metadata(self, metadata: Mapping[str, Any] | None) -> bytes:
        """Encode metadata: plain JSON values, as for `serialize`."""
        if metadata is None:
            return b"null"
        plain = _plain_json(dict(metadata), "metadata")
        try:
            return _dumps_plain(plain)
        except (ValueError, RecursionError) as exc:  # a lone surrogate, an int too long
            raise _unencodable(plain, "metadata", exc) from exc

    def deserialize_metadata(self, payload: bytes | None) -> Mapping[str, Any] | None:
        if payload is None or payload == b"null":
            return None
        try:
            value = _loads(payload)
        except ValueError as exc:
            raise SerializationError(f"stored metadata is not JSON: {exc}") from exc
        except RecursionError as exc:
            raise SerializationError("stored metadata is nested too deeply to decode") from exc
        if value is not None and not isinstance(value, dict):
            return {"value": value}
        return value

    def deserialize_metadata_many(
        self, payloads: list[bytes | None]
    ) -> list[Mapping[str, Any] | None]:
        """`deserialize_metadata` of each payload, in one pass."""
        present = [p for p in payloads if p is not None and p != b"null"]
        if not present:
            return [None] * len(payloads)
        values = _loads_many(present)
        if values is None or any(v is not None and not isinstance(v, dict) for v in values):
            return [self.deserialize_metadata(p) for p in payloads]
        if len(present) == len(payloads):
            return values
        decoded = iter(values)
        return [None if p is None or p == b"null" else next(decoded) for p in payloads]

    def __repr__(self) -> str:
        return f"JsonSerializer(strict={self.strict}, registered={sorted(self._by_type)})"


def load_serializer(target: str) -> Serializer:
    """``"package.module:name"`` -> the serializer it names: a `Serializer`, or a class
    or function that returns one when called without arguments (``EVENTSTORE_SERIALIZER``
    and ``trio-eventstore run --serializer`` take this form).

    Raises:
        ValueError: not of that form, not importable, or not a serializer.
    """
    found = import_named(target, "serializer")
    if isinstance(found, type) or (not isinstance(found, Serializer) and callable(found)):
        try:
            found = found()
        except Exception as exc:
            raise ValueError(f"serializer {target!r}: calling it failed: {exc!r}") from exc
    if isinstance(found, type) or not isinstance(found, Serializer):
        raise ValueError(
            f"serializer {target!r}: expected a Serializer (or a class or function making "
            f"one), got {type(found).__name__}"
        )
    return found
