"""The exception hierarchy: every error the store raises derives from `EventStoreError`.

Leaves also subclass what callers already catch (`LookupError`, `ValueError`,
`trio.BrokenResourceError`), as asyncpg and trio do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trio

__all__ = [
    "DuplicateEventError",
    "EventNotFoundError",
    "EventStoreError",
    "EventTooLargeError",
    "InvalidStartFromError",
    "NotSupportedError",
    "PoolOverloadedError",
    "SchemaNotInitializedError",
    "SerializationError",
    "SnapshotNotFoundError",
    "StorageUnavailableError",
    "StreamDeletedError",
    "StreamExistsError",
    "StreamNotFoundError",
    "SubscriptionAlreadyExistsError",
    "SubscriptionFailedError",
    "SubscriptionNotFoundError",
    "TooManySubscribersError",
    "UnexpectedAckError",
    "UnknownEventTypeError",
    "WrongExpectedVersionError",
    "DatabaseError",
    "SchemaMismatchError",
    "AuthenticationError",
    "single_errors",
]


class EventStoreError(Exception):
    """Root of every error raised by trio-eventstore."""


class WrongExpectedVersionError(EventStoreError):
    """The stream's current version is not the expected one (optimistic concurrency)."""


class StreamExistsError(WrongExpectedVersionError):
    """`NO_STREAM` was expected but the stream already has events."""


class StreamNotFoundError(EventStoreError, LookupError):
    """The stream does not exist."""


class StreamDeletedError(EventStoreError):
    """The stream has been (soft) deleted."""


class EventNotFoundError(EventStoreError, LookupError):
    """An event to link does not exist."""


class DuplicateEventError(EventStoreError):
    """An event with the same id is already stored."""


class SnapshotNotFoundError(EventStoreError, LookupError):
    """No snapshot is stored for the source."""


class SerializationError(EventStoreError, ValueError):
    """Event data could not be serialized or deserialized."""


class UnknownEventTypeError(SerializationError):
    """An event type has no registered class (strict serializers only): raised when
    reading such an event, and when appending one (which is then not written)."""


class EventTooLargeError(SerializationError):
    """An event, an append or a snapshot is larger than PostgreSQL takes or returns in
    one piece (nothing is written; retrying cannot help)."""


class SubscriptionAlreadyExistsError(EventStoreError):
    """A subscription of that name is already active in this store."""


class SubscriptionNotFoundError(EventStoreError, LookupError):
    """No subscription of that name exists."""


class TooManySubscribersError(EventStoreError):
    """A competing-consumer subscription is already at its `concurrency_limit`."""


class InvalidStartFromError(EventStoreError, ValueError):
    """`start_from` is not ORIGIN, CURRENT or a non-negative event number."""


class UnexpectedAckError(EventStoreError, ValueError):
    """An ack names an event that is not in flight for this subscriber."""


class SubscriptionFailedError(EventStoreError):
    """The subscription stopped because of an error (its `__cause__` says which)."""


class NotSupportedError(EventStoreError):
    """The operation is disabled by configuration (e.g. hard deletes)."""


class StorageUnavailableError(EventStoreError, trio.BrokenResourceError):
    """The database cannot be reached, or the connection to it broke."""


class PoolOverloadedError(StorageUnavailableError):
    """No pooled connection came free in time (see ``queue_target``/``queue_interval``):
    the pool is overloaded; retry later, or give it more connections."""


class AuthenticationError(StorageUnavailableError):
    """The database server rejected the credentials (the password is never shown)."""


class SchemaNotInitializedError(EventStoreError):
    """The configured schema holds no event store: run `trio-eventstore init` first."""


class SchemaMismatchError(EventStoreError):
    """The schema was initialised with other settings (e.g. another `column_data_type`)
    or a newer layout version than this library knows."""


class DatabaseError(EventStoreError):
    """Any other error reported by PostgreSQL.

    Attributes:
        sqlstate: the five-character SQLSTATE code.
        constraint_name: the violated constraint, when there is one.
    """

    def __init__(
        self, message: str, *, sqlstate: str | None = None, constraint_name: str | None = None
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.constraint_name = constraint_name


@contextlib.contextmanager
def single_errors() -> Iterator[None]:
    """Never hand the caller an ExceptionGroup that holds a single error: re-raise the
    error itself (trio nurseries wrap even one error in a group)."""
    try:
        yield
    except BaseExceptionGroup as group:
        inner: BaseException = group
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if inner is group:
            raise
        raise inner from inner.__cause__
