"""Value types: stream information and the expected-version / start-from markers."""

from __future__ import annotations

import datetime
import enum
import os
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = [
    "ALL_STREAMS",
    "ANY_VERSION",
    "CURRENT",
    "NO_STREAM",
    "ORIGIN",
    "STREAM_EXISTS",
    "EventData",
    "ExpectedVersion",
    "Page",
    "RecordedEvent",
    "SnapshotData",
    "StartFrom",
    "StreamInfo",
    "StreamStatus",
    "UndecodedEvent",
    "new_event_id",
]

#: The stream of every event, in commit order.
ALL_STREAMS = "$all"

#: The largest version, event number or count PostgreSQL stores (``bigint``).
MAX_BIGINT = 2**63 - 1


def check_text(name: str, value: str) -> None:
    """Raise `ValueError` unless PostgreSQL can store ``value`` as text: UTF-8 without NUL
    characters (a lone surrogate has no UTF-8 form)."""
    if "\x00" in value:
        raise ValueError(f"{name}: must not contain NUL characters")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{name}: not valid Unicode text ({exc.reason} at position {exc.start})"
            ) from None


class ExpectedVersion(enum.Enum):
    """Expected-version markers for appends (or pass an int >= 0)."""

    ANY_VERSION = "any_version"
    NO_STREAM = "no_stream"
    STREAM_EXISTS = "stream_exists"

    def __repr__(self) -> str:
        return self.name


ANY_VERSION = ExpectedVersion.ANY_VERSION
NO_STREAM = ExpectedVersion.NO_STREAM
STREAM_EXISTS = ExpectedVersion.STREAM_EXISTS


class StartFrom(enum.Enum):
    """Where a new persistent subscription starts (or pass an event number)."""

    ORIGIN = "origin"
    CURRENT = "current"

    def __repr__(self) -> str:
        return self.name


ORIGIN = StartFrom.ORIGIN
CURRENT = StartFrom.CURRENT


class StreamStatus(enum.Enum):
    CREATED = "created"
    DELETED = "deleted"


@attrs.frozen
class StreamInfo:
    """What the store knows of one stream (`EventStore.stream_info`)."""

    stream_uuid: str
    stream_id: int
    stream_version: int
    created_at: datetime.datetime
    deleted_at: datetime.datetime | None = None

    @property
    def status(self) -> StreamStatus:
        return StreamStatus.CREATED if self.deleted_at is None else StreamStatus.DELETED


def _to_uuid(value: object) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            raise ValueError(f"not a UUID: {value!r}") from None
    raise TypeError(f"expected a uuid.UUID or str, got {type(value).__name__}")


def _optional_uuid(value: object) -> uuid.UUID | None:
    return None if value is None else _to_uuid(value)


#: The last id's millisecond and counter (`new_event_id`), and the lock that keeps ids
#: made in several threads increasing too.
_last_id_ms = 0
_id_counter = 0
_id_lock = threading.Lock()
_RAND_B = (1 << 62) - 1
_VERSION_7_AND_VARIANT = (0x7 << 76) | (0b10 << 62)


def new_event_id() -> uuid.UUID:
    """A new event id: a time-ordered UUID, version 7 (RFC 9562): the Unix time in
    milliseconds, a 12-bit counter (ids made in one millisecond, or while the clock
    steps back, still increase within the process, whichever thread makes them) and
    62 random bits.

    Ids that grow with time are added at the right edge of the events' indexes instead
    of on a random page each, so appends touch and log fewer index pages (after each
    checkpoint, PostgreSQL logs every page it changes whole). `EventData` takes one by
    default; use it for ids you make yourself (e.g. to retry an append safely)."""
    global _last_id_ms, _id_counter
    rand_b = int.from_bytes(os.urandom(8)) & _RAND_B
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_id_ms:
            _last_id_ms, _id_counter = ms, 0
        else:
            _id_counter += 1
            if _id_counter > 0xFFF:  # 4,096 ids in one millisecond: borrow the next one
                _last_id_ms, _id_counter = _last_id_ms + 1, 0
        high = (_last_id_ms << 80) | (_id_counter << 64)
    return uuid.UUID(int=high | _VERSION_7_AND_VARIANT | rand_b)


def _new_event_id(value: object) -> uuid.UUID:
    return new_event_id() if value is None else _to_uuid(value)


def _check_event_type(_instance: object, _attribute: object, value: str | None) -> None:
    if value is not None:
        if not isinstance(value, str):
            raise TypeError(
                f"event_type: expected a non-empty str or None, got {type(value).__name__}"
            )
        if not value:
            raise ValueError("event_type: must not be empty (None: named after the class)")
        check_text("event_type", value)


