"""pytest fixtures for testing code that uses trio-eventstore (extra ``testing``).

Registered with pytest through an entry point when trio-eventstore is installed; the
async fixtures need pytest-trio (``trio_mode = true``).

* ``eventstore_server_url`` (session): ``TRIO_EVENTSTORE_TEST_URL`` when set (a role that
  may create databases), else a throwaway PostgreSQL cluster started for the session
  (server binaries on PATH, in ``pg_config --bindir``, or the ``embedded`` extra).
* ``eventstore_database_url`` (session): a database for the session's stores.
* ``eventstore_config`` (function): a config naming a fresh schema, created and
  initialised, dropped after the test. Override it to change settings.
* ``event_store`` (function, async): an open store on that schema.
* ``fresh_event_store`` (session): ``fresh_event_store(**changes)`` is an async context
  manager: an open store on a new schema, dropped on exit. Use it in Hypothesis tests
  (``@given``), one store per example: async fixtures are set up once per test, and a
  store cannot outlive the example's Trio run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import trio

from . import admin
from ._config import EventStoreConfig
from ._store import EventStore, open_event_store
from ._tempcluster import temp_cluster
from ._throwaway import open_fresh_event_store

__all__ = [
    "event_store",
    "eventstore_config",
    "eventstore_database_url",
    "eventstore_server_url",
    "fresh_event_store",
]

SESSION_DATABASE = "trio_eventstore_tests"


def _with_database(url: str, database: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(database)))


@pytest.fixture(scope="session")
def eventstore_server_url() -> Iterator[str]:
    """A superuser URL of the test server (its database part is not used)."""
    url = os.environ.get("TRIO_EVENTSTORE_TEST_URL")
    if url:
        yield url
        return
    with temp_cluster() as cluster:
        yield cluster.url("postgres")


@pytest.fixture(scope="session")
def eventstore_database_url(eventstore_server_url: str) -> str:
    """A database, created once, that holds a schema per test."""
    url = _with_database(eventstore_server_url, SESSION_DATABASE)
    trio.run(admin.create, EventStoreConfig(url=url))
    return url


@pytest.fixture
def eventstore_config(eventstore_database_url: str) -> Iterator[EventStoreConfig]:
    """A fresh, initialised schema for this test (dropped afterwards)."""
    config = EventStoreConfig(
        url=eventstore_database_url,
        schema=f"t_{uuid.uuid4().hex[:12]}",
        subscription_retry_interval=1.0,
    )
    trio.run(admin.create, config)
    trio.run(admin.init, config)
    yield config
    trio.run(admin.drop, config)


@pytest.fixture
async def event_store(eventstore_config: EventStoreConfig) -> AsyncIterator[EventStore]:
    """An open store on this test's schema."""
    async with open_event_store(eventstore_config) as store:
        yield store


@pytest.fixture(scope="session")
def fresh_event_store(
    eventstore_database_url: str,
) -> Callable[..., contextlib.AbstractAsyncContextManager[EventStore]]:
    """``async with fresh_event_store(**changes) as store:`` a store on a new schema of
    the test database (dropped on exit); ``changes`` are `EventStoreConfig` fields."""
    config = EventStoreConfig(url=eventstore_database_url, subscription_retry_interval=1.0)

    def factory(**changes: Any) -> contextlib.AbstractAsyncContextManager[EventStore]:
        return open_fresh_event_store(config, **changes)

    return functools.update_wrapper(factory, open_fresh_event_store, updated=())
