"""Hostile input, fuzzed with Hypothesis: NOTIFY payloads, configuration, stream ids and
schema names, event payloads (and rows another client wrote). Each gets a clear typed
error or is handled; the store keeps serving other callers; nothing is half-written.

The fuzzers that need a store run Hypothesis in a worker thread and each example in the
test's Trio loop (`trio.from_thread.run`): one store serves every example. Example counts
follow the Hypothesis profile (``quick`` in ``make test``; ``invoke proptest`` runs more).
"""

from __future__ import annotations

import contextlib
import math
import random
import string
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

import trio_eventstore as es
from trio_eventstore import (
    ANY_VERSION,
    EventData,
    EventStore,
    EventStoreConfig,
    _storage,
    admin,
    open_event_store,
)
from trio_eventstore._arguments import MAX_WRITTEN_STREAM_UUID_BYTES, check_stream
from trio_eventstore._config import MAX_SCHEMA_BYTES
from trio_eventstore._pg import Conn, Connection, open_connection
from trio_eventstore._serialization import MAX_JSON_DEPTH
from trio_eventstore._sql import notification_channel, quote_ident

HANG_GUARD = 30  # per example: a guard against hangs, never a speed assertion

#: Text PostgreSQL can hold (no NUL, no lone surrogate).
STORABLE = st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00")


def ev(n: int) -> EventData:
    return EventData({"n": n}, event_type="Counted")


async def in_thread(fuzz: Callable[[], None]) -> None:
    """Run a Hypothesis test (sync, decorated with @given) in a worker thread; its
    examples call `trio.from_thread.run` to work in this loop."""
    await trio.to_thread.run_sync(fuzz)


