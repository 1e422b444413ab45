"""Transient and persistent subscriptions on a real PostgreSQL."""

from __future__ import annotations

import base64
import os
import uuid

import pytest
import trio

import trio_eventstore as es
from trio_eventstore import (
    ANY_VERSION,
    CURRENT,
    EventData,
    EventStore,
    EventStoreConfig,
    RecordedEvent,
    _operator,
    admin,
    open_event_store,
)
from trio_eventstore._pg import open_connection
from trio_eventstore._sql import quote_ident

from .helpers import Role, append, ev, n_of

HANG_GUARD = 30  # seconds: a guard against hangs, never a speed assertion


async def take(sub: es.Subscription, count: int, *, ack: bool = True) -> list[RecordedEvent]:
    """Receive ``count`` events, acknowledging each batch."""
    got: list[RecordedEvent] = []
    with trio.fail_after(HANG_GUARD):
        async for batch in sub:
            got.extend(batch.events)
            if ack:
                sub.ack(batch)
            if len(got) >= count:
                break
    return got


@pytest.fixture(params=["owner", "application-role"])
async def fast(
    request: pytest.FixtureRequest, initialized: EventStoreConfig, application_role: Role
) -> EventStoreConfig:
    """Quick retries; the store's owner, and an application role with only what
    `admin.grant` gives it."""
    config = initialized.with_changes(
        subscription_retry_interval=0.2, notification_poll_interval=30
    )
    if request.param == "application-role":
        config = await application_role.use(config)
    return config


# -- transient ---------------------------------------------------------------------------


async def test_transient_subscription_gets_later_appends_in_order(store: EventStore) -> None:
    await append(store, "s", 1, 2)
    async with store.subscribe("s") as stream_sub, store.subscribe("$all") as all_sub:
        await append(store, "s", 3, 4)
        await append(store, "other", 5)
        await append(store, "s", 6)
        seen: list[int] = []
        with trio.fail_after(HANG_GUARD):
            async for batch in stream_sub:
                seen.extend(n_of(e) for e in batch)
                if len(seen) == 3:
                    break
        assert seen == [3, 4, 6]
        numbers: list[int] = []
        with trio.fail_after(HANG_GUARD):
            async for batch in all_sub:
                numbers.extend(e.event_number for e in batch)
                if len(numbers) == 4:
                    break
        assert numbers == [3, 4, 5, 6]


async def test_transient_selector_and_mapper(store: EventStore) -> None:
    async with store.subscribe(
        "$all",
        selector=lambda e: n_of(e) % 2 == 0,
        mapper=n_of,
    ) as sub:
        await append(store, "a", 1, 2, 3, 4)
        with trio.fail_after(HANG_GUARD):
            batch = await sub.__anext__()
        assert batch == [2, 4]


# -- persistent --------------------------------------------------------------------------


async def test_catch_up_then_live_and_resume_after_checkpoint(fast: EventStoreConfig) -> None:
    async with open_event_store(fast) as store:
        await append(store, "acct", 1, 2, 3)
        async with store.subscribe_to_stream("acct", "proj", buffer_size=10) as sub:
            await sub.wait_subscribed()
            first = await take(sub, 3)
            await append(store, "acct", 4)
            live = await take(sub, 1)
        assert [e.stream_version for e in first + live] == [1, 2, 3, 4]
        await append(store, "acct", 5, 6)
        async with store.subscribe_to_stream("acct", "proj", buffer_size=10) as sub:
            resumed = await take(sub, 2)
        assert [e.stream_version for e in resumed] == [5, 6]


async def test_all_streams_subscription_in_global_order(fast: EventStoreConfig) -> None:
    async with open_event_store(fast) as store:
        await append(store, "a", 1)
        await append(store, "b", 2)
        async with store.subscribe_to_all_streams("all-proj", buffer_size=3) as sub:
            await append(store, "a", 3)
            got = await take(sub, 3)
            stats = sub.statistics()
        assert [e.event_number for e in got] == [1, 2, 3]
        assert stats.last_ack == 3


