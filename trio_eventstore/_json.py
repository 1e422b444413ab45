"""JSON for the store's payloads: encoding and decoding (orjson when installed, the
standard library otherwise), and the check that plain values are JSON values that
read back as written (`plain_json`), with messages that name the value and its path."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import math
import uuid
from collections.abc import Callable
from typing import Any

import attrs

from ._errors import SerializationError

__all__ = [
    "JSON_DECODER",
    "MAX_JSON_DEPTH",
    "_kinds_kept",
    "_dumps",
    "_dumps_plain",
    "_is_record_class",
    "_loads",
    "_loads_many",
    "_plain_json",
    "_stdlib_loads",
    "_unencodable",
]


def _is_record_class(cls: type) -> bool:
    if cls is dict:  # the usual plain data: spare the two lookups (an append's hot path)
        return False
    return attrs.has(cls) or dataclasses.is_dataclass(cls)


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


def _kinds_kept(sent: object, back: object) -> bool:
    """Whether ``sent`` (JSON values, as stored) and ``back`` (what the converter
    unstructures from what they read back as; equal as Python values) hold their bools in
    the same places, and no float where an int came back: ``True`` stored in an ``int``
    field reads back as ``1``, ``1`` in a ``bool`` field as ``True``, ``5.0`` in an ``int``
    field as ``5`` (an int in a ``float`` field reads back as a float, as typing allows).
    ``back`` may hold tuples (a ``tuple`` field) where ``sent`` has lists, and keys that
    JSON writes as strings (a ``dict[int, ...]`` field)."""
    if type(sent) is bool or type(back) is bool:
        return type(sent) is type(back)
    if type(sent) is float:
        return type(back) is not int
    if type(sent) is dict and isinstance(back, dict):
        if any(key not in back for key in sent):
            back = {_json_key(key): item for key, item in back.items()}
        return all(key not in back or _kinds_kept(item, back[key]) for key, item in sent.items())
    if type(sent) is list and isinstance(back, list | tuple):
        return all(map(_kinds_kept, sent, back))
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


def _first(
    value: object, problem: Callable[[object, set[int]], str | None]
) -> tuple[list[str | int], str] | None:
    """For an error's message (never on the hot path): the path (innermost first, as
    `_NotJson.path`) of the first value, key or container in ``value`` for which
    ``problem(node, ids of the lists and dicts it sits in)`` says what is wrong, and
    that; None if nothing is (or ``value`` is too deep to walk)."""
    on_path: set[int] = set()
    path: list[str | int] = []

    def visit(node: object) -> str | None:
        if (why := problem(node, on_path)) is not None or not isinstance(node, dict | list):
            return why
        on_path.add(id(node))
        for key, item in node.items() if isinstance(node, dict) else enumerate(node):
            path.append(key)
            if isinstance(key, str) and (why := problem(key, on_path)) is not None:
                return f"its key: {why}"
            if (why := visit(item)) is not None:
                return why
            path.pop()
        on_path.discard(id(node))
        return None

    try:
        why = visit(value)
    except RecursionError:  # deep, not cyclic
        return None
    return None if why is None else (path[::-1], why)


def _inside_itself(node: object, on_path: set[int]) -> str | None:
    if isinstance(node, dict | list) and id(node) in on_path:
        return "contains itself (a list or dict inside itself is not JSON)"
    return None


def _unwritable(node: object, _on_path: set[int]) -> str | None:
    """What the encoder refuses in checked JSON values: a str with a lone surrogate
    (UTF-8 cannot hold it), an int too long to write."""
    if isinstance(node, str):
        try:
            node.encode()
        except UnicodeEncodeError as error:
            char = error.object[error.start]
            return f"a str holding a lone surrogate ({char!r}), which UTF-8 cannot encode"
    elif isinstance(node, int) and not isinstance(node, bool):
        try:
            str(node)
        except ValueError:
            return "an int too long to write"
    return None


def _unencodable(value: object, root: str, exc: Exception) -> SerializationError:
    """The error for plain values the encoder refused, naming the first such value and
    where it is."""
    found = _first(value, _unwritable)
    if found is None:
        return SerializationError(f"{root}: cannot serialize: {exc}")
    return SerializationError(f"{_path_text(root, found[0])}: {found[1]}")


def _plain_json(value: object, root: str) -> object:
    """``value`` itself, once checked to hold JSON values only (raise SerializationError
    naming the first value that is not)."""
    try:
        _check_plain(value)
    except _NotJson as exc:
        if len(exc.path) >= MAX_JSON_DEPTH:
            cycle = _first(value, _inside_itself)
            if cycle is not None:  # what went too deep is a list or dict inside itself
                raise SerializationError(f"{_path_text(root, cycle[0])}: {cycle[1]}") from None
            raise SerializationError(f"{root}: {exc.what}") from None
        raise SerializationError(f"{_path_text(root, exc.path)}: {exc.what}") from None
    except RecursionError:
        raise SerializationError(f"{root}: nested too deeply") from None
    return value
