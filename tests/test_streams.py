"""Append, link, read, iterate, delete and snapshots, with the Elixir library's outcomes."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import decimal
import enum
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio

import trio_eventstore as es
from trio_eventstore import (
    ANY_VERSION,
    NO_STREAM,
    STREAM_EXISTS,
    EventData,
    EventStore,
    EventStoreConfig,
    JsonSerializer,
    _sql,
    admin,
    open_event_store,
)
from trio_eventstore._pg import Connection, open_connection
from trio_eventstore._sql import quote_ident

from .helpers import Role, until_a_backend_waits_for_a_lock

serializer = JsonSerializer()


class Kind(enum.Enum):
    CASH = "cash"
    CARD = "card"


@serializer.register(event_type="Elixir.Bank.Events.Deposited")
@attrs.frozen
class Deposited:
    account_id: str
    amount: decimal.Decimal
    at: datetime.datetime
    kind: Kind = Kind.CASH
    note: str | None = None


@dataclasses.dataclass(frozen=True)
class Line:
    sku: str
    qty: int


@serializer.register
@dataclasses.dataclass(frozen=True)
class Ordered:
    order_id: uuid.UUID
    lines: list[Line]


def deposit(amount: int | str = 1, **kwargs: object) -> EventData:
    data = Deposited(
        "a-1", decimal.Decimal(amount), datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    )
    return EventData(data, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(
    params=[
        ("bytea", True, False),
        ("jsonb", True, False),
        ("bytea", False, False),
        ("jsonb", True, True),
    ],
    ids=["bytea", "jsonb", "bytea-direct", "jsonb-application-role"],
)
async def store(
    request: pytest.FixtureRequest, config: EventStoreConfig, application_role: Role
) -> AsyncIterator[EventStore]:
    """Each test runs on both data types, without group commit (same outcomes), and as
    an application role with only what `admin.grant` gives it."""
    column_data_type, group_commit, application = request.param
    cfg = config.with_changes(
        serializer=serializer,
        column_data_type=column_data_type,
        enable_hard_deletes=True,
        group_commit=group_commit,
    )
    await admin.create(cfg)
    await admin.init(cfg)
    opened_as = await application_role.use(cfg) if application else cfg
    try:
        async with open_event_store(opened_as) as opened:
            yield opened
    finally:
        with trio.CancelScope(shield=True):
            await admin.drop(cfg)


async def test_round_trip_of_typed_events(store: EventStore) -> None:
    order = Ordered(uuid.uuid4(), [Line("A-1", 2), Line("B-2", 1)])
    cause, corr = uuid.uuid4(), str(uuid.uuid4())
    version = await store.append_to_stream(
        "acct",
        NO_STREAM,
        [
            deposit("10.50", metadata={"user": "zoë"}, causation_id=cause, correlation_id=corr),
            EventData(order),
        ],
    )
    assert version == 2
    events = await store.read_stream_forward("acct")
    assert [e.stream_version for e in events] == [1, 2]
    assert [e.event_number for e in events] == [1, 2]
    first, second = events
    assert first.data == Deposited(
        "a-1", decimal.Decimal("10.50"), datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    )
    assert first.event_type == "Elixir.Bank.Events.Deposited"
    assert first.metadata == {"user": "zoë"}
    assert (first.causation_id, first.correlation_id) == (cause, uuid.UUID(corr))
    assert first.created_at.tzinfo is not None
    assert second.data == order
    assert second.event_type.endswith("Ordered")
    assert second.metadata is None


async def test_plain_json_needs_event_type_and_unknown_types_read_as_dicts(
    store: EventStore,
) -> None:
    with pytest.raises(es.SerializationError):
        await store.append_to_stream("s", ANY_VERSION, [EventData({"x": 1})])
    await store.append_to_stream(
        "s", ANY_VERSION, [EventData({"x": [1, None]}, event_type="Thing")]
    )
    [event] = await store.read_stream_forward("s")
    assert event.data == {"x": [1, None]}
    strict = store.config.with_changes(serializer=JsonSerializer(strict=True))
    async with open_event_store(strict) as strict_store:
        with pytest.raises(es.UnknownEventTypeError) as raised:
            await strict_store.read_stream_forward("s")
    # The error names the event that cannot be read, and keeps its type's name.
    assert str(event.event_id) in str(raised.value)
    assert "'s' version 1" in str(raised.value)
    assert raised.value.event_type == "Thing"


async def test_absent_metadata_is_stored_as_the_elixir_library_stores_it(
    store: EventStore,
) -> None:
    """bytea: the JSON bytes ``null``; jsonb: SQL NULL (the Elixir JsonbSerializer)."""
    await store.append_to_stream("s", NO_STREAM, [deposit()])
    await store.record_snapshot(
        es.SnapshotData(source_uuid="snap", source_version=1, data=deposit().data)
    )
    s = quote_ident(store.config.schema)
    async with open_connection(store.config) as conn:
        raw = await conn.fetchval(f"SELECT metadata::text FROM {s}.events")
        snap = await conn.fetchval(f"SELECT metadata::text FROM {s}.snapshots")
    expected = "\\x6e756c6c" if store.config.column_data_type == "bytea" else None
    assert (raw, snap) == (expected, expected)
    assert (await store.read_stream_forward("s"))[0].metadata is None
    assert (await store.read_snapshot("snap")).metadata is None


async def test_expected_version_outcomes(store: EventStore) -> None:
    with pytest.raises(es.StreamNotFoundError):
        await store.append_to_stream("s", STREAM_EXISTS, [deposit()])
    with pytest.raises(es.WrongExpectedVersionError):
        await store.append_to_stream("s", 1, [deposit()])
    assert await store.append_to_stream("s", 0, [deposit()]) == 1
    with pytest.raises(es.StreamExistsError):
        await store.append_to_stream("s", NO_STREAM, [deposit()])
    with pytest.raises(es.WrongExpectedVersionError):
        await store.append_to_stream("s", 0, [deposit()])
    assert await store.append_to_stream("s", 1, [deposit()]) == 2
    assert await store.append_to_stream("s", STREAM_EXISTS, [deposit()]) == 3
    assert await store.append_to_stream("s", ANY_VERSION, [deposit(), deposit()]) == 5
    assert (await store.stream_info("s")).stream_version == 5
    assert (await store.stream_info("$all")).stream_version == 5


async def test_duplicate_event_id_writes_nothing(store: EventStore) -> None:
    event = deposit()
    await store.append_to_stream("a", NO_STREAM, [event])
    with pytest.raises(es.DuplicateEventError) as raised:
        await store.append_to_stream("b", NO_STREAM, [deposit(), event])
    with pytest.raises(es.StreamNotFoundError):
        await store.stream_info("b")
    assert len(await store.read_all_streams_forward()) == 1
    # The error names the event and says it is stored (not that stream "b" holds it),
    # without the server's DETAIL text.
    assert raised.value.event_id == event.event_id
    assert str(raised.value) == (
        f"event {event.event_id} is already stored (writing to stream 'b')"
    )


async def test_concurrent_appends_one_winner(store: EventStore) -> None:
    await store.append_to_stream("s", NO_STREAM, [deposit()])
    outcomes: list[str] = []

    async def attempt() -> None:
        try:
            await store.append_to_stream("s", 1, [deposit()])
            outcomes.append("won")
        except es.WrongExpectedVersionError:
            outcomes.append("lost")

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(attempt)
    assert sorted(outcomes) == ["lost"] * 7 + ["won"]


async def test_large_batch_is_chunked_and_atomic(store: EventStore) -> None:
    events = [deposit(i) for i in range(2500)]
    assert await store.append_to_stream("big", NO_STREAM, events) == 2500
    numbers = [e.event_number async for e in store.stream_all_forward(read_batch_size=700)]
    assert numbers == list(range(1, 2501))
    # A duplicate in the last chunk rolls back the whole batch.
    again = [deposit() for _ in range(2100)] + [events[0]]
    with pytest.raises(es.DuplicateEventError):
        await store.append_to_stream("big2", ANY_VERSION, again)
    assert (await store.stream_info("$all")).stream_version == 2500
    # One event id twice in one append: refused before any I/O, naming it (as a link).
    with pytest.raises(es.DuplicateEventError, match="given twice") as twice:
        await store.append_to_stream("big2", ANY_VERSION, [deposit(), again[5], again[5]])
    assert twice.value.event_id == again[5].event_id
    assert twice.value.stream_uuid == "big2"
    assert str(again[5].event_id) in str(twice.value)


async def test_a_long_link_with_an_event_twice_is_refused_at_once(store: EventStore) -> None:
    """Finding which event is given twice takes one pass, not one per event (30,000
    ids took minutes, with the event loop blocked)."""
    ids = [uuid.uuid4() for _ in range(30_000)]
    started = trio.current_time()
    with pytest.raises(es.DuplicateEventError) as twice:
        await store.link_to_stream("long", NO_STREAM, [*ids, ids[-1]])
    assert twice.value.event_id == ids[-1]
    assert trio.current_time() - started < 5


async def test_links_keep_original_stream_and_version(store: EventStore) -> None:
    await store.append_to_stream("a", NO_STREAM, [deposit(1), deposit(2)])
    await store.append_to_stream("b", NO_STREAM, [deposit(3)])
    a = await store.read_stream_forward("a")
    b = await store.read_stream_forward("b")
    assert (
        await store.link_to_stream("l", NO_STREAM, [a[0], b[0].event_id, str(a[1].event_id)]) == 3
    )
    linked = await store.read_stream_forward("l")
    assert [(e.event_number, e.stream_uuid, e.stream_version) for e in linked] == [
        (1, "a", 1),
        (2, "b", 1),
        (3, "a", 2),
    ]
    with pytest.raises(es.DuplicateEventError):
        await store.link_to_stream("l", 3, [a[0]])
    with pytest.raises(es.EventNotFoundError):
        await store.link_to_stream("l", 3, [uuid.uuid4()])
    # One event twice in one link, as in one append: refused before any I/O.
    with pytest.raises(es.DuplicateEventError, match="given twice") as twice:
        await store.link_to_stream("m", NO_STREAM, [b[0], str(b[0].event_id)])
    assert twice.value.event_id == b[0].event_id
    assert twice.value.stream_uuid == "m"
    with pytest.raises(es.WrongExpectedVersionError):
        await store.link_to_stream("l", 2, [b[0]])
    # Links are not in $all.
    assert (await store.stream_info("$all")).stream_version == 3


async def test_concurrent_links_one_winner(store: EventStore) -> None:
    await store.append_to_stream("a", NO_STREAM, [deposit(i) for i in range(8)])
    events = await store.read_stream_forward("a")
    await store.link_to_stream("l", NO_STREAM, [events[0]])
    outcomes: list[str] = []

    async def attempt(i: int) -> None:
        try:
            await store.link_to_stream("l", 1, [events[i]])
            outcomes.append("won")
        except es.WrongExpectedVersionError:
            outcomes.append("lost")

    async with trio.open_nursery() as nursery:
        for i in range(1, 8):
            nursery.start_soon(attempt, i)
    assert sorted(outcomes) == ["lost"] * 6 + ["won"]
    assert (await store.stream_info("l")).stream_version == 2


async def test_read_backward_and_iterators(store: EventStore) -> None:
    await store.append_to_stream("s", NO_STREAM, [deposit(i) for i in range(1, 8)])
    back = await store.read_stream_backward("s", count=3)
    assert [e.stream_version for e in back] == [7, 6, 5]
    assert [e.stream_version for e in await store.read_stream_backward("s", 2)] == [2, 1]
    assert [e.stream_version for e in await store.read_stream_forward("s", 6)] == [6, 7]
    forward = [e.stream_version async for e in store.stream_forward("s", read_batch_size=2)]
    assert forward == list(range(1, 8))
    backward = [e.event_number async for e in store.stream_all_backward(read_batch_size=3)]
    assert backward == list(range(7, 0, -1))
    tail = [e.stream_version async for e in store.stream_forward("s", start_version=5)]
    assert tail == [5, 6, 7]
    assert [e.event_number for e in await store.read_all_streams_backward(-1, 2)] == [7, 6]


async def test_missing_stream_reads(store: EventStore) -> None:
    with pytest.raises(es.StreamNotFoundError):
        await store.read_stream_forward("nope")
    with pytest.raises(es.StreamNotFoundError):
        await store.stream_info("nope")
    assert await store.read_all_streams_forward() == []


async def test_soft_delete(store: EventStore) -> None:
    await store.append_to_stream("t", NO_STREAM, [deposit(), deposit()])
    with pytest.raises(es.WrongExpectedVersionError):
        await store.delete_stream("t", 1)
    await store.delete_stream("t", 2)
    info = await store.stream_info("t")
    assert info.status is es.StreamStatus.DELETED
    assert info.deleted_at is not None
    with pytest.raises(es.StreamDeletedError):
        await store.read_stream_forward("t")
    with pytest.raises(es.StreamDeletedError):
        await store.append_to_stream("t", ANY_VERSION, [deposit()])
    with pytest.raises(es.StreamDeletedError):
        await store.delete_stream("t", ANY_VERSION)
    # Its events stay in $all.
    assert len(await store.read_all_streams_forward()) == 2


async def test_hard_delete_removes_own_events_and_their_links_only(store: EventStore) -> None:
    await store.append_to_stream("doomed", NO_STREAM, [deposit(1), deposit(2)])
    await store.append_to_stream("other", NO_STREAM, [deposit(3)])
    doomed = await store.read_stream_forward("doomed")
    other = await store.read_stream_forward("other")
    await store.link_to_stream("links", NO_STREAM, [doomed[0], other[0]])
    await store.link_to_stream("doomed", 2, [other[0]])  # only linked into doomed
    await store.delete_stream("doomed", 3, hard=True)
    with pytest.raises(es.StreamNotFoundError):
        await store.stream_info("doomed")
    assert [e.event_id for e in await store.read_all_streams_forward()] == [other[0].event_id]
    assert [e.event_id for e in await store.read_stream_forward("links")] == [other[0].event_id]
    assert (await store.stream_info("$all")).stream_version == 3  # never lowered
    # The deleted stream's name can be used again.
    assert await store.append_to_stream("doomed", NO_STREAM, [deposit()]) == 1


HANG_GUARD = 30  # seconds: a guard against hangs, never a speed assertion


async def _a_source_event_and_its_link(
    store: EventStore,
) -> tuple[es.RecordedEvent, Callable[[], Awaitable[None]], list[object]]:
    """An event of stream src; a link of it into lnk (to run in a task); its outcome."""
    await store.append_to_stream("src", NO_STREAM, [deposit(1)])
    (event,) = await store.read_stream_forward("src")
    outcome: list[object] = []

    async def link() -> None:
        try:
            outcome.append(await store.link_to_stream("lnk", ANY_VERSION, [event]))
        except es.EventStoreError as exc:
            outcome.append(exc)

    return event, link, outcome


@contextlib.asynccontextmanager
async def _hard_deleting(config: EventStoreConfig) -> AsyncIterator[Connection]:
    """A connection of another program, in a transaction that may hard-delete."""
    async with open_connection(config) as conn:
        await conn.execute("BEGIN")
        await conn.execute("SET LOCAL eventstore.enable_hard_deletes = 'on'")
        yield conn


async def test_a_link_racing_a_hard_delete_of_its_events_stream_gets_event_not_found(
    store: EventStore,
) -> None:
    """A hard delete holds the stream's row, then deletes its events; a link of one of
    them, made meanwhile, waits for the delete (it locks the events' streams before
    it writes) and then finds the event gone. Before: the link took the event's row
    for its foreign-key check, then waited for the stream's row, and the delete waited
    for the event's: a deadlock, one of them failing with a raw `DatabaseError`."""
    event, link, outcome = await _a_source_event_and_its_link(store)
    config = store.config
    s = quote_ident(config.schema)
    async with _hard_deleting(config) as deleting:
        stream_id = await deleting.fetchval(
            f"SELECT stream_id FROM {s}.streams WHERE stream_uuid = 'src' FOR UPDATE"
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link)
            await until_a_backend_waits_for_a_lock(config)  # the link (before: on the row)
            with trio.fail_after(HANG_GUARD):
                await deleting.execute(_sql.hard_delete_stream(config.schema), stream_id)
                await deleting.execute("COMMIT")
    (got,) = outcome
    assert isinstance(got, es.EventNotFoundError), repr(got)
    assert got.event_ids == (event.event_id,)
    with pytest.raises(es.StreamNotFoundError):
        await store.stream_info("lnk")
    assert await store.read_all_streams_forward() == []


