"""`open_event_store()` and the `EventStore` facade."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from types import TracebackType
from typing import Any, Literal

import trio

from . import _parking, _schema_state, _snapshots, _storage
from ._config import EventStoreConfig
from ._errors import (
    NotSupportedError,
    SubscriptionAlreadyExistsError,
    SubscriptionNotFoundError,
    single_errors,
)
from ._locks import LockKeeper, run_lock_keeper
from ._notifications import Notifier, run_notifier
from ._pg import Database, open_database
from ._serialization import JsonSerializer, Serializer, check_storable
from ._sql import STREAM_SORT_COLUMNS
from ._statistics import EventStoreStatistics, store_statistics
from ._subscription_types import (
    DEFAULT_MAX_BUFFER_BYTES,
    DEFAULT_RETRY_POLICY,
    ParkedEvent,
    RetryPolicy,
    SubscriptionOptions,
)
from ._subscriptions import Subscription, Subscriptions
from ._transient import TransientSubscription
from ._types import (
    ALL_STREAMS,
    MAX_BIGINT,
    EventData,
    ExpectedVersion,
    Page,
    RecordedEvent,
    SnapshotData,
    StartFrom,
    StreamInfo,
    check_text,
)
from ._writer import GroupCommitWriter

__all__ = ["EventStore", "EventStoreStatistics", "open_event_store"]

logger = logging.getLogger("trio_eventstore.subscriptions")


class EventStore:
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
        _check_stream(stream_uuid)
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
        the first attempt is there.

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
        """
        self._check_open()
        _check_target(stream_uuid)
        _check_expected_version(expected_version)
        event_list = _check_events(events, EventData, "events")
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
                # The writer hands the events to this store's subscriptions itself, in
                # commit order.
                appended = await self._writer.append(request)
            else:
                appended = await _storage.append(self._db, request)
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
            DuplicateEventError: an event is already in the stream.
        """
        self._check_open()
        _check_target(stream_uuid)
        _check_expected_version(expected_version)
        items = _check_events(events_or_event_ids, (RecordedEvent, uuid.UUID, str), "events")
        ids: list[uuid.UUID] = []
        for item in items:
            if isinstance(item, RecordedEvent):
                ids.append(item.event_id)
            elif isinstance(item, uuid.UUID):
                ids.append(item)
            else:
                try:
                    ids.append(uuid.UUID(item))
                except ValueError:
                    raise ValueError(f"events: not an event id: {item!r}") from None
        if len(set(ids)) != len(ids):
            raise ValueError("events: the same event is given twice")
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
        _check_stream(stream_uuid)
        _check_int("start_version", start_version, minimum=0)
        _check_int("count", count, minimum=1)
        return await self._read(stream_uuid, start_version, count, forward=True)

    async def read_stream_backward(
        self, stream_uuid: str, start_version: int = -1, count: int = 1000
    ) -> list[RecordedEvent]:
        """Events of a stream from ``start_version`` (inclusive; -1 = the last), newest first.

        Raises:
            StreamNotFoundError, StreamDeletedError.
        """
        self._check_open()
        _check_stream(stream_uuid)
        _check_int("start_version", start_version, minimum=-1)
        _check_int("count", count, minimum=1)
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
        _check_stream(stream_uuid)
        _check_int("start_version", start_version, minimum=0)
        _check_int("read_batch_size", read_batch_size, minimum=1)
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
        _check_stream(stream_uuid)
        _check_int("start_version", start_version, minimum=-1)
        _check_int("read_batch_size", read_batch_size, minimum=1)
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
        _check_int("page_size", page_size, minimum=1)
        _check_int("page_number", page_number, minimum=1)
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
        _check_target(stream_uuid)
        _check_expected_version(expected_version)
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
            serializer.check_readable(snapshot.data, snapshot.source_type)
        await _snapshots.record_snapshot(self._db, snapshot)

    async def read_snapshot(self, source_uuid: str) -> SnapshotData:
        """The snapshot of ``source_uuid``. Raises SnapshotNotFoundError."""
        self._check_open()
        _check_stream(source_uuid, "source_uuid")
        return await _snapshots.read_snapshot(self._db, source_uuid)

    async def delete_snapshot(self, source_uuid: str) -> None:
        """Delete the snapshot of ``source_uuid`` (nothing happens if there is none)."""
        self._check_open()
        _check_stream(source_uuid, "source_uuid")
        await _snapshots.delete_snapshot(self._db, source_uuid)

    def subscribe(
        self,
        stream_uuid: str,
        *,
        selector: Callable[[RecordedEvent], bool] | None = None,
        mapper: Callable[[RecordedEvent], Any] | None = None,
    ) -> contextlib.AbstractAsyncContextManager[TransientSubscription]:
        """A transient subscription: iterate batches of the events appended to the stream
        (or ``"$all"``) after subscribing, until the block exits. No checkpoint, no lock.

        Ports ``EventStore.subscribe/2``.
        """
        self._check_open()
        _check_stream(stream_uuid)
        for name, fn in (("selector", selector), ("mapper", mapper)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name}: expected a callable or None")
        return self._subscribe(stream_uuid, selector, mapper)

    @contextlib.asynccontextmanager
    async def _subscribe(
        self,
        stream_uuid: str,
        selector: Callable[[RecordedEvent], bool] | None,
        mapper: Callable[[RecordedEvent], Any] | None,
    ) -> AsyncIterator[TransientSubscription]:
        yield await self._subscriptions.transient(stream_uuid, selector, mapper)

    def subscribe_to_stream(
        self,
        stream_uuid: str,
        subscription_name: str,
        *,
        start_from: StartFrom | int = StartFrom.ORIGIN,
        concurrency_limit: int | None = None,
        partition_by: Callable[[RecordedEvent], Hashable] | None = None,
        buffer_size: int = 1,
        max_size: int = 1000,
        max_buffer_bytes: int | None = DEFAULT_MAX_BUFFER_BYTES,
        checkpoint_threshold: int = 1,
        checkpoint_after: float = 0.0,
        selector: Callable[[RecordedEvent], bool] | None = None,
        mapper: Callable[[RecordedEvent], Any] | None = None,
        retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
        undecodable: Literal["park", "deliver"] = "park",
    ) -> contextlib.AbstractAsyncContextManager[Subscription]:
        """A persistent subscription: iterate batches, `Subscription.ack` them; the
        checkpoint survives restarts and one store at a time (cluster-wide, through
        Postgres advisory locks) delivers a given name. Leaving the block persists the
        last ack.

        Reading ahead stops at ``max_size`` events or ``max_buffer_bytes`` bytes of event
        data and metadata held (read and not acknowledged; None: no byte bound), and
        resumes once half of both is free; a page always holds at least one event, so
        the subscription may hold ``max_buffer_bytes`` plus one event.

        ``retry_policy`` says how often an event given back with `Subscription.nack`
        is delivered again before it is parked (see `RetryPolicy`). An event the
        serializer cannot decode is parked (``undecodable="park"``) or delivered as an
        `UndecodedEvent` (``"deliver"``); either way the others are delivered.

        Ports ``EventStore.subscribe_to_stream/4``.

        Raises:
            SubscriptionAlreadyExistsError: the name is active in this store (and no
                ``concurrency_limit`` lets several consumers share it).
            TooManySubscribersError: ``concurrency_limit`` consumers already share it.
            InvalidStartFromError: ``start_from`` is not ORIGIN, CURRENT or an int >= 0.
            CheckpointFailedError: (from the block's exit) the last acknowledgements could
                not be persisted; they are delivered again next time.
        """
        self._check_open()
        _check_stream(stream_uuid)
        _check_stream(subscription_name, "subscription_name")
        options = SubscriptionOptions(
            start_from=start_from,
            concurrency_limit=concurrency_limit,
            partition_by=partition_by,
            buffer_size=buffer_size,
            max_size=max_size,
            max_buffer_bytes=max_buffer_bytes,
            checkpoint_threshold=checkpoint_threshold,
            checkpoint_after=checkpoint_after,
            selector=selector,
            mapper=mapper,
            retry_policy=retry_policy,
            undecodable=undecodable,
        )
        return self._subscribe_to_stream(stream_uuid, subscription_name, options)

    def _subscribe_to_stream(
        self, stream_uuid: str, subscription_name: str, options: SubscriptionOptions
    ) -> _Joined:
        return _Joined(self._subscriptions, stream_uuid, subscription_name, options)

    def subscribe_to_all_streams(
        self,
        subscription_name: str,
        *,
        start_from: StartFrom | int = StartFrom.ORIGIN,
        concurrency_limit: int | None = None,
        partition_by: Callable[[RecordedEvent], Hashable] | None = None,
        buffer_size: int = 1,
        max_size: int = 1000,
        max_buffer_bytes: int | None = DEFAULT_MAX_BUFFER_BYTES,
        checkpoint_threshold: int = 1,
        checkpoint_after: float = 0.0,
        selector: Callable[[RecordedEvent], bool] | None = None,
        mapper: Callable[[RecordedEvent], Any] | None = None,
        retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
        undecodable: Literal["park", "deliver"] = "park",
    ) -> contextlib.AbstractAsyncContextManager[Subscription]:
        """`subscribe_to_stream` on ``"$all"`` (event numbers are global); the same
        options.

        Ports ``EventStore.subscribe_to_all_streams/3``.
        """
        return self.subscribe_to_stream(
            ALL_STREAMS,
            subscription_name,
            start_from=start_from,
            concurrency_limit=concurrency_limit,
            partition_by=partition_by,
            buffer_size=buffer_size,
            max_size=max_size,
            checkpoint_threshold=checkpoint_threshold,
            checkpoint_after=checkpoint_after,
            selector=selector,
            mapper=mapper,
            max_buffer_bytes=max_buffer_bytes,
            retry_policy=retry_policy,
            undecodable=undecodable,
        )

    async def delete_subscription(self, stream_uuid: str, subscription_name: str) -> None:
        """Delete a persistent subscription's row (its checkpoint).

        Raises:
            SubscriptionAlreadyExistsError: it is active in this store: leave it first.
            SubscriptionNotFoundError: there is no such subscription.
        """
        self._check_open()
        _check_stream(stream_uuid)
        _check_stream(subscription_name, "subscription_name")
        if any(
            d.stream_uuid == stream_uuid and d.name == subscription_name
            for d in self._subscriptions.active()
        ):
            raise SubscriptionAlreadyExistsError(
                f"subscription {subscription_name!r} is active in this store; leave it first",
                stream_uuid=stream_uuid,
                subscription_name=subscription_name,
            )
        if not await _storage.delete_subscription(self._db, stream_uuid, subscription_name):
            raise SubscriptionNotFoundError(
                stream_uuid=stream_uuid, subscription_name=subscription_name
            )

    async def parked_events(self, stream_uuid: str, subscription_name: str) -> list[ParkedEvent]:
        """The events a persistent subscription has parked and not yet replayed or
        discarded, by position (see `Subscription.nack` and `RetryPolicy`)."""
        self._check_open()
        _check_stream(stream_uuid)
        _check_stream(subscription_name, "subscription_name")
        return await _parking.list_parked(self._db, stream_uuid, subscription_name)

    async def replay_parked(
        self,
        stream_uuid: str,
        subscription_name: str,
        event_ids: Sequence[uuid.UUID | str] | None = None,
    ) -> int:
        """Ask for parked events (all, or those of ``event_ids``) to be delivered to the
        subscription again; returns how many were asked for.

        The node holding the subscription (this store or another) delivers them, before
        new events, at least once; an event leaves the parked list once acknowledged
        (given back again, it is parked again). Without a holder, the next one does.
        """
        self._check_open()
        _check_stream(stream_uuid)
        _check_stream(subscription_name, "subscription_name")
        ids = _event_ids(event_ids)
        count = await _parking.replay_parked(self._db, stream_uuid, subscription_name, ids)
        self._subscriptions.parked_changed(stream_uuid, subscription_name)
        return count

    async def discard_parked(
        self,
        stream_uuid: str,
        subscription_name: str,
        event_ids: Sequence[uuid.UUID | str] | None = None,
    ) -> int:
        """Forget parked events (all, or those of ``event_ids``): they are never delivered
        again (their links stay in the ``$parked-<name>`` stream). Returns how many."""
        self._check_open()
        _check_stream(stream_uuid)
        _check_stream(subscription_name, "subscription_name")
        ids = _event_ids(event_ids)
        count = await _parking.discard_parked(self._db, stream_uuid, subscription_name, ids)
        self._subscriptions.parked_changed(stream_uuid, subscription_name)
        return count

    def statistics(self) -> EventStoreStatistics:
        """A snapshot of the store's figures: pool, connections, appends, reads,
        deliveries and each persistent subscription (sync, no I/O)."""
        return store_statistics(self._config, self._db, self._subscriptions, self._writer)

    def __repr__(self) -> str:
        return (
            f"<EventStore schema={self._config.schema!r} database={self._config.database_name!r}>"
        )


#: NOTIFY payloads hold "<stream_uuid>,<id>,<first>,<last>" and must stay under 8000 bytes.
MAX_STREAM_UUID_BYTES = 7900


def _check_stream(stream_uuid: object, name: str = "stream_uuid") -> None:
    if not isinstance(stream_uuid, str):
        raise TypeError(f"{name}: expected a str, got {type(stream_uuid).__name__}")
    if not stream_uuid:
        raise ValueError(f"{name}: must not be empty")
    check_text(name, stream_uuid)
    if len(stream_uuid.encode()) > MAX_STREAM_UUID_BYTES:
        raise ValueError(
            f"{name}: at most {MAX_STREAM_UUID_BYTES} bytes (it travels in NOTIFY payloads)"
        )


def _event_ids(items: Sequence[uuid.UUID | str] | None) -> list[uuid.UUID] | None:
    if items is None:
        return None
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise TypeError(f"event_ids: expected a list or None, got {type(items).__name__}")
    ids = []
    for item in items:
        try:
            ids.append(item if isinstance(item, uuid.UUID) else uuid.UUID(item))
        except (ValueError, TypeError, AttributeError):
            raise ValueError(f"event_ids: not an event id: {item!r}") from None
    return ids


def _check_target(stream_uuid: object) -> None:
    _check_stream(stream_uuid)
    if stream_uuid == ALL_STREAMS:
        raise ValueError(f"stream_uuid: {ALL_STREAMS!r} cannot be written to or deleted")


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    if value > MAX_BIGINT:
        raise ValueError(f"{name}: must be < 2**63 (PostgreSQL's bigint), got {value}")


def _check_expected_version(expected: object) -> None:
    if isinstance(expected, ExpectedVersion):
        return
    if isinstance(expected, bool) or not isinstance(expected, int):
        raise TypeError(
            "expected_version: expected ANY_VERSION, NO_STREAM, STREAM_EXISTS or an int, "
            f"got {expected!r}"
        )
    if not 0 <= expected <= MAX_BIGINT:
        raise ValueError(f"expected_version: must be >= 0 and < 2**63, got {expected}")


def _check_readable(serializer: Serializer, events: list[EventData]) -> None:
    """Events given an explicit type must read back as written (`JsonSerializer` only)."""
    if isinstance(serializer, JsonSerializer):
        for event in events:
            if event.event_type is not None:
                serializer.check_readable(event.data, event.event_type)


def _check_events(items: object, kinds: type | tuple[type, ...], name: str) -> list[Any]:
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise TypeError(f"{name}: expected a list, got {type(items).__name__}")
    if not items:
        raise ValueError(f"{name}: must not be empty")
    for item in items:
        if not isinstance(item, kinds):
            raise TypeError(f"{name}: unexpected {type(item).__name__} {item!r}")
    return list(items)


class _Joined:
    """The block of a persistent subscription (`EventStore.subscribe_to_stream`): joins
    on entry, leaves on exit. A class rather than a generator: an idle subscription keeps
    it for as long as its block runs, and this is a few hundred bytes smaller."""

    __slots__ = ("_name", "_options", "_stream_uuid", "_subscription", "_subscriptions")

    def __init__(
        self,
        subscriptions: Subscriptions,
        stream_uuid: str,
        name: str,
        options: SubscriptionOptions,
    ) -> None:
        self._subscriptions = subscriptions
        self._stream_uuid = stream_uuid
        self._name = name
        self._options = options
        self._subscription: Subscription | None = None

    async def __aenter__(self) -> Subscription:
        if self._subscription is not None:
            raise RuntimeError("a subscription's block cannot be entered twice")
        driver, consumer = await self._subscriptions.join(
            self._stream_uuid, self._name, self._options
        )
        self._subscription = Subscription(driver, consumer)
        return self._subscription

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        subscription = self._subscription
        assert subscription is not None
        subscription._end_span()
        failure = await self._subscriptions.leave(subscription._driver, subscription._consumer)
        if failure is not None:
            if exc is not None:  # the error already leaving the block wins
                logger.warning("%s", failure)
            else:
                raise failure


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
                notifier = Notifier(config, database)
                await nursery.start(run_notifier, notifier)
                locks = LockKeeper(config)
                await nursery.start(run_lock_keeper, locks)
                subscriptions = Subscriptions(
                    config, database, notifier, locks, state.lock_key, nursery
                )
                writer = None
                if config.group_commit:
                    writer = GroupCommitWriter(database, subscriptions.appended)
                    await nursery.start(writer.run)
                try:
                    yield EventStore(config, database, subscriptions, writer)
                finally:
                    subscriptions.close()
                nursery.cancel_scope.cancel()
