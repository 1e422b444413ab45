"""Hibernated persistent subscriptions: many in one store, none with a task of its own.

An idle subscription hibernates after ``subscription_hibernate_after``; it keeps its lock
and its place in the stream, but no task: whatever needs it (a new event, a consumer, a
lost lock, the store closing) starts its task again.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import trio

import trio_eventstore as es
from trio_eventstore import (
    ANY_VERSION,
    EventData,
    EventStore,
    EventStoreConfig,
    RecordedEvent,
    Subscription,
    open_event_store,
)
from trio_eventstore._pg import open_connection

HANG_GUARD = 30  # seconds: a guard against hangs, never a speed assertion


def idle_config(config: EventStoreConfig) -> EventStoreConfig:
    return config.with_changes(
        subscription_hibernate_after=0.2,
        subscription_retry_interval=0.2,
        notification_poll_interval=30,
    )


def ev(n: int) -> EventData:
    return EventData({"n": n}, event_type="Counted")


def all_tasks() -> list[trio.lowlevel.Task]:
    """Every task of this run (a walk of the task tree from the root)."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    found: list[trio.lowlevel.Task] = []
    todo = [root]
    while todo:
        task = todo.pop()
        found.append(task)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return found


CONSUMER = "tests.test_hibernation.Consumers._consume"  # the name of their tasks


class Consumers:
    """Subscriptions, each iterated by a task of its own (as a consumer is), recording
    what they receive."""

    def __init__(self, store: EventStore, nursery: trio.Nursery) -> None:
        self._store = store
        self._nursery = nursery
        self.subs: dict[str, Subscription] = {}
        self.received: dict[str, list[RecordedEvent]] = {}
        self._changed = trio.Event()

    async def start(self, stream: str, name: str, **options: object) -> Subscription:
        await self._nursery.start(self._consume, stream, name, options)
        return self.subs[name]

    async def _consume(
        self, stream: str, name: str, options: dict[str, object], *, task_status: trio.TaskStatus
    ) -> None:
        async with self._store.subscribe_to_stream(stream, name, **options) as sub:  # type: ignore[arg-type]
            await sub.wait_subscribed()
            self.subs[name] = sub
            self.received[name] = []
            task_status.started()
            async for batch in sub:
                self.received[name].extend(batch.events)
                sub.ack(batch)
                self._changed.set()
                self._changed = trio.Event()

    async def wait_received(self, name: str, count: int) -> list[RecordedEvent]:
        while len(self.received[name]) < count:
            await self._changed.wait()
        return self.received[name]

    async def wait_hibernating(self) -> None:
        # The state is only seen in statistics: poll it.
        while any(s.statistics().state != "hibernating" for s in self.subs.values()):  # noqa: ASYNC110
            await trio.sleep(0.05)


@contextlib.asynccontextmanager
async def consumers(store: EventStore) -> AsyncIterator[Consumers]:
    async with trio.open_nursery() as nursery:
        yield Consumers(store, nursery)
        nursery.cancel_scope.cancel()


async def test_a_hibernated_subscription_keeps_no_task_of_its_own(
    initialized: EventStoreConfig,
) -> None:
    """Only the consumers' own tasks remain once every subscription hibernates; a new
    event, appended by another store (notified) or by this one (handed over), wakes the
    one it is for, which hibernates again without a task afterwards."""
    count = 20
    config = idle_config(initialized)
    with trio.fail_after(HANG_GUARD):
        async with (
            open_event_store(config) as store,
            open_event_store(config) as other,
            consumers(store) as subs,
        ):
            before = {t.name for t in all_tasks()}
            for i in range(count):
                await subs.start(f"s-{i}", f"t-{i}")
            await subs.wait_hibernating()
            tasks = all_tasks()
            assert [t.name for t in tasks if "_driver" in t.name] == []
            # the consumers' own tasks, no more
            assert [t.name for t in tasks if t.name not in before] == [CONSUMER] * count

            await other.append_to_stream("s-7", ANY_VERSION, [ev(1)])  # notified
            assert [e.data for e in await subs.wait_received("t-7", 1)] == [{"n": 1}]
            await store.append_to_stream("s-3", ANY_VERSION, [ev(2)])  # handed over
            assert [e.data for e in await subs.wait_received("t-3", 1)] == [{"n": 2}]
            assert subs.received["t-5"] == []

            await subs.wait_hibernating()
            tasks = all_tasks()
            assert [t.name for t in tasks if t.name not in before] == [CONSUMER] * count


