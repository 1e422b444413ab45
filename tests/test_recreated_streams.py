"""A stream hard-deleted and created again by a new append, under subscriptions open on
it: the stream is followed by its name (its ``streams`` row, and so its id, is a new one)."""

from __future__ import annotations

import pytest
import trio

import trio_eventstore as es
from trio_eventstore import (
    ANY_VERSION,
    EventStore,
    EventStoreConfig,
    RecordedEvent,
    open_event_store,
)
from trio_eventstore._notifications import Notifier

from .helpers import append, n_of

HANG_GUARD = 10  # seconds: the bug was a subscriber waiting for ever


async def recreate(store: EventStore, stream: str, *ns: int) -> None:
    """Hard-delete ``stream`` and create it again with the events ``ns``."""
    await store.delete_stream(stream, ANY_VERSION, hard=True)
    await append(store, stream, *ns)


async def receive(sub: es.TransientSubscription, count: int) -> list[RecordedEvent]:
    got: list[RecordedEvent] = []
    with trio.fail_after(HANG_GUARD):
        async for batch in sub:
            got.extend(batch)
            if len(got) >= count:
                break
    return got


def versions(events: list[RecordedEvent]) -> list[tuple[int, int]]:
    return [(n_of(e), e.stream_version) for e in events]


@pytest.fixture
def config(initialized: EventStoreConfig) -> EventStoreConfig:
    return initialized.with_changes(enable_hard_deletes=True, notification_poll_interval=30)


@pytest.mark.parametrize("new_events", [(4, 5), (4, 5, 6, 7, 8)], ids=["shorter", "longer"])
async def test_a_transient_subscription_follows_the_stream_created_again(
    config: EventStoreConfig, new_events: tuple[int, ...]
) -> None:
    """The new stream's events arrive, its versions from 1 again; the next appends too
    (whether the new stream is still shorter than the old one or already longer)."""
    async with open_event_store(config) as store:
        await append(store, "s", 1, 2)
        async with store.subscribe("s") as sub:
            await append(store, "s", 3)
            assert versions(await receive(sub, 1)) == [(3, 3)]
            await recreate(store, "s", *new_events)
            got = await receive(sub, len(new_events))
            assert versions(got) == [(n, v) for v, n in enumerate(new_events, 1)]
            await append(store, "s", 9)
            assert versions(await receive(sub, 1)) == [(9, len(new_events) + 1)]


async def test_a_stream_created_again_before_the_first_read(config: EventStoreConfig) -> None:
    async with open_event_store(config) as store:
        await append(store, "s", 1, 2, 3)
        async with store.subscribe("s") as sub:
            await recreate(store, "s", 4)
            assert versions(await receive(sub, 1)) == [(4, 1)]


async def test_recreated_several_times_and_other_subscribers(config: EventStoreConfig) -> None:
    """Subscribers that subscribed before and after a recreation each get the events
    appended after they subscribed, once (but not those deleted before they read them)."""
    async with open_event_store(config) as store:
        await append(store, "s", 1)
        async with store.subscribe("s") as early, store.subscribe("$all") as every:
            await recreate(store, "s", 2, 3)
            assert versions(await receive(early, 2)) == [(2, 1), (3, 2)]
            async with store.subscribe("s") as late:
                await recreate(store, "s", 4)
                await append(store, "s", 5)
                assert versions(await receive(late, 2)) == [(4, 1), (5, 2)]
            assert versions(await receive(early, 2)) == [(4, 1), (5, 2)]
            assert [n_of(e) for e in await receive(every, 2)] == [4, 5]  # 2, 3: deleted


