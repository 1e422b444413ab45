"""The exception hierarchy: every error the store raises derives from `EventStoreError`.

Leaves also subclass what callers already catch (`LookupError`, `ValueError`,
`trio.BrokenResourceError`), as asyncpg and trio do.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable, Iterator

import trio

from ._types import ExpectedVersion

__all__ = [
    "AccessRejectedError",
    "InsufficientPrivilegeError",
    "TLSError",
    "CheckpointFailedError",
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
    "DatabaseNotFoundError",
    "EventStoreClosedError",
    "SchemaMismatchError",
    "AuthenticationError",
    "single_errors",
]


#: A name longer than this is cut in messages (`shown`); the error's attributes keep it.
SHOWN_CHARACTERS = 200


def shown(name: str | None) -> str:
    """``repr(name)`` for a message, cut after `SHOWN_CHARACTERS` characters (a stream id
    may be thousands): the start, and how long it is."""
    if name is None or len(name) <= SHOWN_CHARACTERS:
        return repr(name)
    return f"{name[:SHOWN_CHARACTERS]!r}... ({len(name)} characters)"


class EventStoreError(Exception):
    """Root of every error raised by trio-eventstore.

    Errors carry their facts as attributes (``stream_uuid``, ``expected``, ...; None
    when unknown) besides their message, and survive pickling.
    """


class EventStoreClosedError(EventStoreError, trio.ClosedResourceError):
    """The store has been closed (its ``async with`` block has exited): nothing can be
    done with it any more. Not a `StorageUnavailableError`: retrying will not help."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or "the event store is closed")


class WrongExpectedVersionError(EventStoreError):
    """The stream's current version is not the expected one (optimistic concurrency).

    Attributes:
        stream_uuid: the stream.
        expected: the expected version given (an int or an `ExpectedVersion` marker).
        current: the stream's version (0 when it does not exist).
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        stream_uuid: str | None = None,
        expected: ExpectedVersion | int | None = None,
        current: int | None = None,
    ) -> None:
        super().__init__(
            message or f"stream {shown(stream_uuid)} is at version {current}, expected {expected}"
        )
        self.stream_uuid = stream_uuid
        self.expected = expected
        self.current = current


class StreamExistsError(WrongExpectedVersionError):
    """`NO_STREAM` was expected but the stream already has events (``expected`` is
    `NO_STREAM`)."""

    def __init__(
        self,
        message: str | None = None,
        *,
        stream_uuid: str | None = None,
        expected: ExpectedVersion | int | None = ExpectedVersion.NO_STREAM,
        current: int | None = None,
    ) -> None:
        super().__init__(
            message or f"stream {shown(stream_uuid)} already exists (version {current})",
            stream_uuid=stream_uuid,
            expected=expected,
            current=current,
        )


class StreamNotFoundError(EventStoreError, LookupError):
    """The stream does not exist.

    Attributes:
        stream_uuid: the stream.
    """

    def __init__(self, message: str | None = None, *, stream_uuid: str | None = None) -> None:
        super().__init__(message or f"stream {shown(stream_uuid)} does not exist")
        self.stream_uuid = stream_uuid


class StreamDeletedError(EventStoreError):
    """The stream has been (soft) deleted.

    Attributes:
        stream_uuid: the stream.
    """

    def __init__(self, message: str | None = None, *, stream_uuid: str | None = None) -> None:
        super().__init__(message or f"stream {shown(stream_uuid)} has been deleted")
        self.stream_uuid = stream_uuid


class EventNotFoundError(EventStoreError, LookupError):
    """An event to link does not exist.

    Attributes:
        event_ids: the ids that do not exist (a tuple of UUIDs).
    """

    def __init__(self, message: str | None = None, *, event_ids: Iterable[uuid.UUID] = ()) -> None:
        ids = tuple(event_ids)
        super().__init__(message or f"no such event(s): {', '.join(map(str, ids[:5]))}")
        self.event_ids = ids


class DuplicateEventError(EventStoreError):
    """An event with the same id is already stored (or already in the stream, for a link),
    or one append or link gives the same event twice (refused before any I/O).

    Attributes:
        stream_uuid: the stream written to.
        event_id: the duplicate event's id, when known (the database names it, most of
            the time; an event given twice is always named).
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        stream_uuid: str | None = None,
        event_id: uuid.UUID | None = None,
    ) -> None:
        super().__init__(
            message
            or f"event {event_id} is already stored (writing to stream {shown(stream_uuid)})"
        )
        self.stream_uuid = stream_uuid
        self.event_id = event_id