def run(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """From the worker thread: ``await fn(*args)`` in the test's loop, with a hang guard."""

    async def guarded() -> Any:
        with trio.fail_after(HANG_GUARD):
            return await fn(*args)

    return trio.from_thread.run(guarded)


async def all_count(store: EventStore) -> int:
    return (await store.stream_info("$all")).stream_version


# ------------------------------------------------------------------------------------------
# NOTIFY payloads

_INTS = (
    st.integers(-(2**70), 2**70)
    | st.sampled_from([0, -1, 2**63 - 1, 2**63, 10**30])
    | st.sampled_from(["1_000", " 7", "+3", "٣", "9" * 5000, "", "x", "1.5", "1e3"])
)


def _formatted(stream: str, stream_id: object, first: object, last: object) -> str:
    return f"{stream},{stream_id},{first},{last}"


PAYLOADS = st.one_of(
    st.text(STORABLE, max_size=100),
    st.builds(_formatted, st.just("s"), st.integers(), st.integers(), st.integers(0, 2**70)),
    st.builds(
        _formatted,
        st.sampled_from(["s", "$all", "t", "s,s", ""]) | st.text(STORABLE, max_size=20),
        _INTS,
        _INTS,
        _INTS,
    ),
    st.integers(7000, 7999).map(lambda n: "s,1,1," + "9" * (n - 6)),  # huge, but under 8000
    st.integers(8000, 9000).map(lambda n: "x" * n),  # too long: the sender gets an error
)


@pytest.fixture
async def notifying(store: EventStore) -> AsyncIterator[Connection]:
    """Another client's connection (to send notifications)."""
    async with open_connection(store.config) as conn:
        yield conn


async def notify(conn: Connection, channel: str, payload: str) -> None:
    with contextlib.suppress(es.DatabaseError):  # e.g. payload too long: the sender's problem
        await conn.execute("SELECT pg_catalog.pg_notify($1, $2)", channel, payload)


async def test_hostile_notifications_never_disturb_delivery(
    store: EventStore, notifying: Connection
) -> None:
    ours = notification_channel(store.config.schema)
    received: dict[str, list[int]] = {"persistent": [], "transient": []}
    changed = trio.Event()

    def record(who: str, numbers: list[int]) -> None:
        nonlocal changed
        received[who] += numbers
        changed.set()
        changed = trio.Event()

    async with (
        store.subscribe_to_stream("s", "fuzz", buffer_size=10) as sub,
        store.subscribe("s") as transient,
        trio.open_nursery() as nursery,
    ):
        await sub.wait_subscribed()

        async def persistent_consumer() -> None:
            async for batch in sub:
                record("persistent", [e.event_number for e in batch.events])
                sub.ack(batch)

        async def transient_consumer() -> None:
            async for events in transient:
                record("transient", [e.event_number for e in events])

        nursery.start_soon(persistent_consumer)
        nursery.start_soon(transient_consumer)

        async def example(notes: list[tuple[str, str]]) -> None:
            for channel, payload in notes:
                await notify(notifying, ours if channel == "ours" else channel, payload)
            await store.append_to_stream("s", ANY_VERSION, [ev(0)])
            number = (await store.stream_info("s")).stream_version
            while not all(number in seen for seen in received.values()):
                await changed.wait()
            reads = sub.statistics().reads
            await trio.sleep(0.02)
            # A forged mark must not make readers read again and again.
            assert sub.statistics().reads - reads <= 2

        channels = st.just("ours") | st.sampled_from(["public.events", ours + "x", "events"])

        @given(st.lists(st.tuples(channels, PAYLOADS), max_size=5))
        def fuzz(notes: list[tuple[str, str]]) -> None:
            run(example, notes)

        await in_thread(fuzz)
        nursery.cancel_scope.cancel()
    expected = list(range(1, len(received["persistent"]) + 1))
    assert received["persistent"] == expected
    assert received["transient"] == expected


async def test_a_forged_high_version_does_not_make_readers_spin(
    store: EventStore, notifying: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A notification naming a version the stream does not have (forged, or a stream
    deleted and created again) wakes readers once; they read, find nothing, and wait."""
    reads = 0
    read_page = _storage.read_page

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return await read_page(*args, **kwargs)

    monkeypatch.setattr(_storage, "read_page", counted)
    await store.append_to_stream("s", ANY_VERSION, [ev(1)])
    async with (
        store.subscribe_to_stream("s", "p") as sub,
        store.subscribe("s") as transient,
        trio.open_nursery() as nursery,
    ):
        async for batch in sub:
            sub.ack(batch)
            break
        got: list[int] = []
        transient_got = trio.Event()

        async def transient_consumer() -> None:
            async for events in transient:
                got.extend(e.event_number for e in events)
                transient_got.set()

        nursery.start_soon(transient_consumer)
        await trio.sleep(0.1)
        before, driver_before = reads, sub.statistics().reads
        await notify(notifying, notification_channel(store.config.schema), "s,1,2,1000000")
        await trio.sleep(0.5)
        assert reads - before <= 3, "the transient subscription reads again and again"
        assert sub.statistics().reads - driver_before <= 3, "the driver reads again and again"
        await store.append_to_stream("s", ANY_VERSION, [ev(2)])
        with trio.fail_after(HANG_GUARD):
            async for batch in sub:
                assert [e.event_number for e in batch.events] == [2]
                sub.ack(batch)
                break
            await transient_got.wait()
        assert got == [2]
        nursery.cancel_scope.cancel()


async def test_a_stream_deleted_and_created_again_does_not_make_readers_spin(
    initialized: EventStoreConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The notifier's mark of a stream hard-deleted at version 3 stays at 3; a reader of
    the stream created again (at version 1) must not take it for news forever."""
    reads = 0
    read_page = _storage.read_page

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return await read_page(*args, **kwargs)

    monkeypatch.setattr(_storage, "read_page", counted)
    config = initialized.with_changes(enable_hard_deletes=True)
    async with open_event_store(config) as store:
        async with store.subscribe("s") as watching:
            await store.append_to_stream("s", ANY_VERSION, [ev(1), ev(2), ev(3)])
            assert len(await watching.__anext__()) == 3
        await store.delete_stream("s", ANY_VERSION, hard=True)
        await store.append_to_stream("s", ANY_VERSION, [ev(4)])
        async with store.subscribe("s") as transient, trio.open_nursery() as nursery:
            nursery.start_soon(transient.__anext__)
            await trio.sleep(0.3)
            assert reads < 10, "the transient subscription reads again and again"
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------
# configuration

SECRET = "Sekr3t"

#: URL text a part may hold without changing the URL's structure.
_PART = st.text(st.characters(blacklist_characters="/?#@:[]%&=+"), max_size=8)
_ANY = st.text(st.characters(), max_size=12)
#: A password's part: a lone surrogate has no UTF-8 form, so no URL can hold it.
_PASSWORD_PART = st.text(
    st.characters(blacklist_characters="/?#@:[]%&=+", codec="utf-8"), max_size=8
)


@st.composite
def secret_urls(draw: st.DrawFn) -> tuple[str, str]:
    """(password, URL holding it in the user info or in the query)."""
    password = SECRET + draw(_PASSWORD_PART)
    scheme = draw(st.sampled_from(["postgresql", "postgres", "http", ""]))
    user = draw(_PART)
    host = draw(_ANY | st.sampled_from(["127.0.0.1", "[::1]", "[", "h:1:2", "h1:1,h2:2"]))
    port = draw(_ANY | st.integers(-5, 70000).map(str))
    database = draw(_ANY)
    query = draw(_ANY | st.sampled_from(["", "sslmode=require", "a&b", "=", "&&"]))
    where = draw(st.sampled_from(["userinfo", "password", "sslpassword", "both"]))
    quoted = urllib.parse.quote(password, safe="")
    if where == "userinfo":
        return password, f"{scheme}://{user}:{quoted}@{host}:{port}/{database}?{query}"
    if where == "both":
        return password, f"{scheme}://{user}:{quoted}@{host}:{port}/{database}?password={quoted}"
    return password, f"{scheme}://{user}@{host}:{port}/{database}?{query}&{where}={quoted}"


def assert_hidden(password: str, text: str) -> None:
    for form in {password, urllib.parse.quote(password, safe="")}:
        assert form not in text


@given(st.one_of(secret_urls(), _ANY.map(lambda url: (SECRET, url))))
@example((SECRET, f"postgresql://@:/0#?&password={SECRET}"))  # a query after a stray "#"
@example((SECRET, f"postgresql://:{SECRET}@:/0#?password={SECRET}"))
@example((SECRET, f"postgresql://:{SECRET}@:/0??password={SECRET}"))  # a stray "?"
def test_config_urls_raise_only_value_or_type_errors_and_hide_passwords(
    case: tuple[str, str],
) -> None:
    password, url = case
    try:
        config = EventStoreConfig(url=url)
    except (ValueError, TypeError) as exc:
        assert_hidden(password, f"{exc} {exc!r}")
        return
    assert_hidden(password, repr(config))
    assert_hidden(password, config.redact(f"failed for {password} and {url}"))
    assert config.database_name  # derived values work on what was accepted
    assert config.connect_params()["database"] == config.database_name


_FIELDS = [f.name for f in attrs.fields(EventStoreConfig) if f.name not in ("serializer", "init")]
_RAW = st.one_of(
    st.text(st.characters(), max_size=20),
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(["nan", "inf", "-0", "1e999", "true", "0", " 5 ", "٣", "9" * 5000]),
)


@given(st.dictionaries(st.sampled_from(_FIELDS), _RAW, min_size=1))
def test_config_from_env_raises_only_value_errors(values: dict[str, str]) -> None:
    environ = {"EVENTSTORE_" + name.upper(): raw for name, raw in values.items()}
    environ.setdefault("EVENTSTORE_DATABASE", "db")
    environ["EVENTSTORE_PASSWORD"] = SECRET
    try:
        config = EventStoreConfig.from_env(environ=environ)
    except (ValueError, TypeError) as exc:
        refused: Exception | None = exc
    else:
        refused = None
        assert SECRET not in repr(config)
    assert SECRET not in str(refused)


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=10),
    st.binary(max_size=5),
    st.lists(st.integers(), max_size=2),
)


