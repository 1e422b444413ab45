"""Group commit: concurrent appends share one statement and one commit, each caller
gets its own outcome, cancellation before the batch drops an append, and bursts wait
for the writer instead of failing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence

import pytest
import trio
import trio.testing

from trio_eventstore import (
    ANY_VERSION,
    NO_STREAM,
    STREAM_EXISTS,
    DuplicateEventError,
    EventData,
    EventStore,
    EventStoreConfig,
    StreamDeletedError,
    StreamExistsError,
    StreamNotFoundError,
    WrongExpectedVersionError,
    _appends,
    _storage,
    _writer,
    open_event_store,
)
from trio_eventstore._pg import Connection, Row, open_connection
from trio_eventstore._sql import quote_ident
from trio_eventstore._writer import MAX_BIG_IN_FLIGHT, MAX_IN_FLIGHT

from .helpers import Role, until_a_backend_waits_for_a_lock

HANG_GUARD = 30  # seconds: a guard against hangs, never a speed assertion


def ev(n: int = 0, event_id: uuid.UUID | None = None) -> EventData:
    return EventData({"n": n}, event_type="E", event_id=event_id)


@pytest.fixture(params=["owner", "application-role"])
async def store(
    request: pytest.FixtureRequest, initialized: EventStoreConfig, application_role: Role
) -> AsyncIterator[EventStore]:
    """The store's owner, and an application role with only what `admin.grant` gives."""
    config = initialized.with_changes(group_commit=True)
    if request.param == "application-role":
        config = await application_role.use(config)
    async with open_event_store(config) as opened:
        yield opened


class AllLock:
    """Holds the `$all` row lock from another connection, so that the writer's
    current batch waits (and what is appended meanwhile queues up behind it)."""

    def __init__(self, conn: Connection, schema: str) -> None:
        self.conn = conn
        self.schema = schema

    async def take(self) -> None:
        await self.conn.execute("BEGIN")
        await self.conn.execute(
            f"SELECT 1 FROM {quote_ident(self.schema)}.streams WHERE stream_id = 0 FOR UPDATE"
        )

    async def release(self) -> None:
        await self.conn.execute("COMMIT")


async def record(
    outcomes: dict[str, object],
    name: str,
    store: EventStore,
    stream: str,
    expected: object,
    events: list[EventData],
) -> None:
    """Append, keeping the new version, or the type of the error, under ``name``."""
    try:
        outcomes[name] = await store.append_to_stream(stream, expected, events)  # type: ignore[arg-type]
    except Exception as exc:
        outcomes[name] = type(exc)


async def all_events(store: EventStore) -> list[tuple[str, int, uuid.UUID]]:
    return [
        (e.stream_uuid, e.stream_version, e.event_id)
        for e in await store.read_all_streams_forward(0, 10_000)
    ]


async def queued_behind_the_batches_in_flight(
    store: EventStore,
    config: EventStoreConfig,
    outcomes: dict[str, object],
    queued: list[tuple[str, str, object, list[EventData]]],
    *,
    first: str = "first",
    first_expected: object = NO_STREAM,
) -> None:
    """Append ``queued`` ((name, stream, expected, events)), in this order, while the
    writer's batches in flight (an append each, ``{first}-{i}`` to ``s-first-{i}``) wait
    for the `$all` lock, held from another connection: they form the next batch. Each
    outcome is recorded under its name."""

    async def append(name: str, stream: str, expected: object, events: list[EventData]) -> None:
        await record(outcomes, name, store, stream, expected, events)

    async with open_connection(config) as conn:
        lock = AllLock(conn, config.schema)
        await lock.take()
        async with trio.open_nursery() as nursery:
            # The first appends take the writer's batches in flight; they wait for the
            # $all lock ...
            for i in range(MAX_IN_FLIGHT):
                nursery.start_soon(append, f"{first}-{i}", f"s-first-{i}", first_expected, [ev()])
                await trio.testing.wait_all_tasks_blocked()
            # ... while these queue up, in this order, for the next batch.
            for args in queued:
                nursery.start_soon(append, *args)
                await trio.testing.wait_all_tasks_blocked()
            assert store.statistics().writer.queued == len(queued)  # type: ignore[union-attr]
            await lock.release()


