"""`open_event_store()` and the `EventStore` facade."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import trio

from . import _schema_state, _snapshots, _storage, _writer
from ._appends import refuse_repeated_ids
from ._arguments import (
    check_bool,
    check_events,
    check_expected_version,
    check_int,
    check_stream,
    check_target,
    parse_event_id,
)
from ._config import EventStoreConfig
from ._errors import (
    InsufficientPrivilegeError,
    NotSupportedError,
    StorageUnavailableError,
    single_errors,
)
from ._locks import LockKeeper, run_lock_keeper
from ._notifications import Notifier, run_notifier
from ._pg import Database, open_database, waiting_out_overload
from ._serialization import JsonSerializer, Serializer
from ._sql import STREAM_SORT_COLUMNS, quote_ident
from ._statistics import EventStoreStatistics, store_statistics
from ._storable import check_storable
from ._store_subscriptions import SubscriptionMethods
from ._subscriptions import Subscriptions
from ._types import (
    ALL_STREAMS,
    MAX_BIGINT,
    EventData,
    ExpectedVersion,
    Page,
    RecordedEvent,
    SnapshotData,
    StreamInfo,
    check_text,
)
from ._writer import GroupCommitWriter

__all__ = ["EventStore", "EventStoreStatistics", "open_event_store"]

logger = logging.getLogger("trio_eventstore.subscriptions")


class EventStore(SubscriptionMethods):
    """A store opened by `open_event_store`. Do not construct it yourself.

    Once the store's ``async with`` block has exited, every method but `statistics`
    raises `EventStoreClosedError` (a `trio.ClosedResourceError`) when called.
    """

    def __init__(
        self,
        config: EventStoreConfig,
        database: Database,
        subscriptions: Subscriptions,
        writer: GroupCommitWriter | None,
    ) -> None:
        self._config = config
        self._db = database
        self._subscriptions = subscriptions
        self._writer = writer
        self._metrics = subscriptions.metrics

    @property
    def config(self) -> EventStoreConfig:
        """The configuration the store was opened with (after ``init``)."""
        return self._config

    def _check_open(self) -> None:
        """Raise `EventStoreClosedError` once the store's block has exited."""
        self._subscriptions.check_open()

    async def stream_info(self, stream_uuid: str) -> StreamInfo:
        """Information on one stream (``"$all"`` included).

        Ports ``EventStore.stream_info/2``.

        Raises:
            StreamNotFoundError: no such stream.
        """
        self._check_open()
        check_stream(stream_uuid)
        return await _storage.stream_info(self._db, stream_uuid)

    async def append_to_stream(
        self,
        stream_uuid: str,
        expected_version: ExpectedVersion | int,
        events: Sequence[EventData],
    ) -> int:
        """Append events to a stream, all or nothing; returns the stream's new version.

        Ports ``EventStore.append_to_stream/4``. One statement, one round trip, whatever
        the expected version and however many events. With ``config.group_commit``
        (the default), appends from concurrent callers are written together, one
        commit for all; each caller gets its own outcome.

        Cancellation: an append cancelled before it is sent writes nothing; one
        cancelled while in flight may have committed (as with any driver's COMMIT).
        To retry safely, reuse the same event ids: `DuplicateEventError` then means
        the first attempt is there (the expected version is checked first: with
        ``NO_STREAM`` or a number, read the stream to see whether the ids are there).

        Raises:
            WrongExpectedVersionError: the stream is not at ``expected_version``.
            StreamExistsError: ``NO_STREAM`` was expected but the stream has events.
            StreamNotFoundError: ``STREAM_EXISTS`` was expected but there is no stream.
            StreamDeletedError: the stream was soft-deleted.
            DuplicateEventError: an event id is already stored.
            SerializationError: event data cannot be serialized, or would not read back
                as itself (nothing is written).
            UnknownEventTypeError: a strict serializer has no class for an event's type.
            EventTooLargeError: the events are larger than PostgreSQL takes in one append.
            StorageUnavailableError: the database could not be reached, or the connection
                failed while the append was in flight (it may have committed: retry with
                the same event ids). Not for a busy pool: an append waits for a connection.
            EventStoreClosedError: the store is closed, or closed while the append was
                queued (nothing written) or in flight (it may have committed).
            TypeError, ValueError: bad arguments (before any I/O).
        """
        self._check_open()
        check_target(stream_uuid)
        check_expected_version(expected_version)
        event_list = check_events(events, EventData, "events")
        serializer = self._config.serializer
        _check_readable(serializer, event_list)
        encoded = _storage.encode_events(serializer, event_list)
        check_storable(encoded, self._config.column_data_type)
        request = _storage.AppendRequest.build(stream_uuid, expected_version, encoded)
        subscriptions, metrics = self._subscriptions, self._metrics
        tracing = metrics.tracing
        span = (
            None
            if tracing is None
            else tracing.start_span(
                "eventstore.append",
                {"eventstore.stream": stream_uuid, "eventstore.events": len(event_list)},
            )
        )
        token = subscriptions.append_started(stream_uuid)
        started = time.perf_counter()
        try:
            if self._writer is not None:
                # The writer hands the events to this store's subscriptions itself.
                if len(encoded) < _writer.ALONE_EVENTS:
                    appended = await self._writer.append(request)
                else:
                    appended = await self._writer.write_big(request)
            else:
                # Readers holding every pooled connection make it wait, not fail, as
                # the writer's appends do (an overloaded pool refuses before sending).
                appended = await waiting_out_overload(
                    functools.partial(_storage.append, self._db, request)
                )
                subscriptions.appended(request, appended)
        except BaseException as exc:
            if isinstance(exc, Exception):
                metrics.append_failed(exc)
            if span is not None:
                span.end(exc)
            raise
        finally:
            subscriptions.append_finished(token)
        metrics.append_latency.observe(time.perf_counter() - started)
        metrics.appends += 1
        metrics.appended_events += len(event_list)
        if span is not None:
            span.end()
        return appended.version

    async def link_to_stream(
        self,
        stream_uuid: str,
        expected_version: ExpectedVersion | int,
        events_or_event_ids: Sequence[RecordedEvent | uuid.UUID | str],
    ) -> int:
        """Link existing events into a stream (they keep their original stream and
        version); returns the stream's new version. Ports ``link_to_stream/4``; the
        expected version is checked under the stream's row lock (race-free).

        Raises:
            WrongExpectedVersionError, StreamExistsError, StreamNotFoundError,
            StreamDeletedError: as for `append_to_stream`.
            EventNotFoundError: an event does not exist.
            DuplicateEventError: an event is already in the stream, or given twice.
        """
        self._check_open()
        check_target(stream_uuid)
        check_expected_version(expected_version)
        items = check_events(events_or_event_ids, (RecordedEvent, uuid.UUID, str), "events")
        ids = [
            item.event_id if isinstance(item, RecordedEvent) else parse_event_id(item, "events")
            for item in items
        ]
        refuse_repeated_ids(stream_uuid, ids)
        return await _storage.link(self._db, stream_uuid, expected_version, ids)

    async def read_stream_forward(
        self, stream_uuid: str, start_version: int = 0, count: int = 1000
    ) -> list[RecordedEvent]:
        """Events of a stream from ``start_version`` (inclusive; 0 = the first), oldest
        first. ``"$all"`` reads every event by event number.

        Raises:
            StreamNotFoundError, StreamDeletedError.
        """
        self._check_open()
        check_stream(stream_uuid)
        check_int("start_version", start_version, minimum=0)
        check_int("count", count, minimum=1)
        return await self._read(stream_uuid, start_version, count, forward=True)

    async def read_stream_backward(
        self, stream_uuid: str, start_version: int = -1, count: int = 1000
    ) -> list[RecordedEvent]:
        """Events of a stream from ``start_version`` (inclusive; -1 = the last), newest first.

        Raises:
            StreamNotFoundError, StreamDeletedError.
        """
        self._check_open()
        check_stream(stream_uuid)
        check_int("start_version", start_version, minimum=-1)
        check_int("count", count, minimum=1)
        return await self._read(stream_uuid, start_version, count, forward=False)

    async def _read(
        self, stream_uuid: str, start_version: int, count: int, *, forward: bool
    ) -> list[RecordedEvent]:
        metrics = self._metrics
        tracing = metrics.tracing
        span = (
            None
            if tracing is None
            else tracing.start_span(
                "eventstore.read",
                {"eventstore.stream": stream_uuid, "eventstore.forward": forward},
            )
        )
        started = time.perf_counter()
        try:
            events = await _storage.read(
                self._db, stream_uuid, start_version, count, forward=forward
            )
        except BaseException as exc:
            if span is not None:
                span.end(exc)
            raise
        metrics.read_latency.observe(time.perf_counter() - started)
        metrics.reads += 1
        metrics.read_events += len(events)
        if span is not None:
            span.end()
        return events

    async def read_all_streams_forward(
        self, start_version: int = 0, count: int = 1000
    ) -> list[RecordedEvent]:
        """Every event in commit order, from event number ``start_version``."""
        return await self.read_stream_forward(ALL_STREAMS, start_version, count)

    async def read_all_streams_backward(
        self, start_version: int = -1, count: int = 1000
    ) -> list[RecordedEvent]:
        """Every event, newest first, from event number ``start_version`` (-1: the last)."""
        return await self.read_stream_backward(ALL_STREAMS, start_version, count)

    def stream_forward(
        self, stream_uuid: str, *, start_version: int = 0, read_batch_size: int = 1000
    ) -> AsyncIterator[RecordedEvent]:
        """Iterate a stream oldest first, reading pages of ``read_batch_size``; no
        connection is held between pages."""
        self._check_open()
        check_stream(stream_uuid)
        check_int("start_version", start_version, minimum=0)
        check_int("read_batch_size", read_batch_size, minimum=1)
        return self._stream_forward(stream_uuid, start_version, read_batch_size)

    async def _stream_forward(
        self, stream_uuid: str, start_version: int, read_batch_size: int
    ) -> AsyncIterator[RecordedEvent]:
        position = start_version
        while True:
            page = await self.read_stream_forward(stream_uuid, position, read_batch_size)
            for event in page:
                yield event
            if len(page) < read_batch_size:
                return
            position = page[-1].event_number + 1

    def stream_backward(
        self, stream_uuid: str, *, start_version: int = -1, read_batch_size: int = 1000
    ) -> AsyncIterator[RecordedEvent]:
        """Iterate a stream newest first, in pages of ``read_batch_size``."""
        self._check_open()
        check_stream(stream_uuid)
        check_int("start_version", start_version, minimum=-1)
        check_int("read_batch_size", read_batch_size, minimum=1)
        return self._stream_backward(stream_uuid, start_version, read_batch_size)

    async def _stream_backward(
        self, stream_uuid: str, start_version: int, read_batch_size: int
    ) -> AsyncIterator[RecordedEvent]:
        position = start_version
        while True:
            page = await self.read_stream_backward(stream_uuid, position, read_batch_size)
            for event in page:
                yield event
            if len(page) < read_batch_size or page[-1].event_number <= 1:
                return
            position = page[-1].event_number - 1

    def stream_all_forward(
        self, *, start_version: int = 0, read_batch_size: int = 1000
    ) -> AsyncIterator[RecordedEvent]:
        """Iterate ``$all`` in commit order."""
        return self.stream_forward(
            ALL_STREAMS, start_version=start_version, read_batch_size=read_batch_size
        )

    def stream_all_backward(
        self, *, start_version: int = -1, read_batch_size: int = 1000
    ) -> AsyncIterator[RecordedEvent]:
        """Iterate ``$all`` newest first."""
        return self.stream_backward(
            ALL_STREAMS, start_version=start_version, read_batch_size=read_batch_size
        )

    async def paginate_streams(
        self,
        *,
        page_size: int = 50,
        page_number: int = 1,
        search: str | None = None,
        sort_by: str = "stream_id",
        sort_dir: str = "asc",
    ) -> Page:
        """A page of streams, ``$all`` (stream_id 0) included as in Elixir.

        Args:
            search: only streams whose id contains this text, case-sensitively (Elixir's
                ``LIKE``); unlike Elixir, ``%``, ``_`` and ``\\`` match themselves, not
                as wildcards. ``None`` or ``""``: every stream.
            sort_by: ``stream_id``, ``stream_uuid``, ``stream_version``, ``created_at`` or
                ``deleted_at`` (streams not deleted last when ascending, as in Postgres);
                ties in stream_id order.
            sort_dir: ``asc`` or ``desc``.

        Ports ``EventStore.paginate_streams/1``.
        """
        self._check_open()
        check_int("page_size", page_size, minimum=1)
        check_int("page_number", page_number, minimum=1)
        if search is not None:
            if not isinstance(search, str):
                raise TypeError("search: expected a str or None")
            check_text("search", search)
        if (page_number - 1) * page_size > MAX_BIGINT:
            raise ValueError("page_number: the page starts beyond the last possible stream")
        if sort_by not in STREAM_SORT_COLUMNS:
            raise ValueError(
                f"sort_by: expected one of {', '.join(STREAM_SORT_COLUMNS)}, got {sort_by!r}"
            )
        if not isinstance(sort_dir, str) or sort_dir.lower() not in ("asc", "desc"):
            raise ValueError(f"sort_dir: expected 'asc' or 'desc', got {sort_dir!r}")
        return await _storage.paginate_streams(
            self._db,
            page_size=page_size,
            page_number=page_number,
            search=search,
            sort_by=sort_by,
            sort_dir=sort_dir,
        )

    async def delete_stream(
        self, stream_uuid: str, expected_version: ExpectedVersion | int, *, hard: bool = False
    ) -> None:
        """Delete a stream: soft (reads and appends then raise `StreamDeletedError`) or
        hard (its own events and every link to them are removed; events only linked
        into it stay; needs ``enable_hard_deletes``).

        Raises:
            NotSupportedError: ``hard=True`` without ``enable_hard_deletes``.
            StreamNotFoundError, StreamDeletedError, WrongExpectedVersionError.
        """
        self._check_open()
        check_target(stream_uuid, written=False)
        check_expected_version(expected_version)
        check_bool("hard", hard)
        if hard and not self._config.enable_hard_deletes:
            raise NotSupportedError("hard deletes are disabled (config enable_hard_deletes)")
        await _storage.delete_stream(self._db, stream_uuid, expected_version, hard=hard)

    async def record_snapshot(self, snapshot: SnapshotData) -> None:
        """Record (or replace) the snapshot of ``snapshot.source_uuid``."""
        self._check_open()
        if not isinstance(snapshot, SnapshotData):
            raise TypeError(f"snapshot: expected SnapshotData, got {type(snapshot).__name__}")
        serializer = self._config.serializer
        if isinstance(serializer, JsonSerializer) and snapshot.source_type:
            serializer.check_readable(snapshot.data, snapshot.source_type, name="source_type")
        await _snapshots.record_snapshot(self._db, snapshot)

    async def read_snapshot(self, source_uuid: str) -> SnapshotData:
        """The snapshot of ``source_uuid``. Raises SnapshotNotFoundError."""
        self._check_open()
        check_stream(source_uuid, "source_uuid")
        return await _snapshots.read_snapshot(self._db, source_uuid)

    async def delete_snapshot(self, source_uuid: str) -> None:
        """Delete the snapshot of ``source_uuid`` (nothing happens if there is none)."""
        self._check_open()
        check_stream(source_uuid, "source_uuid")
        await _snapshots.delete_snapshot(self._db, source_uuid)

    def statistics(self) -> EventStoreStatistics:
        """A snapshot of the store's figures: pool, connections, appends, reads,
        deliveries and each persistent subscription (sync, no I/O)."""
        return store_statistics(self._config, self._db, self._subscriptions, self._writer)

    def __repr__(self) -> str:
        return (
            f"<EventStore schema={self._config.schema!r} database={self._config.database_name!r}>"
        )


