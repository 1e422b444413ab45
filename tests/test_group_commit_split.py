"""A batch the database refuses because of one append's data (or a duplicate id that
committed meanwhile) is written again one append at a time: only the culprit fails, and
the others each get their own outcome, even when the pool runs short halfway."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from trio_eventstore import (
    NO_STREAM,
    EventData,
    EventStoreConfig,
    JsonSerializer,
    SerializationError,
    admin,
    open_event_store,
)
from trio_eventstore._pg import Connection, open_connection

from .test_group_commit import AllLock, ev, record


class RefusedFor:
    """JsonSerializer, but the data {"bad": True} becomes ``refused``: bytes a jsonb
    store's server refuses (a user's serializer gone wrong)."""

    def __init__(self, refused: bytes) -> None:
        self._json = JsonSerializer()
        self._refused = refused

    def __getattr__(self, name: str) -> Any:
        return getattr(self._json, name)

    def serialize(self, data: object) -> bytes:
        return self._refused if data == {"bad": True} else self._json.serialize(data)


def bad() -> list[EventData]:
    return [EventData({"bad": True}, event_type="E")]


@pytest.fixture
async def jsonb(config: EventStoreConfig) -> AsyncIterator[EventStoreConfig]:
    config = config.with_changes(column_data_type="jsonb")
    await admin.create(config)
    await admin.init(config)
    try:
        yield config
    finally:
        with trio.CancelScope(shield=True):
            await admin.drop(config)


async def lock_waiters(watcher: Connection, n: int) -> None:
    """Until ``n`` statements wait for a lock (the `$all` row's)."""
    with trio.fail_after(30):
        while True:
            waiting = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            if waiting == n:
                return
            await trio.sleep(0.01)


@pytest.mark.parametrize(
    "refused",
    [b"not json", b"1e400000"],  # 22P02; 22003 (beyond numeric's range)
    ids=["not-json", "number-out-of-range"],
)
async def test_data_the_database_refuses_fails_only_its_append(
    jsonb: EventStoreConfig, refused: bytes
) -> None:
    config = jsonb.with_changes(serializer=RefusedFor(refused))
    async with open_event_store(config) as store, open_connection(config) as conn:
        outcomes: dict[str, object] = {}
        lock = AllLock(conn, config.schema)
        await lock.take()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(record, outcomes, "first", store, "first", NO_STREAM, [ev()])
            await trio.testing.wait_all_tasks_blocked()
            for name in ("a", "b", "bad"):  # one batch, queued behind "first"
                events = bad() if name == "bad" else [ev()]
                nursery.start_soon(record, outcomes, name, store, name, NO_STREAM, events)
            await trio.testing.wait_all_tasks_blocked()
            await lock.release()
        assert outcomes == {"first": 1, "a": 1, "b": 1, "bad": SerializationError}
        written = [e.stream_uuid for e in await store.read_all_streams_forward()]
        assert sorted(written) == ["a", "b", "first"]  # in whichever order they committed
        with pytest.raises(SerializationError, match="rejected the event data"):
            await store.append_to_stream("alone", NO_STREAM, bad())


async def test_a_split_batch_that_meets_a_busy_pool_is_not_written_again(
    jsonb: EventStoreConfig,
) -> None:
    """The split's appends commit one by one: one that then waits for a connection
    must not send the batch again (the ones before it would be told they failed)."""
    config = jsonb.with_changes(
        serializer=RefusedFor(b"not json"), pool_size=2, queue_target=0.001, queue_interval=0.3
    )
    async with (
        open_event_store(config) as store,
        open_connection(config) as conn,
        open_connection(config) as watcher,
    ):
        outcomes: dict[str, object] = {}
        lock = AllLock(conn, config.schema)
        await lock.take()
        async with trio.open_nursery() as nursery:
            # Written at once by its caller (pooled connection 1): waits for $all.
            nursery.start_soon(record, outcomes, "first", store, "first", NO_STREAM, [ev()])
            await lock_waiters(watcher, 1)
            # One batch (connection 2), refused whole, then split: its first good
            # append, alone, waits for $all.
            for name in ("a", "b", "bad"):
                events = bad() if name == "bad" else [ev()]
                nursery.start_soon(record, outcomes, name, store, name, NO_STREAM, events)
            await lock_waiters(watcher, 2)
            # Two readers wait for a connection: they take those of "first" and of the
            # split's append when these commit; the split's next append finds none.
            for _ in range(2):
                nursery.start_soon(store._db.fetch, "SELECT pg_sleep(1)")
            await trio.testing.wait_all_tasks_blocked()
            await lock.release()
        assert outcomes == {"first": 1, "a": 1, "b": 1, "bad": SerializationError}
        for name in ("a", "b"):
            assert len(await store.read_stream_forward(name)) == 1
