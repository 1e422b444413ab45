"""Throwaway stores and servers for tests and demos (re-exported by
`trio_eventstore.testing`; the pytest plugin's fixtures use them)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import trio

from . import admin
from ._config import EventStoreConfig
from ._pg import CLEANUP_TIMEOUT
from ._store import EventStore, open_event_store
from ._tempcluster import temp_cluster

__all__ = ["open_fresh_event_store", "temporary_postgres"]


@contextlib.asynccontextmanager
async def open_fresh_event_store(
    config: EventStoreConfig | str, **changes: Any
) -> AsyncIterator[EventStore]:
    """An open store on a new schema of the database ``config`` (or a URL) names: created
    and initialised first, dropped on exit. One per Hypothesis example: a store (and its
    async fixtures) cannot outlive the Trio run of the example that opened it.

    ``changes``: `EventStoreConfig` fields to change (``serializer=``, ...).
    """
    base = EventStoreConfig(url=config) if isinstance(config, str) else config
    fresh = base.with_changes(schema=f"t_{uuid.uuid4().hex[:12]}", **changes)
    await admin.create(fresh)
    try:
        await admin.init(fresh)
        async with open_event_store(fresh) as store:
            yield store
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT * 2):
            await admin.drop(fresh)


@contextlib.contextmanager
def temporary_postgres(database: str = "postgres") -> Iterator[str]:
    """Start a throwaway PostgreSQL server (a new cluster in a temporary folder, on a free
    port of 127.0.0.1) and yield a superuser URL of ``database`` on it (`admin.create`
    makes the database); the server is stopped and deleted on exit.

    Needs the server binaries (``initdb``, ``pg_ctl``) on PATH, in ``pg_config
    --bindir``, under ``/usr/lib/postgresql/*/bin``, or the ``embedded`` extra.

    Raises:
        PostgresNotFoundError: no server binaries were found.
    """
    with temp_cluster() as cluster:
        yield cluster.url(database)
