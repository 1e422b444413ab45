"""Exactly-once projections into Postgres: the read model and the projection's position
change in one transaction.

As Commanded.Projections.Ecto does, a projection keeps its position (the number of the
last event it applied) in a ``projection_versions`` table in the user's schema, one row
per projection. Each batch of events is one transaction: lock the row, skip the events
at or below the position, run the user's handler on the rest with the transaction's
connection, move the position to the last of them, commit; the subscription is
acknowledged only after the commit. A crash before the commit leaves nothing applied
and nothing acknowledged (the events come again); a crash after it leaves the events
applied and the position past them (when they come again they are skipped). The
subscription's checkpoint is then only an optimisation: it saves re-reading events.

The transaction runs on a connection of the store's pool, not on one of its own: the
pool reconnects after a database restart with nothing more (a dedicated connection
would need its own reconnect loop and a task to own it), a daemon running many
projections costs no extra server connection each, and the pool's admission rules and
timeouts apply. The price: the read model lives in the store's database (in any
schema), and a batch holds one pooled connection while its handler runs.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import attrs

from . import _sql
from ._arguments import check_indexed
from ._btree import MAX_RAW_BYTES
from ._errors import DatabaseError
from ._groups import GroupedSubscription
from ._pg import TransactionConnection
from ._store import EventStore
from ._subscription_types import EventBatch, is_replay
from ._subscriptions import Subscription
from ._types import RecordedEvent, check_text

__all__ = ["Projection", "ProjectionHandler"]

logger = logging.getLogger("trio_eventstore.projections")

#: ``async def handler(conn, event)``; with ``batch=True``, ``async def handler(conn, events)``.
ProjectionHandler = Callable[[TransactionConnection, Any], Awaitable[None]]

#: Concurrent ``CREATE ... IF NOT EXISTS`` of the same object can fail with these
#: (unique_violation on the catalog, duplicate_table, duplicate_schema, duplicate_object:
#: the table's row type, when the other CREATE TABLE committed first): try again.
_CREATE_RACES = frozenset({"23505", "42P07", "42P06", "42710"})
_CREATE_ATTEMPTS = 3


class _HasStore(Protocol):
    """What `Projection.lifecycle` needs of the daemon's handler context."""

    @property
    def store(self) -> EventStore: ...


#: PostgreSQL's longest identifier (NAMEDATALEN - 1).
MAX_IDENTIFIER_BYTES = 63


