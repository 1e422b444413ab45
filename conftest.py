"""Test harness: a real PostgreSQL for the session, a fresh schema per test.

Set ``TRIO_EVENTSTORE_TEST_URL`` (a superuser URL) to use an existing server;
otherwise a throwaway cluster is started for the session.

Hypothesis profiles (tests and property tests): ``quick`` (default, part of ``make
test``), ``ci`` (longer, ``invoke proptest``) and ``long``. Choose with HYPOTHESIS_PROFILE.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import trio
from hypothesis import HealthCheck, settings

from tests.helpers import Role
from trio_eventstore import EventStore, EventStoreConfig, EventStoreError, admin, open_event_store
from trio_eventstore._pg import open_connection
from trio_eventstore._sql import quote_ident, quote_literal

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    "print_blob": True,
}
settings.register_profile("quick", max_examples=25, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("ci", max_examples=300, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("long", max_examples=3000, **_COMMON)  # type: ignore[arg-type]
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))


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


async def _execute(url: str, *statements: str) -> None:
    async with open_connection(EventStoreConfig(url=url)) as conn:
        for statement in statements:
            await conn.execute(statement)


@pytest.fixture(scope="session")
def application_role(server_url: str, test_database: str) -> Iterator[Role]:
    """A role that may log in and nothing else: the stores under test get only what
    `admin.grant` gives it."""
    role = Role(f"app_{uuid.uuid4().hex[:10]}", secrets.token_urlsafe(18))
    create = f"CREATE ROLE {quote_ident(role.name)} LOGIN PASSWORD {quote_literal(role.password)}"
    trio.run(_execute, server_url, create)
    yield role
    with contextlib.suppress(EventStoreError):
        trio.run(_execute, test_database, f"DROP OWNED BY {quote_ident(role.name)}")
        trio.run(_execute, server_url, f"DROP ROLE {quote_ident(role.name)}")
