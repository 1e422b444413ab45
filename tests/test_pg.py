"""The asyncio boundary: units of work, cancellation, error translation, pool limits."""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import AsyncIterator

import pytest
import trio

import trio_eventstore as es
from trio_eventstore import EventStoreConfig
from trio_eventstore._pg import Conn, Database, open_database
from trio_eventstore._sql import quote_ident

from .faultproxy import POOL, Delay, open_fault_proxy
from .helpers import failing_callback


@pytest.fixture
async def db(initialized: EventStoreConfig) -> AsyncIterator[Database]:
    async with open_database(initialized.with_changes(pool_size=2)) as database:
        yield database


def table(db: Database) -> str:
    return f"{quote_ident(db.config.schema)}.snapshots"


async def count(db: Database) -> int:
    value: int = await db.fetchval(f"SELECT count(*) FROM {table(db)}")
    return value


def insert_sql(db: Database) -> str:
    return (
        f"INSERT INTO {table(db)} (source_uuid, source_version, source_type, data) "
        "VALUES ($1, 1, 't', '\\x7b7d')"
    )


async def test_transaction_commits_and_returns(db: Database) -> None:
    async def unit(conn: Conn) -> int:
        await conn.execute(insert_sql(db), "a")
        await conn.execute(insert_sql(db), "b")
        value: int = await conn.fetchval(f"SELECT count(*) FROM {table(db)}")
        return value

    assert await db.transaction(unit) == 2
    assert await count(db) == 2


async def test_error_rolls_back_whole_unit_and_is_translated(db: Database) -> None:
    async def unit(conn: Conn) -> None:
        await conn.execute(insert_sql(db), "a")
        await conn.execute(insert_sql(db), "a")

    with pytest.raises(es.DatabaseError) as info:
        await db.transaction(unit)
    assert info.value.sqlstate == "23505"
    assert info.value.constraint_name == "snapshots_pkey"
    assert isinstance(info.value.__cause__, Exception)
    assert await count(db) == 0


async def test_python_error_in_unit_rolls_back(db: Database) -> None:
    async def unit(conn: Conn) -> None:
        await conn.execute(insert_sql(db), "a")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await db.transaction(unit)
    assert await count(db) == 0


async def test_cancellation_rolls_back_and_pool_stays_usable(db: Database) -> None:
    for _ in range(3):  # more rounds than the pool has connections
        inserted = trio.Event()

        async def unit(conn: Conn, inserted: trio.Event = inserted) -> None:
            await conn.execute(insert_sql(db), "a")
            inserted.set()
            await conn.execute("SELECT pg_sleep(30)")

        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(db.transaction, unit)
                await inserted.wait()
                await trio.sleep(0.2)
                scope.cancel()
        assert scope.cancelled_caught
        assert await count(db) == 0

    # Every connection came back clean: none idle in a transaction, none still sleeping.
    async def others(conn: Conn) -> list[str]:
        rows = await conn.fetch(
            "SELECT state, query FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return [f"{r['state']}: {r['query']}" for r in rows]

    for state in await db.run(others):
        assert not state.startswith("idle in transaction"), state
        assert "pg_sleep" not in state or state.startswith("idle"), state
    assert db.pool_statistics()["size"] <= 2


async def test_transaction_settings_do_not_leak_to_pool(db: Database) -> None:
    async def unit(conn: Conn) -> str:
        value: str = await conn.fetchval("SELECT current_setting('eventstore.reset', true)")
        return value

    assert await db.transaction(unit, settings={"eventstore.reset": "on"}) == "on"
    for _ in range(4):
        assert await db.transaction(unit) in (None, "")


async def test_query_timeout_is_storage_unavailable(initialized: EventStoreConfig) -> None:
    async with open_database(initialized.with_changes(timeout=0.3)) as database:
        with pytest.raises(es.StorageUnavailableError, match="in time"):
            await database.execute("SELECT pg_sleep(5)")
        assert await database.fetchval("SELECT 1") == 1


async def test_overloaded_pool_fails_fast(initialized: EventStoreConfig) -> None:
    """With every connection busy for longer than queue_interval, waiting callers are
    refused with StorageUnavailableError instead of queueing for `timeout`."""
    config = initialized.with_changes(pool_size=1, queue_target=0.01, queue_interval=0.05)
    async with open_database(config) as database:
        release = trio.Event()

        async def hog(conn: Conn) -> None:
            while not release.is_set():
                await conn.execute("SELECT pg_sleep(0.05)")

        async def hold() -> None:
            await database.run(hog)

        outcomes: list[str] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold)
            await trio.sleep(0.1)
            for _ in range(3):
                try:
                    await database.fetchval("SELECT 1")
                    outcomes.append("served")
                except es.PoolOverloadedError:
                    outcomes.append("refused")
            release.set()
        assert "refused" in outcomes
        assert await database.fetchval("SELECT 1") == 1