async def test_a_link_deadlocked_by_a_delete_locking_in_another_order_is_made_again(
    store: EventStore,
) -> None:
    """A hard delete that deletes the events before it takes the stream's row (another
    program's) and a link of one of them can still wait for each other: the
    link holds the stream's row (key share), waiting for the event's; the delete holds
    the event's, waiting for the stream's. PostgreSQL aborts one: when it is the link,
    which wrote nothing, the link is made again, and finds the event gone (before:
    a raw `DatabaseError`, "deadlock detected")."""
    event, link, outcome = await _a_source_event_and_its_link(store)
    config = store.config
    s = quote_ident(config.schema)
    async with _hard_deleting(config) as deleting:
        await deleting.execute(f"DELETE FROM {s}.stream_events WHERE event_id = $1", event.event_id)
        await deleting.execute(f"DELETE FROM {s}.events WHERE event_id = $1", event.event_id)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link)
            await until_a_backend_waits_for_a_lock(config)  # the link, for the event's row
            failed: es.DatabaseError | None = None
            try:
                with trio.fail_after(HANG_GUARD):
                    await deleting.execute(f"DELETE FROM {s}.streams WHERE stream_uuid = 'src'")
                    await deleting.execute("COMMIT")
            except es.DatabaseError as exc:  # PostgreSQL chose the delete
                failed = exc
    deleted = failed is None
    if failed is not None:
        assert failed.sqlstate == "40P01"
    (got,) = outcome
    if deleted:
        assert isinstance(got, es.EventNotFoundError), repr(got)
        assert await store.read_all_streams_forward() == []
    else:
        assert got == 1
        assert [e.event_id for e in await store.read_stream_forward("lnk")] == [event.event_id]


