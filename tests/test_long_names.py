"""Names too long for PostgreSQL's btree indexes, on a real PostgreSQL.

An index entry takes at most 2704 bytes; the server compresses a long value before it
indexes it, so a long name that compresses well fits and one that does not (random
letters, hex) is refused. The server refused such names late (when a subscription
started, when it parked an event, when a snapshot or a projection's position was
written); they are now refused before any I/O with a plain `ValueError`, and what the
server takes stays accepted.
"""

from __future__ import annotations

import random
import string
from typing import Any

import pytest
import trio

import trio_eventstore as es
from trio_eventstore import (
    ANY_VERSION,
    EventData,
    EventStore,
    Projection,
    RecordedEvent,
    RetryPolicy,
    SnapshotData,
    TransactionConnection,
)
from trio_eventstore._btree import MAX_ENTRY_BYTES, MAX_RAW_BYTES, entry_size, fits
from trio_eventstore._pg import Conn
from trio_eventstore._sql import quote_ident

HANG_GUARD = 30  # seconds: a guard against hangs, never a speed assertion

#: What the key of a park record, '$parked-<name>|<stream>|<event id>', adds to the name
#: and the stream id.
PARK_KEY_EXTRA = len("$parked-") + 2 + 36


def incompressible(size: int, seed: int = 0) -> str:
    """Random letters and digits: PostgreSQL cannot compress them."""
    return "".join(random.Random(seed).choices(string.ascii_letters + string.digits, k=size))