async def test_unacked_events_are_redelivered(fast: EventStoreConfig) -> None:
    async with open_event_store(fast) as store:
        await append(store, "s", 1, 2, 3)
        async with store.subscribe_to_stream("s", "p", buffer_size=3) as sub:
            got = await take(sub, 3, ack=False)
            sub.ack(got[0])  # only the first
        async with store.subscribe_to_stream("s", "p", buffer_size=3) as sub:
            again = await take(sub, 2)
        assert [e.stream_version for e in again] == [2, 3]


async def test_start_from_current_and_number(fast: EventStoreConfig) -> None:
    async with open_event_store(fast) as store:
        await append(store, "s", 1, 2, 3)
        async with store.subscribe_to_stream("s", "cur", start_from=CURRENT) as sub:
            await sub.wait_subscribed()
            await append(store, "s", 4)
            assert [e.stream_version for e in await take(sub, 1)] == [4]
        async with store.subscribe_to_stream("s", "num", start_from=2, buffer_size=5) as sub:
            assert [e.stream_version for e in await take(sub, 2)] == [3, 4]
        # start_from only applies when the row is created.
        async with store.subscribe_to_stream("s", "num", start_from=0, buffer_size=5) as sub:
            await append(store, "s", 5)
            assert [e.stream_version for e in await take(sub, 1)] == [5]


async def last_seen(config: EventStoreConfig, stream_uuid: str, name: str) -> object:
    async with open_connection(config) as conn:
        return await conn.fetchval(
            f"SELECT last_seen FROM {quote_ident(config.schema)}.subscriptions "
            "WHERE stream_uuid = $1 AND subscription_name = $2",
            stream_uuid,
            name,
        )


async def test_a_subscription_from_the_origin_stores_last_seen_0(fast: EventStoreConfig) -> None:
    """As the Elixir library does (so ``stream_version - last_seen`` is the lag), and
    delivery still starts at the first event."""
    async with open_event_store(fast) as store:
        await append(store, "s", 1, 2)
        async with store.subscribe_to_stream("s", "p", buffer_size=5) as sub:
            await sub.wait_subscribed()
            assert await last_seen(fast, "s", "p") == 0
            got = await take(sub, 2, ack=False)
        assert [e.stream_version for e in got] == [1, 2]
        assert await last_seen(fast, "s", "p") == 0
        async with store.subscribe_to_all_streams("all-p", buffer_size=5) as sub:
            await sub.wait_subscribed()
            assert await last_seen(fast, "$all", "all-p") == 0
            assert [e.event_number for e in await take(sub, 2)] == [1, 2]
        assert await last_seen(fast, "$all", "all-p") == 2
        async with store.subscribe_to_stream("s", "p", buffer_size=5) as sub:
            again = await take(sub, 2)  # nothing was acked: from the first event again
        assert [e.stream_version for e in again] == [1, 2]


async def test_a_subscription_row_with_last_seen_null_starts_at_the_first_event(
    fast: EventStoreConfig,
) -> None:
    """Rows written before stores wrote 0 for the origin hold NULL: the same position."""
    async with open_connection(fast) as conn:
        await conn.execute(
            f"INSERT INTO {quote_ident(fast.schema)}.subscriptions "
            "(stream_uuid, subscription_name, last_seen) VALUES ('s', 'old', NULL)"
        )
    async with open_event_store(fast) as store:
        await append(store, "s", 1, 2, 3)
        [row] = await _operator.subscriptions_with_lag(store)
        assert (row["last_seen"], row["lag"]) == (0, 3)
        async with store.subscribe_to_stream("s", "old", buffer_size=5) as sub:
            got = await take(sub, 3, ack=False)
            sub.ack(got[1])
        assert [e.stream_version for e in got] == [1, 2, 3]
    assert await last_seen(fast, "s", "old") == 2


async def test_checkpoint_threshold(fast: EventStoreConfig) -> None:
    async with open_event_store(fast) as store:
        await append(store, "s", *range(1, 6))
        async with store.subscribe_to_stream(
            "s", "t", buffer_size=1, checkpoint_threshold=3
        ) as sub:
            got = await take(sub, 4)
            assert [e.stream_version for e in got] == [1, 2, 3, 4]
            with trio.fail_after(HANG_GUARD):
                await sub.wait_checkpointed(3)
            # Never more than acknowledged; at least each threshold's worth.
            assert 3 <= sub.statistics().last_persisted <= sub.statistics().last_ack == 4
        # Leaving persisted the last ack (4).
        async with store.subscribe_to_stream("s", "t") as sub:
            assert [e.stream_version for e in await take(sub, 1)] == [5]


