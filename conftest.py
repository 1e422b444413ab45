"""Test harness: a real PostgreSQL for the session, a fresh schema per test.

Set ``TRIO_EVENTSTORE_TEST_URL`` (a superuser URL) to use an existing server;
otherwise a throwaway cluster is started for the session.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import trio

from tests.helpers import url_for
from trio_eventstore import EventStore, EventStoreConfig, admin, open_event_store
from trio_eventstore._tempcluster import TempCluster, temp_cluster

TEST_DATABASE = "trio_eventstore_test"


@pytest.fixture(scope="session")
def cluster() -> Iterator[TempCluster | None]:
    """The session's throwaway cluster (None when TRIO_EVENTSTORE_TEST_URL is set)."""
    if os.environ.get("TRIO_EVENTSTORE_TEST_URL"):
        yield None
        return
    with temp_cluster() as running:
        yield running


@pytest.fixture(scope="session")
def server_url(cluster: TempCluster | None) -> str:
    """A superuser URL of the test server (database part: the maintenance database)."""
    if cluster is None:
        return os.environ["TRIO_EVENTSTORE_TEST_URL"]
    return cluster.url("postgres")


@pytest.fixture(scope="session")
def test_database(server_url: str) -> str:
    """The database holding the per-test schemas, created once."""
    config = EventStoreConfig(url=url_for(server_url, TEST_DATABASE))
    trio.run(admin.create, config)
    return url_for(server_url, TEST_DATABASE)


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
