"""Failover, lost connections and a restarted server: no event is ever lost."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager

import pytest
import trio

import trio_eventstore as es
from trio_eventstore import (
    ANY_VERSION,
    EventData,
    EventStore,
    EventStoreConfig,
    Subscription,
    admin,
    open_event_store,
)
from trio_eventstore._pg import open_connection
from trio_eventstore._tempcluster import TempCluster, temp_cluster

HANG_GUARD = 60  # a guard against hangs, never a speed assertion


def ev(n: int) -> EventData:
    return EventData({"n": n}, event_type="Counted")


async def append(store: EventStore, stream: str, *ns: int) -> None:
    await store.append_to_stream(stream, ANY_VERSION, [ev(n) for n in ns])


async def terminate(config: EventStoreConfig, pid: int | None) -> None:
    assert pid is not None
    async with open_connection(config) as conn:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)


class Log(list[tuple[str, int]]):
    """What the nodes received; `wait` wakes on every change (no polling)."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = trio.Event()

    def record(self, who: str, number: int) -> None:
        self.append((who, number))
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, predicate: Callable[[Log], bool]) -> None:
        while not predicate(self):
            await self._changed.wait()


def fast(config: EventStoreConfig) -> EventStoreConfig:
    return config.with_changes(subscription_retry_interval=0.2, notification_poll_interval=60)


