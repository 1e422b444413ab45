"""Exactly-once projections: the read model and the position commit together."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio

import trio_eventstore as es
from trio_eventstore import (
    ANY_VERSION,
    DatabaseError,
    EventData,
    EventStore,
    Projection,
    RecordedEvent,
    StorageUnavailableError,
    SubscriberSpec,
    TransactionConnection,
    open_event_store,
    open_subscriber_daemon,
)
from trio_eventstore._sql import quote_ident
from trio_eventstore._subscription_types import mark_replay

from .helpers import until_parked

HANG_GUARD = 10  # seconds: a guard against hangs, never a speed assertion


@pytest.fixture
async def rm(store: EventStore) -> AsyncIterator[str]:
    """A read-model schema of its own, with a per-key counter table."""
    schema = f"rm_{uuid.uuid4().hex[:10]}"
    s = quote_ident(schema)
    await store._db.execute(f"CREATE SCHEMA {s}")
    await store._db.execute(f"CREATE TABLE {s}.counts (key text PRIMARY KEY, n bigint NOT NULL)")
    yield schema
    with trio.CancelScope(shield=True):
        await store._db.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")


def upsert(schema: str) -> str:
    return (
        f"INSERT INTO {quote_ident(schema)}.counts (key, n) VALUES ($1, 1) "
        "ON CONFLICT (key) DO UPDATE SET n = counts.n + 1"
    )


@attrs.define
class Counting:
    """A per-event handler counting events per ``data["key"]``; remembers its calls."""

    schema: str
    seen: list[int] = attrs.Factory(list)
    fail_on: int | None = None

    async def __call__(self, conn: TransactionConnection, event: RecordedEvent) -> None:
        assert isinstance(event.data, dict)
        await conn.execute(upsert(self.schema), event.data["key"])
        self.seen.append(event.event_number)
        if event.event_number == self.fail_on:
            raise RuntimeError(f"failed on {event.event_number}")


async def counts(store: EventStore, schema: str) -> dict[str, int]:
    rows = await store._db.fetch(f"SELECT key, n FROM {quote_ident(schema)}.counts")
    return {row["key"]: row["n"] for row in rows}


async def append_keys(store: EventStore, keys: list[str], stream: str = "s") -> None:
    await store.append_to_stream(
        stream, ANY_VERSION, [EventData({"key": k}, event_type="Counted") for k in keys]
    )


async def tables(store: EventStore, schema: str) -> set[str]:
    rows = await store._db.fetch(
        "SELECT tablename FROM pg_catalog.pg_tables WHERE schemaname = $1", schema
    )
    return {row["tablename"] for row in rows}


# -- arguments ------------------------------------------------------------------------


async def _noop(conn: TransactionConnection, event: Any) -> None:
    pass


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"name": "", "schema": "rm"}, ValueError),
        ({"name": 1, "schema": "rm"}, TypeError),
        ({"name": "p", "schema": ""}, ValueError),
        ({"name": "p", "schema": "r\x00m"}, ValueError),
        ({"name": "p", "schema": "r" * 64}, ValueError),  # PostgreSQL would cut it to 63
        ({"name": "p", "schema": "é" * 32}, ValueError),  # 64 bytes
        ({"name": "p", "schema": "rm", "batch": 1}, TypeError),
        ({"name": "p", "schema": "rm", "setup": 3}, TypeError),
        ({"name": "p", "schema": "rm", "handler": "nope"}, TypeError),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs: dict[str, Any], error: type) -> None:
    name = kwargs.pop("name")
    handler = kwargs.pop("handler", _noop)
    with pytest.raises(error):
        Projection(name, handler, **kwargs)


def test_the_schema_must_be_named() -> None:
    """No default: the position table never lands in the store's schema by accident."""
    with pytest.raises(TypeError):
        Projection("p", _noop)  # type: ignore[call-arg]