@given(st.dictionaries(st.sampled_from(_FIELDS), _VALUES, min_size=1))
def test_config_options_raise_only_value_or_type_errors(options: dict[str, object]) -> None:
    options.setdefault("database", "db")
    with contextlib.suppress(ValueError, TypeError):
        EventStoreConfig(**options)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# stream ids, subscription names and schema names

NAMES = st.one_of(
    st.text(st.characters(), max_size=30),  # NUL and lone surrogates included
    st.text(STORABLE, min_size=1, max_size=12).map(lambda s: f'"{s}\'";--'),
    st.sampled_from(["$all", "", " ", "a,b,1,2", "ß", "\u202e", "x" * 7900, "é" * 3951]),
    st.integers(7890, 8100).map(lambda n: "s" * n),
    st.text(STORABLE, min_size=1, max_size=4).map(lambda s: s * 2000),
)


#: Stream ids too long for PostgreSQL's index of stream ids, and incompressible: refused
#: for appends before any I/O; as subscription names, refused before any I/O too (they
#: would not fit the index of subscriptions, or the key of a parked event's record).
UNINDEXABLE = st.builds(
    lambda size, seed: "".join(random.Random(seed).choices(string.ascii_letters, k=size)),
    st.integers(MAX_WRITTEN_STREAM_UUID_BYTES + 1, 3000) | st.just(7900),
    st.integers(0, 1000),
)


