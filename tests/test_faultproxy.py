"""The fault proxy against a real PostgreSQL: each fault does what it says, on the
connection class it is set for, and the store gets over it once it is lifted."""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator

import pytest
import trio

import trio_eventstore as es
from trio_eventstore import ANY_VERSION, EventData, EventStoreConfig, admin, open_event_store

from .faultproxy import (
    ADMIN,
    ALL,
    LISTEN,
    LOCK,
    POOL,
    SESSION,
    Blackhole,
    Cut,
    Delay,
    Drop,
    FaultProxy,
    HalfClose,
    open_fault_proxy,
)

HANG_GUARD = 30  # a guard against hangs, never a speed assertion


def ev(n: int) -> EventData:
    return EventData({"n": n}, event_type="Counted")


def ns(events: list[es.RecordedEvent]) -> list[int]:
    return [e.data["n"] for e in events if isinstance(e.data, dict)]


@pytest.fixture
async def proxy(test_database: str) -> AsyncIterator[FaultProxy]:
    parts = urllib.parse.urlsplit(test_database)
    assert parts.hostname is not None
    assert parts.port is not None
    async with open_fault_proxy(parts.hostname, parts.port) as opened:
        yield opened


@pytest.fixture
def proxied(initialized: EventStoreConfig, proxy: FaultProxy) -> EventStoreConfig:
    """The test's store, reached through the proxy (short timeouts: faults are slow)."""
    assert initialized.url is not None
    return initialized.with_changes(
        url=proxy.url_for(initialized.url),
        timeout=1.0,
        subscription_retry_interval=0.2,
        notification_poll_interval=60.0,
    )


async def test_connections_are_classified_by_role(
    initialized: EventStoreConfig, proxy: FaultProxy
) -> None:
    assert initialized.url is not None
    config = initialized.with_changes(
        url=proxy.url_for(initialized.url),
        session_mode_url=proxy.url_for(initialized.url, session_mode=True),
    )
    with trio.fail_after(HANG_GUARD):
        await admin.migrate(config)
        assert proxy.opened[ADMIN] >= 1
        async with open_event_store(config) as store:
            assert proxy.connections(POOL) >= 1
            assert proxy.connections(LISTEN) == 1
            assert proxy.connections(LOCK) == 1
            # LISTEN and locks go through session_mode_url; the pool does not.
            assert proxy.connections(SESSION) == 2
            assert proxy.pids(SESSION) == {
                store.statistics().listener_pid,
                store.statistics().lock_pid,
            }
            await store.append_to_stream("s", ANY_VERSION, [ev(1)])
    assert proxy.injected == {}


async def test_delay_adds_latency_per_direction(
    proxied: EventStoreConfig, proxy: FaultProxy
) -> None:
    with trio.fail_after(HANG_GUARD):
        async with open_event_store(proxied) as store:
            await store.append_to_stream("s", ANY_VERSION, [ev(1)])
            proxy.set(POOL, Delay(0.15, "to_server"))
            started = trio.current_time()
            assert len(await store.read_stream_forward("s")) == 1
            one_way = trio.current_time() - started
            proxy.set(POOL, Delay(0.15))
            started = trio.current_time()
            assert len(await store.read_stream_forward("s")) == 1
            both_ways = trio.current_time() - started
            proxy.clear()
            await store.append_to_stream("s", ANY_VERSION, [ev(2)])
    assert one_way >= 0.15
    assert both_ways >= 0.3
    assert proxy.injected["delay"] >= 2


async def test_cut_listen_connection_notifier_reconnects_and_delivery_goes_on(
    proxied: EventStoreConfig, proxy: FaultProxy
) -> None:
    with trio.fail_after(HANG_GUARD):
        async with (
            open_event_store(proxied) as store,
            store.subscribe_to_all_streams("p", buffer_size=10) as sub,
            store.subscribe("$all") as transient,
        ):
            await sub.wait_subscribed()
            pid = store.statistics().listener_pid
            proxy.set(LISTEN, Cut())
            await proxy.wait_injected("cut", 2)  # the connection, then a reconnect attempt
            await store.append_to_stream("s", ANY_VERSION, [ev(1), ev(2)])  # while deaf
            proxy.clear()
            await store.append_to_stream("t", ANY_VERSION, [ev(3)])
            got: list[int] = []
            async for batch in sub:
                got += [e.event_number for e in batch.events]
                sub.ack(batch)
                if len(got) >= 3:
                    break
            seen: list[int] = []
            async for events in transient:
                seen += [e.event_number for e in events]
                if len(seen) >= 3:
                    break
            stats = store.statistics()
    assert got == [1, 2, 3]
    assert seen == [1, 2, 3]
    assert stats.listener_reconnects >= 1
    assert stats.listener_pid != pid