async def test_concurrent_appends_share_batches(store: EventStore) -> None:
    async with trio.open_nursery() as nursery:
        for i in range(60):
            nursery.start_soon(store.append_to_stream, f"s-{i}", NO_STREAM, [ev(i), ev(i)])
    stats = store.statistics().writer
    assert stats is not None
    assert stats.appends == 60
    assert stats.batches < 60  # some shared a commit
    events = await all_events(store)
    assert len(events) == 120
    # Each append's events are contiguous in $all and in its stream.
    for k in range(0, 120, 2):
        assert events[k][0] == events[k + 1][0]
        assert (events[k][1], events[k + 1][1]) == (1, 2)


@pytest.mark.parametrize("all_apart", [False, True], ids=["one-statement", "all-apart"])
async def test_each_caller_gets_its_own_outcome(
    store: EventStore,
    initialized: EventStoreConfig,
    all_apart: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if all_apart:  # every batch written as big ones are: streams, then $all
        monkeypatch.setattr(_appends, "ALL_APART_EVENTS", 1)
        monkeypatch.setattr(_appends, "ALL_APART_LONE_EVENTS", 1)
    await store.append_to_stream("existing", NO_STREAM, [ev(1)])
    taken = uuid.uuid4()
    await store.append_to_stream("other", NO_STREAM, [ev(2, taken)])
    outcomes: dict[str, object] = {}
    queued: list[tuple[str, str, object, list[EventData]]] = [
        ("x1", "x", NO_STREAM, [ev()]),
        ("x2", "x", 1, [ev()]),  # checked after x1: succeeds
        ("x3", "x", 1, [ev()]),  # after x2: wrong version
        ("wrong", "existing", 5, [ev()]),
        ("exists", "existing", NO_STREAM, [ev()]),
        ("missing", "nowhere", STREAM_EXISTS, [ev()]),
        ("dup", "d", ANY_VERSION, [ev(), ev(0, taken)]),
        ("ok1", "y", ANY_VERSION, [ev(), ev()]),
        ("ok2", "existing", 1, [ev()]),
    ]
    await queued_behind_the_batches_in_flight(store, initialized, outcomes, queued)
    assert outcomes == {
        **{f"first-{i}": 1 for i in range(MAX_IN_FLIGHT)},
        "x1": 1,
        "x2": 2,
        "x3": WrongExpectedVersionError,
        "wrong": WrongExpectedVersionError,
        "exists": StreamExistsError,
        "missing": StreamNotFoundError,
        "dup": DuplicateEventError,
        "ok1": 2,
        "ok2": 2,
    }
    stats = store.statistics().writer
    # The next batch takes the first append of each stream (x1, wrong, missing, dup,
    # ok1); later appends to x and to existing wait for the batch after, in order.
    assert stats is not None
    assert stats.largest_batch == 5
    # Refused appends wrote nothing; $all is dense and holds exactly the others.
    events = await all_events(store)
    streams = [s for s, _, _ in events]
    assert streams.count("x") == 2
    assert streams.count("existing") == 2
    assert "d" not in streams
    assert "nowhere" not in streams
    assert len(events) == 2 + MAX_IN_FLIGHT + 2 + 2 + 1
    info = await store.stream_info("$all")
    assert info.stream_version == len(events)
    # Each append's events are where the stream's version says, in order.
    for stream in ("x", "existing", "y"):
        versions = [v for s, v, _ in events if s == stream]
        assert versions == sorted(versions) == list(range(1, len(versions) + 1))


async def test_a_batch_of_expected_versions_gives_each_its_outcome(
    store: EventStore, initialized: EventStoreConfig
) -> None:
    """A batch whose appends all expect a version (or no stream, or version 0): stale,
    deleted, existing and taken-id ones refused alone, each with its own error; the
    others committed together, densely numbered."""
    await store.append_to_stream("existing", NO_STREAM, [ev(1)])
    await store.append_to_stream("gone", NO_STREAM, [ev(1)])
    await store.delete_stream("gone", 1)
    taken = uuid.uuid4()
    await store.append_to_stream("other", NO_STREAM, [ev(2, taken)])
    outcomes: dict[str, object] = {}
    queued: list[tuple[str, str, object, list[EventData]]] = [
        ("x1", "x", NO_STREAM, [ev(), ev()]),
        ("x2", "x", 2, [ev()]),  # after x1, in the batch after
        ("stale", "existing", 5, [ev()]),
        ("exists", "existing", NO_STREAM, [ev()]),
        ("deleted", "gone", 1, [ev()]),
        ("ok1", "y", NO_STREAM, [ev(), ev(), ev()]),
        ("ok2", "z", 0, [ev()]),  # version 0: a new stream
        ("ok3", "other", 1, [ev()]),
    ]
    await queued_behind_the_batches_in_flight(store, initialized, outcomes, queued)
    assert outcomes == {
        **{f"first-{i}": 1 for i in range(MAX_IN_FLIGHT)},
        "x1": 2,
        "x2": 3,
        "stale": WrongExpectedVersionError,
        "exists": StreamExistsError,
        "deleted": StreamDeletedError,
        "ok1": 3,
        "ok2": 1,
        "ok3": 2,
    }
    events = await all_events(store)
    info = await store.stream_info("$all")
    assert info.stream_version == len(events)
    assert [e.event_number for e in await store.read_all_streams_forward(0, 1000)] == list(
        range(1, len(events) + 1)
    )
    for stream, count in (("x", 3), ("existing", 1), ("y", 3), ("z", 1), ("other", 2)):
        assert [v for s, v, _ in events if s == stream] == list(range(1, count + 1))

    # A taken event id among appends that expect versions: only its append is refused.
    outcomes.clear()
    queued = [
        ("dup", "d", NO_STREAM, [ev(), ev(0, taken)]),
        ("fine", "x", 3, [ev()]),
        ("new", "w", NO_STREAM, [ev()]),
    ]
    await queued_behind_the_batches_in_flight(
        store, initialized, outcomes, queued, first="again", first_expected=1
    )
    assert outcomes == {
        **{f"again-{i}": 2 for i in range(MAX_IN_FLIGHT)},
        "dup": DuplicateEventError,
        "fine": 4,
        "new": 1,
    }
    assert "d" not in [s for s, _, _ in await all_events(store)]


async def test_stores_writing_overlapping_streams_with_expected_versions_never_deadlock(
    initialized: EventStoreConfig,
) -> None:
    """As below, with expected versions: batches from two stores expect the same
    versions of overlapping streams, new and existing, that arrive in opposite orders.
    One winner per expected version, no deadlock, `$all` dense."""
    failures: list[type[BaseException]] = []

    async def append(store: EventStore, stream: str, expected: object) -> None:
        try:
            await store.append_to_stream(stream, expected, [ev()])  # type: ignore[arg-type]
        except (StreamExistsError, WrongExpectedVersionError) as exc:
            failures.append(type(exc))

    async with open_event_store(initialized) as a, open_event_store(initialized) as b:
        streams: list[str] = []
        attempts = 0
        for round_ in range(20):
            streams = streams[::2] + [f"v-{round_}-{i:02}" for i in range(16)]
            attempts += len(streams)
            versions = {}
            for stream in streams:
                try:
                    versions[stream] = (await a.stream_info(stream)).stream_version
                except StreamNotFoundError:
                    versions[stream] = 0
            async with trio.open_nursery() as nursery:
                for stream, reverse in zip(streams, streams[::-1], strict=True):
                    nursery.start_soon(append, a, stream, versions[stream] or NO_STREAM)
                    nursery.start_soon(append, b, reverse, versions[reverse] or NO_STREAM)
        info = await a.stream_info("$all")
        numbers = [e.event_number for e in await a.read_all_streams_forward(0, 100_000)]
        assert numbers == list(range(1, info.stream_version + 1))
        # Each stream had two appends expecting the same version per round: one won.
        assert len(numbers) + len(failures) == 2 * attempts
        assert len(failures) == len(numbers) == attempts


async def test_big_concurrent_appends_number_all_densely(store: EventStore) -> None:
    """Batches of many events (written streams first, then $all) from concurrent
    callers: $all dense, each append's events consecutive in $all and in its stream."""
    appended: dict[str, int] = {}

    async def append(i: int) -> None:
        stream = f"big-{i}"
        for round_ in range(3):
            events = [ev(k) for k in range(150 + 37 * i)]
            version = await store.append_to_stream(stream, round_ and appended[stream], events)
            appended[stream] = version

    total = sum(3 * (150 + 37 * i) for i in range(6))
    delivered: list[tuple[int, uuid.UUID]] = []
    async with store.subscribe("$all") as subscription:
        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(append, i)
        with trio.fail_after(30):
            async for batch in subscription:
                delivered += [(e.event_number, e.event_id) for e in batch]
                if len(delivered) >= total:
                    break
    recorded = await store.read_all_streams_forward(0, 100_000)
    # What this store's subscription got straight from the writer is numbered as stored.
    assert delivered == [(e.event_number, e.event_id) for e in recorded]
    assert [e.event_number for e in recorded] == list(range(1, len(recorded) + 1))
    assert len(recorded) == sum(3 * (150 + 37 * i) for i in range(6))
    for i in range(6):
        mine = [e for e in recorded if e.stream_uuid == f"big-{i}"]
        assert [e.stream_version for e in mine] == list(range(1, len(mine) + 1))
        expected = [k for _ in range(3) for k in range(150 + 37 * i)]
        assert [e.data["n"] for e in mine] == expected  # type: ignore[index]
    assert appended == {f"big-{i}": 3 * (150 + 37 * i) for i in range(6)}


async def test_big_appends_are_written_two_at_a_time(
    store: EventStore, initialized: EventStoreConfig
) -> None:
    """Big appends are written in parallel, `MAX_BIG_IN_FLIGHT` at once (more would only
    queue for the `$all` row, inside PostgreSQL): the others wait their turn in their
    callers' tasks, holding no connection and having sent nothing, so one cancelled
    meanwhile writes nothing. Before, all of them went to the database at once."""
    size = _writer.ALONE_EVENTS
    async with open_connection(initialized) as conn:
        lock = AllLock(conn, initialized.schema)
        await lock.take()
        cancelled = trio.CancelScope()

        async def big(stream: str, scope: trio.CancelScope | None = None) -> None:
            with scope or trio.CancelScope():
                await store.append_to_stream(stream, NO_STREAM, [ev(k) for k in range(size)])

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(big, f"big-{i}")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(big, "big-cancelled", cancelled)
            await trio.testing.wait_all_tasks_blocked()
            assert store._db.pool_statistics()["in_use"] == MAX_BIG_IN_FLIGHT
            cancelled.cancel()
            await trio.testing.wait_all_tasks_blocked()
            await lock.release()
    assert cancelled.cancelled_caught
    assert (await store.stream_info("$all")).stream_version == 5 * size
    with pytest.raises(StreamNotFoundError):
        await store.stream_info("big-cancelled")


async def test_a_big_append_alone_goes_in_one_statement(
    store: EventStore, initialized: EventStoreConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big append with no other append in flight in its store is written in the one
    lean statement (the streams' part and the `$all` part apart cost it 15-20% more,
    with nobody to share the `$all` lock with); one written while another big one is
    in flight still goes in two parts. Outcomes and numbering are the same either way."""
    sent: list[int] = []  # per round trip: how many statements were sent together
    fetchmany = store._db.fetchmany_direct

    async def spy(sql: str, args: Sequence[Sequence[object]], **kw: int) -> Sequence[Row]:
        sent.append(len(args))
        return await fetchmany(sql, args, **kw)

    monkeypatch.setattr(store._db, "fetchmany_direct", spy)
    size = _writer.ALONE_EVENTS + 50
    assert await store.append_to_stream("a", NO_STREAM, [ev(k) for k in range(size)]) == size
    assert await store.append_to_stream("a", size, [ev(k) for k in range(size)]) == 2 * size
    with pytest.raises(WrongExpectedVersionError):
        await store.append_to_stream("a", size, [ev(k) for k in range(size)])
    with pytest.raises(StreamExistsError):
        await store.append_to_stream("a", NO_STREAM, [ev(k) for k in range(size)])
    # Each went alone, in one statement (a refusal: then the general one, which says why).
    assert sent == [1, 1, 1, 1, 1, 1]
    assert (await store.stream_info("$all")).stream_version == 2 * size

    sent.clear()
    async with open_connection(initialized) as conn:
        lock = AllLock(conn, initialized.schema)
        await lock.take()  # the first big append waits in flight for the `$all` row
        async with trio.open_nursery() as nursery:
            for stream in ("b", "c"):
                nursery.start_soon(
                    store.append_to_stream, stream, NO_STREAM, [ev(k) for k in range(size)]
                )
                await trio.testing.wait_all_tasks_blocked()
            await lock.release()
    assert sorted(sent) == [1, 2]  # the second one: streams, then `$all`
    recorded = await store.read_all_streams_forward(0, 10_000)
    assert [e.event_number for e in recorded] == list(range(1, 4 * size + 1))
    for stream, n in (("a", 2 * size), ("b", size), ("c", size)):
        mine = [e for e in recorded if e.stream_uuid == stream]
        assert [e.stream_version for e in mine] == list(range(1, n + 1))


@pytest.mark.parametrize("size", [1, _writer.ALONE_EVENTS], ids=["lone", "big"])
async def test_an_append_aborted_by_a_deadlock_is_sent_again(
    store: EventStore, initialized: EventStoreConfig, size: int
) -> None:
    """PostgreSQL can abort an append's statement as a deadlock's victim (another
    program locking rows in another order; two statements on one stream, one reaching
    a row's old version after locking its newest): it wrote nothing, and is sent again
    instead of failing with a raw `DatabaseError` "deadlock detected"."""
    await store.append_to_stream("s", NO_STREAM, [ev(0)])
    s = quote_ident(initialized.schema)
    async with open_connection(initialized) as other:
        await other.execute("BEGIN")
        await other.execute(f"SELECT 1 FROM {s}.streams WHERE stream_id = 0 FOR UPDATE")
        async with trio.open_nursery() as nursery:
            appended: list[int] = []

            async def append() -> None:
                appended.append(await store.append_to_stream("s", 1, [ev(k) for k in range(size)]))

            nursery.start_soon(append)
            await until_a_backend_waits_for_a_lock(initialized)  # holding s, for `$all`
            # The other program now waits for s: a cycle, the append (first to wait)
            # its victim; sent again, it waits for `$all` until the other one commits.
            with trio.fail_after(HANG_GUARD):
                await other.execute(f"SELECT 1 FROM {s}.streams WHERE stream_uuid = 's' FOR UPDATE")
            await other.execute("COMMIT")
    assert appended == [1 + size]
    assert (await store.stream_info("$all")).stream_version == 1 + size


async def test_cancelled_before_its_batch_writes_nothing(
    store: EventStore, initialized: EventStoreConfig
) -> None:
    async with open_connection(initialized) as conn:
        lock = AllLock(conn, initialized.schema)
        await lock.take()
        async with trio.open_nursery() as nursery:
            in_flight = trio.CancelScope()
            queued = trio.CancelScope()

            async def append(scope: trio.CancelScope, stream: str) -> None:
                with scope:
                    await store.append_to_stream(stream, NO_STREAM, [ev()])

            # Every batch in flight waits for the $all lock (one append each) ...
            nursery.start_soon(append, in_flight, "in-flight")
            await trio.testing.wait_all_tasks_blocked()
            for i in range(1, MAX_IN_FLIGHT):
                nursery.start_soon(store.append_to_stream, f"in-flight-{i}", NO_STREAM, [ev()])
                await trio.testing.wait_all_tasks_blocked()
            # ... so these two stay queued.
            nursery.start_soon(append, queued, "queued")
            nursery.start_soon(store.append_to_stream, "kept", NO_STREAM, [ev()])
            await trio.testing.wait_all_tasks_blocked()
            in_flight.cancel()  # its batch has started: it may commit
            queued.cancel()  # still queued: dropped
            await trio.testing.wait_all_tasks_blocked()
            await lock.release()
    streams = {s for s, _, _ in await all_events(store)}
    # "in-flight" may or may not have committed (its caller left while it was sent).
    assert streams - {"in-flight"} == {"kept"} | {f"in-flight-{i}" for i in range(1, MAX_IN_FLIGHT)}


async def test_appends_behind_one_written_by_its_caller_keep_their_order(
    store: EventStore, initialized: EventStoreConfig
) -> None:
    """An append made while the writer is idle is written at once by its caller; the
    appends made meanwhile queue up behind it (those to its stream wait for it, the
    others go in a batch beside it), and each is checked after the ones before."""
    outcomes: dict[str, object] = {}

    async def append(name: str, stream: str, expected: object) -> None:
        await record(outcomes, name, store, stream, expected, [ev()])

    async with open_connection(initialized) as conn:
        lock = AllLock(conn, initialized.schema)
        await lock.take()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(append, "first", "s", NO_STREAM)  # written at once: waits
            await trio.testing.wait_all_tasks_blocked()
            assert store.statistics().writer.queued == 0  # type: ignore[union-attr]
            for name, stream, expected in [
                ("second", "s", 1),
                ("stale", "s", 1),
                ("elsewhere", "t", NO_STREAM),
            ]:
                nursery.start_soon(append, name, stream, expected)
                await trio.testing.wait_all_tasks_blocked()
            # "elsewhere" went in a batch (waiting for $all too); the others wait for "first".
            assert store.statistics().writer.queued == 2  # type: ignore[union-attr]
            await lock.release()
    assert outcomes == {
        "first": 1,
        "second": 2,
        "stale": WrongExpectedVersionError,
        "elsewhere": 1,
    }
    events = [(s, v) for s, v, _ in await all_events(store)]
    assert sorted(events) == [("s", 1), ("s", 2), ("t", 1)]
    assert events.index(("s", 1)) < events.index(("s", 2))


async def test_a_burst_waits_for_the_writer_instead_of_failing(
    initialized: EventStoreConfig,
) -> None:
    config = initialized.with_changes(pool_size=2, queue_target=0.001, queue_interval=0.01)
    async with open_event_store(config) as store:
        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(store.append_to_stream, f"burst-{i}", NO_STREAM, [ev(i)])
        assert (await store.stream_info("$all")).stream_version == 300


async def test_stores_creating_the_same_streams_agree(initialized: EventStoreConfig) -> None:
    """Two stores (two writers) race to create the same new streams: a creation that
    lost the race is retried, never reported wrongly, and exactly one NO_STREAM wins."""
    async with open_event_store(initialized) as a, open_event_store(initialized) as b:
        results: list[object] = []

        async def append(store: EventStore, stream: str, expected: object) -> None:
            try:
                results.append(await store.append_to_stream(stream, expected, [ev()]))  # type: ignore[arg-type]
            except StreamExistsError as exc:
                results.append(type(exc))

        for i in range(40):
            async with trio.open_nursery() as nursery:
                for store in (a, b, a, b):
                    nursery.start_soon(append, store, f"any-{i}", ANY_VERSION)
                    nursery.start_soon(append, store, f"new-{i}", NO_STREAM)
        for i in range(40):
            assert (await a.stream_info(f"any-{i}")).stream_version == 4
            assert (await a.stream_info(f"new-{i}")).stream_version == 1
        assert results.count(StreamExistsError) == 40 * 3
        numbers = [e.event_number for e in await a.read_all_streams_forward(0, 10_000)]
        assert numbers == list(range(1, 40 * 5 + 1))


async def test_stores_writing_overlapping_streams_never_deadlock(
    initialized: EventStoreConfig,
) -> None:
    """Batches from two stores lock overlapping sets of streams, new and existing, that
    arrive in opposite orders: no deadlock (which would fail appends), all written."""
    async with open_event_store(initialized) as a, open_event_store(initialized) as b:
        streams: list[str] = []
        for round_ in range(20):
            # Half new streams, half streams of the previous round.
            streams = streams[::2] + [f"o-{round_}-{i:02}" for i in range(16)]
            async with trio.open_nursery() as nursery:
                for stream, reverse in zip(streams, streams[::-1], strict=True):
                    nursery.start_soon(a.append_to_stream, stream, ANY_VERSION, [ev()])
                    nursery.start_soon(b.append_to_stream, reverse, ANY_VERSION, [ev()])
        info = await a.stream_info("$all")
        numbers = [e.event_number for e in await a.read_all_streams_forward(0, 100_000)]
        assert numbers == list(range(1, info.stream_version + 1))


@pytest.mark.parametrize("group_commit", [True, False])
async def test_appends_wait_while_readers_hold_every_connection(
    initialized: EventStoreConfig, group_commit: bool
) -> None:
    config = initialized.with_changes(
        pool_size=1, queue_target=0.001, queue_interval=0.01, group_commit=group_commit
    )
    async with open_event_store(config) as store:
        async with trio.open_nursery() as nursery:
            # A slow query holds the only pooled connection past the overload limits.
            nursery.start_soon(store._db.fetch, "SELECT pg_sleep(0.5)")
            await trio.testing.wait_all_tasks_blocked()
            for i in range(5):
                nursery.start_soon(store.append_to_stream, f"wait-{i}", NO_STREAM, [ev(i)])
            # A big append (written alone, on its own connection) waits too.
            big = [ev(k) for k in range(_writer.ALONE_EVENTS)]
            nursery.start_soon(store.append_to_stream, "wait-big", NO_STREAM, big)
        assert (await store.stream_info("$all")).stream_version == 5 + len(big)


async def test_a_link_and_a_batch_locking_its_original_stream_do_not_deadlock(
    store: EventStore, initialized: EventStoreConfig
) -> None:
    """A link into t of an event from a-x checks its foreign key on a-x's row while
    holding t; a batch appending to a-x and t holds a-x and waits for t. The batch's
    lock on a-x must not block that check (else: a deadlock, one of them aborted)."""

    await store.append_to_stream("a-x", NO_STREAM, [ev()])
    await store.append_to_stream("t", NO_STREAM, [ev()])
    [original] = await store.read_stream_forward("a-x")
    s = quote_ident(initialized.schema)
    outcomes: list[object] = []

    async def link() -> None:
        outcomes.append(await store.link_to_stream("t", ANY_VERSION, [original]))

    async def batch() -> None:
        requests = [
            _storage.AppendRequest.build(
                name, ANY_VERSION, _storage.encode_events(initialized.serializer, [ev()])
            )
            for name in ("a-x", "t")
        ]
        outcomes.append(await _storage.append_batch(store._db, requests))

    async def waiting(conn: Connection, n: int) -> None:
        # Polls the server: nothing on this side knows when a backend starts waiting.
        while (  # noqa: ASYNC110
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()"
            )
            < n
        ):
            await trio.sleep(0.01)

    async with open_connection(initialized) as holder, open_connection(initialized) as probe:
        await holder.execute("BEGIN")
        await holder.execute(f"SELECT 1 FROM {s}.streams WHERE stream_uuid = 't' FOR UPDATE")
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link)  # waits for t
                await waiting(probe, 1)
                nursery.start_soon(batch)  # takes a-x, then waits for t
                await waiting(probe, 2)
                await holder.execute("COMMIT")  # t goes to the link first
    assert len(outcomes) == 2
    assert 2 in outcomes  # the link: t at version 2
    [batch_outcome] = [o for o in outcomes if isinstance(o, list)]
    assert all(isinstance(o, _storage.Appended) for o in batch_outcome)


def test_a_long_queue_is_shared_among_the_free_places() -> None:
    """Under load the queue is split among the writer's free places (so that batches
    follow each other through the `$all` lock), in batches of at least MIN_SHARE and
    at most MAX_BATCH_APPENDS appends."""
    assert _writer._share(40, 2) == 20
    assert _writer._share(41, 2) == 21
    assert _writer._share(40, 1) == 40
    assert _writer._share(10, 2) == _writer.MIN_SHARE
    assert _writer._share(5000, 2) == _writer.MAX_BATCH_APPENDS
