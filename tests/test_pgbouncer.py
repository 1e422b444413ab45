"""Through PgBouncer in transaction mode: the pool uses it, LISTEN and advisory locks
use ``session_mode_url`` (or, without one, the poll interval still wakes readers)."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator

import pytest
import trio

from trio_eventstore import (
    ANY_VERSION,
    EventData,
    EventStoreConfig,
    NotSupportedError,
    open_event_store,
)

from .pgbouncer import pgbouncer

HANG_GUARD = 60


@pytest.fixture(scope="module")
def bouncer(server_url: str) -> Iterator[str]:
    with pgbouncer(server_url) as template:
        yield template


def through(bouncer: str, config: EventStoreConfig) -> EventStoreConfig:
    return config.with_changes(
        url=bouncer.format(database=urllib.parse.quote(config.database_name)),
        statement_cache_size=0,
        subscription_retry_interval=0.2,
    )


async def test_store_and_subscriptions_through_pgbouncer(
    bouncer: str, initialized: EventStoreConfig
) -> None:
    config = through(bouncer, initialized).with_changes(
        session_mode_url=initialized.url, notification_poll_interval=60
    )
    with trio.fail_after(HANG_GUARD):
        async with open_event_store(config) as store:
            for i in range(20):  # many statements over few server connections
                await store.append_to_stream(
                    "s", ANY_VERSION, [EventData({"i": i}, event_type="T")]
                )
            assert len(await store.read_stream_forward("s")) == 20
            async with store.subscribe_to_stream("s", "p", buffer_size=50) as sub:
                await sub.wait_subscribed()
                await store.append_to_stream("s", 20, [EventData({"i": 20}, event_type="T")])
                got: list[int] = []
                async for batch in sub:
                    got.extend(e.stream_version for e in batch.events)
                    sub.ack(batch)
                    if len(got) >= 21:
                        break
            assert got == list(range(1, 22))
            # LISTEN and locks went around PgBouncer, straight to Postgres.
            stats = store.statistics()
            assert stats.listener_pid is not None
            assert stats.lock_pid is not None


async def test_without_session_mode_url_polling_still_delivers(
    bouncer: str, initialized: EventStoreConfig
) -> None:
    config = through(bouncer, initialized).with_changes(notification_poll_interval=0.2)
    with trio.fail_after(HANG_GUARD):
        async with open_event_store(config) as store, store.subscribe("$all") as sub:
            await store.append_to_stream("s", ANY_VERSION, [EventData({"i": 1}, event_type="T")])
            batch = await sub.__anext__()
            assert [e.event_number for e in batch] == [1]


async def test_replica_appends_through_pgbouncer_is_refused_saying_why(
    bouncer: str, initialized: EventStoreConfig
) -> None:
    """PgBouncer refuses the setting as a startup parameter: not a passing outage."""
    config = through(bouncer, initialized).with_changes(replica_appends=True)
    with trio.fail_after(HANG_GUARD), pytest.raises(NotSupportedError) as caught:
        async with open_event_store(config):
            pass  # pragma: no cover
    message = str(caught.value)
    assert "replica_appends" in message
    assert "direct connection" in message
    assert "session_replication_role" in message
