"""Failures that must not be silent: a final checkpoint that cannot be persisted, and a
subscription that fails or stops before it is subscribed, reach the caller, with their
cause."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio

import trio_eventstore as es
from trio_eventstore import ANY_VERSION, EventData, EventStore, EventStoreConfig, open_event_store
from trio_eventstore._pg import CLEANUP_TIMEOUT, Connection, open_connection
from trio_eventstore._sql import quote_ident

HANG_GUARD = 30  # seconds: a guard against hangs, never a speed assertion


def ev(n: int) -> EventData:
    return EventData({"n": n}, event_type="Counted")


@pytest.fixture
def fast(initialized: EventStoreConfig) -> EventStoreConfig:
    return initialized.with_changes(subscription_retry_interval=0.2, notification_poll_interval=30)


@pytest.fixture
async def owner(fast: EventStoreConfig) -> AsyncIterator[Connection]:
    """A connection of the store's owner, to break things under the store."""
    async with open_connection(fast) as conn:
        yield conn


async def rename_subscriptions(conn: Connection, schema: str, old: str, new: str) -> None:
    await conn.execute(f"ALTER TABLE {quote_ident(schema)}.{old} RENAME TO {new}")


async def consume_then(
    store: EventStore, count: int, then: Callable[[], Awaitable[object]]
) -> None:
    """Take and ack ``count`` events below the checkpoint threshold, then ``then()``,
    then leave the subscription's block."""
    async with store.subscribe_to_stream("s", "p", checkpoint_threshold=100) as sub:
        assert await take_and_ack(sub, count) == list(range(1, count + 1))
        await then()


async def take_and_ack(sub: es.Subscription, count: int) -> list[int]:
    got: list[int] = []
    with trio.fail_after(HANG_GUARD):
        async for batch in sub:
            got += [e.event_number for e in batch.events]
            sub.ack(batch)
            if len(got) >= count:
                return got
    raise AssertionError("the subscription ended")


async def test_a_failed_final_checkpoint_raises_from_the_block(
    fast: EventStoreConfig, owner: Connection
) -> None:
    async with open_event_store(fast) as store:
        await store.append_to_stream("s", ANY_VERSION, [ev(1), ev(2), ev(3)])
        with pytest.raises(es.CheckpointFailedError) as failed:
            await consume_then(
                store, 3, lambda: rename_subscriptions(owner, fast.schema, "subscriptions", "gone")
            )
        error = failed.value
        assert isinstance(error, es.SubscriptionFailedError)
        assert (error.stream_uuid, error.subscription_name) == ("s", "p")
        assert (error.checkpoint, error.last_persisted) == (3, 0)
        assert isinstance(error.__cause__, es.DatabaseError)
        assert "does not exist" in str(error)
        # Nothing is lost: the unpersisted acknowledgements come again.
        await rename_subscriptions(owner, fast.schema, "gone", "subscriptions")
        async with store.subscribe_to_stream("s", "p") as sub:
            assert await take_and_ack(sub, 3) == [1, 2, 3]


async def test_a_final_checkpoint_with_no_answer_raises_from_the_block(
    fast: EventStoreConfig, owner: Connection
) -> None:
    async with open_event_store(fast) as store:
        await store.append_to_stream("s", ANY_VERSION, [ev(1)])

        async def hold_the_row() -> None:  # another session's lock: the UPDATE waits
            await owner.execute("BEGIN")
            await owner.execute(
                f"SELECT 1 FROM {quote_ident(fast.schema)}.subscriptions FOR UPDATE"
            )

        with (
            trio.fail_after(CLEANUP_TIMEOUT + HANG_GUARD),
            pytest.raises(es.CheckpointFailedError, match="no answer") as failed,
        ):
            await consume_then(store, 1, hold_the_row)
        assert (failed.value.checkpoint, failed.value.last_persisted) == (1, 0)
        # The driver's own last try times out too, and it still releases the lock (it
        # did not: no store could take the subscription until the lock connection
        # dropped). The row is still locked meanwhile.
        async with (
            open_event_store(fast) as other,
            other.subscribe_to_stream("s", "p") as sub,
        ):
            with trio.fail_after(CLEANUP_TIMEOUT + HANG_GUARD):
                await sub.wait_subscribed()
            await owner.execute("ROLLBACK")
            assert await take_and_ack(sub, 1) == [1]


