"""A lone append goes out as one lean statement (`_sql.append_lone`, one per
expected-version kind); when that statement writes nothing, the general statement
(`_sql.append_batch`) says why. Every kind against every state of a stream, on both
data types, through the writer and without it."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

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
    ExpectedVersion,
    _sql,
    admin,
    open_event_store,
)
from trio_eventstore._pg import open_connection
from trio_eventstore._sql import quote_ident


def event(n: int = 0) -> EventData:
    return EventData({"n": n}, event_type="Counted", metadata={"m": n} if n % 2 else None)


@pytest.fixture(params=["bytea", "jsonb-no-writer"])
async def store(
    request: pytest.FixtureRequest, config: EventStoreConfig
) -> AsyncIterator[EventStore]:
    cfg = config.with_changes(
        column_data_type="bytea" if request.param == "bytea" else "jsonb",
        group_commit=request.param == "bytea",
    )
    await admin.create(cfg)
    await admin.init(cfg)
    try:
        async with open_event_store(cfg) as opened:
            yield opened
    finally:
        with trio.CancelScope(shield=True):
            await admin.drop(cfg)


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How many times each append statement was built (once per statement sent)."""
    built: Counter[str] = Counter()

    def spy(name: str) -> Callable[..., str]:
        real = getattr(_sql, name)

        def build(*args: Any, **kwargs: Any) -> str:
            built[name] += 1
            return str(real(*args, **kwargs))

        return build

    for name in ("append_lone", "append_batch"):
        monkeypatch.setattr(_sql, name, spy(name))
    return built


async def _stream_state(store: EventStore, state: str) -> None:
    """Make stream "s" ``state``: absent, live at version 2, at version 0 (a row
    without events, as a database may hold), or soft-deleted at version 2."""
    if state == "absent":
        return
    if state == "version-0":
        schema = quote_ident(store.config.schema)
        async with open_connection(store.config) as conn:
            await conn.execute(f"INSERT INTO {schema}.streams (stream_uuid) VALUES ('s')")
        return
    await store.append_to_stream("s", NO_STREAM, [event(1), event(2)])
    if state == "deleted":
        await store.delete_stream("s", 2)


#: (expected version, state) -> the stream's version after the append, or the error.
OUTCOMES: dict[tuple[object, str], int | tuple[type[Exception], int | None]] = {
    (NO_STREAM, "absent"): 1,
    (NO_STREAM, "live"): (es.StreamExistsError, 2),
    (NO_STREAM, "version-0"): 1,
    (NO_STREAM, "deleted"): (es.StreamDeletedError, None),
    (0, "absent"): 1,
    (0, "live"): (es.WrongExpectedVersionError, 2),
    (0, "version-0"): 1,
    (0, "deleted"): (es.StreamDeletedError, None),
    (2, "absent"): (es.WrongExpectedVersionError, 0),
    (2, "live"): 3,
    (2, "version-0"): (es.WrongExpectedVersionError, 0),
    (2, "deleted"): (es.StreamDeletedError, None),
    (1, "live"): (es.WrongExpectedVersionError, 2),
    (STREAM_EXISTS, "absent"): (es.StreamNotFoundError, None),
    (STREAM_EXISTS, "live"): 3,
    (STREAM_EXISTS, "version-0"): 1,
    (STREAM_EXISTS, "deleted"): (es.StreamDeletedError, None),
    (ANY_VERSION, "absent"): 1,
    (ANY_VERSION, "live"): 3,
    (ANY_VERSION, "version-0"): 1,
    (ANY_VERSION, "deleted"): (es.StreamDeletedError, None),
}