async def test_events_must_ascend(store: EventStore, rm: str) -> None:
    await append_keys(store, ["a", "b"])
    events = await store.read_all_streams_forward()
    projection = Projection("p", Counting(rm), schema=rm)
    with pytest.raises(ValueError, match="ascending"):
        await projection.apply(store, events[::-1])
    with pytest.raises(TypeError):
        await projection.apply(store, ["not an event"])  # type: ignore[list-item]
    assert await tables(store, rm) == {"counts"}  # refused before any I/O


# -- the position table -----------------------------------------------------------------


async def test_position_table_is_created_in_the_users_schema_only(
    store: EventStore, rm: str
) -> None:
    before = await tables(store, store.config.schema)
    await append_keys(store, ["a"])
    projection = Projection("p", Counting(rm), schema=rm)
    assert await projection.position(store) == 0  # no table yet: nothing applied
    await projection.apply(store, await store.read_all_streams_forward())
    assert await tables(store, rm) == {"counts", "projection_versions", "projection_replays"}
    assert await tables(store, store.config.schema) == before
    [row] = await store._db.fetch(
        f"SELECT * FROM {quote_ident(rm)}.projection_versions WHERE projection_name = 'p'"
    )
    assert row["last_seen_event_number"] == 1
    assert row["inserted_at"] is not None
    assert row["updated_at"] is not None


async def test_a_commanded_projection_versions_table_works(store: EventStore, rm: str) -> None:
    """The table as Commanded's migrations make it: timestamps without time zone and
    without defaults, a NULL position (read as 0)."""
    s = quote_ident(rm)
    await store._db.execute(
        f"CREATE TABLE {s}.projection_versions (projection_name text PRIMARY KEY, "
        "last_seen_event_number bigint, inserted_at timestamp(0) NOT NULL, "
        "updated_at timestamp(0) NOT NULL)"
    )
    await store._db.execute(f"INSERT INTO {s}.projection_versions VALUES ('p', NULL, now(), now())")
    await append_keys(store, ["a", "b"])
    handler = Counting(rm)
    projection = Projection("p", handler, schema=rm)
    await projection.apply(store, await store.read_all_streams_forward())
    assert handler.seen == [1, 2]
    assert await projection.position(store) == 2


async def test_setup_runs_in_the_creating_transaction(store: EventStore) -> None:
    schema = f"rm_{uuid.uuid4().hex[:10]}"
    s = quote_ident(schema)
    calls = []

    async def setup(conn: TransactionConnection) -> None:
        calls.append(1)
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {s}.counts (key text PRIMARY KEY, n bigint NOT NULL)"
        )

    try:
        await append_keys(store, ["a", "a"])
        projection = Projection("p", Counting(schema), schema=schema, setup=setup)
        await projection.apply(store, await store.read_all_streams_forward())
        await projection.apply(store, await store.read_all_streams_forward())
        assert calls == [1]  # once per store
        assert await counts(store, schema) == {"a": 2}
    finally:
        await store._db.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")


async def test_concurrent_creation_of_the_table_is_retried(store: EventStore, rm: str) -> None:
    """Two projections prepared at once in one schema: both CREATE TABLE, the second
    fails on the catalog's unique index once the first commits; it tries again."""
    both_in = trio.Event()
    entered = 0

    async def setup(conn: TransactionConnection) -> None:
        nonlocal entered
        entered += 1
        if entered <= 2:  # the first attempts of both: create at the same time
            if entered == 2:
                both_in.set()
            await both_in.wait()

    first = Projection("first", _noop, schema=rm, setup=setup)
    second = Projection("second", _noop, schema=rm, setup=setup)
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first.prepare, store)
            nursery.start_soon(second.prepare, store)
    # Both succeed; when their CREATE TABLEs collided (most runs), one of them ran again.
    assert entered in (2, 3)
    assert "projection_versions" in await tables(store, rm)


# -- exactly once -------------------------------------------------------------------------