async def test_a_failed_final_checkpoint_never_hides_the_error_leaving_the_block(
    fast: EventStoreConfig, owner: Connection, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_event_store(fast) as store:
        await store.append_to_stream("s", ANY_VERSION, [ev(1)])

        async def break_then_fail() -> None:
            await rename_subscriptions(owner, fast.schema, "subscriptions", "gone")
            raise KeyError("the caller's own")

        with (
            caplog.at_level(logging.WARNING, "trio_eventstore"),
            pytest.raises(KeyError, match="the caller's own"),
        ):
            await consume_then(store, 1, break_then_fail)
        assert any("could not be persisted" in r.getMessage() for r in caplog.records)


async def test_a_clean_exit_with_everything_persisted_raises_nothing(
    fast: EventStoreConfig, owner: Connection
) -> None:
    async with open_event_store(fast) as store:
        await store.append_to_stream("s", ANY_VERSION, [ev(1)])
        async with store.subscribe_to_stream("s", "p") as sub:  # threshold 1
            await take_and_ack(sub, 1)
            await sub.wait_checkpointed(1)
            await rename_subscriptions(owner, fast.schema, "subscriptions", "gone")
        await rename_subscriptions(owner, fast.schema, "gone", "subscriptions")


async def test_wait_subscribed_names_its_cause(fast: EventStoreConfig, owner: Connection) -> None:
    async with open_event_store(fast) as store:
        await rename_subscriptions(owner, fast.schema, "subscriptions", "gone")
        async with store.subscribe_to_stream("s", "p") as sub:
            with trio.fail_after(HANG_GUARD), pytest.raises(es.SubscriptionFailedError) as failed:
                await sub.wait_subscribed()
        cause = failed.value.__cause__
        assert isinstance(cause, es.DatabaseError)
        assert cause.sqlstate == "42P01"  # undefined_table
        assert str(cause) in str(failed.value)


async def test_wait_subscribed_returns_when_the_store_stops_first(
    fast: EventStoreConfig,
) -> None:
    """A consumer waiting for the lock when its store closes is told (the store closed),
    not left spinning."""
    outcome: list[BaseException] = []

    async def consumer(store: EventStore, waiting: trio.Event) -> None:
        async with store.subscribe_to_stream("s", "p") as sub:
            waiting.set()
            try:
                await sub.wait_subscribed()
            except es.EventStoreError as exc:
                outcome.append(exc)

    async with open_event_store(fast) as holder, holder.subscribe_to_stream("s", "p") as held:
        await held.wait_subscribed()
        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as outside, open_event_store(fast) as waiter:
                waiting = trio.Event()
                outside.start_soon(consumer, waiter, waiting)
                await waiting.wait()
                await trio.sleep(0.3)  # it tries the lock, which the holder has
    assert len(outcome) == 1
    assert isinstance(outcome[0], es.EventStoreClosedError)  # as iteration says it


async def test_acks_the_closing_store_cannot_persist_raise_from_the_block_outside_it(
    fast: EventStoreConfig, owner: Connection
) -> None:
    """A consumer in a task outside the store's block: the store's close cannot persist
    its acknowledgements, so its block's exit says so (and the events come again)."""
    outcome: list[BaseException] = []
    acked = trio.Event()

    async def consume(store: EventStore) -> None:
        try:
            async with store.subscribe_to_stream("s", "p", checkpoint_threshold=100) as sub:
                await take_and_ack(sub, 1)
                acked.set()
                with pytest.raises(es.EventStoreClosedError):
                    await sub.__anext__()
        except BaseException as exc:
            outcome.append(exc)

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as outside, open_event_store(fast) as store:
            await store.append_to_stream("s", ANY_VERSION, [ev(1)])
            outside.start_soon(consume, store)
            await acked.wait()
            await rename_subscriptions(owner, fast.schema, "subscriptions", "gone")
    assert len(outcome) == 1
    error = outcome[0]
    assert isinstance(error, es.CheckpointFailedError)
    assert (error.checkpoint, error.last_persisted) == (1, 0)
    await rename_subscriptions(owner, fast.schema, "gone", "subscriptions")
    async with open_event_store(fast) as store, store.subscribe_to_stream("s", "p") as sub:
        assert await take_and_ack(sub, 1) == [1]