async def test_blackholed_pool_append_times_out_and_the_store_recovers(
    proxied: EventStoreConfig, proxy: FaultProxy
) -> None:
    with trio.fail_after(HANG_GUARD):
        async with open_event_store(proxied) as store:
            await store.append_to_stream("s", ANY_VERSION, [ev(1)])
            proxy.set(POOL, Blackhole())
            started = trio.current_time()
            with pytest.raises(es.StorageUnavailableError):
                await store.append_to_stream("s", ANY_VERSION, [ev(2)])
            took = trio.current_time() - started
            # New pool connections are never answered either.
            with pytest.raises(es.StorageUnavailableError):
                await store.read_all_streams_forward()
            proxy.clear()
            await store.append_to_stream("s", ANY_VERSION, [ev(3)])
            events = await store.read_stream_forward("s")
    assert took < proxied.timeout * 2  # one statement's timeout (and a scheduling margin)
    # The timed-out append may still commit once the network heals (its bytes were in
    # flight): a timeout is an ambiguous outcome, never a lost or doubled event.
    assert ns(events) in ([1, 3], [1, 2, 3])
    assert proxy.injected["blackhole"] >= 1


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "direct"])
async def test_an_append_that_must_connect_while_connections_are_reset_is_unavailable(
    proxied: EventStoreConfig, proxy: FaultProxy, group_commit: bool
) -> None:
    """What PostgreSQL does to connections during a restart: the pooled ones are cut and
    new ones reset while connecting. The append fails with `StorageUnavailableError`
    (what a retry loop catches), and the store goes on once connections are taken."""
    with trio.fail_after(HANG_GUARD):
        async with open_event_store(proxied.with_changes(group_commit=group_commit)) as store:
            await store.append_to_stream("s", ANY_VERSION, [ev(1)])
            proxy.set(POOL, Cut())
            await proxy.wait_injected("cut", 1)
            for n in (2, 3):
                with pytest.raises(es.StorageUnavailableError, match="connection failed"):
                    await store.append_to_stream("s", ANY_VERSION, [ev(n)])
            proxy.clear()
            await store.append_to_stream("s", ANY_VERSION, [ev(4)])
            events = await store.read_stream_forward("s")
    assert ns(events) == [1, 4]


async def test_half_closed_pool_connection_fails_fast_and_is_replaced(
    proxied: EventStoreConfig, proxy: FaultProxy
) -> None:
    with trio.fail_after(HANG_GUARD):
        async with open_event_store(proxied) as store:
            await store.append_to_stream("s", ANY_VERSION, [ev(1)])
            proxy.set(POOL, HalfClose("to_server"))  # the server reads EOF and hangs up
            with pytest.raises(es.StorageUnavailableError):
                await store.read_stream_forward("s")
            proxy.set(POOL, HalfClose("to_client"))  # the store reads EOF
            with pytest.raises(es.StorageUnavailableError):
                await store.read_stream_forward("s")
            proxy.clear()
            await store.append_to_stream("s", ANY_VERSION, [ev(2)])
            assert len(await store.read_stream_forward("s")) == 2
    assert proxy.injected["half_close"] >= 2


async def test_dropped_lock_traffic_delays_a_subscription_until_cleared(
    proxied: EventStoreConfig, proxy: FaultProxy
) -> None:
    with trio.fail_after(HANG_GUARD):
        async with open_event_store(proxied) as store:
            await store.append_to_stream("s", ANY_VERSION, [ev(1)])
            proxy.set(LOCK, Drop())
            async with store.subscribe_to_stream("s", "p") as sub:
                with trio.move_on_after(proxied.timeout * 1.5):
                    await sub.wait_subscribed()
                    pytest.fail("subscribed while the lock connection drops everything")
                proxy.clear()
                await sub.wait_subscribed()
                async for batch in sub:
                    assert ns(batch.events) == [1]
                    sub.ack(batch)
                    break
            assert store.statistics().lock_reconnects >= 1
    assert proxy.dropped_bytes > 0


async def test_blackhole_of_everything_answers_nothing(
    proxied: EventStoreConfig, proxy: FaultProxy
) -> None:
    proxy.set(ALL, Blackhole())
    with trio.fail_after(HANG_GUARD), pytest.raises(es.StorageUnavailableError):
        async with open_event_store(proxied):
            pass  # pragma: no cover
    proxy.clear()
    with trio.fail_after(HANG_GUARD):
        async with open_event_store(proxied) as store:
            await store.append_to_stream("s", ANY_VERSION, [ev(1)])


async def test_tls_requests_can_be_passed_to_the_server(
    initialized: EventStoreConfig, test_database: str
) -> None:
    """With ``tls="pass"`` the server answers the SSLRequest (this one has no TLS, so the
    connection goes on in plain text and is classified as usual)."""
    parts = urllib.parse.urlsplit(test_database)
    assert parts.hostname is not None
    assert parts.port is not None
    assert initialized.url is not None
    with trio.fail_after(HANG_GUARD):
        async with open_fault_proxy(parts.hostname, parts.port, tls="pass") as proxy:
            config = initialized.with_changes(url=proxy.url_for(initialized.url))
            async with open_event_store(config) as store:
                await store.append_to_stream("s", ANY_VERSION, [ev(1)])
                assert proxy.connections(LISTEN) == 1
                assert proxy.connections(POOL) >= 1