class SnapshotNotFoundError(EventStoreError, LookupError):
    """No snapshot is stored for the source.

    Attributes:
        source_uuid: the snapshot's source.
    """

    def __init__(self, message: str | None = None, *, source_uuid: str | None = None) -> None:
        super().__init__(message or f"no snapshot of {source_uuid!r}")
        self.source_uuid = source_uuid


class SerializationError(EventStoreError, ValueError):
    """Event data could not be serialized or deserialized."""


class UnknownEventTypeError(SerializationError):
    """An event type has no registered class (strict serializers only): raised when
    reading such an event, and when appending one (which is then not written).

    Attributes:
        event_type: the event type.
    """

    def __init__(self, message: str | None = None, *, event_type: str | None = None) -> None:
        super().__init__(message or f"no class registered for event type {event_type!r}")
        self.event_type = event_type


class EventTooLargeError(SerializationError):
    """An event, an append or a snapshot is larger than PostgreSQL takes or returns in
    one piece (nothing is written; retrying cannot help)."""


class _SubscriptionError(EventStoreError):
    """An error about one subscription: ``stream_uuid`` and ``subscription_name``."""

    def __init__(
        self,
        message: str | None = None,
        *,
        stream_uuid: str | None = None,
        subscription_name: str | None = None,
    ) -> None:
        super().__init__(message or self._default(stream_uuid, subscription_name))
        self.stream_uuid = stream_uuid
        self.subscription_name = subscription_name

    @staticmethod
    def _default(stream_uuid: str | None, name: str | None) -> str:
        return f"subscription {name!r} on {shown(stream_uuid)}"


class SubscriptionAlreadyExistsError(_SubscriptionError):
    """A subscription of that name is already active: in this store, or (for the
    operator commands) on some node, which holds its lock.

    Attributes:
        stream_uuid, subscription_name: the subscription.
    """

    @staticmethod
    def _default(stream_uuid: str | None, name: str | None) -> str:
        return f"subscription {name!r} on {shown(stream_uuid)} is already active in this store"


class SubscriptionNotFoundError(_SubscriptionError, LookupError):
    """No subscription of that name exists.

    Attributes:
        stream_uuid, subscription_name: the subscription.
    """

    @staticmethod
    def _default(stream_uuid: str | None, name: str | None) -> str:
        return f"no subscription {name!r} on {shown(stream_uuid)}"


class TooManySubscribersError(_SubscriptionError):
    """A competing-consumer subscription is already at its `concurrency_limit`.

    Attributes:
        stream_uuid, subscription_name: the subscription.
        concurrency_limit: its limit.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        stream_uuid: str | None = None,
        subscription_name: str | None = None,
        concurrency_limit: int | None = None,
    ) -> None:
        super().__init__(
            message
            or f"subscription {subscription_name!r} already has {concurrency_limit} subscriber(s)",
            stream_uuid=stream_uuid,
            subscription_name=subscription_name,
        )
        self.concurrency_limit = concurrency_limit


class InvalidStartFromError(EventStoreError, ValueError):
    """`start_from` is not ORIGIN, CURRENT or a non-negative event number.

    Attributes:
        start_from: the value given.
    """

    def __init__(self, message: str | None = None, *, start_from: object = None) -> None:
        super().__init__(
            message
            or f"start_from: expected ORIGIN, CURRENT or an event number >= 0, got {start_from!r}"
        )
        self.start_from = start_from


class UnexpectedAckError(EventStoreError, ValueError):
    """An ack names an event that is not in flight for this subscriber.

    Attributes:
        event_number: the acknowledged event number.
    """

    def __init__(self, message: str | None = None, *, event_number: int | None = None) -> None:
        super().__init__(message or f"event {event_number} is not in flight for this subscriber")
        self.event_number = event_number


class SubscriptionFailedError(_SubscriptionError):
    """The subscription stopped because of an error (its `__cause__` says which).

    Attributes:
        stream_uuid, subscription_name: the subscription.
    """

    @staticmethod
    def _default(stream_uuid: str | None, name: str | None) -> str:
        return f"subscription {name!r} failed"


class CheckpointFailedError(SubscriptionFailedError):
    """The checkpoint could not be persisted when a subscription's ``async with`` block
    exited (raised from the block's exit, unless another error is already leaving it,
    which is then only logged). Nothing is lost: the events acknowledged after
    ``last_persisted`` are delivered again when the subscription next starts.

    Attributes:
        stream_uuid, subscription_name: the subscription.
        checkpoint: the event number that was to be persisted.
        last_persisted: the checkpoint that is stored.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        stream_uuid: str | None = None,
        subscription_name: str | None = None,
        checkpoint: int | None = None,
        last_persisted: int | None = None,
    ) -> None:
        super().__init__(
            message
            or f"subscription {subscription_name!r}: the checkpoint {checkpoint} could not be "
            f"persisted; events after {last_persisted} will be delivered again",
            stream_uuid=stream_uuid,
            subscription_name=subscription_name,
        )
        self.checkpoint = checkpoint
        self.last_persisted = last_persisted


