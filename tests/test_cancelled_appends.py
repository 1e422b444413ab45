"""Cancelled appends, as the README states them: one cancelled before its statement is
sent writes nothing; one cancelled after may have committed."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_eventstore import (
    ANY_VERSION,
    EventData,
    EventStore,
    EventStoreClosedError,
    EventStoreConfig,
    StreamNotFoundError,
    open_event_store,
)
from trio_eventstore._pg import open_connection


def _event() -> EventData:
    return EventData({}, event_type="T")


async def stored(store: EventStore, streams: list[str]) -> list[str]:
    """Which of ``streams`` exist."""
    found = []
    for stream in streams:
        try:
            await store.stream_info(stream)
            found.append(stream)
        except StreamNotFoundError:
            pass
    return found


async def test_appends_cancelled_while_their_batch_waits_for_a_connection_write_nothing(
    initialized: EventStoreConfig,
) -> None:
    """``pool_size=1``: a lone append holds the only connection (a table lock holds it up);
    three appends made meanwhile stay queued, since the writer waits for a connection
    before it takes any: nothing of theirs is sent. Their callers are cancelled; the README
    says they are dropped and write nothing, and none is written once the lock goes (the
    writer used to take the first into a batch that then waited, and wrote it)."""
    config = initialized.with_changes(pool_size=1)
    waiting = [f"waiting-{i}" for i in range(3)]
    async with open_event_store(config) as store, open_connection(config) as blocker:
        await blocker.execute("BEGIN")
        await blocker.execute(f'LOCK TABLE "{config.schema}".streams IN EXCLUSIVE MODE')
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.append_to_stream, "first", ANY_VERSION, [_event()])
            await trio.testing.wait_all_tasks_blocked()
            scopes: list[trio.CancelScope] = []

            async def append(stream: str) -> None:
                with trio.CancelScope() as scope:
                    scopes.append(scope)
                    await store.append_to_stream(stream, ANY_VERSION, [_event()])

            for stream in waiting:
                nursery.start_soon(append, stream)
                await trio.testing.wait_all_tasks_blocked()
            for scope in scopes:  # nothing sent: no connection is free
                scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            await blocker.execute("ROLLBACK")  # the lock goes: "first" commits
        assert await stored(store, waiting) == []


async def test_appends_queued_when_the_pool_closes_under_the_writer_fail_alone(
    initialized: EventStoreConfig,
) -> None:
    """The writer waits for a pooled connection before it takes appends; should the pool
    close meanwhile (under a store still open), the queued appends fail with
    `EventStoreClosedError`, write nothing, and the store itself stays up."""
    config = initialized.with_changes(pool_size=1)
    async with open_event_store(config) as store, open_connection(config) as blocker:
        await blocker.execute("BEGIN")
        await blocker.execute(f'LOCK TABLE "{config.schema}".streams IN EXCLUSIVE MODE')
        outcomes: dict[str, object] = {}
        both = trio.Event()

        async def append(stream: str) -> None:
            try:
                outcomes[stream] = await store.append_to_stream(stream, ANY_VERSION, [_event()])
            except EventStoreClosedError as exc:
                outcomes[stream] = exc
            if len(outcomes) == 2:
                both.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(append, "first")  # holds the only connection
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(append, "queued")  # the writer waits for a connection
            await trio.testing.wait_all_tasks_blocked()
            await store._db._pool.close()
            with trio.fail_after(5):
                await both.wait()
            assert isinstance(outcomes["queued"], EventStoreClosedError)
            await blocker.execute("ROLLBACK")
    async with open_event_store(config) as store:
        with pytest.raises(StreamNotFoundError):
            await store.stream_info("queued")


async def test_an_append_cancelled_as_a_connection_comes_free_writes_nothing(
    initialized: EventStoreConfig,
) -> None:
    """``pool_size=1``: a lone append holds the only connection (a table lock holds it up)
    and an append queued behind it waits for the writer, which waits for a connection. The
    lone append's caller, as soon as its append returns (the connection is free again, the
    writer woken), cancels the queued append: nothing of it was sent, nor taken into a
    batch, so it writes nothing. Trio runs the writer and the cancelled caller in either
    order; each round is a coin toss, so sixteen of them."""
    config = initialized.with_changes(pool_size=1)
    cancelled = [f"cancelled-{i}" for i in range(16)]
    async with open_event_store(config) as store, open_connection(config) as blocker:
        for k, stream in enumerate(cancelled):
            await blocker.execute("BEGIN")
            await blocker.execute(f'LOCK TABLE "{config.schema}".streams IN EXCLUSIVE MODE')
            scope = trio.CancelScope()

            async def queued(stream: str = stream, scope: trio.CancelScope = scope) -> None:
                with scope:
                    await store.append_to_stream(stream, ANY_VERSION, [_event()])

            async def lone(k: int = k, scope: trio.CancelScope = scope) -> None:
                await store.append_to_stream(f"lone-{k}", ANY_VERSION, [_event()])
                scope.cancel()  # in the step in which the connection came free

            async with trio.open_nursery() as nursery:
                nursery.start_soon(lone)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(queued)
                await trio.testing.wait_all_tasks_blocked()
                writer = store.statistics().writer
                assert writer is not None
                assert writer.queued == 1
                await blocker.execute("ROLLBACK")
            assert scope.cancelled_caught
        await trio.testing.wait_all_tasks_blocked()
        assert await stored(store, cancelled) == []