async def test_the_bridge_runs_ready_asyncio_callbacks_together(db: Database) -> None:
    """The trio-asyncio loop runs every ready callback in one pass (pinned trio-asyncio
    internals: an upgrade that changes them must be noticed here, not as a slowdown)."""
    from trio_eventstore._pg import _bridge

    loop = db._pool.loop
    assert loop._main_loop_one.__func__ is _bridge._main_loop_one_batched
    assert loop._io_task.__func__ is _bridge._io_task

    async def many(conn: Conn) -> list[int]:
        # Statements pipelined on several connections' worth of asyncio callbacks.
        return [int(await conn.fetchval("SELECT $1::int", i)) for i in range(50)]

    async with trio.open_nursery() as nursery:
        results: list[list[int]] = []

        async def one() -> None:
            results.append(await db.run(many))

        for _ in range(4):
            nursery.start_soon(one)
    assert results == [list(range(50))] * 4


async def test_asyncio_timeouts_and_current_task_work_inside_units(db: Database) -> None:
    """Units run as if in an asyncio task: ``asyncio.current_task()`` is there, and
    ``asyncio.timeout`` / ``asyncio.wait_for`` cancel a statement and report
    TimeoutError (the connection stays usable)."""
    import asyncio

    async def unit(conn: Conn) -> list[str]:
        seen = []
        assert asyncio.current_task() is not None
        try:
            async with asyncio.timeout(0.2):
                await conn.execute("SELECT pg_sleep(20)")
        except TimeoutError:
            seen.append("timeout")
        try:
            await asyncio.wait_for(conn.fetchval("SELECT pg_sleep(20)"), 0.2)
        except TimeoutError:
            seen.append("wait_for")
        await asyncio.sleep(0)  # a bare yield
        await asyncio.sleep(0.01)
        seen.append(str(await conn.fetchval("SELECT 41 + 1")))
        return seen

    with trio.fail_after(15):
        assert await db.run(unit) == ["timeout", "wait_for", "42"]
        assert await db.fetchval("SELECT 1") == 1


async def test_cancelled_from_trio_a_unit_finishes_its_asyncio_cleanup(db: Database) -> None:
    """A Trio cancellation reaches the unit once, as asyncio.CancelledError at the
    statement it waits on; its cleanup (which awaits again) runs to the end, then the
    caller sees the cancellation."""
    import asyncio

    steps: list[str] = []
    sleeping = trio.Event()

    async def unit(conn: Conn) -> None:
        try:
            sleeping.set()
            await conn.execute("SELECT pg_sleep(20)")
        except asyncio.CancelledError:
            steps.append("cancelled")
            await asyncio.sleep(0.05)  # not cancelled again
            steps.append("cleaned up")
            raise

    with trio.fail_after(15):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(db.run, unit)
                await sleeping.wait()
                await trio.sleep(0.1)
                scope.cancel()
        assert scope.cancelled_caught
        assert steps == ["cancelled", "cleaned up"]
        assert await db.fetchval("SELECT 1") == 1


