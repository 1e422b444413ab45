"""What PostgreSQL takes: the limits on one message from a client and on a ``jsonb``
value, and the checks that encoded events (`check_storable`) and snapshots
(`check_storable_snapshot`) fit them. Pure: appends and snapshots call them after
encoding, before any I/O, so a refusal is a typed error rather than a dropped connection
or a failed statement.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

from ._errors import EventTooLargeError, SerializationError

__all__ = [
    "MAX_APPEND_BYTES",
    "MAX_JSONB_BYTES",
    "MAX_MESSAGE_BYTES",
    "check_storable",
    "check_storable_snapshot",
]

#: PostgreSQL's limit on one message from a client (``PQ_LARGE_MESSAGE_LIMIT``, that is
#: ``MaxAllocSize - 1``): the server drops the connection on a larger one.
MAX_MESSAGE_BYTES = 0x3FFF_FFFE

#: What the encoded events of one append, or one snapshot, may take: one message, less room
#: for the rest of it (statement name, stream id...). Rows this small also come back from a
#: read (one row travels in one message, under the same limit).
MAX_APPEND_BYTES = MAX_MESSAGE_BYTES - 64 * 1024

#: The largest JSON text a ``jsonb`` column is given (jsonb's own limit on a string or the
#: contents of an array or object, ``JENTRY_OFFLENMASK``: 256 MiB less one byte).
MAX_JSONB_BYTES = 0x0FFF_FFFF

#: What an event takes in the message beyond its type, data and metadata: three ids and the
#: length words of its six array elements.
_EVENT_OVERHEAD = 3 * 16 + 6 * 4

#: ``\u0000`` that is an escape (preceded by an even number of backslashes), not text.
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


class _Encoded(Protocol):
    @property
    def event_type(self) -> str: ...

    @property
    def data(self) -> bytes: ...

    @property
    def metadata(self) -> bytes: ...


def _jsonb_refuses(payload: bytes) -> bool:
    return (
        len(payload) > MAX_JSONB_BYTES
        or (b"\\u0000" in payload and _NUL_ESCAPE.search(payload) is not None)
        or b"\x00" in payload
    )


def _check_jsonb(label: str, what: str, payload: bytes) -> None:
    if len(payload) > MAX_JSONB_BYTES:
        raise EventTooLargeError(
            f"{label}: its {what} takes {len(payload):,} bytes of JSON; a jsonb column holds "
            f"at most {MAX_JSONB_BYTES:,} (store less, or use a bytea store)"
        )
    if _jsonb_refuses(payload):
        raise SerializationError(
            f"{label}: its {what} holds a NUL character (\\u0000), which a jsonb column "
            "cannot store (a bytea store can)"
        )


def _event_size(event_type: str, data: bytes, metadata: bytes) -> int:
    return len(event_type.encode()) + len(data) + len(metadata) + _EVENT_OVERHEAD


def check_storable(events: Sequence[_Encoded], column_data_type: str) -> None:
    """Raise unless PostgreSQL takes these encoded events in one append and returns each
    of them on read. Pure: appends call it after encoding, before any I/O.

    Raises:
        EventTooLargeError: the events take more than `MAX_APPEND_BYTES` together, or in a
            jsonb store an event's data or metadata is over `MAX_JSONB_BYTES`.
        SerializationError: in a jsonb store, data or metadata holds a NUL character.
    """
    jsonb = column_data_type == "jsonb"
    total = 0
    for number, event in enumerate(events, 1):
        data, metadata = event.data, event.metadata
        size = _event_size(event.event_type, data, metadata)
        if size > MAX_APPEND_BYTES or (
            jsonb and (_jsonb_refuses(data) or _jsonb_refuses(metadata))
        ):
            label = f"event {number} of the append (type {event.event_type!r})"
            if size > MAX_APPEND_BYTES:
                raise EventTooLargeError(
                    f"{label} takes {size:,} bytes encoded; PostgreSQL takes at most "
                    f"{MAX_APPEND_BYTES:,} in one append"
                )
            _check_jsonb(label, "data", data)
            _check_jsonb(label, "metadata", metadata)
        total += size
    if total > MAX_APPEND_BYTES:
        raise EventTooLargeError(
            f"the append's {len(events)} events take {total:,} bytes encoded; PostgreSQL "
            f"takes at most {MAX_APPEND_BYTES:,} in one append: append them in several"
        )


def check_storable_snapshot(
    source_type: str, data: bytes, metadata: bytes, column_data_type: str
) -> None:
    """`check_storable` for a snapshot."""
    label = f"the snapshot (type {source_type!r})"
    size = _event_size(source_type, data, metadata)
    if size > MAX_APPEND_BYTES:
        raise EventTooLargeError(
            f"{label} takes {size:,} bytes encoded; PostgreSQL takes at most "
            f"{MAX_APPEND_BYTES:,} in one snapshot"
        )
    if column_data_type == "jsonb":
        _check_jsonb(label, "data", data)
        _check_jsonb(label, "metadata", metadata)