async def stream_round_trip(store: EventStore, stream: str) -> None:
    before = await all_count(store)
    event = EventData({"stream": "fuzz"}, event_type="Fuzzed")
    try:
        await store.append_to_stream(stream, ANY_VERSION, [event])
    except (ValueError, TypeError):
        assert await all_count(store) == before  # refused before any I/O: nothing written
        if stream == "$all":
            return  # it reads, but cannot be written to
        if _readable(stream):  # too long to be written to, not to be read: there is none
            with pytest.raises(es.StreamNotFoundError):
                await store.read_stream_forward(stream)
            return
        with pytest.raises((ValueError, TypeError)):
            await store.read_stream_forward(stream)
        with pytest.raises((ValueError, TypeError)):
            store.subscribe_to_stream(stream, "fuzz")
        return
    assert await all_count(store) == before + 1
    (last,) = await store.read_stream_backward(stream, count=1)
    assert (last.stream_uuid, last.event_id) == (stream, event.event_id)
    assert (await store.stream_info(stream)).stream_uuid == stream
    async with store.subscribe_to_stream(stream, "fuzz", start_from=last.stream_version - 1) as sub:
        async for batch in sub:
            assert [e.event_id for e in batch.events] == [event.event_id]
            sub.ack(batch)
            break
    await store.delete_subscription(stream, "fuzz")


def _readable(stream: str) -> bool:
    try:
        check_stream(stream)
    except (ValueError, TypeError):
        return False
    return True


async def test_stream_ids_round_trip_or_are_refused_before_io(store: EventStore) -> None:
    @given(NAMES | UNINDEXABLE)
    def fuzz(stream: str) -> None:
        run(stream_round_trip, store, stream)

    await in_thread(fuzz)
    await store.append_to_stream("after", ANY_VERSION, [ev(1)])  # still serving


async def subscription_name_round_trip(store: EventStore, name: str) -> None:
    try:
        subscription = store.subscribe_to_stream("named", name)
    except (ValueError, TypeError):
        return
    async with subscription as sub:
        async for batch in sub:
            assert batch.events[0].stream_uuid == "named"
            sub.ack(batch)
            break
    await store.delete_subscription("named", name)


async def test_subscription_names_work_or_are_refused_before_io(store: EventStore) -> None:
    await store.append_to_stream("named", ANY_VERSION, [ev(1)])

    @given(NAMES | UNINDEXABLE)
    def fuzz(name: str) -> None:
        run(subscription_name_round_trip, store, name)

    await in_thread(fuzz)


SCHEMAS = st.one_of(
    st.text(st.characters(), max_size=20),
    st.text(STORABLE, min_size=1, max_size=8).map(lambda s: f"\"{s}'.x"),
    st.sampled_from(["public.events", "Upper Case", "ü" * 28, "s" * 56, "s" * 57, "pg_x"]),
)