def _check_name(field: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{field}: expected a str, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{field}: must not be empty")
    check_text(field, value)


@attrs.frozen
class Projection:
    """A read model in Postgres, kept exactly once: the handler's SQL and the
    projection's position commit together.

    Args:
        name: the projection's name: its row in ``projection_versions`` (use the
            name of the subscription it reads).
        handler: ``async def handler(conn, event)``, called for each event not yet
            applied, in order, inside the batch's transaction; with ``batch=True``,
            ``async def handler(conn, events)`` called once per batch with the list of
            events not yet applied. ``conn`` is a `TransactionConnection`: run the read
            model's SQL on it, and nothing else (no COMMIT/ROLLBACK, no other
            connection: what does not run on ``conn`` is not exactly once).
        schema: the schema of ``projection_versions`` (created there if missing). Name
            your read model's schema: the store's own schema only if you mean it.
        batch: call ``handler`` once per batch instead of once per event.
        setup: ``async def setup(conn)``, run once per store before the first batch,
            in the transaction that creates ``projection_versions`` if missing (create
            your read model's schema and tables there, with ``IF NOT EXISTS``).

    Positions count in the stream the subscription reads (``event_number``: the
    ``$all`` number for ``subscribe_to_all_streams``, the stream version for
    ``subscribe_to_stream``), so one projection reads one stream, through one
    subscriber at a time (no competing consumers: their batches commit out of order).

    Raises:
        TypeError, ValueError: a bad argument (before any I/O).
    """

    name: str
    handler: ProjectionHandler
    schema: str = attrs.field(kw_only=True)
    batch: bool = attrs.field(default=False, kw_only=True)
    setup: Callable[[TransactionConnection], Awaitable[None]] | None = attrs.field(
        default=None, kw_only=True
    )
    #: the stores this projection's tables are known to exist in
    _prepared: weakref.WeakSet[EventStore] = attrs.field(
        init=False, factory=weakref.WeakSet, eq=False, repr=False
    )

    def __attrs_post_init__(self) -> None:
        _check_name("name", self.name)
        check_indexed(
            "name",
            "projection names (projection_versions)",
            (self.name,),
            f"at most {MAX_RAW_BYTES} bytes of text that does not compress",
        )
        _check_name("schema", self.schema)
        if len(self.schema.encode()) > MAX_IDENTIFIER_BYTES:
            raise ValueError(
                f"schema: at most {MAX_IDENTIFIER_BYTES} bytes (PostgreSQL cuts longer names "
                f"short, so two of them could name one schema); got {len(self.schema.encode())}"
            )
        if not callable(self.handler):
            raise TypeError("handler: expected an async function (conn, event)")
        if not isinstance(self.batch, bool):
            raise TypeError("batch: expected a bool")
        if self.setup is not None and not callable(self.setup):
            raise TypeError("setup: expected an async function (conn) or None")

    async def prepare(self, store: EventStore) -> None:
        """Run ``setup`` and create ``projection_versions`` if missing, in one
        transaction. `apply` does it before its first batch in a store; call it to
        surface a missing privilege or a broken ``setup`` at startup.

        Raises:
            DatabaseError: a statement failed (``setup``'s, or the table's creation).
            StorageUnavailableError: the database cannot be reached.
        """
        store._check_open()
        for attempt in range(1, _CREATE_ATTEMPTS + 1):
            try:
                async with store._db.open_transaction() as conn:
                    if self.setup is not None:
                        await _awaited(self.setup(conn), "setup")
                    exists = await conn.fetchval(
                        _sql.TABLE_EXISTS, self.schema, "projection_versions"
                    )
                    if not exists:
                        await conn.execute(_sql.create_projection_versions(self.schema))
                        await conn.execute(_sql.create_projection_replays(self.schema))
            except DatabaseError as exc:
                if exc.sqlstate in _CREATE_RACES and attempt < _CREATE_ATTEMPTS:
                    continue  # another task or process created it at the same time
                raise
            break
        self._prepared.add(store)

    async def apply(
        self, store: EventStore, events: EventBatch | Sequence[RecordedEvent] | RecordedEvent
    ) -> list[RecordedEvent]:
        """Apply, in one transaction with the new position, the events not applied yet
        (those numbered above the stored position); acknowledge the subscription only
        after this returns.

        Args:
            events: a delivered batch, a list of events in ascending order, or one event.

        Returns:
            The events the handler was given (an empty list: all were applied before).

        Raises:
            DatabaseError: a statement failed, or the commit did (nothing of the
                batch is applied).
            StorageUnavailableError: the database cannot be reached (the batch may or
                may not have committed: deliver it again, it is skipped if it had).
            PoolOverloadedError: no pooled connection free in time.
        """
        recorded = _recorded(events)
        if not recorded:
            return []
        if store not in self._prepared:
            await self.prepare(store)
        else:
            store._check_open()
        async with store._db.open_transaction() as conn:
            position = await self._lock_position(conn)
            replays: list[RecordedEvent] = []
            fresh: list[RecordedEvent] = []
            for e in recorded:
                if is_replay(e):
                    replays.append(e)
                elif e.event_number > position:
                    fresh.append(e)
            if replays:  # marked, wherever they are: a replay may come again
                replays = await self._first_replays(conn, replays)
            todo = sorted(replays + fresh, key=lambda e: e.event_number) if replays else fresh
            if todo and todo[-1].event_number > position:
                # A replay above it moves it too: the event may come again live (a
                # checkpoint behind it) and must then be skipped.
                await conn.execute(
                    _sql.update_projection_version(self.schema), self.name, todo[-1].event_number
                )
            if todo:
                if self.batch:
                    await _awaited(self.handler(conn, todo), "handler")
                else:
                    for event in todo:
                        await _awaited(self.handler(conn, event), "handler")
        if len(todo) < len(recorded):
            logger.debug(
                "projection %s: skipped %d events at or below %d (applied before)",
                self.name,
                len(recorded) - len(todo),
                position,
            )
        return todo

    async def _first_replays(
        self, conn: TransactionConnection, replays: list[RecordedEvent]
    ) -> list[RecordedEvent]:
        """Of ``replays`` (replayed parked events: never applied, since they were
        parked, their batch rolled back), those not applied by an earlier delivery of
        their replay, now marked applied in ``projection_replays`` (created if missing)."""
        exists = await conn.fetchval(_sql.TABLE_EXISTS, self.schema, "projection_replays")
        if not exists:
            await conn.execute(_sql.create_projection_replays(self.schema))
        numbers = [e.event_number for e in replays]
        marked = {
            int(row[0])
            for row in await conn.fetch(
                _sql.mark_projection_replays(self.schema), self.name, numbers
            )
        }
        return [e for e in replays if e.event_number in marked]

    async def _lock_position(self, conn: TransactionConnection) -> int:
        lock = _sql.lock_projection_version(self.schema)
        position = await conn.fetchval(lock, self.name)
        if position is None:  # its first batch: a row at 0 (or a concurrent one's)
            await conn.execute(_sql.insert_projection_version(self.schema), self.name)
            position = await conn.fetchval(lock, self.name)
        return int(position)

    async def position(self, store: EventStore) -> int:
        """The number of the last event applied (0: none yet).

        Raises:
            StorageUnavailableError: the database cannot be reached.
        """
        store._check_open()
        try:
            value = await store._db.fetchval(_sql.projection_version(self.schema), self.name)
        except DatabaseError as exc:
            if exc.sqlstate == "42P01":  # undefined_table: never prepared
                return 0
            raise
        return int(value or 0)

    async def run(self, store: EventStore, subscription: Subscription) -> None:
        """Apply every batch the subscription delivers, acknowledging each after its
        commit, until the subscription ends (or this is cancelled).

        Raises:
            TypeError: not a persistent subscription (a transient one has no
                acknowledgements).
            ValueError: the subscription has competing consumers (``concurrency_limit``
                above 1), or partition groups.
            SubscriptionFailedError: the subscription failed.
            DatabaseError, StorageUnavailableError, PoolOverloadedError: as `apply`
                (the batch is not acknowledged).
        """
        if not isinstance(subscription, Subscription):
            raise TypeError(
                f"subscription: expected a persistent subscription (subscribe_to_stream or "
                f"subscribe_to_all_streams), got {type(subscription).__name__}"
            )
        limit = subscription._driver.options.concurrency_limit
        if limit is not None and limit > 1:
            raise ValueError(
                f"projection {self.name!r}: its subscription has competing consumers "
                f"(concurrency_limit={limit}); a projection needs one subscriber in order"
            )
        if isinstance(subscription, GroupedSubscription):
            raise ValueError(
                f"projection {self.name!r}: its subscription is split into partition groups, "
                "whose batches come out of order; a projection needs one subscriber in order"
            )
        await self.prepare(store)
        async for batch in subscription:
            await self.apply(store, batch)
            subscription.ack(batch)

    def event_handler(self, store: EventStore) -> Callable[[Any], Awaitable[None]]:
        """A subscriber daemon handler: ``SubscriberSpec(handler=projection.event_handler(
        store))`` (one transaction per event); it takes a list of events too (one
        transaction per list)."""

        async def handle(events: EventBatch | Sequence[RecordedEvent] | RecordedEvent) -> None:
            await self.apply(store, events)

        return handle

    @contextlib.asynccontextmanager
    async def lifecycle(
        self, context: _HasStore
    ) -> AsyncIterator[Callable[[Any], Awaitable[None]]]:
        """For a daemon handler with a lifecycle: `prepare` in the store of
        ``context.store``, then the handler of `event_handler` (events or lists)."""
        await self.prepare(context.store)
        yield self.event_handler(context.store)


def _recorded(events: object) -> list[RecordedEvent]:
    if isinstance(events, EventBatch):
        recorded = list(events.events)
    elif isinstance(events, RecordedEvent):
        recorded = [events]
    elif isinstance(events, Sequence) and not isinstance(events, str | bytes):
        recorded = list(events)
        for event in recorded:
            if not isinstance(event, RecordedEvent):
                raise TypeError(f"events: expected RecordedEvents, got {type(event).__name__}")
    else:
        raise TypeError(
            "events: expected a batch, a list of RecordedEvents or a RecordedEvent, "
            f"got {type(events).__name__}"
        )
    for before, after in itertools.pairwise(recorded):
        if after.event_number <= before.event_number:
            raise ValueError(
                "events: expected ascending event numbers, got "
                f"{before.event_number} then {after.event_number}"
            )
    return recorded


async def _awaited(result: object, what: str) -> None:
    if not inspect.isawaitable(result):
        raise TypeError(f"{what}: expected an async function (it returned {result!r})")
    await result