async def test_a_hibernated_holder_notices_that_it_lost_its_lock(
    initialized: EventStoreConfig,
) -> None:
    """Its lock connection is killed while it hibernates: it stops holding at once (it
    has no task waiting on the lease), the standby in another store takes over, and the
    next event goes there, not to the former holder."""
    config = idle_config(initialized)
    with trio.fail_after(HANG_GUARD):
        async with (
            open_event_store(config) as store_a,
            open_event_store(config) as store_b,
            consumers(store_a) as subs_a,
            consumers(store_b) as subs_b,
        ):
            sub_a = await subs_a.start("s", "shared")
            await subs_a.wait_hibernating()
            async with trio.open_nursery() as nursery:  # b waits for the lock
                nursery.start_soon(subs_b.start, "s", "shared")
                while sub_a.statistics().lock_attempts == 0:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                pid = store_a.statistics().lock_pid
                assert pid is not None
                async with open_connection(config) as conn:
                    assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
            # b takes the lock as soon as the server ends a's lock session; a hears of
            # it when its lock connection reads the end (a moment later on a busy
            # machine), without an event or a task of its own to wake it.
            with trio.fail_after(5):
                while sub_a.statistics().state == "hibernating":  # noqa: ASYNC110
                    await trio.sleep(0.02)
            await store_a.append_to_stream("s", ANY_VERSION, [ev(1)])
            assert [e.data for e in await subs_b.wait_received("shared", 1)] == [{"n": 1}]
            assert subs_a.received["shared"] == []


async def test_leaving_a_hibernated_subscription_persists_its_last_ack(
    initialized: EventStoreConfig,
) -> None:
    config = idle_config(initialized)
    with trio.fail_after(HANG_GUARD):
        async with open_event_store(config) as store:
            await store.append_to_stream("s", ANY_VERSION, [ev(n) for n in (1, 2, 3)])
            async with store.subscribe_to_stream("s", "t", checkpoint_threshold=100) as sub:
                async for batch in sub:
                    sub.ack(batch)
                    if batch.last_event_number == 3:
                        break
                while sub.statistics().state != "hibernating":  # noqa: ASYNC110
                    await trio.sleep(0.05)
                assert sub.statistics().last_persisted == 0  # below the threshold
            await store.append_to_stream("s", ANY_VERSION, [ev(4)])
            async with store.subscribe_to_stream("s", "t") as again:
                async for batch in again:
                    assert [e.data for e in batch.events] == [{"n": 4}]
                    break


async def test_closing_the_store_ends_the_iteration_of_hibernated_subscriptions(
    initialized: EventStoreConfig,
) -> None:
    config = idle_config(initialized)
    ended: list[str] = []
    with trio.fail_after(HANG_GUARD):
        # The consumers' tasks outlive the store's block.
        async with trio.open_nursery() as nursery, open_event_store(config) as store:

            async def consume(name: str, *, task_status: trio.TaskStatus[Subscription]) -> None:
                async with store.subscribe_to_stream("s", name) as sub:
                    await sub.wait_subscribed()
                    task_status.started(sub)
                    # Nothing was appended; it raises as a transient subscription does.
                    with pytest.raises(es.EventStoreClosedError):
                        await sub.__anext__()
                ended.append(name)

            subs = [await nursery.start(consume, name) for name in ("a", "b", "c")]
            while any(s.statistics().state != "hibernating" for s in subs):  # noqa: ASYNC110
                await trio.sleep(0.05)
    assert sorted(ended) == ["a", "b", "c"]