async def schema_round_trip(test_database: str, schema: object) -> None:
    try:
        config = EventStoreConfig(url=test_database, schema=schema, timeout=10.0)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return
    # Examples may repeat a name: never reuse a schema.
    base, suffix = config.schema, uuid.uuid4().hex[:6]
    while len(f"{base}{suffix}".encode()) > MAX_SCHEMA_BYTES:
        base = base[:-1]
    config = config.with_changes(schema=base + suffix)
    if config.schema.startswith("pg_"):
        # Names PostgreSQL reserves are refused by the server, as they should be.
        with pytest.raises(es.DatabaseError):
            await admin.create(config)
        return
    await admin.create(config)
    try:
        await admin.init(config)
        async with open_event_store(config) as store:
            await store.append_to_stream("s", ANY_VERSION, [ev(1)])
            async with store.subscribe_to_all_streams("p") as sub:
                async for batch in sub:
                    assert [e.data for e in batch.events] == [{"n": 1}]
                    sub.ack(batch)
                    break
    finally:
        await admin.drop(config)


async def test_schema_names_work_or_are_refused_before_io(test_database: str) -> None:
    @settings(max_examples=min(settings().max_examples, 10))
    @given(SCHEMAS)
    @example("{")  # once broke an append statement built with str.format
    @example("a}b{0}")
    def fuzz(schema: str) -> None:
        run(schema_round_trip, test_database, schema)

    await in_thread(fuzz)


# ------------------------------------------------------------------------------------------
# event payloads


def nested(depth: int, inner: Any = None) -> Any:
    value: Any = [] if inner is None else inner
    for _ in range(depth):
        value = [value]
    return value


def nested_dicts(depth: int) -> Any:
    value: Any = {}
    for _ in range(depth):
        value = {"a": value}
    return value


async def test_deep_nesting_is_refused_with_serialization_error(store: EventStore) -> None:
    for data, metadata in [
        (nested(10_000), None),
        (nested_dicts(10_000), None),
        ({}, {"deep": nested(10_000)}),
    ]:
        with pytest.raises(es.SerializationError):
            await store.append_to_stream(
                "deep", ANY_VERSION, [ev(1), EventData(data, event_type="Deep", metadata=metadata)]
            )
    with pytest.raises(es.SerializationError):
        await store.record_snapshot(
            es.SnapshotData(
                source_uuid="deep", source_version=1, source_type="x", data=nested(10_000)
            )
        )
    with pytest.raises(es.StreamNotFoundError):  # nothing half-written
        await store.read_stream_forward("deep")
    assert await all_count(store) == 0


async def test_a_list_or_dict_inside_itself_is_named_as_such(store: EventStore) -> None:
    """Not 'nested more than 500 levels deep': where it contains itself."""
    data: dict[str, object] = {"a": [1, {}]}
    data["a"][1]["b"] = data  # type: ignore[index]
    message = r"^\$\.a\[1\]\.b: contains itself \(a list or dict inside itself is not JSON\)$"
    with pytest.raises(es.SerializationError, match=message):
        await store.append_to_stream("cycle", ANY_VERSION, [EventData(data, event_type="C")])
    with pytest.raises(es.SerializationError, match=r"^metadata\.m\.a\[1\]\.b: contains itself"):
        await store.append_to_stream(
            "cycle", ANY_VERSION, [EventData({}, event_type="C", metadata={"m": data})]
        )
    assert await all_count(store) == 0


