"""Checks of the arguments the public API takes (pure: no I/O, typed errors)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from ._btree import MAX_ENTRY_BYTES, MAX_RAW_BYTES, entry_size, fits
from ._types import ALL_STREAMS, MAX_BIGINT, ExpectedVersion, check_text

__all__ = [
    "MAX_STREAM_UUID_BYTES",
    "MAX_WRITTEN_STREAM_UUID_BYTES",
    "check_events",
    "check_expected_version",
    "check_indexed",
    "check_int",
    "check_stream",
    "check_target",
    "parse_event_ids",
]


#: NOTIFY payloads hold "<stream_uuid>,<id>,<first>,<last>" and must stay under 8000 bytes.
MAX_STREAM_UUID_BYTES = 7900

#: PostgreSQL indexes stream ids (`ix_streams_stream_uuid`) in btree entries of at most
#: 2704 bytes (8 KiB pages), 12 of them its own: a longer id is stored only if the server
#: happens to compress it, so appends and links take none.
MAX_WRITTEN_STREAM_UUID_BYTES = MAX_RAW_BYTES


def _utf8_length(text: str) -> int:
    """``len(text.encode())``, without encoding an ASCII text (the usual stream id)."""
    return len(text) if text.isascii() else len(text.encode())


def check_stream(stream_uuid: object, name: str = "stream_uuid") -> None:
    if not isinstance(stream_uuid, str):
        raise TypeError(f"{name}: expected a str, got {type(stream_uuid).__name__}")
    if not stream_uuid:
        raise ValueError(f"{name}: must not be empty")
    check_text(name, stream_uuid)
    if _utf8_length(stream_uuid) > MAX_STREAM_UUID_BYTES:
        raise ValueError(
            f"{name}: at most {MAX_STREAM_UUID_BYTES} bytes (it travels in NOTIFY payloads)"
        )


def parse_event_ids(items: Sequence[uuid.UUID | str] | None) -> list[uuid.UUID] | None:
    if items is None:
        return None
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise TypeError(f"event_ids: expected a list or None, got {type(items).__name__}")
    return [parse_event_id(item, "event_ids") for item in items]


def parse_event_id(item: object, name: str = "") -> uuid.UUID:
    """``item`` (a UUID, or its text) as an event id; else ValueError, naming ``name``."""
    if isinstance(item, uuid.UUID):
        return item
    try:
        return uuid.UUID(item)  # type: ignore[arg-type]
    except (ValueError, TypeError, AttributeError):
        prefix = f"{name}: " if name else ""
        raise ValueError(f"{prefix}not an event id: {item!r}") from None


def check_target(stream_uuid: object, *, written: bool = True) -> None:
    """A stream to append or link to (``written``), or to delete."""
    check_stream(stream_uuid)
    if stream_uuid == ALL_STREAMS:
        raise ValueError(f"stream_uuid: {ALL_STREAMS!r} cannot be written to or deleted")
    assert isinstance(stream_uuid, str)
    if written and _utf8_length(stream_uuid) > MAX_WRITTEN_STREAM_UUID_BYTES:
        raise ValueError(
            f"stream_uuid: at most {MAX_WRITTEN_STREAM_UUID_BYTES} bytes to be written to "
            "(PostgreSQL's index of stream ids takes no longer one)"
        )


def check_indexed(what: str, index: str, values: tuple[str, ...], limit: str) -> None:
    """Raise `ValueError` unless PostgreSQL's btree ``index`` takes the entry of a row of
    ``values`` (as the server compresses them: see `_btree`). ``what`` names the
    arguments, ``limit`` says how long they may be."""
    if not fits(*values):
        raise ValueError(
            f"{what}: too long for PostgreSQL's index of {index}: {limit} (these make an "
            f"index entry of {entry_size(*values)} bytes; it takes at most {MAX_ENTRY_BYTES})"
        )


def check_bool(name: str, value: object) -> None:
    """A flag must be a bool: ``hard="False"`` is truthy (and a hard delete)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    if value > MAX_BIGINT:
        raise ValueError(f"{name}: must be < 2**63 (PostgreSQL's bigint), got {value}")


def check_expected_version(expected: object) -> None:
    if isinstance(expected, ExpectedVersion):
        return
    if isinstance(expected, bool) or not isinstance(expected, int):
        raise TypeError(
            "expected_version: expected ANY_VERSION, NO_STREAM, STREAM_EXISTS or an int, "
            f"got {expected!r}"
        )
    if not 0 <= expected <= MAX_BIGINT:
        raise ValueError(f"expected_version: must be >= 0 and < 2**63, got {expected}")


def check_events(items: object, kinds: type | tuple[type, ...], name: str) -> list[Any]:
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise TypeError(
            f"{name}: expected a list (or another sequence), got {type(items).__name__}"
        )
    if not items:
        raise ValueError(f"{name}: must not be empty")
    for item in items:
        if not isinstance(item, kinds):
            raise TypeError(f"{name}: unexpected {type(item).__name__} {item!r}")
    return list(items)
