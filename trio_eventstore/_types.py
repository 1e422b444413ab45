"""Value types: stream information and the expected-version / start-from markers."""

from __future__ import annotations

import datetime
import enum

import attrs

__all__ = [
    "ALL_STREAMS",
    "ANY_VERSION",
    "CURRENT",
    "NO_STREAM",
    "ORIGIN",
    "STREAM_EXISTS",
    "ExpectedVersion",
    "StartFrom",
    "StreamInfo",
    "StreamStatus",
]

#: The stream of every event, in commit order.
ALL_STREAMS = "$all"


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
