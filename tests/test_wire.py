"""The hot statements sent straight from Trio (`_pg._wire`, `Database.fetchrow_direct`):
values as asyncpg sends and reads them, server errors as everywhere else, every
authentication method a server may ask for, a fallback to asyncpg for what it does
not speak, and connections left mid-statement never reused."""

from __future__ import annotations

import array
import datetime
import struct
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

import trio_eventstore as es
from trio_eventstore import NO_STREAM, EventData, EventStoreConfig, admin, open_event_store
from trio_eventstore._pg import Database, open_connection, open_database, open_listener
from trio_eventstore._tempcluster import temp_cluster

from .helpers import failing_callback


@pytest.fixture
async def db(initialized: EventStoreConfig) -> AsyncIterator[Database]:
    async with open_database(initialized.with_changes(pool_size=2)) as database:
        yield database


async def both(db: Database, sql: str, *args: object) -> tuple[Any, Any]:
    """The row as `_wire` reads it, and as asyncpg does."""
    direct = await db.fetchrow_direct(sql, *args)
    assert sql not in db._not_direct, "ran through asyncpg"
    assert not db._wire_off
    return direct, await via_asyncpg(db, sql, *args)


async def via_asyncpg(db: Database, sql: str, *args: object) -> Any:
    async def unit(conn: Any) -> Any:
        return await conn.fetchrow(sql, *args)

    return await db.run(unit)


#: A statement that sleeps; `end_sleepers` ends those left running by closed connections.
SLEEP = "SELECT 1 AS one FROM pg_sleep({}) /* wire-sleep */"


async def end_sleepers(config: EventStoreConfig) -> None:
    async with open_connection(config) as conn:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE query LIKE '%wire-sleep%' AND pid <> pg_backend_pid()"
        )


UTC = datetime.UTC
TYPES: list[tuple[str, object]] = [
    ("text", "grüße \u2603"),
    ("text", ""),
    ("varchar", "v"),
    ("uuid", uuid.uuid4()),
    ("bytea", b"\x00\xff bytes"),
    ("bigint", -(2**63)),
    ("int", 2**31 - 1),
    ("smallint", -7),
    ("boolean", True),
    ("boolean", False),
    ("timestamptz", datetime.datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)),
    ("timestamptz", datetime.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
    ("timestamp", datetime.datetime(2001, 2, 3, 4, 5, 6, 7)),
]


@pytest.mark.parametrize(("type_", "value"), TYPES)
async def test_values_read_back_as_asyncpg_reads_them(
    db: Database, type_: str, value: object
) -> None:
    direct, driver = await both(db, f"SELECT $1::{type_} AS v, NULL::{type_} AS n", value)
    assert direct["v"] == driver["v"] == value
    assert direct[0] == value
    assert direct["n"] is None
    assert direct.get("n", 1) is None
    assert list(direct.items()) == list(driver.items())


async def test_rows_of_integers_read_back_as_asyncpg_reads_them(db: Database) -> None:
    """A row's leading integer columns have one layout when none is NULL (read in one
    unpack), another when one is."""
    sql = "SELECT $1::bigint AS a, $2::int AS b, $3::smallint AS c, $4::text AS t"
    for values in (
        (-(2**63), 2**31 - 1, -(2**15), "x"),
        (1, 2, 3, None),
        (0, None, 7, "y"),
        (None, None, None, None),
    ):
        direct, driver = await both(db, sql, *values)
        assert tuple(direct) == tuple(driver) == values
        assert (direct["a"], direct["t"]) == values[::3]


_INT_ROWS = st.tuples(
    st.none() | st.integers(-(2**15), 2**15 - 1),
    st.none() | st.integers(-(2**31), 2**31 - 1),
    st.none() | st.integers(-(2**63), 2**63 - 1),
    st.none() | st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00")),
    st.none() | st.integers(-(2**63), 2**63 - 1),
)


async def test_rows_of_any_integers_read_back_as_asyncpg_reads_them(db: Database) -> None:
    """Hypothesis: leading integer columns of each width, any of them NULL, then others."""
    sql = "SELECT $1::smallint AS a, $2::int AS b, $3::bigint AS c, $4::text AS t, $5::bigint AS d"

    @settings(max_examples=100, deadline=None)
    @given(_INT_ROWS)
    def fuzz(values: tuple[object, ...]) -> None:
        direct, driver = trio.from_thread.run(both, db, sql, *values)
        assert tuple(direct) == tuple(driver) == values

    await trio.to_thread.run_sync(fuzz)


