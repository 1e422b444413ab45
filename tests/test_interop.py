"""Data written by the real Elixir EventStore reads back as the Elixir library read it,
and our appends continue it densely (tests/reference/elixir-sample-*)."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import attrs
import pytest
import trio

from trio_eventstore import (
    EventData,
    EventStore,
    EventStoreConfig,
    JsonSerializer,
    RecordedEvent,
    StreamDeletedError,
    StreamStatus,
    admin,
    open_event_store,
)
from trio_eventstore._pg import open_connection

from .elixir_terms import parse_terms
from .helpers import REFERENCE, url_for

SAMPLE_SQL = (REFERENCE / "elixir-sample-db.sql").read_text()
READBACK = (REFERENCE / "elixir-sample-readback.txt").read_text()
SCHEMAS: dict[str, Literal["bytea", "jsonb"]] = {"public": "bytea", "jsonbstore": "jsonb"}


@pytest.fixture(scope="module")
def sample_database_name() -> str:
    return f"elixir_{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def sample_database(server_url: str) -> AsyncIterator[str]:
    """A database with public (bytea) and jsonbstore (jsonb) made by our init, then
    loaded with the Elixir-written sample."""
    url = url_for(server_url, f"elixir_{uuid.uuid4().hex[:8]}")
    for schema, data_type in SCHEMAS.items():
        config = EventStoreConfig(url=url, schema=schema, column_data_type=data_type)
        await admin.create(config)
        await admin.init(config)
    async with open_connection(EventStoreConfig(url=url)) as conn:
        await conn.execute(SAMPLE_SQL)
    yield url
    with trio.CancelScope(shield=True):
        await admin.drop(EventStoreConfig(url=url))


def expected_section(schema: str) -> list[str]:
    section = READBACK.split(f"===== {schema}\n")[1].split("=====")[0]
    return [line for line in section.splitlines() if line.strip()]


def event_line(event: RecordedEvent, *, all_stream: bool) -> tuple[Any, ...]:
    head: tuple[Any, ...] = (
        event.event_number,
        f"{event.stream_uuid}/{event.stream_version}",
        str(event.event_id),
        event.event_type,
    )
    created = event.created_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if all_stream:
        return (*head, event.data, event.metadata, created)
    c = "" if event.causation_id is None else str(event.causation_id)
    r = "" if event.correlation_id is None else str(event.correlation_id)
    return (*head, f"c={c}", f"r={r}", created, event.data, event.metadata)


def parse_event_line(line: str, *, all_stream: bool) -> tuple[Any, ...]:
    fields = line.split(" ", 6 if not all_stream else 4)
    if all_stream:
        number, where, event_id, event_type, rest = fields
        return (int(number), where, event_id, event_type, *parse_terms(rest))
    number, where, event_id, event_type, c, r, rest = fields
    created, terms = rest.split(" ", 1)
    return (int(number), where, event_id, event_type, c, r, created, *parse_terms(terms))


def as_plain(value: Any) -> Any:
    return attrs.asdict(value) if attrs.has(type(value)) else value


async def readback(store: EventStore) -> list[str | tuple[Any, ...]]:
    """What we read, in the shape of elixir-sample-readback.txt."""
    out: list[str | tuple[Any, ...]] = []
    for name in ("$all", "account-1", "account-2", "order-1", "linked-accounts", "temp-1"):
        info = await store.stream_info(name)
        deleted = info.status is StreamStatus.DELETED
        out.append(
            f"stream {name} id={info.stream_id} v={info.stream_version} "
            f"status={info.status.value} deleted={str(deleted).lower()}"
        )
        if name == "$all":
            continue
        try:
            for event in await store.read_stream_forward(name):
                out.append(event_line(event, all_stream=False))
        except StreamDeletedError:
            out.append("  read: {:error, :stream_deleted}")
    for event in await store.read_all_streams_forward():
        out.append(("$all", *event_line(event, all_stream=True)))
    back = await store.read_all_streams_backward(-1, 2)
    out.append(
        "$all backward(-1,2): "
        + " ".join(f"{e.event_number}:{e.stream_uuid}/{e.stream_version}" for e in back)
    )
    snap = await store.read_snapshot("account-1")
    out.append(
        (
            "snapshot",
            snap.source_uuid,
            f"v{snap.source_version}",
            snap.source_type,
            snap.data,
            snap.metadata,
        )
    )
    return out


def expected_readback(schema: str) -> list[str | tuple[Any, ...]]:
    out: list[str | tuple[Any, ...]] = []
    for line in expected_section(schema):
        if line.startswith("  read:") or line.startswith("stream ") or "backward" in line:
            out.append(line)
        elif line.startswith("  "):
            out.append(parse_event_line(line.strip(), all_stream=False))
        elif line.startswith("$all "):
            out.append(("$all", *parse_event_line(line[5:], all_stream=True)))
        elif line.startswith("snapshot "):
            _, uuid_, version, type_, terms = line.split(" ", 4)
            out.append(("snapshot", uuid_, version, type_, *parse_terms(terms)))
        else:
            raise AssertionError(f"unexpected reference line {line!r}")
    return out


@pytest.mark.parametrize("schema", list(SCHEMAS))
async def test_elixir_data_reads_back_identically(sample_database: str, schema: str) -> None:
    config = EventStoreConfig(url=sample_database, schema=schema, column_data_type=SCHEMAS[schema])
    async with open_event_store(config) as store:
        ours = await readback(store)
    assert ours == expected_readback(schema)


@attrs.frozen
class AccountOpened:
    account_id: str
    owner: str
    balance: int


@pytest.mark.parametrize("schema", list(SCHEMAS))
async def test_elixir_events_decode_into_registered_classes(
    sample_database: str, schema: str
) -> None:
    serializer = JsonSerializer()
    serializer.register(AccountOpened, event_type="Elixir.ExOracle.Events.AccountOpened")
    config = EventStoreConfig(
        url=sample_database, schema=schema, serializer=serializer, column_data_type=SCHEMAS[schema]
    )
    async with open_event_store(config) as store:
        [opened, *_] = await store.read_stream_forward("account-1")
    assert opened.data == AccountOpened("account-1", "Zoë Ünïcødé ✓", 0)


@pytest.mark.parametrize("schema", list(SCHEMAS))
async def test_appending_continues_elixir_streams_densely(
    sample_database: str, schema: str
) -> None:
    config = EventStoreConfig(url=sample_database, schema=schema, column_data_type=SCHEMAS[schema])
    deposited = EventData(
        {"account_id": "account-1", "amount": 5, "note": None},
        event_type="Elixir.ExOracle.Events.MoneyDeposited",
    )
    async with open_event_store(config) as store:
        assert await store.append_to_stream("account-1", 3, [deposited]) == 4
        assert (
            await store.append_to_stream(
                "new-1",
                0,
                [deposited.__class__({"x": 1}, event_type="Elixir.ExOracle.Events.Other")],
            )
            == 1
        )
        all_events = await store.read_all_streams_forward()
        assert [e.event_number for e in all_events] == list(range(1, 12))
        assert [(e.stream_uuid, e.stream_version) for e in all_events[-2:]] == [
            ("account-1", 4),
            ("new-1", 1),
        ]
        assert (await store.stream_info("new-1")).stream_id == 6  # after Elixir's 1..5
        await store.link_to_stream("linked-accounts", 4, [all_events[-2]])
        linked = await store.read_stream_forward("linked-accounts", 5)
        assert [(e.event_number, e.stream_uuid, e.stream_version) for e in linked] == [
            (5, "account-1", 4)
        ]
        last = all_events[-2]
        assert last.created_at.tzinfo == datetime.UTC


@pytest.mark.parametrize("schema", list(SCHEMAS))
async def test_elixir_subscription_row_resumes_after_its_checkpoint(
    sample_database: str, schema: str
) -> None:
    """The Elixir library's subscription "sub-a" on $all acknowledged events 1..3
    (last_seen = 3): our subscriber of that name takes over from event 4, holding the
    same advisory lock key an Elixir subscriber would."""
    config = EventStoreConfig(url=sample_database, schema=schema, column_data_type=SCHEMAS[schema])
    async with open_event_store(config) as store:
        async with store.subscribe_to_all_streams("sub-a", buffer_size=20) as sub:
            await sub.wait_subscribed()
            got: list[int] = []
            with trio.fail_after(30):
                async for batch in sub:
                    got.extend(e.event_number for e in batch.events)
                    sub.ack(batch)
                    if got and got[-1] >= 9:
                        break
            # The lock an Elixir node would try: (oid of <schema>.subscriptions, id 1).
            async with open_connection(config) as other:
                taken = await other.fetchval(
                    f"SELECT pg_try_advisory_lock('{schema}.subscriptions'::regclass::oid::int, 1)"
                )
            assert taken is False
        assert got == [4, 5, 6, 7, 8, 9]
        async with open_connection(config) as conn:
            assert (
                await conn.fetchval(
                    f"SELECT last_seen FROM {schema}.subscriptions "
                    "WHERE subscription_name = 'sub-a'"
                )
                == 9
            )