def _check_metadata(_instance: object, _attribute: object, value: Mapping[str, Any] | None) -> None:
    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f"metadata: expected a mapping or None, got {type(value).__name__}")


@attrs.frozen(init=False)
class EventData:
    """An event to append: ``data`` is a registered attrs/dataclass instance, or plain JSON
    values together with an explicit ``event_type``.

    Ids may be given as `uuid.UUID` or str; ``event_id`` defaults to `new_event_id()` (a
    new time-ordered UUID).
    """

    data: object
    event_type: str | None = attrs.field(validator=_check_event_type)
    metadata: Mapping[str, Any] | None = attrs.field(validator=_check_metadata)
    event_id: uuid.UUID
    causation_id: uuid.UUID | None
    correlation_id: uuid.UUID | None

    def __init__(
        self,
        data: object,
        *,
        event_type: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        event_id: uuid.UUID | str | None = None,
        causation_id: uuid.UUID | str | None = None,
        correlation_id: uuid.UUID | str | None = None,
    ) -> None:
        try:
            ids = (
                _new_event_id(event_id),
                _optional_uuid(causation_id),
                _optional_uuid(correlation_id),
            )
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"EventData ids: {exc}") from None
        self.__attrs_init__(data, event_type, metadata, *ids)


# Not slotted: a frozen attrs class with a __dict__ is built almost twice as fast,
# and reads build one of these per event (measured in `python -m bench`).
@attrs.frozen(slots=False)
class RecordedEvent:
    """An event read from the store.

    ``event_number`` is the position in the stream that was read (the global number
    when reading ``$all``); ``stream_uuid``/``stream_version`` name where the event was
    first appended (for a linked event, its original stream), as in Elixir.
    """

    event_number: int
    event_id: uuid.UUID
    stream_uuid: str
    stream_version: int
    event_type: str
    data: object
    metadata: Mapping[str, Any] | None
    causation_id: uuid.UUID | None
    correlation_id: uuid.UUID | None
    created_at: datetime.datetime


@attrs.frozen(slots=False)
class UndecodedEvent(RecordedEvent):
    """An event the store's serializer cannot decode (its type has no registered class
    under a strict serializer, or its payload does not fit), as a persistent
    subscription with ``undecodable="deliver"`` delivers it: ``data`` holds the stored
    bytes (UTF-8 JSON), ``metadata`` the decoded metadata when it could be read (else
    None), and ``error`` says why ``data`` could not be decoded."""

    error: str


#: ``source_type``s of the snapshots table's rows that are parked events' records.
RESERVED_SOURCE_TYPES = frozenset({"$parked", "$replay"})


@attrs.frozen(kw_only=True)
class SnapshotData:
    """A snapshot of an aggregate's state (`EventStore.record_snapshot`)."""

    source_uuid: str
    source_version: int
    source_type: str | None = None
    data: object
    metadata: Mapping[str, Any] | None = None
    created_at: datetime.datetime | None = None

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.source_uuid, str) or not self.source_uuid:
            raise ValueError("source_uuid: expected a non-empty str")
        check_text("source_uuid", self.source_uuid)
        if isinstance(self.source_version, bool) or not isinstance(self.source_version, int):
            raise TypeError("source_version: expected an int")
        if not 0 <= self.source_version <= MAX_BIGINT:
            raise ValueError(f"source_version: must be >= 0 and < 2**63, got {self.source_version}")
        if self.source_type is not None:
            if not isinstance(self.source_type, str):
                raise TypeError("source_type: expected a str or None")
            check_text("source_type", self.source_type)
            if self.source_type in RESERVED_SOURCE_TYPES:
                raise ValueError(
                    f"source_type {self.source_type!r} is the store's own (parked events' records)"
                )
        if self.created_at is not None:
            if not isinstance(self.created_at, datetime.datetime):
                raise TypeError(
                    f"created_at: expected a datetime or None, got {type(self.created_at).__name__}"
                )
            if self.created_at.utcoffset() is None:
                raise ValueError(
                    "created_at: expected a timezone-aware datetime (a naive one says no "
                    "instant: give tzinfo, e.g. datetime.UTC)"
                )


@attrs.frozen
class Page:
    """One page of `EventStore.paginate_streams`."""

    entries: list[StreamInfo]
    page_number: int
    page_size: int
    total_entries: int

    @property
    def total_pages(self) -> int:
        return max(1, -(-self.total_entries // self.page_size))