async def test_events_at_or_below_the_position_are_skipped(store: EventStore, rm: str) -> None:
    await append_keys(store, ["a", "b", "a", "c", "a", "b", "c"])
    events = await store.read_all_streams_forward()
    handler = Counting(rm)
    projection = Projection("p", handler, schema=rm)
    assert await projection.apply(store, events[:5]) == events[:5]
    applied = await projection.apply(store, events[2:])  # 3..5 again, then 6, 7
    assert [e.event_number for e in applied] == [6, 7]
    assert await projection.apply(store, events[3]) == []
    assert handler.seen == [1, 2, 3, 4, 5, 6, 7]
    assert await counts(store, rm) == {"a": 3, "b": 2, "c": 2}
    assert await projection.position(store) == 7


async def test_a_batch_is_one_transaction(store: EventStore, rm: str) -> None:
    await append_keys(store, ["a", "b", "c"])
    txids: list[int] = []

    async def per_event(conn: TransactionConnection, event: RecordedEvent) -> None:
        txids.append(await conn.fetchval("SELECT txid_current()"))

    await Projection("p", per_event, schema=rm).apply(store, await store.read_all_streams_forward())
    assert len(txids) == 3
    assert len(set(txids)) == 1

    batches: list[list[int]] = []

    async def per_batch(conn: TransactionConnection, events: list[RecordedEvent]) -> None:
        batches.append([e.event_number for e in events])
        await conn.executemany(upsert(rm), [(e.data["key"],) for e in events])  # type: ignore[index]

    batched = Projection("q", per_batch, schema=rm, batch=True)
    await batched.apply(store, await store.read_all_streams_forward())
    assert batches == [[1, 2, 3]]
    assert await counts(store, rm) == {"a": 1, "b": 1, "c": 1}


async def test_a_failing_handler_rolls_back_the_read_model_and_the_position(
    store: EventStore, rm: str
) -> None:
    await append_keys(store, ["a", "b", "c"])
    events = await store.read_all_streams_forward()
    failing = Projection("p", Counting(rm, fail_on=3), schema=rm)
    with pytest.raises(RuntimeError, match="failed on 3"):
        await failing.apply(store, events)
    assert await counts(store, rm) == {}  # events 1 and 2 were rolled back too
    assert await failing.position(store) == 0
    handler = Counting(rm)
    await Projection("p", handler, schema=rm).apply(store, events)
    assert handler.seen == [1, 2, 3]
    assert await counts(store, rm) == {"a": 1, "b": 1, "c": 1}


async def test_an_error_caught_inside_the_handler_does_not_commit(
    store: EventStore, rm: str
) -> None:
    """PostgreSQL answers ROLLBACK to the COMMIT of an aborted transaction: the batch
    must not count as applied (its ack would lose it)."""
    await append_keys(store, ["a"])  # one event: nothing runs after the caught error

    caught_inside: list[str | None] = []

    async def swallowing(conn: TransactionConnection, event: RecordedEvent) -> None:
        await conn.execute(upsert(rm), "x")
        try:
            await conn.execute("SELECT 1/0")
        except DatabaseError as exc:
            caught_inside.append(exc.sqlstate)

    projection = Projection("p", swallowing, schema=rm)
    with pytest.raises(DatabaseError) as caught:
        await projection.apply(store, await store.read_all_streams_forward())
    assert caught.value.sqlstate == "25P02"
    assert caught_inside == ["22012"]
    assert await projection.position(store) == 0
    assert await counts(store, rm) == {}


async def test_a_handler_ending_the_transaction_itself_is_refused(
    store: EventStore, rm: str
) -> None:
    await append_keys(store, ["a"])

    async def committing(conn: TransactionConnection, event: RecordedEvent) -> None:
        await conn.execute("COMMIT")

    with pytest.raises(DatabaseError, match="ended inside its block"):
        await Projection("p", committing, schema=rm).apply(
            store, await store.read_all_streams_forward()
        )
    assert await store.read_all_streams_forward() != []  # the pool goes on