ARRAYS = [
    ([], [], [], []),
    ([None], [None], [None], [None]),
    (
        ["a", "", "ü\u2603", None, "x,y"],
        [b"", b"\x00\xff", None],
        [0, -(2**63), 2**63 - 1],
        [uuid.UUID(int=0), None, uuid.uuid4()],
    ),
    (  # values of another type than usual: taken as asyncpg takes them
        ["only"],
        [bytearray(b"ab"), memoryview(b"cd")],
        [7],
        ["00000000-0000-0000-0000-000000000001", uuid.UUID(int=2)],
    ),
    ([None, "a"], [None, None], [None, 1], [None, None, None]),
    (
        [str(i) for i in range(300)],
        [bytes([i % 256]) * i for i in range(50)],
        list(range(500)),
        [uuid.uuid4() for _ in range(100)],
    ),
]


@pytest.mark.parametrize("arrays", ARRAYS)
async def test_arrays_are_sent_as_asyncpg_sends_them(
    db: Database, arrays: tuple[list[Any], ...]
) -> None:
    sql = (
        "SELECT md5(array_to_json($1::text[])::text) AS t, cardinality($2::bytea[]) AS nb,"
        " md5(array_to_string($2::bytea[]::text[], ',', '*')) AS b,"
        " md5(array_to_string($3::bigint[], ',', '*')) AS n,"
        " md5(array_to_string($4::uuid[], ',', '*')) AS u"
    )
    direct, driver = await both(db, sql, *arrays)
    assert tuple(direct) == tuple(driver)


def _ints(bits: int) -> st.SearchStrategy[list[int | None]]:
    return st.lists(st.none() | st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1), max_size=8)


#: bytea values as a serializer may return them: any object with the buffer protocol,
#: whose items may be wider than a byte (its length then is not its size in bytes)
_BUFFERS = st.one_of(
    st.binary(max_size=8),
    st.binary(max_size=8).map(bytearray),
    st.binary(max_size=8).map(lambda v: memoryview(v)),
    st.lists(st.integers(-(2**15), 2**15 - 1), max_size=4).map(lambda v: array.array("h", v)),
    st.lists(st.integers(0, 2**32 - 1), max_size=4).map(lambda v: memoryview(array.array("I", v))),
)

#: Arrays of the element types that `_wire` encodes in one pass when it can.
_ARRAY_ARGS = st.tuples(
    _ints(16),
    _ints(32),
    _ints(64),
    st.lists(
        st.none() | st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00")),
        max_size=8,
    ),
    st.lists(st.none() | _BUFFERS, max_size=8),
    st.lists(st.none() | st.uuids() | st.uuids().map(str), max_size=8),
)


async def test_arrays_of_any_values_are_sent_as_asyncpg_sends_them(db: Database) -> None:
    """Hypothesis: arrays of each type, with NULLs or without, empty or long, read back
    (as text, which both read alike) as what asyncpg sends."""
    sql = (
        "SELECT $1::smallint[]::text AS a, $2::int[]::text AS b, $3::bigint[]::text AS c,"
        " $4::text[]::text AS d, $5::bytea[]::text AS e, $6::uuid[]::text AS f"
    )

    @settings(max_examples=150, deadline=None)
    @given(_ARRAY_ARGS)
    @example(([2**15 - 1] * 70_000, [-1] * 70_000, [None] * 70_000, ["é"] * 70_000, [], []))
    @example(([], [], [], [], [memoryview(array.array("h", [1, 2]))], []))
    def fuzz(arrays: tuple[list[Any], ...]) -> None:
        direct: Any = trio.from_thread.run(db.fetchrow_direct, sql, *arrays)
        assert sql not in db._not_direct, "ran through asyncpg"
        # A buffer is sent as its bytes (asyncpg takes an array.array for a sub-array).
        *same, buffers, uuids = arrays
        as_bytes = [None if v is None else bytes(v) for v in buffers]
        driver = trio.from_thread.run(via_asyncpg, db, sql, *same, as_bytes, uuids)
        assert tuple(direct) == tuple(driver)

    await trio.to_thread.run_sync(fuzz)


def test_an_array_value_of_the_wrong_type_is_refused_before_sending() -> None:
    from trio_eventstore._pg._wire_codecs import Shape

    shape = Shape([1009, 1016, 2951], [])
    with pytest.raises(TypeError, match="expected a str, got int"):
        shape.bind_parameters([["a", 1], [1], [uuid.uuid4()]])
    with pytest.raises(struct.error, match="not an integer"):
        shape.bind_parameters([["a"], [1, 2.5], [uuid.uuid4()]])
    with pytest.raises(ValueError, match="badly formed"):
        shape.bind_parameters([["a"], [1], ["not a uuid"]])


