"""`open_event_store()` and the `EventStore` facade."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import attrs
import trio

from . import _storage
from ._config import EventStoreConfig
from ._errors import single_errors
from ._pg import Database, open_database
from ._types import StreamInfo

__all__ = ["EventStore", "EventStoreStatistics", "open_event_store"]


@attrs.frozen
class EventStoreStatistics:
    """A snapshot of the store's state (`EventStore.statistics`)."""

    schema: str
    pool_size: int
    pool_connections: int
    pool_idle: int
    pool_overloaded: bool


class EventStore:
    """A store opened by `open_event_store`. Do not construct it yourself."""

    def __init__(self, config: EventStoreConfig, database: Database, nursery: trio.Nursery) -> None:
        self._config = config
        self._db = database
        self._nursery = nursery

    @property
    def config(self) -> EventStoreConfig:
        """The configuration the store was opened with (after ``init``)."""
        return self._config

    async def stream_info(self, stream_uuid: str) -> StreamInfo:
        """Information on one stream (``"$all"`` included).

        Ports ``EventStore.stream_info/2``.

        Raises:
            StreamNotFoundError: no such stream.
        """
        if not isinstance(stream_uuid, str):
            raise TypeError(f"stream_uuid: expected a str, got {type(stream_uuid).__name__}")
        if not stream_uuid:
            raise ValueError("stream_uuid: must not be empty")
        return await _storage.stream_info(self._db, stream_uuid)

    def statistics(self) -> EventStoreStatistics:
        pool = self._db.pool_statistics()
        return EventStoreStatistics(
            schema=self._config.schema,
            pool_size=int(pool["max_size"]),
            pool_connections=int(pool["size"]),
            pool_idle=int(pool["idle"]),
            pool_overloaded=bool(pool["overloaded"]),
        )

    def __repr__(self) -> str:
        return (
            f"<EventStore schema={self._config.schema!r} database={self._config.database_name!r}>"
        )


@contextlib.asynccontextmanager
async def open_event_store(config: EventStoreConfig) -> AsyncIterator[EventStore]:
    """Open the store: its connection pool and, inside its nursery, its background tasks.

    Yields only once everything is live. Use it inside your own nursery or ``trio.run``;
    leaving the block stops everything.

    Raises:
        StorageUnavailableError: the server cannot be reached within ``config.timeout``.
        AuthenticationError: the server rejected the credentials.
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
            state = await database.run(lambda conn: _storage.read_schema_state(conn, config.schema))
            _storage.check_schema(state, config)
            async with trio.open_nursery() as nursery:
                yield EventStore(config, database, nursery)
                nursery.cancel_scope.cancel()