async def test_a_failing_notification_callback_keeps_the_listener(
    initialized: EventStoreConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """LISTEN callbacks run as the notification is read; one that raises is logged and
    the connection goes on listening."""
    from trio_eventstore._pg import open_connection

    callback, seen, got_two = failing_callback()

    async with open_connection(initialized) as listener, open_connection(initialized) as other:
        await listener.listen("test_channel", callback)
        for payload in ("one", "boom", "two"):
            await other.execute("SELECT pg_notify('test_channel', $1)", payload)
        with trio.fail_after(10):
            await got_two.wait()
        assert seen == ["one", "two"]
        assert await listener.fetchval("SELECT 1") == 1
    assert "a notification callback failed" in caplog.text


async def test_cancelling_a_crossing_whose_loop_closed_under_it_raises_cancelled() -> None:
    """A crossing still waiting when its loop closes (one the store could not wait
    for) can never be woken by the loop: cancelling it raises `trio.Cancelled` in its
    task, where it used to crash Trio (`TrioInternalError`: the loop is closed)."""
    import trio_asyncio

    from trio_eventstore._pg import _bridge

    outcome: list[str] = []

    async def crossing(loop: object, *, task_status: trio.TaskStatus[None]) -> None:
        future = loop.create_future()  # type: ignore[attr-defined]

        async def waits() -> None:
            await future

        task_status.started()
        try:
            await _bridge._run_inline(loop, waits())
        except trio.Cancelled:
            outcome.append("cancelled")
            raise

    async with trio.open_nursery() as nursery:
        async with trio_asyncio.open_loop() as loop:
            await nursery.start(crossing, loop)
            await trio.sleep(0.05)
        assert loop.is_closed()
        nursery.cancel_scope.cancel()
    assert outcome == ["cancelled"]


async def test_a_lost_connection_has_no_backend_pid(initialized: EventStoreConfig) -> None:
    """Statistics read the lock connection's pid at any time: once the connection has
    ended it is None (asyncpg's own call raised AttributeError then)."""
    from trio_eventstore._pg import open_connection

    async with open_connection(initialized) as conn:
        assert isinstance(conn.backend_pid, int)
        conn.terminate()
        assert conn.backend_pid is None


async def test_a_unit_whose_connection_opens_after_the_pool_closed_writes_nothing(
    initialized: EventStoreConfig, test_database: str
) -> None:
    """A unit that had to open a new connection, and was still connecting when the pool
    closed, raises `EventStoreClosedError` and sends nothing (the closing loop ends the
    connect; one that completes while `close` is still closing idle connections is
    refused by `_Pool.acquire`)."""
    parts = urllib.parse.urlsplit(test_database)
    assert parts.hostname is not None
    assert parts.port is not None
    outcome: list[object] = []
    async with open_fault_proxy(parts.hostname, parts.port) as proxy:
        assert initialized.url is not None
        config = initialized.with_changes(
            url=proxy.url_for(initialized.url), pool_size=2, timeout=10.0
        )

        async def late_insert(db: Database) -> None:
            try:
                outcome.append(await db.execute(insert_sql(db), "late"))
            except es.EventStoreClosedError as exc:
                outcome.append(exc)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                async with open_database(config) as db:
                    before = await count(db)
                    held = trio.Event()

                    async def hold(conn: Conn) -> None:  # keeps the open connection busy
                        held.set()
                        await conn.execute("SELECT pg_sleep(0.5)")

                    async def holder() -> None:
                        with contextlib.suppress(es.EventStoreClosedError):
                            await db.run(hold)

                    nursery.start_soon(holder)
                    await held.wait()
                    proxy.set(POOL, Delay(0.2))  # the next connection takes > 1 s to open
                    nursery.start_soon(late_insert, db)
                    await trio.sleep(0.3)  # it is connecting
                proxy.clear()
        async with open_database(initialized) as db:
            assert await count(db) == before
    assert len(outcome) == 1, outcome
    assert isinstance(outcome[0], es.EventStoreClosedError), outcome