async def test_checkpoint_after_persists_acks_below_the_threshold(
    fast: EventStoreConfig,
) -> None:
    """Acks below the threshold do not wake the subscription task, but the first one
    arms the checkpoint_after timer, which then persists them (well before the task
    would wake on its own: it never hibernates here)."""
    config = fast.with_changes(subscription_hibernate_after=600, notification_poll_interval=600)
    async with open_event_store(config) as store:
        await append(store, "s", *range(1, 4))
        async with store.subscribe_to_stream(
            "s", "t", buffer_size=3, checkpoint_threshold=1000, checkpoint_after=0.1
        ) as sub:
            for last in (3, 4):
                got = await take(sub, 1, ack=False)
                await trio.sleep(0.2)  # the task is asleep, with no timer armed
                sub.ack(got[-1])
                with trio.fail_after(HANG_GUARD):
                    await sub.wait_checkpointed(last)
                await append(store, "s", 4)


async def test_a_busy_subscription_does_not_hibernate(fast: EventStoreConfig) -> None:
    config = fast.with_changes(subscription_hibernate_after=0.3)
    async with open_event_store(config) as store:
        await append(store, "s", *range(1, 31))
        async with store.subscribe_to_stream("s", "t", buffer_size=1) as sub:
            with trio.fail_after(HANG_GUARD):
                async for batch in sub:
                    assert sub.statistics().state != "hibernating"
                    await trio.sleep(0.02)  # 30 events over 0.6 s: never idle 0.3 s
                    sub.ack(batch)
                    if batch.last_event_number == 30:
                        break
            with trio.fail_after(HANG_GUARD):
                # Idle now, it does (the state is only seen in statistics: poll it).
                while sub.statistics().state != "hibernating":  # noqa: ASYNC110
                    await trio.sleep(0.05)
            await append(store, "s", 31)  # and a new event wakes it
            assert [n_of(e) for e in await take(sub, 1)] == [31]


async def test_checkpoint_after_mid_catch_up_skips_nothing(fast: EventStoreConfig) -> None:
    """Elixir #325: a checkpoint timer firing during catch-up must not skip events."""
    async with open_event_store(fast) as store:
        await append(store, "s", *range(1, 41))
        async with store.subscribe_to_stream(
            "s",
            "timer",
            buffer_size=2,
            max_size=4,
            checkpoint_threshold=1000,
            checkpoint_after=0.01,
        ) as sub:
            got: list[int] = []
            with trio.fail_after(HANG_GUARD):
                async for batch in sub:
                    got.extend(e.stream_version for e in batch.events)
                    await trio.sleep(0.005)  # let the timer fire between batches
                    sub.ack(batch)
                    if len(got) >= 40:
                        break
        assert got == list(range(1, 41))


async def test_errors(fast: EventStoreConfig) -> None:
    async with open_event_store(fast) as store:
        with pytest.raises(es.InvalidStartFromError):
            async with store.subscribe_to_stream("s", "x", start_from=-1):
                pass
        with pytest.raises(es.InvalidStartFromError):
            async with store.subscribe_to_stream("s", "x", start_from="origin"):  # type: ignore[arg-type]
                pass
        async with store.subscribe_to_stream("s", "x") as sub:
            with pytest.raises(es.SubscriptionAlreadyExistsError):
                async with store.subscribe_to_stream("s", "x"):
                    pass
            await sub.wait_subscribed()
            with pytest.raises(es.UnexpectedAckError):
                sub.ack(99)
            with pytest.raises(es.SubscriptionAlreadyExistsError):
                await store.delete_subscription("s", "x")
        async with store.subscribe_to_stream("s", "c", concurrency_limit=1):
            with pytest.raises(es.TooManySubscribersError):
                async with store.subscribe_to_stream("s", "c", concurrency_limit=1):
                    pass
        await store.delete_subscription("s", "x")
        with pytest.raises(es.SubscriptionNotFoundError):
            await store.delete_subscription("s", "x")


