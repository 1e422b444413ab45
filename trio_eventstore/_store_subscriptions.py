"""The subscription half of `EventStore` (`SubscriptionMethods`): transient and
persistent subscriptions, deleting them, and their parked events."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from types import TracebackType
from typing import Any, Literal

from . import _parking, _subscription_rows
from ._arguments import check_indexed, check_stream, parse_event_ids
from ._balance import group_name, split_group_name
from ._btree import MAX_RAW_BYTES, MAX_RAW_PAIR_BYTES
from ._errors import SubscriptionAlreadyExistsError, SubscriptionNotFoundError
from ._groups import join_groups
from ._pg import Conn, Database
from ._subscription_types import (
    DEFAULT_MAX_BUFFER_BYTES,
    DEFAULT_RETRY_POLICY,
    ParkedEvent,
    RetryPolicy,
    SubscriptionOptions,
)
from ._subscriptions import Subscription, Subscriptions
from ._transient import TransientSubscription
from ._types import ALL_STREAMS, RecordedEvent, StartFrom

__all__ = ["SubscriptionMethods"]

logger = logging.getLogger("trio_eventstore.subscriptions")

#: `_parking.replay_parked` or `_parking.discard_parked`
_ParkedChange = Callable[[Database, str, str, Sequence[uuid.UUID] | None], Awaitable[int]]


class SubscriptionMethods:
    """`EventStore`'s subscription methods (`EventStore` is the class to use)."""

    _db: Database
    _subscriptions: Subscriptions

    def _check_open(self) -> None:
        raise NotImplementedError

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
        check_stream(stream_uuid)
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
        subscription = await self._subscriptions.transient(stream_uuid, selector, mapper)
        try:
            yield subscription
        finally:
            self._subscriptions.notifier.unwatch(stream_uuid)

    def subscribe_to_stream(
        self,
        stream_uuid: str,
        subscription_name: str,
        *,
        start_from: StartFrom | int = StartFrom.ORIGIN,
        concurrency_limit: int | None = None,
        partition_by: Callable[[RecordedEvent], Hashable] | None = None,
        partition_groups: int | None = None,
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
        ``partition_groups=N`` (with ``partition_by``) splits the subscription into N
        groups, each with its own row (``<name>#g<i>/<N>``), lock and checkpoint, that
        stores hold and stand by for like subscriptions: one subscription can then run on
        several processes (see ``balance_subscriptions``); one key's events stay in order.

        Ports ``EventStore.subscribe_to_stream/4``.

        Raises:
            SubscriptionAlreadyExistsError: the name is active in this store (and no
                ``concurrency_limit`` lets several consumers share it).
            TooManySubscribersError: ``concurrency_limit`` consumers already share it.
            InvalidStartFromError: ``start_from`` is not ORIGIN, CURRENT or an int >= 0.
            ValueError: (among bad arguments) ``stream_uuid`` and ``subscription_name``
                too long together for PostgreSQL's indexes: for the subscription's row,
                or for the record of an event it parks (at most 2646 bytes together of
                text that does not compress; longer if PostgreSQL compresses it).
            CheckpointFailedError: (from the block's exit) the last acknowledgements could
                not be persisted; they are delivered again next time.
        """
        self._check_open()
        check_stream(stream_uuid)
        check_stream(subscription_name, "subscription_name")
        options = SubscriptionOptions(
            start_from=start_from,
            concurrency_limit=concurrency_limit,
            partition_by=partition_by,
            partition_groups=partition_groups,
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
        _check_indexable(stream_uuid, subscription_name, options.partition_groups)
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
        partition_groups: int | None = None,
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
            partition_groups=partition_groups,
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
        """Delete a persistent subscription's row (its checkpoint) and its parked events;
        with partition groups, the row and parked events of every group (of whatever
        number of groups it ran with), in one transaction. (Held by a node of another
        store, it is deleted all the same, and that node forgets the parked events.)

        Raises:
            SubscriptionAlreadyExistsError: it (or one of its groups) is active in this
                store: leave it first.
            SubscriptionNotFoundError: there is no such subscription.
        """
        self._check_open()
        check_stream(stream_uuid)
        check_stream(subscription_name, "subscription_name")
        if any(
            d.stream_uuid == stream_uuid and subscription_name in (d.name, _subscription_of(d.name))
            for d in self._subscriptions.active()
        ):
            raise SubscriptionAlreadyExistsError(
                f"subscription {subscription_name!r} is active in this store; leave it first",
                stream_uuid=stream_uuid,
                subscription_name=subscription_name,
            )
        config = self._db.config

        async def parked_too(conn: Conn, rows: list[_subscription_rows.SubscriptionRow]) -> None:
            names = [row.name for row in rows]
            await _parking.delete_subscription_records(conn, config, stream_uuid, names)

        if not await _subscription_rows.delete_rows(
            self._db, stream_uuid, subscription_name, parked_too
        ):
            raise SubscriptionNotFoundError(
                stream_uuid=stream_uuid, subscription_name=subscription_name
            )

    async def _row_names(self, stream_uuid: str, subscription_name: str) -> list[str]:
        """The names of the subscription's rows: its own, or its partition groups'
        (`SubscriptionNotFoundError` when it has none)."""
        rows = await _subscription_rows.subscription_rows(self._db, stream_uuid, subscription_name)
        if not rows:
            raise SubscriptionNotFoundError(
                stream_uuid=stream_uuid, subscription_name=subscription_name
            )
        return [row.name for row in rows]

    async def parked_events(self, stream_uuid: str, subscription_name: str) -> list[ParkedEvent]:
        """The events a persistent subscription has parked and not yet replayed or
        discarded, by position (see `Subscription.nack` and `RetryPolicy`); those of
        every partition group, for a subscription split into groups (or pass a group's
        row name, ``<name>#g<i>/<N>``, for that group's only).

        Raises:
            SubscriptionNotFoundError: there is no such subscription.
        """
        self._check_open()
        check_stream(stream_uuid)
        check_stream(subscription_name, "subscription_name")
        parked = [
            event
            for name in await self._row_names(stream_uuid, subscription_name)
            for event in await _parking.list_parked(self._db, stream_uuid, name)
        ]
        return sorted(parked, key=lambda p: p.event.event_number)

    async def replay_parked(
        self,
        stream_uuid: str,
        subscription_name: str,
        event_ids: Sequence[uuid.UUID | str] | None = None,
    ) -> int:
        """Ask for parked events (all, or those of ``event_ids``) to be delivered to the
        subscription again (to its partition groups, for a subscription split into
        groups); returns how many were asked for.

        The node holding the subscription (this store or another) delivers them, before
        new events, at least once; an event leaves the parked list once acknowledged
        (given back again, it is parked again). Without a holder, the next one does.

        Raises:
            SubscriptionNotFoundError: there is no such subscription.
        """
        return await self._change_parked(
            _parking.replay_parked, stream_uuid, subscription_name, event_ids
        )

    async def discard_parked(
        self,
        stream_uuid: str,
        subscription_name: str,
        event_ids: Sequence[uuid.UUID | str] | None = None,
    ) -> int:
        """Forget parked events (all, or those of ``event_ids``; of every partition group,
        for a subscription split into groups): they are never delivered again (their
        links stay in the ``$parked-<name>`` stream). Returns how many.

        Raises:
            SubscriptionNotFoundError: there is no such subscription.
        """
        return await self._change_parked(
            _parking.discard_parked, stream_uuid, subscription_name, event_ids
        )

    async def _change_parked(
        self,
        change: _ParkedChange,
        stream_uuid: str,
        subscription_name: str,
        event_ids: Sequence[uuid.UUID | str] | None,
    ) -> int:
        self._check_open()
        check_stream(stream_uuid)
        check_stream(subscription_name, "subscription_name")
        ids = parse_event_ids(event_ids)
        count = 0
        for name in await self._row_names(stream_uuid, subscription_name):
            count += await change(self._db, stream_uuid, name, ids)
            self._subscriptions.parked_changed(stream_uuid, name)
        return count


#: An event id, to check that the key of a park record fits. (Where the key fits only
#: because it compresses, another event's may compress up to an 8-byte step worse.)
_SAMPLE_EVENT_ID = uuid.UUID("c3a0e5f1-9b27-4d68-8e14-70f2b6d9a35c")


def _check_indexable(stream_uuid: str, name: str, groups: int | None) -> None:
    """Raise `ValueError` unless what the subscription writes fits PostgreSQL's btree
    indexes (the server refuses it otherwise, late: when the subscription starts, or when
    it parks an event): its row (each group's), the key of an event's park record
    (snapshots) and its parked stream (streams). Pure: before any I/O."""
    for row in _row_samples(name, groups):
        group = "" if row == name else f" (with the group suffix {row[len(name) :]!r})"
        both = f"stream_uuid and subscription_name{group}"
        # The tighter limit first: its message states the limit that holds.
        key = _parking.record_key(stream_uuid, row, _SAMPLE_EVENT_ID)
        extra = len(key.encode()) - len(stream_uuid.encode()) - len(name.encode())
        check_indexed(
            both,
            "snapshot ids, where each event the subscription parks is recorded under the "
            "key '$parked-<subscription_name>|<stream_uuid>|<event id>'",
            (key,),
            f"together at most {MAX_RAW_BYTES - extra} bytes of text that does not compress",
        )
        check_indexed(
            both,
            "subscriptions",
            (stream_uuid, row),
            f"together at most about {MAX_RAW_PAIR_BYTES} bytes of text that does not compress",
        )
        stream = _parking.parked_stream(row)
        extra = len(stream.encode()) - len(name.encode())
        check_indexed(
            f"subscription_name{group}",
            "stream ids, where the events the subscription parks are linked into the "
            "stream '$parked-<subscription_name>'",
            (stream,),
            f"at most {MAX_RAW_BYTES - extra} bytes of text that does not compress",
        )


def _row_samples(name: str, groups: int | None) -> list[str]:
    """The names of the subscription's rows to check: its own, or its groups' (the last
    group of each length of number, longest first: the others differ from one of them
    in a digit only)."""
    if groups is None:
        return [name]
    last = {len(str(group)): group for group in range(groups)}
    return [group_name(name, group, groups) for group in sorted(last.values(), reverse=True)]


def _subscription_of(row_name: str) -> str:
    """The subscription a row belongs to: a partition group's, or its own."""
    group = split_group_name(row_name)
    return row_name if group is None else group[0]


class _Joined:
    """The block of a persistent subscription (`EventStore.subscribe_to_stream`): joins
    on entry (every partition group, with ``partition_groups``), leaves on exit. A class
    rather than a generator: an idle subscription keeps it for as long as its block
    runs, and this is a few hundred bytes smaller."""

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
        if self._options.partition_groups is None:
            driver, consumer = await self._subscriptions.join(
                self._stream_uuid, self._name, self._options
            )
            self._subscription = Subscription(driver, consumer)
        else:
            self._subscription = await join_groups(
                self._subscriptions, self._stream_uuid, self._name, self._options
            )
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
        failure = await subscription._leave(self._subscriptions)
        if failure is not None:
            if exc is not None:  # the error already leaving the block wins
                logger.warning("%s", failure)
            else:
                raise failure