async def test_a_type_it_does_not_read_goes_through_asyncpg(db: Database) -> None:
    sql = "SELECT $1::int AS i, 1.5::numeric AS n"
    row = await db.fetchrow_direct(sql, 3)
    assert row is not None
    assert row["i"] == 3
    assert str(row["n"]) == "1.5"
    assert sql in db._not_direct
    assert not db._wire_off


async def test_a_server_error_is_translated_and_the_connection_reused(db: Database) -> None:
    with pytest.raises(es.DatabaseError) as info:
        await db.fetchrow_direct("SELECT 1 / $1::int AS x", 0)
    assert info.value.sqlstate == "22012"
    before = await db.fetchrow_direct("SELECT pg_backend_pid() AS pid")
    with pytest.raises(es.DatabaseError):
        await db.fetchrow_direct("SELECT 1 / $1::int AS x", 0)
    after = await db.fetchrow_direct("SELECT pg_backend_pid() AS pid")
    assert before is not None
    assert after is not None
    assert before["pid"] == after["pid"]


async def test_a_statement_prepared_before_a_schema_change_is_prepared_again(
    db: Database,
) -> None:
    table = f'"{db.config.schema}".wire_t'
    await db.execute(f"CREATE TABLE {table} (a int)")
    await db.execute(f"INSERT INTO {table} VALUES (1)")
    sql = f"SELECT * FROM {table} WHERE a = $1::int"
    row = await db.fetchrow_direct(sql, 1)
    assert row is not None
    assert row[0] == 1
    await db.execute(f"ALTER TABLE {table} ADD COLUMN b text DEFAULT 'x'")
    row = await db.fetchrow_direct(sql, 1)
    assert row is not None
    assert (row[0], row[1]) == (1, "x")


async def test_cancelled_mid_statement_the_connection_is_closed_not_reused(
    db: Database,
) -> None:
    first = await db.fetchrow_direct("SELECT pg_backend_pid() AS pid")
    assert first is not None
    with trio.move_on_after(0.3) as scope:
        await db.fetchrow_direct(SLEEP.format(2))
    assert scope.cancelled_caught
    await end_sleepers(db.config)
    row = await db.fetchrow_direct("SELECT pg_backend_pid() AS pid")
    assert row is not None
    assert row["pid"] != first["pid"]
    with trio.fail_after(10):  # the server notices the closed socket and ends it
        while await db.fetchval(  # noqa: ASYNC110 - polling the server
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", first["pid"]
        ):
            await trio.sleep(0.05)


async def test_a_statement_past_the_timeout_fails_as_unavailable(
    initialized: EventStoreConfig,
) -> None:
    async with open_database(initialized.with_changes(timeout=0.3)) as db:
        with pytest.raises(es.StorageUnavailableError, match="did not answer in time"):
            await db.fetchrow_direct(SLEEP.format(5))
        await end_sleepers(initialized)
        again = await db.fetchrow_direct("SELECT 2 AS two")
        assert again is not None
        assert again["two"] == 2


async def test_in_a_store_one_task_times_statements_out(initialized: EventStoreConfig) -> None:
    """A store times its straight-from-Trio statements out with one task
    (`Database.watch_statements`), not a cancel scope each: a statement past its
    deadline fails the same way, within the timeout and a quarter of it, on a
    connection then closed."""
    async with open_event_store(initialized.with_changes(timeout=0.4)) as store:
        db: Database = store._db
        assert db._watched
        started = trio.current_time()
        with pytest.raises(es.StorageUnavailableError, match="did not answer in time"):
            await db.fetchrow_direct(SLEEP.format(5))
        assert 0.4 <= trio.current_time() - started < 0.4 * 1.25 + 0.3
        assert not db._pool._busy_wire
        await end_sleepers(initialized)
        again = await db.fetchrow_direct("SELECT 2 AS two")
        assert again is not None
        assert again["two"] == 2
        # A statement within its time is not disturbed by the watch.
        slow = await db.fetchrow_direct(SLEEP.format(0.2))
        assert slow is not None
    assert not db._watched


async def test_a_connection_the_server_ended_while_idle_is_not_used(db: Database) -> None:
    row = await db.fetchrow_direct("SELECT pg_backend_pid() AS pid")
    assert row is not None
    await db.fetchval("SELECT pg_terminate_backend($1)", row["pid"])
    await trio.sleep(0.2)
    again = await db.fetchrow_direct("SELECT pg_backend_pid() AS pid")
    assert again is not None
    assert again["pid"] != row["pid"]