async def test_a_sync_handler_is_refused_and_rolled_back(store: EventStore, rm: str) -> None:
    await append_keys(store, ["a"])

    def sync(conn: TransactionConnection, event: RecordedEvent) -> None:
        pass

    projection = Projection("p", sync, schema=rm)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async function"):
        await projection.apply(store, await store.read_all_streams_forward())
    assert await projection.position(store) == 0


async def test_cancelling_mid_batch_rolls_back(store: EventStore, rm: str) -> None:
    await append_keys(store, ["a", "b"])
    events = await store.read_all_streams_forward()
    started = trio.Event()

    async def slow(conn: TransactionConnection, event: RecordedEvent) -> None:
        await conn.execute(upsert(rm), "a")
        started.set()
        await trio.sleep_forever()

    projection = Projection("p", slow, schema=rm)
    with trio.move_on_after(HANG_GUARD) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(projection.apply, store, events)
            await started.wait()
            nursery.cancel_scope.cancel()
    assert not scope.cancelled_caught
    assert await counts(store, rm) == {}
    assert await projection.position(store) == 0
    handler = Counting(rm)
    await Projection("p", handler, schema=rm).apply(store, events)  # the pool is fine
    assert handler.seen == [1, 2]


async def test_cancelling_mid_statement_cancels_it_on_the_server(
    store: EventStore, rm: str
) -> None:
    """A handler's statement cut short (the service stops, a deadline) is cancelled on the
    server too: its transaction's row lock is released at once, and the projection
    restarts without waiting (it waited for the abandoned statement to end, then timed
    out saying the database did not answer)."""
    await append_keys(store, ["a"])
    events = await store.read_all_streams_forward()
    started = trio.Event()

    async def stuck(conn: TransactionConnection, event: RecordedEvent) -> None:
        started.set()
        await conn.execute("SELECT pg_sleep(600)")

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Projection("p", stuck, schema=rm).apply, store, events)
            await started.wait()
            await trio.sleep(0.2)  # the statement is running on the server
            nursery.cancel_scope.cancel()
        while await store._db.fetchval(  # noqa: ASYNC110 - the server's state, polled
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(600)'"
        ):
            await trio.sleep(0.05)
        handler = Counting(rm)
        await Projection("p", handler, schema=rm).apply(store, events)
    assert handler.seen == [1]


async def test_a_statement_past_the_timeout_drops_the_connection(
    store: EventStore, rm: str
) -> None:
    await append_keys(store, ["a"])

    async def sleepy(conn: TransactionConnection, event: RecordedEvent) -> None:
        await conn.execute("SELECT pg_sleep(1.5)")

    projection = Projection("p", sleepy, schema=rm)
    await projection.prepare(store)
    async with open_event_store(attrs.evolve(store.config, timeout=0.3)) as impatient:
        with trio.fail_after(HANG_GUARD), pytest.raises(StorageUnavailableError):
            await projection.apply(impatient, await store.read_all_streams_forward())
    assert await projection.position(store) == 0


async def test_the_connection_is_unusable_after_the_batch(store: EventStore, rm: str) -> None:
    await append_keys(store, ["a"])
    kept: list[TransactionConnection] = []

    async def keep(conn: TransactionConnection, event: RecordedEvent) -> None:
        kept.append(conn)

    await Projection("p", keep, schema=rm).apply(store, await store.read_all_streams_forward())
    with pytest.raises(RuntimeError, match="has ended"):
        await kept[0].fetchval("SELECT 1")


# -- on subscriptions and under the daemon --------------------------------------------------


async def _lose_checkpoint(store: EventStore, name: str) -> None:
    """As if the process had died before persisting its checkpoint."""
    await store._db.execute(
        f"UPDATE {quote_ident(store.config.schema)}.subscriptions SET last_seen = 0 "
        "WHERE subscription_name = $1",
        name,
    )