def random_hex(size: int, seed: int = 0) -> str:
    """Hex of random bytes (an ``os.urandom(n).hex()``-derived name): nor can it compress
    those."""
    return random.Random(seed).randbytes(size // 2 + 1).hex()[:size]


def plain_value_error(info: pytest.ExceptionInfo[ValueError]) -> str:
    assert type(info.value) is ValueError, repr(info.value)
    return str(info.value)


async def subscription_rows(store: EventStore) -> int:
    schema = quote_ident(store._config.schema)
    return int(await store._db.fetchval(f"SELECT count(*) FROM {schema}.subscriptions"))


async def first_batch(sub: es.Subscription) -> list[RecordedEvent]:
    with trio.fail_after(HANG_GUARD):
        async for batch in sub:
            return list(batch.events)
    raise AssertionError("the subscription ended")


# -- the entry sizes PostgreSQL computes --------------------------------------------------


def _text(rng: random.Random, size: int) -> str:
    """Text of about ``size`` bytes, of a kind that compresses well, a little or not."""
    kind = rng.randrange(7)
    if kind == 0:
        return random_hex(size, rng.randrange(1000))
    if kind == 1:
        return "".join(rng.choices("ab", k=size))  # compresses by about a quarter
    if kind == 2:
        return "".join(rng.choices("äöü漢字€", k=max(1, size // 2)))  # bytes over 127
    if kind == 3:
        return "a" * size
    if kind == 4:
        half = incompressible(size // 2, rng.randrange(1000))
        return (half * 3)[:size]
    if kind == 5:
        words = ["order", "-", "customer", "/", "2024", "invoice", "#"]
        return "".join(rng.choices(words, k=max(1, size // 5)))
    return incompressible(size, rng.randrange(1000))


async def _refusals(store: EventStore, cases: list[tuple[str, tuple[str, ...]]]) -> list[str]:
    """Each case inserted in a transaction rolled back: the server's error, or ''."""
    schema = quote_ident(store._config.schema)
    inserts = {
        "streams": f"INSERT INTO {schema}.streams (stream_uuid) VALUES ($1)",
        "snapshots": f"INSERT INTO {schema}.snapshots "
        "(source_uuid, source_version, source_type, data) VALUES ($1, 1, 'T', '{}')",
        "subscriptions": f"INSERT INTO {schema}.subscriptions "
        "(stream_uuid, subscription_name) VALUES ($1, $2)",
    }

    async def unit(conn: Conn) -> list[str]:
        errors = []
        for table, values in cases:
            await conn.execute("BEGIN")
            try:
                await conn.execute(inserts[table], *values)
                errors.append("")
            except Exception as exc:
                errors.append(str(exc))
            await conn.execute("ROLLBACK")
        return errors

    result: list[str] = await store._db.run(unit, statements=3 * len(cases))
    return result


async def test_index_entries_are_sized_as_the_server_sizes_them(store: EventStore) -> None:
    """The check's model of the server (compression, length words, alignment) against
    the server, on the store's own indexes: the same rows fit, the same are refused,
    and a refused row's entry has the size the server reports."""
    rng = random.Random(20240611)
    cases: list[tuple[str, tuple[str, ...]]] = []
    for _ in range(150):
        total = rng.randint(2400, 6000)
        table = rng.choice(["streams", "snapshots", "subscriptions", "subscriptions"])
        if table == "subscriptions":
            first = rng.choice([rng.randint(1, 130), rng.randint(480, 560), total // 2])
            cases.append((table, (_text(rng, first), _text(rng, total - first))))
        else:
            cases.append((table, (_text(rng, total),)))
    errors = await _refusals(store, cases)
    assert any(errors)  # both sides of the limit were tried
    assert not all(errors)
    for (table, values), error in zip(cases, errors, strict=True):
        sizes = [len(v.encode()) for v in values]
        if error:
            assert f"index row size {entry_size(*values)} exceeds" in error, (table, sizes)
            assert not fits(*values), (table, sizes, error)
        else:
            assert fits(*values), (table, sizes)
    # The limit itself: an incompressible value of 2692 bytes fits, of 2693 does not.
    assert entry_size(incompressible(MAX_RAW_BYTES)) == MAX_ENTRY_BYTES
    assert not fits(incompressible(MAX_RAW_BYTES + 1))
    assert fits("a" * 7900)


# -- persistent subscriptions ---------------------------------------------------------------


async def test_a_subscription_too_long_for_the_index_is_refused_before_any_io(
    store: EventStore,
) -> None:
    """A stream id and a subscription name over about 2690 bytes together that do not
    compress: the server refused their row when the subscription started
    (`SubscriptionFailedError`)."""
    await store.append_to_stream("s", ANY_VERSION, [EventData({}, event_type="T")])
    name = random_hex(2700)
    for stream, subscription_name in [
        ("s", name),
        ("$all", name),
        (random_hex(1400, 1), random_hex(1400, 2)),
    ]:
        with pytest.raises(ValueError, match=r"^stream_uuid and subscription_name: ") as info:
            store.subscribe_to_stream(stream, subscription_name)
        assert f"it takes at most {MAX_ENTRY_BYTES})" in plain_value_error(info)
    with pytest.raises(ValueError, match="subscription_name"):
        store.subscribe_to_all_streams(name)
    assert await subscription_rows(store) == 0


async def test_a_subscription_whose_park_records_would_not_fit_is_refused_before_any_io(
    store: EventStore,
) -> None:
    """A parked event is recorded under '$parked-<name>|<stream>|<event id>' in the
    index of snapshot ids: a name that fitted the index of subscriptions but not that
    one failed the subscription at the first event it parked. The longest name whose
    records fit still parks."""
    await store.append_to_stream("s", ANY_VERSION, [EventData({"n": 1}, event_type="T")])
    longest = MAX_RAW_BYTES - PARK_KEY_EXTRA - len("s")
    with pytest.raises(ValueError, match=r"index of snapshot ids, .*'\$parked-") as info:
        store.subscribe_to_stream("s", incompressible(longest + 1))
    message = plain_value_error(info)
    assert f"together at most {MAX_RAW_BYTES - PARK_KEY_EXTRA} bytes" in message
    assert await subscription_rows(store) == 0

    name = incompressible(longest)
    async with store.subscribe_to_stream("s", name) as sub:
        [event] = await first_batch(sub)
        sub.nack(event, retry=False, error="poison")
        with trio.fail_after(HANG_GUARD):
            await sub.wait_checkpointed(1)
        assert sub.statistics().state != "failed"
    [parked] = await store.parked_events("s", name)
    assert (parked.event.event_id, parked.error) == (event.event_id, "poison")


async def test_partition_groups_rows_too_long_are_refused_before_any_io(
    store: EventStore,
) -> None:
    """A group's row is named '<name>#g<i>/<N>': longer than the name. A name whose
    group rows did not fit failed late (a `DatabaseError` entering the block, or at the
    first event a group parked)."""
    longest = MAX_RAW_BYTES - PARK_KEY_EXTRA - len("s")
    options: dict[str, Any] = {"partition_by": lambda e: e.event_id, "partition_groups": 2}
    for name in (incompressible(longest), incompressible(2685)):
        with pytest.raises(ValueError, match="'#g1/2'") as info:
            store.subscribe_to_stream("s", name, **options)
        plain_value_error(info)
    with pytest.raises(ValueError, match="'#g1023/1024'"):
        store.subscribe_to_stream(
            "s", incompressible(longest - 5), **options | {"partition_groups": 1024}
        )
    assert await subscription_rows(store) == 0
    async with store.subscribe_to_stream("s", incompressible(longest - 5), **options) as sub:
        await sub.wait_subscribed()
    assert await subscription_rows(store) == 2


# -- snapshots and projections ----------------------------------------------------------------


async def test_a_snapshot_id_too_long_for_the_index_is_refused_before_any_io(
    store: EventStore,
) -> None:
    """The server refused the snapshot, reported as the event data being too large
    (`EventTooLargeError`)."""
    too_long, longest = random_hex(MAX_RAW_BYTES + 1), random_hex(MAX_RAW_BYTES)
    snapshot = SnapshotData(source_uuid=too_long, source_version=1, data={"n": 1}, source_type="T")
    with pytest.raises(ValueError, match=r"^source_uuid: too long for PostgreSQL's index") as info:
        await store.record_snapshot(snapshot)
    assert f"of snapshot ids: at most {MAX_RAW_BYTES} bytes" in plain_value_error(info)
    with pytest.raises(es.SnapshotNotFoundError):
        await store.read_snapshot(too_long)
    await store.record_snapshot(
        SnapshotData(source_uuid=longest, source_version=1, data={"n": 1}, source_type="T")
    )
    assert (await store.read_snapshot(longest)).data == {"n": 1}


async def _count(conn: TransactionConnection, event: RecordedEvent) -> None:
    pass


async def test_a_projection_name_too_long_for_the_index_is_refused(store: EventStore) -> None:
    """A projection's name is the key of its row in ``projection_versions``: the server
    refused the first batch it applied (`DatabaseError`)."""
    schema = store._config.schema
    with pytest.raises(ValueError, match=r"^name: too long for PostgreSQL's index") as info:
        Projection(random_hex(MAX_RAW_BYTES + 1), _count, schema=schema)
    assert f"at most {MAX_RAW_BYTES} bytes" in plain_value_error(info)
    await store.append_to_stream("s", ANY_VERSION, [EventData({}, event_type="T")])
    events = await store.read_stream_forward("s")
    for name in (random_hex(MAX_RAW_BYTES), "a" * 5000):
        projection = Projection(name, _count, schema=schema)
        assert await projection.apply(store, events) == events
        assert await projection.position(store) == 1


# -- long names that compress -------------------------------------------------------------------


async def test_long_names_that_compress_stay_accepted(store: EventStore) -> None:
    """The server compresses a long name before indexing it: one that compresses well
    fits, however long (up to the 7900 bytes a name may have)."""
    await store.append_to_stream("s", ANY_VERSION, [EventData({"n": 1}, event_type="T")])
    name = "a" * 5000
    async with store.subscribe_to_stream(
        "s", name, retry_policy=RetryPolicy(max_attempts=1)
    ) as sub:
        [event] = await first_batch(sub)
        sub.nack(event, error="poison")  # parked: its record's key is over 5000 bytes too
        with trio.fail_after(HANG_GUARD):
            await sub.wait_checkpointed(1)
    assert [p.event.event_id for p in await store.parked_events("s", name)] == [event.event_id]
    async with store.subscribe_to_all_streams("order-" * 1300) as sub:
        [event] = await first_batch(sub)
        sub.ack(event)
    await store.record_snapshot(
        SnapshotData(source_uuid="b" * 7900, source_version=1, data={"n": 2}, source_type="T")
    )
    assert (await store.read_snapshot("b" * 7900)).data == {"n": 2}
