"""A subscription split into partition groups (``partition_groups``), in one store against
a real server: its rows as a whole (delete, a changed number of groups), its parked events
by its own name, and the statistics of its groups."""

from __future__ import annotations

from collections.abc import AsyncIterator

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
    RetryPolicy,
    _operator,
    _sql,
    open_event_store,
)
from trio_eventstore.__main__ import main
from trio_eventstore._groups import GroupedSubscription

from .helpers import until_parked

HANG_GUARD = 30  # seconds: a guard against hangs, never a speed assertion


def _key(event: RecordedEvent) -> str:
    return event.stream_uuid


async def append(store: EventStore, first: int, last: int) -> None:
    """Events first..last, one each to streams ``s-<n % 8>`` (so every group gets some)."""
    for n in range(first, last + 1):
        await store.append_to_stream(
            f"s-{n % 8}", ANY_VERSION, [EventData({"n": n}, event_type="Counted")]
        )


async def rows(store: EventStore) -> dict[tuple[str, str], int]:
    """Every subscription row: (stream, name) -> last_seen."""
    found = await store._db.fetch(_sql.list_subscriptions(store.config.schema))
    return {(r["stream_uuid"], r["subscription_name"]): int(r["last_seen"] or 0) for r in found}


async def add_row(store: EventStore, stream_uuid: str, name: str, last_seen: int) -> None:
    sql = _sql.create_subscription(store.config.schema)
    await store._db.execute(sql, stream_uuid, name, last_seen)