async def _checkpoint(store: EventStore, name: str) -> int:
    value = await store._db.fetchval(
        f"SELECT last_seen FROM {quote_ident(store.config.schema)}.subscriptions "
        "WHERE subscription_name = $1",
        name,
    )
    return int(value or 0)


async def _run_until(
    store: EventStore, projection: Projection, position: int, **options: Any
) -> None:
    with trio.fail_after(HANG_GUARD):
        async with (
            store.subscribe_to_all_streams(projection.name, **options) as sub,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(projection.run, store, sub)
            await sub.wait_acked(position)  # acked after the commit
            assert await projection.position(store) >= position
            nursery.cancel_scope.cancel()


async def test_run_on_a_subscription_skips_redelivered_events(store: EventStore, rm: str) -> None:
    keys = [f"k{i % 3}" for i in range(30)]
    await append_keys(store, keys[:20], "s1")
    await append_keys(store, keys[20:], "s2")
    handler = Counting(rm)
    projection = Projection("counts", handler, schema=rm)
    await _run_until(store, projection, 30, buffer_size=7, checkpoint_threshold=100)
    assert await _checkpoint(store, "counts") == 30  # acked, persisted on leaving
    assert handler.seen == list(range(1, 31))

    await _lose_checkpoint(store, "counts")
    await append_keys(store, ["k0"], "s1")
    await _run_until(store, projection, 31, buffer_size=7)
    assert handler.seen == list(range(1, 32))  # 1..30 again: skipped, acked
    assert await _checkpoint(store, "counts") == 31
    assert await counts(store, rm) == dict(Counter([*keys, "k0"]))


async def test_wait_acked_sees_a_stored_checkpoint(store: EventStore) -> None:
    """A process that resumes at a checkpoint already past what it waits for (the
    workers and the example wait for their last event this way)."""
    await append_keys(store, ["a", "b"])
    async with store.subscribe_to_all_streams("w") as sub:
        async for batch in sub:
            sub.ack(batch)
            if batch.last_event_number == 2:
                break
    assert await _checkpoint(store, "w") == 2
    with trio.fail_after(HANG_GUARD):
        async with store.subscribe_to_all_streams("w") as sub:
            await sub.wait_acked(2)


async def test_run_acknowledges_only_what_committed(store: EventStore, rm: str) -> None:
    await append_keys(store, ["a", "b", "c"])
    projection = Projection("p", Counting(rm, fail_on=3), schema=rm)
    with trio.fail_after(HANG_GUARD), pytest.raises(RuntimeError, match="failed on 3"):
        async with store.subscribe_to_all_streams("p", checkpoint_threshold=100) as sub:
            await projection.run(store, sub)
    assert await projection.position(store) == 2
    assert await _checkpoint(store, "p") == 2  # persisted on leaving: 3 comes again


async def test_run_refuses_competing_consumers(store: EventStore, rm: str) -> None:
    projection = Projection("p", _noop, schema=rm)
    async with store.subscribe_to_all_streams("p", concurrency_limit=2) as sub:
        with trio.fail_after(HANG_GUARD), pytest.raises(ValueError, match="competing consumers"):
            await projection.run(store, sub)


async def test_run_refuses_partition_groups_and_transient_subscriptions(
    store: EventStore, rm: str
) -> None:
    """Partition groups deliver out of order (a position-based skip would drop the
    events of one group below the position another reached); a transient subscription
    has no acknowledgements (it raised AttributeError)."""
    projection = Projection("p", _noop, schema=rm)
    async with store.subscribe_to_all_streams(
        "g", partition_by=lambda e: e.stream_uuid, partition_groups=2
    ) as grouped:
        with trio.fail_after(HANG_GUARD), pytest.raises(ValueError, match="partition groups"):
            await projection.run(store, grouped)
    async with store.subscribe("$all") as transient:
        with trio.fail_after(HANG_GUARD), pytest.raises(TypeError, match="persistent"):
            await projection.run(store, transient)  # type: ignore[arg-type]


async def test_under_the_subscriber_daemon(store: EventStore, rm: str) -> None:
    await append_keys(store, ["a", "b", "a"])
    handler = Counting(rm)
    projection = Projection("daemon-counts", handler, schema=rm)
    spec = SubscriberSpec(name="daemon-counts", handler=projection.event_handler(store))
    for _ in range(2):  # the second time from a lost checkpoint: all skipped
        with trio.fail_after(HANG_GUARD):
            async with open_subscriber_daemon(store, [spec]):
                while True:
                    if await _checkpoint(store, "daemon-counts") >= 3:
                        break
                    await trio.sleep(0.02)
        await _lose_checkpoint(store, "daemon-counts")
    assert handler.seen == [1, 2, 3]
    assert await counts(store, rm) == {"a": 2, "b": 1}


async def test_a_replayed_parked_event_is_applied_once(store: EventStore, rm: str) -> None:
    """Event 2 fails and is parked; 3 is applied, so the position passes 2. Replayed,
    2 is applied (it was skipped as at or below the position, and its replay
    acknowledged: applied zero times), and only once: a second delivery of the same
    replay (after a crash before its acknowledgement) is skipped."""
    await append_keys(store, ["a", "b", "c"])
    handler = Counting(rm, fail_on=2)
    projection = Projection("replays", handler, schema=rm)
    spec = SubscriberSpec(
        name="replays",
        handler=projection.event_handler(store),
        retry_policy=es.RetryPolicy(max_attempts=1),
    )
    with trio.fail_after(HANG_GUARD):
        async with open_subscriber_daemon(store, [spec]):
            while await _checkpoint(store, "replays") < 3:  # noqa: ASYNC110
                await trio.sleep(0.02)
            parked = await store.parked_events("$all", "replays")
            assert [p.event.event_number for p in parked] == [2]
            assert await counts(store, rm) == {"a": 1, "c": 1}
            handler.fail_on = None  # the fix is deployed
            assert await store.replay_parked("$all", "replays") == 1
            await until_parked(store, "$all", "replays", parked=False)
    assert await counts(store, rm) == {"a": 1, "b": 1, "c": 1}
    assert await projection.position(store) == 3
    # The same replay delivered again: skipped.
    again = [e for e in await store.read_all_streams_forward() if e.event_number == 2]
    mark_replay(again[0])
    assert await projection.apply(store, again) == []
    assert await counts(store, rm) == {"a": 1, "b": 1, "c": 1}


async def _apply_1_park_2_and_apply_its_replay(
    store: EventStore, sub: es.Subscription, projection: Projection
) -> tuple[es.EventBatch, es.EventBatch]:
    """Of the first batch (events 1 and 2 of subscription "p"), apply 1 and park 2
    (acks 1); replay 2 and apply the replay. The first batch and the replay."""
    batch = await sub.__anext__()
    await projection.apply(store, batch.events[:1])
    sub.nack(batch.events[1], retry=False, error="poison")  # acks 1, parks 2
    await until_parked(store, "$all", "p")
    assert await store.replay_parked("$all", "p") == 1
    replay = await sub.__anext__()
    assert [e.event_number for e in await projection.apply(store, replay)] == [2]
    return batch, replay


async def test_a_replay_above_the_position_delivered_again_is_applied_once(
    store: EventStore, rm: str
) -> None:
    """The parked event is the last one seen (the position is below it): its replay is
    applied, then the subscriber stops before acknowledging it; the replay comes again
    and must be skipped (it was applied twice: only replays below the position were
    marked)."""
    await append_keys(store, ["a", "b"])
    handler = Counting(rm)
    projection = Projection("p", handler, schema=rm)
    with trio.fail_after(HANG_GUARD):
        async with store.subscribe_to_all_streams("p", buffer_size=10) as sub:
            batch, replay = await _apply_1_park_2_and_apply_its_replay(store, sub, projection)
            assert [e.event_number for e in batch] == [1, 2]
            # stops before acknowledging it
        async with store.subscribe_to_all_streams("p", buffer_size=10) as sub:
            replay = await sub.__anext__()
            assert [e.event_number for e in replay] == [2]
            assert await projection.apply(store, replay) == []
            sub.ack(replay)
    assert handler.seen == [1, 2]
    assert await counts(store, rm) == {"a": 1, "b": 1}


async def test_a_replay_above_the_position_moves_it(store: EventStore, rm: str) -> None:
    """The parked event is the last one seen; its replay is applied and acknowledged, and
    the store stops before the checkpoint passes it (a large checkpoint_threshold, as
    advised): the event then comes again live, and must be skipped (it was applied twice:
    the replay did not move the position)."""
    await append_keys(store, ["a", "b"])
    handler = Counting(rm)
    projection = Projection("p", handler, schema=rm)
    with trio.fail_after(HANG_GUARD):
        async with store.subscribe_to_all_streams(
            "p", buffer_size=10, checkpoint_threshold=100
        ) as sub:
            _, replay = await _apply_1_park_2_and_apply_its_replay(store, sub, projection)
            sub.ack(replay)
            await until_parked(store, "$all", "p", parked=False)
        assert await projection.position(store) == 2
        await _lose_checkpoint(store, "p")  # as a crash before the checkpoint passed 2
        async with store.subscribe_to_all_streams("p", buffer_size=10) as sub:
            batch = await sub.__anext__()
            assert await projection.apply(store, batch) == []
            sub.ack(batch)
    assert handler.seen == [1, 2]
    assert await counts(store, rm) == {"a": 1, "b": 1}


@attrs.frozen
class _Context:
    store: EventStore


async def test_lifecycle_prepares_then_handles_events_and_lists(store: EventStore, rm: str) -> None:
    """The shape of a daemon handler with a lifecycle (setup, then a handle function
    taking an event or a batch)."""
    prepared = []

    async def setup(conn: TransactionConnection) -> None:
        prepared.append(1)

    await append_keys(store, ["a", "b", "c"])
    events = await store.read_all_streams_forward()
    handler = Counting(rm)
    projection = Projection("p", handler, schema=rm, setup=setup)
    async with projection.lifecycle(_Context(store)) as handle:
        assert prepared == [1]
        assert "projection_versions" in await tables(store, rm)
        await handle(events[0])
        await handle(events)
    assert handler.seen == [1, 2, 3]
    assert prepared == [1]


async def test_under_the_daemon_with_a_lifecycle_and_batches(store: EventStore, rm: str) -> None:
    """One transaction per delivered batch, where the daemon's handlers have batches and a
    lifecycle (an `EventHandler` given ``lifecycle=`` and ``batch=True``)."""
    event_handler = getattr(es, "EventHandler", None)
    if event_handler is None:
        pytest.skip("this daemon's handlers have no lifecycle")
    await append_keys(store, ["a", "b", "a", "c", "a"])
    txids: dict[int, int] = {}

    async def per_event(conn: TransactionConnection, event: RecordedEvent) -> None:
        await conn.execute(upsert(rm), event.data["key"])  # type: ignore[index]
        txids[event.event_number] = await conn.fetchval("SELECT txid_current()")

    projection = Projection("batched", per_event, schema=rm)
    spec = SubscriberSpec(
        name="batched",
        handler=event_handler(lifecycle=projection.lifecycle, batch=True),
        buffer_size=5,
    )
    with trio.fail_after(HANG_GUARD):
        async with open_subscriber_daemon(store, [spec]):
            while True:
                if await _checkpoint(store, "batched") >= 5:
                    break
                await trio.sleep(0.02)
    assert sorted(txids) == [1, 2, 3, 4, 5]
    assert len(set(txids.values())) < 5  # batches of several events, one transaction each
    assert await counts(store, rm) == {"a": 3, "b": 1, "c": 1}