async def test_failing_selector_fails_only_that_subscription(fast: EventStoreConfig) -> None:
    def boom(event: RecordedEvent) -> bool:
        raise RuntimeError("selector bug")

    async with open_event_store(fast) as store:
        await append(store, "s", 1)
        async with store.subscribe_to_stream("s", "bad", selector=boom) as sub:
            with trio.fail_after(HANG_GUARD), pytest.raises(es.SubscriptionFailedError):
                async for _ in sub:
                    pass
        # The store and other subscriptions live on.
        async with store.subscribe_to_stream("s", "good") as sub:
            assert len(await take(sub, 1)) == 1


async def test_competing_consumers_keep_partition_order_through_a_crash(
    fast: EventStoreConfig,
) -> None:
    async with open_event_store(fast) as store:
        for i in range(12):
            await append(store, f"agg-{i % 3}", i)
        received: dict[str, list[int]] = {}
        crashed = trio.Event()

        async def consumer(name: str, crash_after: int | None) -> None:
            async with store.subscribe_to_all_streams(
                "workers",
                concurrency_limit=2,
                buffer_size=2,
                partition_by=lambda e: e.stream_uuid,
            ) as sub:
                handled = 0
                async for batch in sub:
                    for event in batch.events:
                        received.setdefault(event.stream_uuid, []).append(event.stream_version)
                        handled += 1
                        if crash_after is not None and handled == crash_after:
                            crashed.set()
                            return  # leaves with events in flight, unacked
                        sub.ack(event)
                    if sum(len(v) for v in received.values()) >= 14:
                        return

        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consumer, "a", 3)
                nursery.start_soon(consumer, "b", None)
                await crashed.wait()
                await append(store, "agg-0", 99)
        for stream, versions in received.items():
            # Within a partition the order never goes backwards, apart from redelivery
            # of the crashed consumer's unacknowledged event.
            deduped = [v for i, v in enumerate(versions) if v not in versions[:i]]
            assert deduped == sorted(deduped), (stream, versions)
        everything = {(s, v) for s, vs in received.items() for v in vs}
        assert {(f"agg-{i % 3}", i // 3 + 1) for i in range(12)} <= everything


@pytest.mark.parametrize("column_data_type", ["bytea", "jsonb"])
async def test_own_appends_delivered_without_a_read_equal_what_a_read_returns(
    config: EventStoreConfig, column_data_type: str
) -> None:
    cfg = config.with_changes(column_data_type=column_data_type, notification_poll_interval=60)
    await admin.create(cfg)
    await admin.init(cfg)
    try:
        async with (
            open_event_store(cfg) as store,
            store.subscribe_to_stream("s", "p", buffer_size=10) as stream_sub,
            store.subscribe_to_all_streams("q", buffer_size=10) as all_sub,
        ):
            await stream_sub.wait_subscribed()
            await all_sub.wait_subscribed()
            await append(store, "other", 0)
            await store.append_to_stream(
                "s",
                ANY_VERSION,
                [ev(1, metadata={"k": [1, "ü"]}, causation_id=str(uuid.uuid4())), ev(2)],
            )
            live = await take(stream_sub, 2)
            live_all = await take(all_sub, 3)
            assert live == await store.read_stream_forward("s")
            assert live_all == await store.read_all_streams_forward()
    finally:
        await admin.drop(cfg)


async def test_catch_up_reads_pages_ahead_in_order(fast: EventStoreConfig) -> None:
    """A catch-up with buffer_size=1 reads pages (half of max_size), not one event per
    ack, and the page fetched ahead joins on without a gap or a repeat."""
    async with open_event_store(fast) as store:
        for start in range(0, 300, 50):
            await append(store, f"s{start % 3}", *range(start, start + 50))
        got: list[RecordedEvent] = []
        async with store.subscribe_to_all_streams("p", max_size=20) as sub:
            with trio.fail_after(HANG_GUARD):
                async for batch in sub:
                    got.extend(batch.events)
                    sub.ack(batch)
                    await trio.sleep(0.001)  # a consumer slower than reading
                    if len(got) >= 300:
                        break
            reads = sub.statistics().reads
    assert [n_of(e) for e in got] == list(range(300))
    assert [e.event_number for e in got] == list(range(1, 301))
    assert reads <= 40, reads  # 300 / 10 and the last, empty one (was one per ack)


async def test_own_appends_at_the_head_cost_no_read(fast: EventStoreConfig) -> None:
    """The NOTIFY of an own append usually arrives before the append returns: the
    subscription waits for the hand-over instead of reading (one query per append)."""
    async with (
        open_event_store(fast) as store,
        store.subscribe_to_stream("s", "p") as stream_sub,
        store.subscribe_to_all_streams("q") as all_sub,
    ):
        await stream_sub.wait_subscribed()
        await all_sub.wait_subscribed()
        await append(store, "s", 0)
        await take(stream_sub, 1)
        await take(all_sub, 1)
        before = (stream_sub.statistics().reads, all_sub.statistics().reads)
        for i in range(1, 31):
            await append(store, "s", i)
            assert [n_of(e) for e in await take(stream_sub, 1)] == [i]
            assert [n_of(e) for e in await take(all_sub, 1)] == [i]
        after = (stream_sub.statistics().reads, all_sub.statistics().reads)
    assert after == before, (before, after)


async def test_appends_from_another_store_interleaved_with_own(fast: EventStoreConfig) -> None:
    async with (
        open_event_store(fast) as mine,
        open_event_store(fast) as theirs,
        mine.subscribe_to_all_streams("p", buffer_size=100) as sub,
    ):
        await sub.wait_subscribed()
        for i in range(20):
            await append(theirs if i % 3 else mine, f"s{i % 4}", i)
        got = await take(sub, 20)
    assert [e.event_number for e in got] == list(range(1, 21))


async def test_many_subscriptions_starting_at_once_on_a_small_pool(
    fast: EventStoreConfig,
) -> None:
    """Pool overload while many subscriptions start is passing: they retry soon and all
    subscribe (none fails, none waits the whole retry interval)."""
    config = fast.with_changes(
        pool_size=1, queue_target=0.001, queue_interval=0.005, subscription_retry_interval=600
    )
    async with open_event_store(config) as store:
        subscribed = trio.Semaphore(0)

        async def one(i: int) -> None:
            async with store.subscribe_to_stream(f"s{i}", f"p{i}") as sub:
                await sub.wait_subscribed()
                subscribed.release()
                await trio.sleep_forever()

        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:
                for i in range(150):
                    nursery.start_soon(one, i)
                for _ in range(150):
                    await subscribed.acquire()
                assert all(d.failure is None for d in store._subscriptions.active())
                nursery.cancel_scope.cancel()


async def test_an_append_never_fails_because_a_subscriber_cannot_decode(
    fast: EventStoreConfig,
) -> None:
    """The append commits and returns; the subscription that cannot decode the event
    (here a serializer that decodes nothing) parks it and goes on."""

    class Undecodable(es.JsonSerializer):
        def deserialize(self, payload: bytes, event_type: str) -> object:
            raise es.SerializationError(f"cannot decode {event_type!r}")

    undecodable = fast.with_changes(serializer=Undecodable())
    async with (
        open_event_store(undecodable) as store,
        store.subscribe_to_stream("s", "p") as sub,
    ):
        await sub.wait_subscribed()
        assert await store.append_to_stream("s", ANY_VERSION, [ev(1)]) == 1
        with trio.fail_after(HANG_GUARD):
            await sub.wait_checkpointed(1)
        [parked] = await store.parked_events("s", "p")
        assert isinstance(parked.event, es.UndecodedEvent)
        assert "cannot decode 'Counted'" in parked.error


@pytest.mark.parametrize("column_data_type", ["bytea", "jsonb"])
async def test_read_ahead_is_bounded_in_bytes(
    config: EventStoreConfig, column_data_type: str
) -> None:
    """Big events: the subscription holds at most max_buffer_bytes of them (plus the one
    that crosses the bound), catching up, fetching ahead, and when its own appends are
    handed over; and every event still arrives, in order."""
    size = 256 * 1024
    bound = 1024 * 1024

    def big(n: int) -> EventData:
        blob = base64.b64encode(os.urandom(size * 3 // 4)).decode()  # incompressible
        return EventData({"n": n, "blob": blob}, event_type="Big")

    cfg = config.with_changes(column_data_type=column_data_type, notification_poll_interval=60)
    await admin.create(cfg)
    await admin.init(cfg)
    try:
        async with open_event_store(cfg) as store:
            for start in range(0, 40, 10):
                await store.append_to_stream(
                    "s", ANY_VERSION, [big(n) for n in range(start, start + 10)]
                )
            seen: list[int] = []
            buffered: list[int] = []
            async with store.subscribe_to_all_streams(
                "p", buffer_size=100, max_size=1000, max_buffer_bytes=bound
            ) as sub:
                with trio.fail_after(HANG_GUARD):
                    async for batch in sub:
                        buffered.append(sub.statistics().buffered_bytes)
                        seen.extend(n_of(e) for e in batch.events)
                        sub.ack(batch)
                        await trio.sleep(0.01)  # a consumer slower than reading
                        if len(seen) == 40:
                            # Live: one append bigger than the bound is read, not handed over.
                            await store.append_to_stream(
                                "s", ANY_VERSION, [big(n) for n in range(40, 50)]
                            )
                        if len(seen) >= 50:
                            break
                assert sub.statistics().buffered_bytes == 0
    finally:
        await admin.drop(cfg)
    assert seen == list(range(50))
    assert max(buffered) > bound // 2  # it did fill up ...
    assert max(buffered) < bound + 2 * size  # ... to the bound, plus one event (and JSON)


async def test_a_transient_subscription_does_not_replay_history_after_a_failed_lookup(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the stream stands is read when subscribing; if that read fails (the database
    is unavailable), subscribing fails: starting from the first event instead would hand
    the whole history to a consumer of new events."""
    from trio_eventstore import StorageUnavailableError, _storage

    await store.append_to_stream("old", es.NO_STREAM, [es.EventData({"n": 1}, event_type="T")])

    async def unavailable(*_: object) -> None:
        raise StorageUnavailableError("database unavailable (test)")

    monkeypatch.setattr(_storage, "stream_info", unavailable)
    with pytest.raises(StorageUnavailableError):
        async with store.subscribe("old"):
            pass


async def test_a_cancelled_wait_subscribed_raises_cancelled_not_a_group(
    initialized: EventStoreConfig,
) -> None:
    """A standby's `wait_subscribed`, cancelled: `trio.Cancelled` itself (its two waits
    run in an internal nursery; they used to come out as a group of two)."""
    caught: list[BaseException] = []
    async with (
        open_event_store(initialized) as a,
        open_event_store(initialized) as b,
        a.subscribe_to_all_streams("z") as holder,
    ):
        await holder.wait_subscribed()
        async with b.subscribe_to_all_streams("z") as standby:
            with trio.move_on_after(0.3):
                try:
                    await standby.wait_subscribed()
                except BaseException as exc:
                    caught.append(exc)
                    raise
    assert len(caught) == 1
    assert isinstance(caught[0], trio.Cancelled)


async def test_a_partition_key_function_that_raises_fails_the_subscription(
    fast: EventStoreConfig,
) -> None:
    """As a selector that raises does: going on without the key (it used to, silently)
    gave one stream's events to two competing consumers at once, out of order."""

    def key(event: RecordedEvent) -> object:
        if event.event_number == 2:
            raise KeyError("no account")
        return event.stream_uuid

    async with open_event_store(fast) as store:
        await append(store, "s", 1, 2, 3)
        async with store.subscribe_to_stream(
            "s", "keyed", partition_by=key, concurrency_limit=2
        ) as sub:

            async def consume() -> None:
                async for batch in sub:
                    sub.ack(batch)

            with trio.fail_after(HANG_GUARD), pytest.raises(es.SubscriptionFailedError) as failed:
                await consume()
        assert isinstance(failed.value.__cause__, KeyError)