@pytest.mark.parametrize(
    ("expected", "state"),
    list(OUTCOMES),
    ids=[f"{getattr(e, 'name', e)}-{s}" for e, s in OUTCOMES],
)
async def test_every_kind_against_every_state(
    store: EventStore,
    statements: Counter[str],
    expected: ExpectedVersion | int,
    state: str,
) -> None:
    await _stream_state(store, state)
    before = (await store.stream_info("$all")).stream_version
    statements.clear()
    outcome = OUTCOMES[(expected, state)]
    if isinstance(outcome, int):
        version = await store.append_to_stream("s", expected, [event(3)])
        assert version == outcome
        if state == "version-0" and expected in (NO_STREAM, 0):
            # A row without events takes NO_STREAM: the general statement writes it.
            assert statements == Counter(append_lone=1, append_batch=1)
        else:  # written by the lean statement alone, in one round trip
            assert statements == Counter(append_lone=1)
        (recorded,) = await store.read_stream_backward("s", count=1)
        assert (recorded.stream_version, recorded.event_number) == (version, before + 1)
        assert recorded.data == {"n": 3}
        assert (await store.stream_info("$all")).stream_version == before + 1
        return
    error, current = outcome
    with pytest.raises(error) as raised:
        await store.append_to_stream("s", expected, [event(3)])
    if current is not None:
        assert raised.value.current == current  # type: ignore[attr-defined]
    # Refused by the lean statement, diagnosed by the general one; nothing written.
    assert statements == Counter(append_lone=1, append_batch=1)
    assert (await store.stream_info("$all")).stream_version == before


async def test_a_stored_event_id_fails_the_lean_statement_and_writes_nothing(
    store: EventStore,
) -> None:
    first = event(1)
    await store.append_to_stream("a", NO_STREAM, [first])
    for expected in (NO_STREAM, ANY_VERSION):
        with pytest.raises(es.DuplicateEventError) as raised:
            await store.append_to_stream("b", expected, [event(2), first])
        assert raised.value.event_id == first.event_id
    with pytest.raises(es.DuplicateEventError):
        await store.append_to_stream("a", 1, [first])
    with pytest.raises(es.StreamNotFoundError):
        await store.stream_info("b")
    assert (await store.stream_info("a")).stream_version == 1
    assert (await store.stream_info("$all")).stream_version == 1


async def test_concurrent_lone_appends_of_every_kind_keep_streams_and_all_dense(
    store: EventStore,
) -> None:
    """Writers racing on a few streams with every kind: each stream's versions and
    `$all` stay dense, and every success is where it says it is."""
    written: list[tuple[str, int]] = []

    async def writer(k: int) -> None:
        kinds: list[ExpectedVersion | int] = [NO_STREAM, ANY_VERSION, STREAM_EXISTS]
        for i in range(12):
            stream = f"s{(k + i) % 3}"
            expected: ExpectedVersion | int = kinds[(k * 7 + i) % 3]
            if i % 4 == 3:
                try:
                    expected = (await store.stream_info(stream)).stream_version
                except es.StreamNotFoundError:
                    expected = 0
            try:
                version = await store.append_to_stream(stream, expected, [event(i)])
            except (es.WrongExpectedVersionError, es.StreamExistsError, es.StreamNotFoundError):
                continue
            written.append((stream, version))

    async with trio.open_nursery() as nursery:
        for k in range(8):
            nursery.start_soon(writer, k)
    events = await store.read_all_streams_forward(count=10_000)
    assert [e.event_number for e in events] == list(range(1, len(events) + 1))
    assert len(events) == len(written)
    for name in ("s0", "s1", "s2"):
        versions = [e.stream_version for e in events if e.stream_uuid == name]
        assert versions == list(range(1, len(versions) + 1))
    assert sorted(written) == sorted((e.stream_uuid, e.stream_version) for e in events)


@pytest.mark.parametrize("suffix", ["{}", "{0}", "}{"])
async def test_the_lean_statements_write_to_a_schema_whose_name_has_braces(
    config: EventStoreConfig, suffix: str
) -> None:
    """The lean statement was put together with `str.format` after the schema's name was
    in it: braces in the name raised `ValueError`, or (``{}``) named another schema."""
    cfg = config.with_changes(schema=config.schema + suffix)
    await admin.create(cfg)
    await admin.init(cfg)
    try:
        async with open_event_store(cfg) as store:
            assert await store.append_to_stream("s", NO_STREAM, [event(1)]) == 1
            assert await store.append_to_stream("s", ANY_VERSION, [event(2)]) == 2
            assert await store.append_to_stream("t", ANY_VERSION, [event(3)]) == 1
            assert await store.append_to_stream("s", 2, [event(4)]) == 3
            assert await store.append_to_stream("s", STREAM_EXISTS, [event(5)]) == 4
            events = await store.read_all_streams_forward()
            assert [e.data for e in events] == [{"n": n} for n in range(1, 6)]
    finally:
        with trio.CancelScope(shield=True):
            await admin.drop(cfg)