async def test_the_pool_never_holds_more_than_its_size(initialized: EventStoreConfig) -> None:
    name = f"trio-eventstore pool {initialized.schema}"[:63]
    async with open_database(initialized.with_changes(pool_size=1)) as db:
        for _ in range(3):
            await db.fetchrow_direct("SELECT 1 AS one")
            await db.fetchval("SELECT 1")
        async with open_connection(initialized) as watcher:
            n = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name
            )
        assert n == 1


@pytest.mark.parametrize("direct_first", [True, False])
async def test_connections_opened_at_once_stay_within_the_pool_size(
    initialized: EventStoreConfig, direct_first: bool
) -> None:
    """Idle connections of one kind, then a burst that opens the other kind at once:
    each new one makes room as it starts to connect, not once it is connected."""
    name = f"trio-eventstore pool {initialized.schema}"[:63]
    async with open_database(initialized.with_changes(pool_size=3)) as db:

        async def direct() -> None:
            await db.fetchrow_direct("SELECT pg_sleep(0.2) AS slept")

        async def via_asyncpg() -> None:
            await db.fetchval("SELECT pg_sleep(0.2)")

        first, burst = (direct, via_asyncpg) if direct_first else (via_asyncpg, direct)
        await first()
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(burst)
        async with open_connection(initialized) as watcher:
            n = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name
            )
        assert n <= 3


async def test_closing_the_store_fails_a_statement_in_flight(
    initialized: EventStoreConfig,
) -> None:
    async with trio.open_nursery() as nursery:
        failed: list[BaseException] = []

        async with open_database(initialized) as db:

            async def slow() -> None:
                try:
                    await db.fetchrow_direct(SLEEP.format(30))
                except es.EventStoreError as exc:
                    failed.append(exc)

            nursery.start_soon(slow)
            await trio.sleep(0.3)
    await end_sleepers(initialized)
    assert len(failed) == 1
    assert isinstance(failed[0], es.EventStoreClosedError)


def _url(base: str, user: str, password: str | None, database: str, **query: str) -> str:
    parts = urllib.parse.urlsplit(base)
    host = parts.netloc.rsplit("@", 1)[1]
    auth = user if password is None else f"{user}:{password}"
    return urllib.parse.urlunsplit(
        parts._replace(
            netloc=f"{auth}@{host}", path=f"/{database}", query=urllib.parse.urlencode(query)
        )
    )


HBA = [
    "local all all trust",
    "host all md5_user 127.0.0.1/32 md5",
    "host all password_user 127.0.0.1/32 password",
    "host all trust_user 127.0.0.1/32 trust",
    "host all all 127.0.0.1/32 scram-sha-256",
]


@pytest.fixture(scope="module")
def auth_server() -> Any:
    with temp_cluster(hba=HBA) as cluster:
        url = cluster.url()

        async def setup() -> None:
            async with open_connection(EventStoreConfig(url=url)) as conn:
                await conn.execute("SET password_encryption = 'md5'")
                await conn.execute("CREATE ROLE md5_user LOGIN CREATEDB PASSWORD 'md5 pw'")
                await conn.execute("RESET password_encryption")
                for role in ("password_user", "trust_user", "scram_user"):
                    await conn.execute(f"CREATE ROLE {role} LOGIN CREATEDB PASSWORD '{role} pw'")

        trio.run(setup)
        yield url


@pytest.mark.parametrize("user", ["md5_user", "password_user", "trust_user", "scram_user"])
async def test_every_authentication_method_a_server_asks_for(auth_server: str, user: str) -> None:
    password = "md5 pw" if user == "md5_user" else f"{user} pw"
    config = EventStoreConfig(
        url=_url(auth_server, user, password, f"db_{user}"), schema="wire", timeout=10.0
    )
    await admin.create(config)
    await admin.init(config)
    async with open_event_store(config) as store:
        assert (
            await store.append_to_stream("s", NO_STREAM, [EventData({"n": 1}, event_type="N")]) == 1
        )
        db: Database = store._db
        assert not db._wire_off
        assert db._pool._idle_wire, "the append did not go through _wire"
        assert [e.data for e in await store.read_stream_forward("s")] == [{"n": 1}]