async def test_nesting_is_limited_whatever_the_callers_stack(store: EventStore) -> None:
    """500 levels are taken (and read back everywhere), 501 never are, however little
    of Python's recursion limit the caller has used."""
    deepest = nested(MAX_JSON_DEPTH - 1)  # 500 lists
    await store.append_to_stream("deep", ANY_VERSION, [EventData(deepest, event_type="Deep")])
    (event,) = await store.read_stream_forward("deep")
    assert same_json(event.data, deepest)
    with pytest.raises(es.SerializationError, match=r"^\$: nested more than 500 levels deep$"):
        await store.append_to_stream(
            "deep", ANY_VERSION, [EventData(nested(MAX_JSON_DEPTH), event_type="Deep")]
        )
    with pytest.raises(es.SerializationError, match=r"^metadata: nested more than"):
        await store.append_to_stream(
            "deep",
            ANY_VERSION,
            [EventData({}, event_type="Deep", metadata={"m": nested(MAX_JSON_DEPTH - 1)})],
        )
    assert await all_count(store) == 1


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**4400), 10**4400)  # beyond 4300 digits Python refuses to print it
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(), max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=20,
)


def same_json(a: Any, b: Any, *, jsonb: bool = False) -> bool:
    """Equal JSON values (NaN equals NaN; bool is not int); without recursion. ``jsonb``:
    numbers compare by value (a jsonb column keeps numbers as numeric, so a float
    written as ``1e+16`` reads back as the int 10000000000000000)."""
    pending = [(a, b)]
    while pending:
        x, y = pending.pop()
        if jsonb and {type(x), type(y)} == {int, float}:
            if float(x) != float(y):
                return False
            continue
        if type(x) is not type(y):
            return False
        if isinstance(x, list):
            if len(x) != len(y):
                return False
            pending.extend(zip(x, y, strict=True))
        elif isinstance(x, dict):
            if x.keys() != y.keys():
                return False
            pending.extend((x[k], y[k]) for k in x)
        elif isinstance(x, float) and math.isnan(x):
            if not math.isnan(y):
                return False
        elif x != y:
            return False
    return True


async def payload_round_trip(store: EventStore, data: Any, depth: int) -> None:
    data = nested(depth, data) if depth else data
    before = await all_count(store)
    event = EventData(data, event_type="Fuzzed", metadata={"m": data})
    try:
        await store.append_to_stream("payloads", ANY_VERSION, [event])
    except (ValueError, TypeError):  # SerializationError is a ValueError
        assert await all_count(store) == before
        return
    (last,) = await store.read_stream_backward("payloads", count=1)
    assert last.event_id == event.event_id
    jsonb = store.config.column_data_type == "jsonb"
    assert same_json(last.data, data, jsonb=jsonb)
    assert last.metadata is not None
    assert same_json(last.metadata["m"], data, jsonb=jsonb)


@pytest.mark.parametrize("column_data_type", ["bytea", "jsonb"])
async def test_event_payloads_round_trip_or_are_refused(
    config: EventStoreConfig, column_data_type: str
) -> None:
    config = config.with_changes(column_data_type=column_data_type)
    await admin.create(config)
    try:
        await admin.init(config)
        async with open_event_store(config) as store:

            @given(JSON, st.sampled_from([0, 0, 100, 400, 900, 1100]))
            def fuzz(data: Any, depth: int) -> None:
                run(payload_round_trip, store, data, depth)

            await in_thread(fuzz)
    finally:
        with trio.CancelScope(shield=True):
            await admin.drop(config)


async def insert_raw(
    config: EventStoreConfig, conn: Connection, stream: str, data: bytes, metadata: bytes | None
) -> uuid.UUID:
    """Append one event as another client (the Elixir library) would, row by row."""
    s = quote_ident(config.schema)
    event_id = uuid.uuid4()

    async def unit(c: Conn) -> None:
        await c.execute(
            f"INSERT INTO {s}.events (event_id, event_type, data, metadata) "
            "VALUES ($1, 'Raw', $2, $3)",
            event_id,
            data,
            metadata,
        )
        row = await c.fetchrow(
            f"INSERT INTO {s}.streams (stream_uuid, stream_version) VALUES ($1, 1) "
            "ON CONFLICT (stream_uuid) DO UPDATE "
            f"SET stream_version = {s}.streams.stream_version + 1 "
            "RETURNING stream_id, stream_version",
            stream,
        )
        assert row is not None
        all_version = await c.fetchval(
            f"UPDATE {s}.streams SET stream_version = stream_version + 1 WHERE stream_id = 0 "
            "RETURNING stream_version"
        )
        await c.execute(
            f"INSERT INTO {s}.stream_events "
            "(event_id, stream_id, stream_version, original_stream_id, original_stream_version) "
            "VALUES ($1, $2, $3, $2, $3), ($1, 0, $4, $2, $3)",
            event_id,
            row["stream_id"],
            row["stream_version"],
            all_version,
        )

    await conn.transaction(unit)
    return event_id