class NotSupportedError(EventStoreError):
    """The operation is disabled by configuration (e.g. hard deletes)."""


class StorageUnavailableError(EventStoreError, trio.BrokenResourceError):
    """The database cannot be reached, or the connection to it broke (retrying later
    may succeed)."""


class PoolOverloadedError(StorageUnavailableError):
    """No pooled connection came free in time (see ``queue_target``/``queue_interval``):
    the pool is overloaded; retry later, or give it more connections."""


class AuthenticationError(StorageUnavailableError):
    """The database server refused to authenticate the connection: a wrong password
    (SQLSTATE 28P01), or (28000) a role that does not exist or may not log in, or a
    failed certificate or peer authentication. The password is never shown."""


class AccessRejectedError(AuthenticationError):
    """The server's ``pg_hba.conf`` refused the connection before any password was
    checked: no line admits this host, user, database and encryption (TLS or not), or a
    ``reject`` line matches. Not a wrong password: the server's administrator decides,
    or a TLS connection (``ssl_mode``) may be admitted where a plain one is not.

    Attributes:
        host, user, database: as the server names them (None when it did not).
        encryption: ``"SSL encryption"``, ``"GSS encryption"`` or ``"no encryption"``
            (None when the server did not say).
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        host: str | None = None,
        user: str | None = None,
        database: str | None = None,
        encryption: str | None = None,
    ) -> None:
        super().__init__(
            message
            or f"the server's pg_hba.conf refused the connection (host {host!r}, user {user!r}, "
            f"database {database!r}, {encryption or 'encryption unknown'})"
        )
        self.host = host
        self.user = user
        self.database = database
        self.encryption = encryption


class TLSError(EventStoreError):
    """A TLS connection could not be made: the server's certificate was not accepted (it
    does not chain to ``ssl_root_cert``, or does not name the host under
    ``verify-full``), the server refused the client certificate, the server does not
    offer TLS where ``ssl_mode`` requires it, or a certificate or key file cannot be
    read. Not a `StorageUnavailableError`: retrying will not help."""


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
        detail: the server's DETAIL line, when there is one.
    """

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        constraint_name: str | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.constraint_name = constraint_name
        self.detail = detail


class InsufficientPrivilegeError(DatabaseError):
    """The connected role lacks a privilege the operation needs (SQLSTATE 42501): the
    message names the privilege and, from the admin tasks, the role to run them as.

    Attributes:
        role: the connected role (None when unknown).
        privilege: what was missing, e.g. ``"CREATE on database 'bank'"`` (None when
            only the server's message says).
    """

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = "42501",
        constraint_name: str | None = None,
        detail: str | None = None,
        role: str | None = None,
        privilege: str | None = None,
    ) -> None:
        super().__init__(message, sqlstate=sqlstate, constraint_name=constraint_name, detail=detail)
        self.role = role
        self.privilege = privilege


class DatabaseNotFoundError(DatabaseError, LookupError):
    """The database does not exist on the server (SQLSTATE 3D000): create it
    (``trio-eventstore create``). Not a `StorageUnavailableError`: retrying will not help.

    Attributes:
        database: the database's name.
    """

    def __init__(
        self, message: str | None = None, *, database: str | None = None, sqlstate: str = "3D000"
    ) -> None:
        super().__init__(
            message
            or f"database {database!r} does not exist: create it with `trio-eventstore create`",
            sqlstate=sqlstate,
        )
        self.database = database


@contextlib.contextmanager
def single_errors() -> Iterator[None]:
    """Never hand the caller an ExceptionGroup that holds a single error: re-raise the
    error itself (trio nurseries wrap even one error in a group); nor one that holds
    only `trio.Cancelled` (tasks of an internal nursery cancelled together): re-raise
    the first."""
    try:
        yield
    except BaseExceptionGroup as group:
        inner: BaseException = group
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if inner is group:
            cancelled, rest = group.split(trio.Cancelled)
            if cancelled is None or rest is not None:
                raise
            first: BaseException = cancelled
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        raise inner from inner.__cause__