async def test_a_stream_created_again_while_the_listener_heard_nothing(
    config: EventStoreConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Notifications lost (the listener was reconnecting): the re-read of the streams'
    positions finds the stream's new row."""
    deaf = False
    on_notify = Notifier.on_notify

    def hearing(self: Notifier, channel: str, payload: str) -> None:
        if not deaf:
            on_notify(self, channel, payload)

    monkeypatch.setattr(Notifier, "on_notify", hearing)
    async with open_event_store(config) as store:
        await append(store, "s", 1, 2)
        async with store.subscribe("s") as sub:
            await append(store, "s", 3)
            assert versions(await receive(sub, 1)) == [(3, 3)]
            deaf = True
            await recreate(store, "s", 4)
            await trio.sleep(0.2)  # the notification has come (and gone unheard)
            deaf = False
            await store._subscriptions.notifier.resync()  # as after a reconnection
            assert versions(await receive(sub, 1)) == [(4, 1)]


async def test_a_stream_created_again_by_another_store(config: EventStoreConfig) -> None:
    async with open_event_store(config) as store, open_event_store(config) as other:
        await append(store, "s", 1, 2)
        async with store.subscribe("s") as sub:
            await append(other, "s", 3)
            assert versions(await receive(sub, 1)) == [(3, 3)]
            await recreate(other, "s", 4)
            assert versions(await receive(sub, 1)) == [(4, 1)]


async def receive_persistent(sub: es.Subscription, count: int) -> list[RecordedEvent]:
    got: list[RecordedEvent] = []
    with trio.fail_after(HANG_GUARD):
        async for batch in sub:
            got.extend(batch.events)
            sub.ack(batch)
            if len(got) >= count:
                break
    return got


async def test_a_persistent_subscription_goes_on_above_its_checkpoint(
    config: EventStoreConfig,
) -> None:
    """Its checkpoint is a version of the stream, whichever row: it goes on with the
    events of the stream created again above it (as after a restart, and as the Elixir
    library does); it used to wait for ever for events of the deleted row."""
    async with open_event_store(config) as store:
        await append(store, "s", 1, 2, 3)
        async with store.subscribe_to_stream("s", "p", buffer_size=10) as sub:
            assert versions(await receive_persistent(sub, 3)) == [(1, 1), (2, 2), (3, 3)]
            await recreate(store, "s", 4, 5)
            await append(store, "s", 6, 7, 8)
            assert versions(await receive_persistent(sub, 2)) == [(7, 4), (8, 5)]
            await append(store, "s", 9)
            assert versions(await receive_persistent(sub, 1)) == [(9, 6)]
        await recreate(store, "s", 10, 11, 12, 13, 14, 15, 16)
        async with store.subscribe_to_stream("s", "p", buffer_size=10) as sub:
            assert versions(await receive_persistent(sub, 1)) == [(16, 7)]


def test_the_notifier_takes_another_row_for_the_stream_created_again() -> None:
    """Its mark starts again with the new row; a reader that found the new row before
    its notification came tells the notifier, unless a notification came meanwhile."""
    config = EventStoreConfig(url="postgresql://localhost/unused")
    notifier = Notifier(config, None)  # type: ignore[arg-type]  # no I/O here
    notifier.watch("s")
    notifier.on_notify("c", "s,5,1,3")
    assert (notifier.mark("s"), notifier.heard_another_row("s", 5)) == (3, False)
    notifier.on_notify("c", "s,7,1,1")  # deleted, created again
    assert (notifier.mark("s"), notifier.heard_another_row("s", 5)) == (1, True)
    assert not notifier.heard_another_row("s", 7)
    notifier.on_notify("c", "t,9,1,1")  # nobody follows it: not kept
    assert not notifier.heard_another_row("t", 1)
    # A reader read the stream's row in the database; a notification came meanwhile:
    generation = notifier.generation("s")
    notifier.on_notify("c", "s,8,1,2")
    notifier.settle_row("s", 7, generation)  # what the reader found is older
    assert notifier.heard_another_row("s", 7)
    notifier.watch("u")
    notifier.on_notify("c", "u,2,1,1")
    generation = notifier.generation("u")
    notifier.settle_row("u", 3, generation)  # the row the reader found is newer
    assert not notifier.heard_another_row("u", 3)
    notifier.unwatch("u")
    assert not notifier.heard_another_row("u", 4)  # forgotten