@pytest.mark.parametrize("hard", ["False", "yes", 1, [0], None])
async def test_delete_refuses_a_hard_flag_that_is_not_a_bool(
    store: EventStore, hard: object
) -> None:
    """``hard="False"`` (a flag read from the environment) is truthy: it hard-deleted."""
    await store.append_to_stream("s", NO_STREAM, [deposit()])
    with pytest.raises(TypeError, match="hard: expected a bool"):
        await store.delete_stream("s", ANY_VERSION, hard=hard)  # type: ignore[arg-type]
    assert (await store.stream_info("s")).stream_version == 1
    assert (await store.stream_info("s")).deleted_at is None


async def test_hard_delete_needs_config(store: EventStore) -> None:
    await store.append_to_stream("s", NO_STREAM, [deposit()])
    async with open_event_store(store.config.with_changes(enable_hard_deletes=False)) as plain:
        with pytest.raises(es.NotSupportedError):
            await plain.delete_stream("s", ANY_VERSION, hard=True)
    assert (await store.stream_info("s")).stream_version == 1


async def test_snapshots(store: EventStore) -> None:
    with pytest.raises(es.SnapshotNotFoundError):
        await store.read_snapshot("agg")
    data = deposit(5).data
    await store.record_snapshot(es.SnapshotData(source_uuid="agg", source_version=3, data=data))
    snap = await store.read_snapshot("agg")
    assert (snap.source_version, snap.source_type, snap.data) == (
        3,
        "Elixir.Bank.Events.Deposited",
        data,
    )
    await store.record_snapshot(
        es.SnapshotData(
            source_uuid="agg",
            source_version=4,
            data={"v": 4},
            source_type="Plain",
            metadata={"m": 1},
        )
    )
    snap = await store.read_snapshot("agg")
    assert (snap.source_version, snap.data, snap.metadata) == (4, {"v": 4}, {"m": 1})
    await store.delete_snapshot("agg")
    with pytest.raises(es.SnapshotNotFoundError):
        await store.read_snapshot("agg")
    # plain values name no type: the error says which field to give
    with pytest.raises(
        es.SerializationError, match=r"SnapshotData\(source_type=\.\.\.\)"
    ) as refused:
        await store.record_snapshot(es.SnapshotData(source_uuid="agg", source_version=5, data={}))
    assert "EventData" not in str(refused.value)
    # a class given another class's type: the message names the snapshot's argument
    ordered = Ordered(uuid.uuid4(), [])
    with pytest.raises(es.SerializationError, match=r"source_type=.*leave source_type out"):
        await store.record_snapshot(
            es.SnapshotData(
                source_uuid="agg",
                source_version=5,
                data=ordered,
                source_type="Elixir.Bank.Events.Deposited",
            )
        )
    at = datetime.datetime(2024, 5, 1, 12, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
    await store.record_snapshot(
        es.SnapshotData(source_uuid="agg", source_version=6, data=ordered, created_at=at)
    )
    assert (await store.read_snapshot("agg")).created_at == at


@pytest.mark.parametrize(
    ("created_at", "error"),
    [
        ("2020-01-01", TypeError),
        (1700000000, TypeError),
        (datetime.date(2020, 1, 1), TypeError),  # it was stored as midnight
        (datetime.datetime(2020, 1, 1), ValueError),  # naive: no instant
    ],
)
def test_a_snapshot_refuses_a_created_at_that_is_not_an_aware_datetime(
    created_at: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="created_at"):
        es.SnapshotData(source_uuid="agg", source_version=1, data={}, created_at=created_at)  # type: ignore[arg-type]


async def test_paginate_streams(store: EventStore) -> None:
    """As in Elixir: ``$all`` (stream_id 0) is a stream like the others in entries and
    totals, the search is case-sensitive, and five columns sort."""
    for name in ("b-1", "a-2", "c_3", "a%4", "Acct-5", "back\\slash"):
        await store.append_to_stream(name, NO_STREAM, [deposit()])
    await store.append_to_stream("c_3", ANY_VERSION, [deposit(), deposit()])
    await store.delete_stream("b-1", ANY_VERSION)

    async def uuids(**options: Any) -> list[str]:
        return [s.stream_uuid for s in (await store.paginate_streams(**options)).entries]

    page = await store.paginate_streams(page_size=3)
    assert [(s.stream_id, s.stream_uuid) for s in page.entries] == [
        (0, "$all"),
        (1, "b-1"),
        (2, "a-2"),
    ]
    assert page.entries[0].stream_version == 8
    assert (page.total_entries, page.total_pages) == (7, 3)
    assert await uuids(page_size=3, page_number=3) == ["back\\slash"]
    empty = await store.paginate_streams(page_number=9)
    assert (empty.entries, empty.total_entries) == ([], 7)

    assert await uuids(search="a") == ["$all", "a-2", "a%4", "back\\slash"]  # case-sensitive
    assert await uuids(search="A") == ["Acct-5"]
    assert (await store.paginate_streams(search="A")).total_entries == 1
    assert await uuids(search="$") == ["$all"]
    assert await uuids(search="_") == ["c_3"]  # %, _ and \ match themselves
    assert await uuids(search="%") == ["a%4"]
    assert await uuids(search="\\") == ["back\\slash"]
    assert len(await uuids(search="")) == 7

    assert await uuids(sort_by="stream_uuid", sort_dir="desc") == [
        "c_3", "back\\slash", "b-1", "a-2", "a%4", "Acct-5", "$all"
    ]  # fmt: skip
    assert (await uuids(sort_by="stream_version", sort_dir="desc"))[:2] == ["$all", "c_3"]
    assert (await uuids(sort_by="created_at"))[0] == "$all"
    assert (await uuids(sort_by="deleted_at"))[0] == "b-1"  # NULLs last, as in Postgres
    assert (await uuids(sort_by="deleted_at", sort_dir="desc"))[-1] == "b-1"
    with pytest.raises(ValueError, match="sort_by"):
        await store.paginate_streams(sort_by="status")


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda s: s.append_to_stream("s", ANY_VERSION, []), ValueError),
        (lambda s: s.append_to_stream("$all", ANY_VERSION, [deposit()]), ValueError),
        (lambda s: s.append_to_stream("", ANY_VERSION, [deposit()]), ValueError),
        (lambda s: s.append_to_stream("x" * 8000, ANY_VERSION, [deposit()]), ValueError),
        (lambda s: s.append_to_stream("s", -1, [deposit()]), ValueError),
        (lambda s: s.append_to_stream("s", "1", [deposit()]), TypeError),
        (lambda s: s.append_to_stream("s", ANY_VERSION, [{"x": 1}]), TypeError),
        (lambda s: s.append_to_stream(1, ANY_VERSION, [deposit()]), TypeError),
        (lambda s: s.append_to_stream("s", ANY_VERSION, deposit()), TypeError),
        (
            lambda s: s.append_to_stream(
                "s", ANY_VERSION, [EventData({"x": float("nan")}, event_type="T")]
            ),
            es.SerializationError,
        ),
        (
            lambda s: s.append_to_stream("s", ANY_VERSION, [EventData(object(), event_type="T")]),
            es.SerializationError,
        ),
        (lambda s: s.link_to_stream("$all", ANY_VERSION, [uuid.uuid4()]), ValueError),
        (lambda s: s.link_to_stream("l", ANY_VERSION, ["not-a-uuid"]), ValueError),
        (lambda s: s.delete_stream("$all", ANY_VERSION), ValueError),
        (lambda s: s.read_stream_forward("s", -1), ValueError),
        (lambda s: s.read_stream_forward("s", 0, 0), ValueError),
        (lambda s: s.paginate_streams(sort_by="stream_id; drop"), ValueError),
    ],
)
async def test_bad_input_raises_before_io(store: EventStore, call: object, error: type) -> None:
    with pytest.raises(error):
        await call(store)  # type: ignore[operator]
    assert (await store.stream_info("$all")).stream_version == 0
    assert (await store.paginate_streams()).total_entries == 1  # $all


def test_event_data_validation() -> None:
    with pytest.raises(ValueError, match="UUID"):
        EventData({}, event_type="T", event_id="nope")
    with pytest.raises(TypeError, match="metadata"):
        EventData({}, event_type="T", metadata=[1])  # type: ignore[arg-type]
    assert isinstance(EventData({}, event_type="T").event_id, uuid.UUID)