def _check_readable(serializer: Serializer, events: list[EventData]) -> None:
    """Events given an explicit type must read back as written (`JsonSerializer` only)."""
    if isinstance(serializer, JsonSerializer):
        for event in events:
            if event.event_type is not None:
                serializer.check_readable(event.data, event.event_type)


@contextlib.asynccontextmanager
async def open_event_store(config: EventStoreConfig) -> AsyncIterator[EventStore]:
    """Open the store: its connection pool and, inside its nursery, its background tasks.

    Yields only once everything is live. Use it inside your own nursery or ``trio.run``;
    leaving the block stops everything.

    Raises:
        StorageUnavailableError: the server cannot be reached within ``config.timeout``.
        AuthenticationError: the server rejected the credentials.
        AccessRejectedError: the server's pg_hba.conf admits no such connection.
        TLSError: TLS could not be set up as ``ssl_mode`` requires.
        InsufficientPrivilegeError: the role may not connect to the database (CONNECT).
        DatabaseNotFoundError: the database does not exist (run ``create``).
        SchemaNotInitializedError: the schema holds no event store (run ``init``).
        SchemaMismatchError: the schema was initialised with another ``column_data_type``
            or is at another layout version.
    """
    if not isinstance(config, EventStoreConfig):
        raise TypeError(f"config: expected an EventStoreConfig, got {type(config).__name__}")
    if config.init is not None:
        configured = config.init(config)
        if not isinstance(configured, EventStoreConfig):
            raise TypeError(
                f"config.init: must return an EventStoreConfig, got {type(configured).__name__}"
            )
        config = configured
    with single_errors():
        async with open_database(config) as database:
            state = await database.run(
                lambda conn: _schema_state.read_schema_state(conn, config.schema)
            )
            _schema_state.check_schema(state, config)
            assert state.lock_key is not None
            async with trio.open_nursery() as nursery:
                await nursery.start(database.watch_statements)
                notifier = Notifier(config, database)
                await nursery.start(run_notifier, notifier)
                locks = LockKeeper(config)
                await nursery.start(run_lock_keeper, locks)
                subscriptions = Subscriptions(
                    config, database, notifier, locks, state.lock_key, nursery
                )
                async with _appends_database(config) as appends:
                    writer = None
                    if config.group_commit:
                        writer = GroupCommitWriter(appends or database, subscriptions.appended)
                        await nursery.start(writer.run)
                    try:
                        yield EventStore(config, database, subscriptions, writer)
                    finally:
                        await subscriptions.close()
                    nursery.cancel_scope.cancel()