async def test_one_store_delivers_and_the_other_takes_over(initialized: EventStoreConfig) -> None:
    config = fast(initialized)
    log = Log()
    a_subscribed, b_started, a_leave = trio.Event(), trio.Event(), trio.Event()
    done = trio.Event()

    async def node(name: str, store: EventStore) -> None:
        async with store.subscribe_to_all_streams("shared", buffer_size=10) as sub:
            if name == "a":
                await sub.wait_subscribed()
                a_subscribed.set()
            else:
                b_started.set()
            async for batch in sub:
                for event in batch.events:
                    log.record(name, event.event_number)
                sub.ack(batch)
                if name == "a" and a_leave.is_set():
                    return
                if len(log) >= 6:
                    done.set()
                    return

    with trio.fail_after(HANG_GUARD):
        async with (
            open_event_store(config) as store_a,
            open_event_store(config) as store_b,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(node, "a", store_a)
            await a_subscribed.wait()
            nursery.start_soon(node, "b", store_b)
            await b_started.wait()
            await append(store_a, "s", 1, 2, 3)
            await log.wait(lambda seen: len(seen) >= 3)
            assert store_b.statistics().subscriptions == 1
            a_leave.set()
            await append(store_a, "s", 4)  # a takes it, then leaves
            await log.wait(lambda seen: any(n == 4 for _, n in seen))
            await append(store_a, "s", 5, 6)
            await done.wait()
    assert [n for who, n in log if who == "a"] == [1, 2, 3, 4]
    assert [n for who, n in log if who == "b"] == [5, 6]


async def test_lock_connection_killed_hands_over_at_once(initialized: EventStoreConfig) -> None:
    config = fast(initialized)
    log = Log()
    subscribed = {"a": trio.Event(), "b": trio.Event()}
    subs: dict[str, Subscription] = {}

    async def node(name: str, store: EventStore) -> None:
        async with store.subscribe_to_stream("s", "shared", buffer_size=10) as sub:
            subs[name] = sub
            await sub.wait_subscribed()
            subscribed[name].set()
            async for batch in sub:
                for event in batch.events:
                    log.record(name, event.event_number)
                sub.ack(batch)

    with trio.fail_after(HANG_GUARD):
        async with (
            open_event_store(config) as store_a,
            open_event_store(config) as store_b,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(node, "a", store_a)
            await subscribed["a"].wait()
            nursery.start_soon(node, "b", store_b)
            await append(store_a, "s", 1)
            await log.wait(lambda seen: bool(seen))
            await terminate(config, store_a.statistics().lock_pid)
            await subscribed["b"].wait()  # b holds the lock now
            # The server releases a lock a moment before the dying session's socket
            # closes: a has stopped once its client has seen that (see Failover).
            while subs["a"].statistics().role in ("holder", "hibernated"):  # noqa: ASYNC110
                await trio.sleep(0.01)
            await append(store_a, "s", 2)
            await log.wait(lambda seen: len({n for _, n in seen}) >= 2)
            nursery.cancel_scope.cancel()
    assert ("a", 1) in log
    assert ("b", 2) in log
    assert ("a", 2) not in log  # a stopped delivering when it lost its lock


async def test_listener_killed_while_appending_loses_nothing(initialized: EventStoreConfig) -> None:
    config = fast(initialized)
    with trio.fail_after(HANG_GUARD):
        async with open_event_store(config) as store:
            async with (
                store.subscribe_to_all_streams("p", buffer_size=100) as sub,
                store.subscribe("$all") as transient,
            ):
                await sub.wait_subscribed()
                await terminate(config, store.statistics().listener_pid)
                await append(store, "s", 1, 2)  # committed while the listener is down
                await append(store, "t", 3)
                got: list[int] = []
                async for batch in sub:
                    got.extend(e.event_number for e in batch.events)
                    sub.ack(batch)
                    if len(got) >= 3:
                        break
                seen: list[int] = []
                async for tbatch in transient:
                    seen.extend(e.event_number for e in tbatch)
                    if len(seen) >= 3:
                        break
            assert store.statistics().listener_reconnects >= 1
    assert got == [1, 2, 3]
    assert seen == [1, 2, 3]


@pytest.fixture
def own_cluster() -> Iterator[TempCluster]:
    with temp_cluster() as cluster:
        yield cluster


async def test_postgres_restart_mid_stream(own_cluster: TempCluster) -> None:
    config = EventStoreConfig(
        url=own_cluster.url(f"restart_{uuid.uuid4().hex[:6]}"),
        timeout=5,
        subscription_retry_interval=0.2,
        notification_poll_interval=0.5,
    )
    await admin.create(config)
    await admin.init(config)
    got: list[int] = []
    with trio.fail_after(HANG_GUARD * 2):
        async with (
            open_event_store(config) as store,
            store.subscribe_to_all_streams("p", buffer_size=50) as sub,
        ):
            await append(store, "s", 1, 2, 3)
            async for batch in sub:
                got.extend(e.event_number for e in batch.events)
                sub.ack(batch)
                if len(got) >= 3:
                    break
            await trio.to_thread.run_sync(own_cluster.stop, "fast")
            await trio.to_thread.run_sync(own_cluster.start)
            for n in (4, 5, 6):
                while True:  # the pool may hand out connections the restart broke
                    try:
                        await append(store, "s", n)
                        break
                    except es.StorageUnavailableError:
                        await trio.sleep(0.1)
            async for batch in sub:
                got.extend(e.event_number for e in batch.events)
                sub.ack(batch)
                if set(range(1, 7)) <= set(got):
                    break
    assert sorted(set(got)) == [1, 2, 3, 4, 5, 6]
    # At-least-once: anything seen twice was never acknowledged-and-persisted first.
    assert got[:3] == [1, 2, 3]


async def test_store_survives_its_connections_being_killed_repeatedly(
    initialized: EventStoreConfig,
) -> None:
    """asyncpg abandons futures when connections drop mid-query; that must never take
    the store down (trio-asyncio re-raises such errors unless told otherwise). Kills
    land while the driver retries its lock every 0.1 s."""
    config = initialized.with_changes(subscription_retry_interval=0.1)
    with trio.fail_after(HANG_GUARD):
        async with (
            open_event_store(config) as store,
            store.subscribe_to_all_streams("p", buffer_size=10) as sub,
        ):
            await sub.wait_subscribed()
            for round_ in range(12):
                for pid in (store.statistics().lock_pid, store.statistics().listener_pid):
                    if pid is not None:
                        async with open_connection(config) as conn:
                            await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
                await trio.sleep(0.01 * (round_ % 7))
            await sub.wait_subscribed()
            await append(store, "s", 1)
            with trio.fail_after(HANG_GUARD):
                async for batch in sub:
                    sub.ack(batch)
                    break


@pytest.mark.parametrize("how", ["events", "batch", "batch-after-the-next"])
async def test_an_ack_of_an_ended_sessions_batch_acknowledges_nothing_of_the_next(
    initialized: EventStoreConfig, how: str
) -> None:
    """Competing consumers; the lock connection drops and the same store takes the
    lock again, delivering the events again, now to other consumers than before. An ack
    of a batch the ended session delivered (harmless, says README) must not acknowledge
    events the new session delivered to that consumer and its subscriber was not handed
    yet: here event 2, which the consumer that had it left with, unprocessed. Before,
    the checkpoint moved past 2, and a restart went on after it: 2 was lost."""
    config = initialized.with_changes(subscription_standby_interval=2.0)
    processed: set[int] = set()
    with trio.fail_after(HANG_GUARD):
        async with open_event_store(config) as store:

            def subscribe(buffer_size: int) -> AbstractAsyncContextManager[Subscription]:
                return store.subscribe_to_stream(
                    "s", "sub", buffer_size=buffer_size, concurrency_limit=2, checkpoint_threshold=1
                )

            async with subscribe(3) as a:
                await a.wait_subscribed()
                b_cm = subscribe(1)
                b = await b_cm.__aenter__()
                await append(store, "s", 1, 2, 3, 4, 5)
                a_batch = await a.__anext__()
                b_batch = await b.__anext__()
                assert [e.event_number for e in a_batch.events] == [1, 3, 4]
                assert [e.event_number for e in b_batch.events] == [2]
                processed.add(1)
                a.ack(a_batch.events[0])
                await terminate(config, store.statistics().lock_pid)
                while a.statistics().role == "holder":  # noqa: ASYNC110
                    await trio.sleep(0.01)
                await b_cm.__aexit__(None, None, None)  # leaves with 2 unprocessed
                while not (a.statistics().sessions >= 2 and a.statistics().in_flight == 3):  # noqa: ASYNC110
                    await trio.sleep(0.01)  # the new session gave a [2, 3, 4]
                if how == "batch-after-the-next":  # taken while the old one is in hand
                    assert [e.event_number for e in await a.__anext__()] == [2, 3, 4]
                if how == "events":
                    processed.add(3)
                    a.ack(a_batch.events[1])
                else:
                    processed.update(e.event_number for e in a_batch.events)
                    a.ack(a_batch)
                assert a.statistics().last_ack == 1
                # a stops before it processes the new session's batch
            async with subscribe(10) as again:
                batch = await again.__anext__()
    delivered = [e.event_number for e in batch.events]
    assert delivered[0] == 2
    assert not {1, 2, 3, 4} - processed - set(delivered)


async def test_a_release_cut_short_drops_the_lock_connection(initialized: EventStoreConfig) -> None:
    """A lease whose UNLOCK cannot be sent (cut short while another lock query has the
    connection) must not stay held by the server, unknown to the store (no store could
    take it; this one would take it again on top): the lock connection is dropped."""
    async with open_event_store(initialized) as store:
        keeper = store._subscriptions.locks
        lease = await keeper.acquire(4242, 1)
        pid = store.statistics().lock_pid

        async def held(conn: es._pg.Connection) -> bool:
            return bool(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND classid = 4242 AND objid = 1 AND objsubid = 2"
                )
            )

        async with open_connection(initialized) as conn:
            assert await held(conn)
            done = trio.Event()

            async def query_in_flight(task_status: trio.TaskStatus[None]) -> None:
                async with keeper._lock:  # a round's query has the connection
                    task_status.started()
                    await done.wait()

            async with trio.open_nursery() as nursery:
                await nursery.start(query_in_flight)
                with trio.move_on_after(0.1):
                    await lease.release()
                done.set()
            assert lease.lost.is_set()
            with trio.fail_after(HANG_GUARD):
                while await held(conn):  # noqa: ASYNC110 - the server's state, polled
                    await trio.sleep(0.01)
                while store.statistics().lock_pid in (None, pid):  # noqa: ASYNC110
                    await trio.sleep(0.01)  # the keeper reconnected