async def consume(
    store: EventStore, name: str, groups: int, up_to: int, **options: object
) -> list[int]:
    """Subscribe to ``$all`` split into ``groups``, acknowledge every batch until each
    group has acknowledged (or skipped) every event up to ``up_to``, leave; the event
    numbers delivered."""
    delivered: list[int] = []

    async def take(sub: es.Subscription) -> None:
        async for batch in sub:
            delivered.extend(e.event_number for e in batch)
            sub.ack(batch)

    with trio.fail_after(HANG_GUARD):
        async with (
            store.subscribe_to_all_streams(
                name,
                partition_by=_key,
                partition_groups=groups,
                buffer_size=4,
                **options,  # type: ignore[arg-type]
            ) as sub,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(take, sub)
            await sub.wait_acked(up_to)
            nursery.cancel_scope.cancel()
    return delivered


@pytest.fixture
async def quick(initialized: EventStoreConfig) -> AsyncIterator[EventStore]:
    config = initialized.with_changes(
        subscription_retry_interval=0.2, notification_poll_interval=0.5
    )
    async with open_event_store(config) as store:
        yield store


# -- delete_subscription ----------------------------------------------------------------------


def _unrelated() -> list[str]:
    """Names that look like group rows of "g" and are not: users' own subscriptions."""
    return ["g#archive", "g#g", "g#g1", "g#g0/2x", "g#g2/2", "g#g01/2", "gx#g0/2", "g#g0/2#g0/2"]


async def test_delete_subscription_deletes_every_partition_group(quick: EventStore) -> None:
    store = quick
    await append(store, 1, 8)
    assert sorted(await consume(store, "g", 2, 8)) == list(range(1, 9))
    await add_row(store, "$all", "g#g3/4", 5)  # left by an earlier number of groups
    for name in _unrelated():
        await add_row(store, "$all", name, 1)
    await add_row(store, "s-1", "g#g0/2", 1)  # the same name on another stream

    await store.delete_subscription("$all", "g")

    left = await rows(store)
    assert sorted(left) == sorted([("$all", n) for n in _unrelated()] + [("s-1", "g#g0/2")])
    with pytest.raises(es.SubscriptionNotFoundError):
        await store.delete_subscription("$all", "g")
    # Subscribed again, the groups start afresh (from the origin), not where they were.
    assert sorted(await consume(store, "g", 2, 8)) == list(range(1, 9))


async def test_delete_subscription_refuses_a_group_active_in_this_store(
    quick: EventStore,
) -> None:
    store = quick
    async with store.subscribe_to_all_streams("g", partition_by=_key, partition_groups=2) as sub:
        await sub.wait_subscribed()
        with pytest.raises(es.SubscriptionAlreadyExistsError, match="leave it first"):
            await store.delete_subscription("$all", "g")
    assert len(await rows(store)) == 2


async def test_operator_deletes_every_group_unless_one_is_held(
    quick: EventStore,
) -> None:
    store = quick
    config = store.config
    await append(store, 1, 8)
    async with store.subscribe_to_all_streams("g", partition_by=_key, partition_groups=2) as sub:
        await sub.wait_subscribed()
        with pytest.raises(es.SubscriptionAlreadyExistsError, match="is active"):
            await _operator.delete_subscription(config, "$all", "g")
        assert len(await rows(store)) == 2
    await add_row(store, "$all", "g#g1/3", 2)
    await add_row(store, "$all", "g#archive", 2)
    await _operator.delete_subscription(config, "$all", "g")
    assert list(await rows(store)) == [("$all", "g#archive")]
    with pytest.raises(es.SubscriptionNotFoundError):
        await _operator.delete_subscription(config, "$all", "g")


def test_operator_cli_delete_and_reset_a_grouped_subscription(
    eventstore_config: EventStoreConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    async def seed() -> None:
        async with open_event_store(eventstore_config) as store:
            await append(store, 1, 8)
            await consume(store, "g", 2, 8)

    trio.run(seed)
    args = ["--url", str(eventstore_config.url), "--schema", eventstore_config.schema]
    assert main(["reset-subscription", "$all", "g", "3", *args]) == 0

    async def checkpoints() -> dict[tuple[str, str], int]:
        async with open_event_store(eventstore_config) as store:
            return await rows(store)

    assert trio.run(checkpoints) == {("$all", "g#g0/2"): 3, ("$all", "g#g1/2"): 3}
    assert main(["delete-subscription", "$all", "g", *args]) == 0
    assert trio.run(checkpoints) == {}
    capsys.readouterr()


# -- a changed number of groups ----------------------------------------------------------------


async def test_more_groups_start_where_the_old_groups_were(quick: EventStore) -> None:
    store = quick
    await append(store, 1, 10)
    assert sorted(await consume(store, "g", 2, 10, start_from=CURRENT)) == []
    await append(store, 11, 20)
    assert sorted(await consume(store, "g", 2, 20, start_from=CURRENT)) == list(range(11, 21))
    await append(store, 21, 30)
    # 2 -> 4 groups: the new groups deliver what the old ones had not, nothing older.
    assert sorted(await consume(store, "g", 4, 30, start_from=CURRENT)) == list(range(21, 31))
    assert sorted(await rows(store)) == [("$all", f"g#g{i}/4") for i in range(4)]


async def test_new_groups_start_at_the_lowest_old_checkpoint(quick: EventStore) -> None:
    store = quick
    await append(store, 1, 20)
    await add_row(store, "$all", "g#g0/2", 12)
    await add_row(store, "$all", "g#g1/2", 7)
    await add_row(store, "$all", "g#g0/3", 2)  # a half-done change before: lower still
    for name in _unrelated():
        await add_row(store, "$all", name, 1)
    delivered = await consume(store, "g", 4, 20)
    assert sorted(delivered) == list(range(3, 21))  # at least once: none skipped
    left = await rows(store)
    assert {n for s, n in left if not n.startswith("g#g") or n in _unrelated()} == set(_unrelated())
    assert sorted(n for _, n in left if n not in _unrelated()) == [f"g#g{i}/4" for i in range(4)]
    assert all(left[("$all", f"g#g{i}/4")] == 20 for i in range(4))


async def test_fewer_groups_then_back(quick: EventStore) -> None:
    store = quick
    await append(store, 1, 10)
    assert sorted(await consume(store, "g", 4, 10)) == list(range(1, 11))
    await append(store, 11, 15)
    assert sorted(await consume(store, "g", 1, 15)) == list(range(11, 16))
    await append(store, 16, 18)
    assert sorted(await consume(store, "g", 4, 18)) == list(range(16, 19))


# -- parked events by the subscription's own name ----------------------------------------------


async def park_and_take(sub: es.Subscription, poison: set[int], delivered: list[int]) -> None:
    """Give back (to be parked) the first delivery of each event in ``poison``; take
    and acknowledge every other delivery."""
    nacked: set[int] = set()
    async for batch in sub:
        for event in batch:
            if event.event_number in poison and event.event_number not in nacked:
                nacked.add(event.event_number)
                sub.nack(event, retry=False, error="poison")
                break
            delivered.append(event.event_number)
            sub.ack(event)


async def parked_numbers(store: EventStore, name: str, count: int) -> list[int]:
    """The parked events' numbers, once there are ``count`` of them."""
    while len(parked := await store.parked_events("$all", name)) != count:  # noqa: ASYNC110
        await trio.sleep(0.02)
    return [p.event.event_number for p in parked]


#: a subscription split into 2 groups, parking an event given back at once
GROUPED: dict[str, object] = {
    "partition_by": _key,
    "partition_groups": 2,
    "retry_policy": RetryPolicy(max_attempts=1),
}


async def test_parked_events_of_a_grouped_subscription_by_its_name(quick: EventStore) -> None:
    store = quick
    await append(store, 1, 8)
    delivered: list[int] = []
    with trio.fail_after(HANG_GUARD):
        async with (
            store.subscribe_to_all_streams("g", **GROUPED) as sub,  # type: ignore[arg-type]
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(park_and_take, sub, {2, 3}, delivered)
            await sub.wait_acked(8)
            assert await parked_numbers(store, "g", 2) == [2, 3]
            parked = await store.parked_events("$all", "g")
            assert [p.error for p in parked] == ["poison", "poison"]
            # The groups' own names still work, and give their own only.
            by_group = [
                p.event.event_number
                for i in range(2)
                for p in await store.parked_events("$all", f"g#g{i}/2")
            ]
            assert sorted(by_group) == [2, 3]
            assert await store.replay_parked("$all", "g", [parked[0].event.event_id]) == 1
            while 2 not in delivered:  # noqa: ASYNC110
                await trio.sleep(0.02)
            assert await parked_numbers(store, "g", 1) == [3]  # 2 was acknowledged
            assert await store.discard_parked("$all", "g") == 1
            assert await store.parked_events("$all", "g") == []
            assert await store.replay_parked("$all", "g") == 0
            nursery.cancel_scope.cancel()
    assert sorted(delivered) == [1, 2, 4, 5, 6, 7, 8]
    with pytest.raises(es.SubscriptionNotFoundError, match="nosuch"):
        await store.parked_events("$all", "nosuch")


def test_operator_cli_parked_list_of_a_grouped_subscription(
    eventstore_config: EventStoreConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    async def seed() -> None:
        config = eventstore_config.with_changes(subscription_retry_interval=0.2)
        async with open_event_store(config) as store:
            await append(store, 1, 4)
            with trio.fail_after(HANG_GUARD):
                async with (
                    store.subscribe_to_all_streams("g", **GROUPED) as sub,  # type: ignore[arg-type]
                    trio.open_nursery() as nursery,
                ):
                    nursery.start_soon(park_and_take, sub, {3}, [])
                    await sub.wait_acked(4)
                    await parked_numbers(store, "g", 1)
                    nursery.cancel_scope.cancel()

    trio.run(seed)
    capsys.readouterr()
    args = ["--url", str(eventstore_config.url), "--schema", eventstore_config.schema]
    assert main(["parked", "list", "$all", "g", "--json", *args]) == 0
    assert '"event_number": 3' in capsys.readouterr().out


# -- statistics ---------------------------------------------------------------------------------


async def test_statistics_name_the_group_and_the_balance_member(
    initialized: EventStoreConfig,
) -> None:
    config = initialized.with_changes(balance_subscriptions=True)
    async with (
        open_event_store(config) as store,
        store.subscribe_to_all_streams("g", partition_by=_key, partition_groups=3) as sub,
        store.subscribe_to_all_streams("plain") as plain,
    ):
        await sub.wait_subscribed()
        await plain.wait_subscribed()
        assert isinstance(sub, GroupedSubscription)
        each = sub.group_statistics()
        assert [(s.name, s.group, s.groups) for s in each] == [
            (f"g#g{i}/3", i, 3) for i in range(3)
        ]
        whole = sub.statistics()
        assert (whole.name, whole.group, whole.groups) == ("g", None, 3)
        one = plain.statistics()
        assert (one.group, one.groups) == (None, None)
        member = store.statistics().balance_member
        assert member is not None
        assert len(member) == 8
        assert store.statistics().balance_members == 1
        details = store.statistics().subscription_details
        assert {d.balance_member for d in details} == {member}
        assert sorted((d.name, d.group) for d in details) == [
            ("g#g0/3", 0),
            ("g#g1/3", 1),
            ("g#g2/3", 2),
            ("plain", None),
        ]
    async with (
        open_event_store(initialized) as store,
        store.subscribe_to_all_streams("plain") as plain,
    ):
        await plain.wait_subscribed()
        assert plain.statistics().balance_member is None
        assert store.statistics().balance_member is None
        assert store.statistics().balance_members == 0


async def test_one_groups_failure_reaches_the_consumer(quick: EventStore) -> None:
    """A selector that raises for one stream's events fails only that stream's group
    (the others never call it for them): the consumer of all the groups must hear of it
    (it went on with the other groups' events, and then waited for ever)."""

    def selector(event: RecordedEvent) -> bool:
        if event.stream_uuid == "s-3":
            raise RuntimeError("selector bug")
        return True

    await append(quick, 1, 16)
    async with quick.subscribe_to_all_streams(
        "g", partition_by=_key, partition_groups=4, selector=selector
    ) as sub:

        async def take() -> None:
            async for batch in sub:
                sub.ack(batch)

        with trio.fail_after(HANG_GUARD), pytest.raises(es.SubscriptionFailedError) as failed:
            await take()
    assert isinstance(failed.value.__cause__, RuntimeError)
    assert isinstance(sub, GroupedSubscription)
    failed_groups = [s.group for s in sub.group_statistics() if s.role == "failed"]
    assert len(failed_groups) == 1


async def test_a_replay_whose_key_cannot_be_computed_reaches_its_groups_consumer(
    quick: EventStore,
) -> None:
    """Parked under one key function, replayed under one that cannot read it: the batch
    goes to the group that delivered it (routing by the key raised the key function's
    error at every replay)."""
    await quick.append_to_stream("s", ANY_VERSION, [EventData({"k": "a"}, event_type="T")])
    with trio.fail_after(HANG_GUARD):
        async with quick.subscribe_to_all_streams(
            "g",
            partition_by=lambda e: e.data["k"],  # type: ignore[index]
            partition_groups=2,
        ) as sub:
            [event] = await sub.__anext__()
            sub.nack(event, retry=False, error="poison")
            await until_parked(quick, "$all", "g")
        async with quick.subscribe_to_all_streams(
            "g",
            partition_by=lambda e: e.data["key"],  # type: ignore[index]
            partition_groups=2,
        ) as sub:
            await sub.wait_subscribed()
            assert await quick.replay_parked("$all", "g") == 1
            batch = await sub.__anext__()
            assert [e.event_number for e in batch.events] == [1]
            sub.ack(batch)
            await until_parked(quick, "$all", "g", parked=False)  # acknowledged: its record goes


async def test_a_stale_batch_is_never_taken_for_another_groups(quick: EventStore) -> None:
    """A replay parked in group 1 under the old key, which the new key puts in group 0,
    goes stale in the inbox (a nack of group 1's earlier batch gives it back): routed by
    its key to group 0, whose session and epoch were the same numbers, it was handed to
    the subscriber, and its ack raised UnexpectedAckError. Each batch now says which
    group's consumer it was sent to."""
    from trio_eventstore._balance import group_of

    def key_in(group: int, prefix: str) -> str:
        return next(f"{prefix}{i}" for i in range(1000) if group_of(f"{prefix}{i}", 2) == group)

    k1, new0, new1 = key_in(1, "old"), key_in(0, "new"), key_in(1, "new")
    await quick.append_to_stream(
        "s", ANY_VERSION, [EventData({"k": k1, "key": new0}, event_type="T")]
    )
    with trio.fail_after(HANG_GUARD):
        async with quick.subscribe_to_all_streams(
            "g",
            partition_by=lambda e: e.data["k"],  # type: ignore[index]
            partition_groups=2,
        ) as sub:
            batch = await sub.__anext__()
            sub.nack(batch.events[0], retry=False, error="poison")  # parked in group 1
            await until_parked(quick, "$all", "g")
    await quick.append_to_stream(
        "s", ANY_VERSION, [EventData({"k": "x", "key": new1}, event_type="T")]
    )
    policy = es.RetryPolicy(max_attempts=5, backoff=3.0, jitter=0.0)
    with trio.fail_after(HANG_GUARD):
        async with quick.subscribe_to_all_streams(
            "g",
            partition_by=lambda e: e.data["key"],  # type: ignore[index]
            partition_groups=2,
            buffer_size=10,
            retry_policy=policy,
        ) as sub:
            assert isinstance(sub, GroupedSubscription)
            first = await sub.__anext__()
            assert [e.event_number for e in first.events] == [2]
            assert await quick.replay_parked("$all", "g") == 1
            while sub.group_statistics()[1].in_flight < 2:  # noqa: ASYNC110
                await trio.sleep(0.01)
            sub.nack(first.events[0], error="transient")  # the replay batch is stale now
            with trio.move_on_after(1.5) as waited:
                await sub.__anext__()
            assert waited.cancelled_caught, "a stale batch was handed to the subscriber"