#: ``replica_appends``: the writer's connections (batches in flight, big appends).
APPEND_CONNECTIONS = _writer.MAX_IN_FLIGHT + _writer.MAX_BIG_IN_FLIGHT


@contextlib.asynccontextmanager
async def _appends_database(config: EventStoreConfig) -> AsyncIterator[Database | None]:
    """With ``replica_appends``, the writer's own connections (`Database.replica`),
    checked (`_schema_state.check_replica_appends`); otherwise None.

    Raises:
        InsufficientPrivilegeError: the role may not set session_replication_role.
        NotSupportedError: the schema's tables carry triggers, foreign keys, rules or
            deferrable constraints of their own, or the setting did not hold or was
            refused (PgBouncer).
    """
    if not config.replica_appends:
        yield None
        return
    size = min(config.pool_size, APPEND_CONNECTIONS)
    async with contextlib.AsyncExitStack() as stack:
        try:
            database = await stack.enter_async_context(
                open_database(config.with_changes(pool_size=size), replica=True)
            )
        except InsufficientPrivilegeError as exc:
            role = quote_ident(exc.role) if exc.role else "<role>"
            raise InsufficientPrivilegeError(
                f"replica_appends: the role may not set session_replication_role ({exc}); "
                "a superuser can allow it: GRANT SET ON PARAMETER session_replication_role "
                f"TO {role} (PostgreSQL 15 or later)",
                role=exc.role,
                privilege="SET on parameter session_replication_role",
            ) from exc
        except StorageUnavailableError as exc:
            if "session_replication_role" not in str(exc):
                raise
            # PgBouncer: "unsupported startup parameter: session_replication_role"
            raise NotSupportedError(
                "replica_appends: the server refused session_replication_role as a "
                f"connection setting ({exc}); a connection pooler such as PgBouncer is "
                "in between? replica_appends needs a direct connection to PostgreSQL: "
                "point url at the server, or open the store without replica_appends"
            ) from exc
        await database.run(lambda conn: _schema_state.check_replica_appends(conn, config.schema))
        yield database