HOSTILE_BYTES = st.one_of(
    st.binary(max_size=50),
    st.sampled_from(
        [
            b'"\xff\xfe"',
            b"\xc3\x28",
            b'{"a": "\xed\xa0\x80"}',  # an encoded surrogate: not UTF-8
            b"[" * 10_000 + b"]" * 10_000,
            b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
            b"9" * 5_000,
            b"NaN",
            b"1e400",
            b"",
            b"null",
            b'"\\ud800"',
        ]
    ),
)


async def raw_read(
    store: EventStore, conn: Connection, stream: str, data: bytes, metadata: bytes | None
) -> None:
    await insert_raw(store.config, conn, stream, data, metadata)
    try:
        events = await store.read_stream_forward(stream)
    except es.SerializationError:
        pass
    else:
        assert len(events) == 1
    # The store keeps serving others.
    await store.append_to_stream("good", ANY_VERSION, [ev(1)])
    assert (await store.read_stream_backward("good", count=1))[0].data == {"n": 1}


async def test_rows_another_client_wrote_read_or_raise_serialization_error(
    store: EventStore, notifying: Connection
) -> None:
    @given(HOSTILE_BYTES, st.none() | st.just(b"null") | HOSTILE_BYTES)
    def fuzz(data: bytes, metadata: bytes | None) -> None:
        run(raw_read, store, notifying, f"raw-{uuid.uuid4().hex[:8]}", data, metadata)

    await in_thread(fuzz)


async def test_an_unreadable_event_fails_its_readers_with_serialization_error_or_is_parked(
    store: EventStore, notifying: Connection
) -> None:
    await store.append_to_stream("bad", ANY_VERSION, [ev(1)])
    with trio.fail_after(HANG_GUARD):
        async with (
            store.subscribe_to_stream("bad", "p") as sub,
            store.subscribe("bad") as transient,
        ):
            first = await sub.__anext__()
            assert [e.event_number for e in first.events] == [1]
            sub.ack(first)
            deep = await insert_raw(
                store.config, notifying, "bad", b"[" * 10_000 + b"]" * 10_000, b"null"
            )
            await insert_raw(store.config, notifying, "bad", b'"\xff"', b"null")
            with pytest.raises(es.SerializationError, match=f"event {deep} .*nested too deeply"):
                await transient.__anext__()
            # A persistent subscription parks them and goes on.
            await sub.wait_checkpointed(3)
            parked = await store.parked_events("bad", "p")
            assert [p.event.event_number for p in parked] == [2, 3]
            assert all(isinstance(p.event, es.UndecodedEvent) for p in parked)
            assert "nested too deeply" in parked[0].error
        with pytest.raises(es.SerializationError, match=f"event {deep} "):
            await store.read_stream_forward("bad")
        with pytest.raises(es.SerializationError, match=f"event {deep} "):
            await store.read_all_streams_forward()
        assert len(await store.read_stream_forward("bad", count=1)) == 1
        # Others are served as before.
        await store.append_to_stream("good", ANY_VERSION, [ev(2)])
        async with store.subscribe_to_stream("good", "p") as good:
            async for batch in good:
                assert [e.data for e in batch.events] == [{"n": 2}]
                good.ack(batch)
                break


async def test_a_50_mb_event_appends_and_reads_back(store: EventStore) -> None:
    text = "x" * (50 * 1024 * 1024)
    await store.append_to_stream(
        "big", ANY_VERSION, [ev(1), EventData({"text": text}, event_type="Big")]
    )
    first, big = await store.read_stream_forward("big")
    assert first.data == {"n": 1}
    assert isinstance(big.data, dict)
    assert big.data["text"] == text
