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
import types
import typing
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, overload, runtime_checkable

import attrs
import cattrs
from cattrs.preconf.json import make_converter

from ._errors import SerializationError, UnknownEventTypeError
from ._imports import import_named
from ._json import (
    MAX_JSON_DEPTH,
    _dumps,
    _dumps_plain,
    _is_record_class,
    _kinds_kept,
    _loads,
    _loads_many,
    _plain_json,
    _unencodable,
)
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
    try:
        return decimal.Decimal(str(value))
    except decimal.InvalidOperation:
        raise ValueError(f"{value!r} is not a decimal number") from None


def _why(exc: BaseException) -> str:
    """A converter's error in words: cattrs's validation errors as the paths and what
    failed there (``expected int @ $.qty``), not "While structuring X (2 sub-exceptions)"."""
    if isinstance(exc, cattrs.BaseValidationError):
        return "; ".join(cattrs.transform_error(exc))
    return str(exc)


def _field_at_fault(converter: cattrs.Converter, data: object) -> str | None:
    """For a record the converter cannot encode: which field, holding what, instead of
    the hook's own words (``'str' object has no attribute 'isoformat'``); None when no
    single field is to blame. Inside nested records, lists, tuples and dicts it names
    the innermost value at fault (``field 'lines[0].at'``), not the outer field."""
    return _fields_at_fault(converter, data, "", frozenset({id(data)}))


#: How deep `_value_at_fault` looks into nested values (beyond: the field holding them).
_FAULT_DEPTH = 16


def _fields_at_fault(
    converter: cattrs.Converter, data: object, path: str, seen: frozenset[int]
) -> str | None:
    cls = type(data)
    try:
        hints = typing.get_type_hints(cls)
        names = (
            [f.name for f in attrs.fields(cls)]
            if attrs.has(cls)
            else [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        )
    except Exception:  # unresolvable annotations: keep the hook's message
        return None
    for name in names:
        declared = hints.get(name)
        if declared is not None:
            value = getattr(data, name, None)
            fault = _value_at_fault(converter, value, declared, path + name, seen)
            if fault is not None:
                return fault
    return None


def _value_at_fault(
    converter: cattrs.Converter, value: object, declared: Any, path: str, seen: frozenset[int]
) -> str | None:
    """Where in ``value`` (declared ``declared``, at ``path``) the converter fails, or
    None if it does not."""
    try:
        converter.unstructure(value, unstructure_as=declared)
    except _HOOK_ERRORS:
        pass
    else:
        return None
    if id(value) in seen:
        return f"field {path!r} holds a {type(value).__name__} that holds it (a cycle)"
    deeper: str | None = None
    if len(seen) < _FAULT_DEPTH:
        deeper = _inner_fault(converter, value, declared, path, seen | {id(value)})
    return (
        deeper or f"field {path!r} holds {type(value).__name__} {value!r}, not {_shown(declared)}"
    )


def _inner_fault(
    converter: cattrs.Converter, value: object, declared: Any, path: str, seen: frozenset[int]
) -> str | None:
    origin, args = typing.get_origin(declared), typing.get_args(declared)
    if origin is typing.Union or origin is types.UnionType:
        members = [a for a in args if a is not type(None)]
        if len(members) != 1:  # which member was meant is anybody's guess
            return None
        declared = members[0]
        origin, args = typing.get_origin(declared), typing.get_args(declared)
    if attrs.has(type(value)) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        return _fields_at_fault(converter, value, path + ".", seen)
    if not isinstance(origin, type) or not args:
        return None
    if isinstance(value, list | tuple) and issubclass(origin, Sequence):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            kinds = list(args)
        else:
            kinds = [args[0]] * len(value)
        for i, (item, kind) in enumerate(zip(value, kinds, strict=False)):
            fault = _value_at_fault(converter, item, kind, f"{path}[{i}]", seen)
            if fault is not None:
                return fault
    elif isinstance(value, dict) and issubclass(origin, Mapping) and len(args) == 2:
        for key, item in value.items():
            fault = _value_at_fault(converter, item, args[1], f"{path}[{key!r}]", seen)
            if fault is not None:
                return fault
    return None


def _shown(declared: Any) -> str:
    """A declared type as written: ``datetime``, ``list[Line]``, ``int | None``."""
    args = typing.get_args(declared)
    origin = typing.get_origin(declared)
    if origin is None or not args:
        return getattr(declared, "__qualname__", None) or str(declared)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(_shown(a) for a in args)
    name = getattr(origin, "__qualname__", None) or str(origin)
    return f"{name}[{', '.join('...' if a is Ellipsis else _shown(a) for a in args)}]"


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

    def check_readable(self, data: object, event_type: str, *, name: str = "event_type") -> None:
        """Raise unless ``data`` stored as ``event_type`` reads back. Appends and snapshots
        call it when the caller names the event type (``name``: the argument that did,
        for the message: ``source_type`` for a snapshot).

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
                f"{name}={event_type!r}, the type registered for {cls.__name__}: "
                f"it would read back as a {cls.__name__} (leave {name} out, or give "
                "it the class's own)"
            )
        try:
            self.converter.structure(_loads(self.serialize(data)), cls)
        except _HOOK_ERRORS as exc:
            raise SerializationError(
                f"{event_type!r} data does not fit {cls.__qualname__}, the class registered "
                f"for it, so it would not read back: {_why(exc)}"
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
                why = _field_at_fault(self.converter, data) or str(exc)
                raise SerializationError(f"cannot serialize {cls.__name__}: {why}") from exc
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
            raise SerializationError(
                f"{data!r} would not read back (a field does not hold its declared type): "
                f"{_why(exc)}"
            ) from exc
        if getattr(cls, "__eq__", None) is not object.__eq__:  # attrs/dataclasses' default
            try:
                same = bool(back == data)
            except Exception:  # an exotic __eq__: the structuring above is the check
                same = True
            if same:  # equality cannot tell True from 1: a bool must read back as a bool
                try:
                    same = _kinds_kept(sent, self.converter.unstructure(back))
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
                f"stored {event_type!r} data does not fit {cls.__qualname__}: {_why(exc)}"
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
