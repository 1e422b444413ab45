"""Test harness: a real PostgreSQL for the session, a fresh schema per test.

Set ``TRIO_EVENTSTORE_TEST_URL`` (a superuser URL) to use an existing server;
otherwise a throwaway cluster is started for the session.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import trio

from trio_eventstore import EventStore, EventStoreConfig, admin, open_event_store


@pytest.fixture(scope="session")
def server_url(eventstore_server_url: str) -> str:
    """A superuser URL of the test server (from trio_eventstore.pytest_plugin)."""
    return eventstore_server_url


@pytest.fixture(scope="session")
def test_database(eventstore_database_url: str) -> str:
    """The database holding the per-test schemas."""
    return eventstore_database_url


@pytest.fixture
def config(test_database: str) -> EventStoreConfig:
    """A config naming a fresh, not yet created schema (dropped after the test)."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    return EventStoreConfig(url=test_database, schema=schema, timeout=10.0)


@pytest.fixture
async def initialized(config: EventStoreConfig) -> AsyncIterator[EventStoreConfig]:
    """`config`'s schema, created and initialised; dropped afterwards."""
    await admin.create(config)
    await admin.init(config)
    yield config
    with trio.CancelScope(shield=True):
        await admin.drop(config)


@pytest.fixture
async def store(initialized: EventStoreConfig) -> AsyncIterator[EventStore]:
    """An open store on a fresh schema."""
    async with open_event_store(initialized) as opened:
        yield opened