async def test_what_it_does_not_speak_goes_through_asyncpg(initialized: EventStoreConfig) -> None:
    url = initialized.url
    assert url is not None
    config = initialized.with_changes(url=url + "?target_session_attrs=read-write")
    async with open_event_store(config) as store:
        assert (
            await store.append_to_stream("s", NO_STREAM, [EventData({"n": 1}, event_type="N")]) == 1
        )
        db: Database = store._db
        assert db._wire_off
        # Group-commit batches and big appends (two statements before one Sync) too.
        big = [EventData({"n": i}, event_type="N") for i in range(150)]
        assert await store.append_to_stream("big", NO_STREAM, big) == 150
        async with trio.open_nursery() as nursery:
            for k in range(8):
                nursery.start_soon(
                    store.append_to_stream, f"c{k}", NO_STREAM, [EventData({}, event_type="N")]
                )
        writer = store.statistics().writer
        assert writer is not None
        assert writer.largest_batch > 1
        assert len(await store.read_stream_forward("big", count=500)) == 150
        assert not db._pool._idle_wire
        # The LISTEN session too, and it hears another store's appends.
        notifier = store._subscriptions.notifier
        assert notifier.transport == "asyncpg"
        async with open_event_store(initialized) as other:
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(notifier.wait_beyond, "t", 0)
                    await trio.sleep(0.05)
                    await other.append_to_stream("t", NO_STREAM, [EventData({}, event_type="N")])


# -- the LISTEN session ---------------------------------------------------------------------


async def notify(config: EventStoreConfig, *payloads: str) -> None:
    from trio_eventstore import _sql

    async with open_connection(config) as conn:
        for payload in payloads:
            await conn.execute(
                "SELECT pg_notify($1, $2)", _sql.notification_channel(config.schema), payload
            )


async def test_the_listen_session_is_spoken_from_trio(initialized: EventStoreConfig) -> None:
    """The store's LISTEN session is a `_wire` connection: another store's appends wake
    its readers; it is the backend the statistics name, with keepalives set."""
    async with open_event_store(initialized) as store, open_event_store(initialized) as other:
        notifier = store._subscriptions.notifier
        assert notifier.transport == "wire"
        await notifier.ensure_listening()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(notifier.wait_beyond, "s", 0)
                await trio.sleep(0.05)
                await other.append_to_stream("s", NO_STREAM, [EventData({"n": 1}, event_type="N")])
        assert notifier.mark("$all") >= 1
        async with open_connection(initialized) as conn:
            row = await conn.fetch(
                "SELECT application_name, query FROM pg_stat_activity WHERE pid = $1",
                store.statistics().listener_pid,
            )
        assert row[0]["application_name"] == f"trio-eventstore listener {initialized.schema}"
        assert row[0]["query"].startswith("LISTEN")


async def test_a_failing_notification_callback_keeps_the_wire_listener(
    initialized: EventStoreConfig, caplog: pytest.LogCaptureFixture
) -> None:
    callback, seen, got_two = failing_callback()

    async with open_listener(initialized, callback, role="test") as listener:
        assert listener.transport == "wire"
        await notify(initialized, "not listening yet")
        await listener.listen()
        await notify(initialized, "one", "boom", "two")
        with trio.fail_after(10):
            await got_two.wait()
        assert seen == ["one", "two"]
        assert not listener.lost.is_set()
    assert "a notification callback failed" in caplog.text


async def test_the_wire_listener_tells_when_its_session_ends(
    initialized: EventStoreConfig,
) -> None:
    async with open_listener(initialized, lambda _c, _p: None, role="test") as listener:
        async with open_connection(initialized) as conn:
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", listener.backend_pid)
        with trio.fail_after(10):
            await listener.lost.wait()


async def test_several_executions_before_one_sync_share_a_transaction(db: Database) -> None:
    """`fetchmany_direct` (a big append's two statements): one round trip, one implicit
    transaction, the rows of each execution in order; an error in a later execution
    rolls back the earlier ones."""
    sql = (
        "SELECT coalesce(current_setting('wire.v', true), '') AS before,"
        " set_config('wire.v', $1, true) AS after"
    )
    rows = await db.fetchmany_direct(sql, [("a",), ("b",)])
    assert sql not in db._not_direct
    assert not db._wire_off
    assert [(r["before"], r["after"]) for r in rows] == [("", "a"), ("a", "b")]
    [row] = await db.fetchmany_direct(sql, [("c",)])
    assert (row["before"], row["after"]) == ("", "c")  # the transaction ended at the Sync

    table = f"wire_{uuid.uuid4().hex}"
    await db.execute(f"CREATE TABLE {table} (n int PRIMARY KEY)")
    try:
        insert = f"INSERT INTO {table} (n) VALUES ($1) RETURNING n"
        with pytest.raises(es.DatabaseError) as caught:
            await db.fetchmany_direct(insert, [(1,), (2,), (1,)])
        assert caught.value.sqlstate == "23505"
        assert insert not in db._not_direct
        [row] = await db.fetch_direct(f"SELECT count(*) AS n FROM {table}")
        assert row["n"] == 0
    finally:
        await db.execute(f"DROP TABLE {table}")
