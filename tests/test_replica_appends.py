"""``replica_appends``: the writer's connections run with session_replication_role =
replica (no foreign-key checks, no triggers); the statements send the notifications
the trigger would. Same rows, same outcomes, same notifications as without it."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest
import trio

from tests.helpers import ev
from trio_eventstore import (
    ANY_VERSION,
    NO_STREAM,
    STREAM_EXISTS,
    EventStoreConfig,
    EventStoreStatistics,
    InsufficientPrivilegeError,
    NotSupportedError,
    admin,
    open_event_store,
)
from trio_eventstore._appends import AppendRequest, append_batch, encode_events
from trio_eventstore._pg import Database, open_connection, open_database
from trio_eventstore._serialization import JsonSerializer
from trio_eventstore._sql import quote_ident, quote_literal

HANG_GUARD = 60  # a guard against hangs, never a speed assertion


@pytest.fixture
async def twin(initialized: EventStoreConfig) -> AsyncIterator[EventStoreConfig]:
    """A second store in the same database (another schema)."""
    other = initialized.with_changes(schema=f"{initialized.schema}_r")
    await admin.create(other)
    await admin.init(other)
    yield other
    with trio.CancelScope(shield=True):
        await admin.drop(other)


def _requests(
    batch: int, spec: Sequence[tuple[str, object, int]], ids: dict[str, uuid.UUID]
) -> list[AppendRequest]:
    """(stream, expected, events) -> requests; event ids from ``ids`` by a stable name
    (so that both stores are given the same ids: duplicates are duplicates in both)."""
    serializer = JsonSerializer()
    requests = []
    for stream, expected, count in spec:
        events = []
        for i in range(count):
            name = f"{batch}/{stream}/{i}" if stream != "dup" else "0/a/0"
            event_id = ids.setdefault(name, uuid.uuid4())
            events.append(ev(i, event_id=event_id))
        requests.append(
            AppendRequest.build(stream, expected, encode_events(serializer, events))  # type: ignore[arg-type]
        )
    return requests


#: Batches, each written as ONE statement by both stores: lone appends (the lean
#: statement), a mixed batch (new and existing streams, refusals, a duplicate id), a
#: big append alone and a big batch (both pipelined: streams, then `$all`).
_BATCHES: list[list[tuple[str, object, int]]] = [
    [("a", NO_STREAM, 1)],
    [("a", 1, 2)],
    [("b", ANY_VERSION, 1)],
    [("b", STREAM_EXISTS, 3)],
    [("a", 9, 1)],  # wrong version
    [
        ("c", NO_STREAM, 2),
        ("a", 3, 1),
        ("d", ANY_VERSION, 1),
        ("b", NO_STREAM, 1),  # exists
        ("e", STREAM_EXISTS, 1),  # not found
        ("dup", ANY_VERSION, 1),  # an id already stored
        ("f", 0, 2),
        ("b", 4, 2),
    ],
    [("g", NO_STREAM, 150)],
    [("h", NO_STREAM, 90), ("a", 4, 90), ("i", ANY_VERSION, 90)],
]


async def _write_all(database: Database, ids: dict[str, uuid.UUID]) -> tuple[list[str], list[str]]:
    """Write `_BATCHES` (one statement each); (outcomes, notifications received)."""
    config = database.config
    got: list[str] = []
    outcomes: list[str] = []
    async with open_connection(config) as listener:
        await listener.listen(f"{config.schema}.events", lambda _c, payload: got.append(payload))
        for batch, spec in enumerate(_BATCHES):
            for outcome in await append_batch(database, _requests(batch, spec, ids)):
                outcomes.append(
                    type(outcome).__name__
                    if isinstance(outcome, Exception)
                    else repr(
                        (
                            getattr(outcome, "version", None),
                            getattr(outcome, "first_event_number", None),
                        )
                    )
                )
        # A notification sent after the appends' tells when theirs have all arrived.
        await listener.execute(f"NOTIFY {quote_ident(config.schema + '.events')}, 'end'")
        with trio.fail_after(HANG_GUARD):
            while not got or got[-1] != "end":  # noqa: ASYNC110
                await trio.sleep(0.01)
    return outcomes, got[:-1]


async def _rows(config: EventStoreConfig) -> list[tuple[object, ...]]:
    s = quote_ident(config.schema)
    async with open_connection(config) as conn:
        rows = await conn.fetch(
            "SELECT s.stream_uuid, se.stream_version, o.stream_uuid, se.original_stream_version,"
            " e.event_id, e.event_type, e.data"
            f" FROM {s}.stream_events se JOIN {s}.streams s ON s.stream_id = se.stream_id"
            f" JOIN {s}.streams o ON o.stream_id = se.original_stream_id"
            f" JOIN {s}.events e ON e.event_id = se.event_id ORDER BY 1, 2"
        )
        streams = await conn.fetch(
            f"SELECT stream_uuid, stream_version, deleted_at FROM {s}.streams ORDER BY 1"
        )
    return [tuple(r[i] for i in range(7)) for r in rows] + [
        tuple(r[i] for i in range(3)) for r in streams
    ]


def _statements(payloads: list[str], ids: dict[str, str]) -> list[list[tuple[str, ...]]]:
    """Notifications, with stream ids named by their streams (the stores number them
    alike, but say so), by statement (each ends with `$all`'s): its streams' sorted
    (the trigger's order among the streams a statement updates is the join's), then
    `$all`'s."""
    statements: list[list[tuple[str, ...]]] = []
    current: list[tuple[str, ...]] = []
    for payload in payloads:
        uuid_, stream_id, first, last = payload.split(",")
        if uuid_ == "$all":
            statements.append([*sorted(current), (uuid_, stream_id, first, last)])
            current = []
        else:
            current.append((uuid_, ids[stream_id], first, last))
    assert not current, current
    return statements


async def _stream_ids(config: EventStoreConfig) -> dict[str, str]:
    s = quote_ident(config.schema)
    async with open_connection(config) as conn:
        rows = await conn.fetch(f"SELECT stream_id, stream_uuid FROM {s}.streams")
    return {str(r[0]): str(r[1]) for r in rows}


async def test_replica_statements_write_and_notify_as_the_trigger_does(
    initialized: EventStoreConfig, twin: EventStoreConfig
) -> None:
    ids: dict[str, uuid.UUID] = {}
    async with open_database(initialized) as plain:
        expected_outcomes, expected_notes = await _write_all(plain, ids)
    async with open_database(twin, replica=True) as replica:
        assert replica.replica
        outcomes, notes = await _write_all(replica, ids)
    assert outcomes == expected_outcomes
    assert "WrongExpectedVersionError" in outcomes
    assert "DuplicateEventError" in outcomes
    assert await _rows(twin) == await _rows(initialized)
    expected = _statements(expected_notes, await _stream_ids(initialized))
    assert _statements(notes, await _stream_ids(twin)) == expected
    assert len(expected) == 7  # every statement but the refused one wrote
    assert sum(map(len, expected)) == 20  # 13 streams written, 7 times `$all`


async def test_appends_with_replica_appends_notify_other_stores_and_number_densely(
    initialized: EventStoreConfig,
) -> None:
    config = initialized.with_changes(replica_appends=True, notification_poll_interval=60)
    with trio.fail_after(HANG_GUARD):
        async with (
            open_event_store(config) as store,
            open_event_store(config.with_changes(replica_appends=False)) as reader,
        ):
            # Another store's subscription: only the notifications tell it (a store's
            # own appends reach its subscriptions without them).
            async with reader.subscribe("$all") as sub, trio.open_nursery() as nursery:
                first_seen = trio.Event()

                async def write() -> None:
                    await store.append_to_stream("first", NO_STREAM, [ev(0), ev(0)])
                    await first_seen.wait()  # the reader waits for notifications now
                    async with trio.open_nursery() as appends:
                        for k in range(99):
                            appends.start_soon(
                                store.append_to_stream, f"s{k % 7}", ANY_VERSION, [ev(k), ev(k)]
                            )

                nursery.start_soon(write)
                seen: list[int] = []
                async for batch in sub:
                    seen.extend(e.event_number for e in batch)
                    first_seen.set()
                    if len(seen) >= 200:
                        break
            assert seen == list(range(1, 201))
            writer = store.statistics().writer
            assert writer is not None
            assert writer.batches < 100
            assert (await store.stream_info("s3")).stream_version == 28  # 14 appends of 2


async def test_replica_appends_needs_the_privilege(
    initialized: EventStoreConfig, server_url: str
) -> None:
    name = f"w_{uuid.uuid4().hex[:10]}"
    password = secrets.token_urlsafe(18)
    async with open_connection(EventStoreConfig(url=server_url)) as conn:
        await conn.execute(
            f"CREATE ROLE {quote_ident(name)} LOGIN PASSWORD {quote_literal(password)}"
        )
    try:
        await admin.grant(initialized, name)
        config = initialized.with_changes(username=name, password=password, replica_appends=True)
        with pytest.raises(InsufficientPrivilegeError, match="GRANT SET ON PARAMETER") as caught:
            async with open_event_store(config):
                pass  # pragma: no cover
        assert caught.value.privilege == "SET on parameter session_replication_role"
        # the statement to run, for this role
        grant = f"GRANT SET ON PARAMETER session_replication_role TO {quote_ident(name)}"
        assert grant in str(caught.value)
        async with open_connection(initialized) as conn:
            await conn.execute(
                f"GRANT SET ON PARAMETER session_replication_role TO {quote_ident(name)}"
            )
        async with open_event_store(config) as store:
            assert await store.append_to_stream("s", NO_STREAM, [ev(1)]) == 1
            assert [e.event_number for e in await store.read_all_streams_forward()] == [1]
    finally:
        async with open_connection(initialized) as conn:
            await conn.execute(f"DROP OWNED BY {quote_ident(name)}")
        async with open_connection(EventStoreConfig(url=server_url)) as conn:
            await conn.execute(f"DROP ROLE {quote_ident(name)}")


@pytest.mark.parametrize(
    ("ddl", "named"),
    [
        (
            "CREATE FUNCTION {s}.audit() RETURNS trigger LANGUAGE plpgsql AS"
            " 'BEGIN RETURN NULL; END'|"
            "CREATE TRIGGER audit AFTER INSERT ON {s}.events FOR EACH ROW"
            " EXECUTE FUNCTION {s}.audit()",
            "triggers events.audit",
        ),
        (
            "CREATE TABLE {s}.kinds (t text PRIMARY KEY)|"
            "ALTER TABLE {s}.events ADD CONSTRAINT kind FOREIGN KEY (event_type)"
            " REFERENCES {s}.kinds (t)",
            "foreign keys events(event_type) -> kinds",
        ),
        (
            "CREATE RULE quiet AS ON INSERT TO {s}.streams DO ALSO NOTIFY quiet",
            "rules streams.quiet",
        ),
        (  # fires on replica connections too, but what it writes goes unchecked there
            "CREATE FUNCTION {s}.audit() RETURNS trigger LANGUAGE plpgsql AS"
            " 'BEGIN RETURN NULL; END'|"
            "CREATE TRIGGER audit AFTER INSERT ON {s}.events FOR EACH ROW"
            " EXECUTE FUNCTION {s}.audit()|"
            "ALTER TABLE {s}.events ENABLE ALWAYS TRIGGER audit",
            "triggers events.audit (enabled always)",
        ),
        (
            "CREATE RULE quiet AS ON INSERT TO {s}.streams DO ALSO NOTIFY quiet|"
            "ALTER TABLE {s}.streams ENABLE REPLICA RULE quiet",
            "rules streams.quiet (enabled replica)",
        ),
        (
            # Checked by an internal trigger, which does not fire on a replica connection:
            # duplicates would go in.
            "ALTER TABLE {s}.events ADD CONSTRAINT one_correlation UNIQUE (correlation_id)"
            " DEFERRABLE INITIALLY IMMEDIATE",
            "deferrable constraints events.one_correlation",
        ),
        (
            "CREATE CONSTRAINT TRIGGER audit AFTER INSERT ON {s}.stream_events"
            " FOR EACH ROW EXECUTE FUNCTION {s}.event_store_exception('no')",
            "triggers stream_events.audit",
        ),
    ],
)
async def test_replica_appends_refuses_tables_with_checks_of_their_own(
    initialized: EventStoreConfig, ddl: str, named: str
) -> None:
    async with open_connection(initialized) as conn:
        for statement in ddl.format(s=quote_ident(initialized.schema)).split("|"):
            await conn.execute(statement)
    config = initialized.with_changes(replica_appends=True)
    with pytest.raises(NotSupportedError, match=named.replace("(", r"\(").replace(")", r"\)")):
        async with open_event_store(config):
            pass  # pragma: no cover
    async with open_event_store(initialized) as store:  # without it, the store opens
        assert await store.read_all_streams_forward() == []


async def test_replica_appends_takes_a_disabled_trigger_or_rule(
    initialized: EventStoreConfig,
) -> None:
    s = quote_ident(initialized.schema)
    async with open_connection(initialized) as conn:
        await conn.execute(
            f"CREATE FUNCTION {s}.audit() RETURNS trigger LANGUAGE plpgsql AS"
            " 'BEGIN RETURN NULL; END'"
        )
        await conn.execute(
            f"CREATE TRIGGER audit AFTER INSERT ON {s}.events FOR EACH ROW"
            f" EXECUTE FUNCTION {s}.audit()"
        )
        await conn.execute(f"ALTER TABLE {s}.events DISABLE TRIGGER audit")
        await conn.execute(f"CREATE RULE quiet AS ON INSERT TO {s}.streams DO ALSO NOTIFY quiet")
        await conn.execute(f"ALTER TABLE {s}.streams DISABLE RULE quiet")
    async with open_event_store(initialized.with_changes(replica_appends=True)) as store:
        assert await store.append_to_stream("s", NO_STREAM, [ev(1)]) == 1


def test_replica_appends_needs_group_commit_and_a_session() -> None:
    url = "postgresql://u:p@localhost/db"
    with pytest.raises(ValueError, match=r"needs group_commit=True .*replica_appends=False"):
        EventStoreConfig(url=url, replica_appends=True, group_commit=False)
    with pytest.raises(ValueError, match="PgBouncer"):
        EventStoreConfig(url=url, replica_appends=True, session_mode_url=url)
    with pytest.raises(TypeError, match="replica_appends: expected a bool"):
        EventStoreConfig(url=url, replica_appends="yes")  # type: ignore[arg-type]


async def test_the_writers_own_connections_are_counted(initialized: EventStoreConfig) -> None:
    """With replica_appends the writer's connections are beside the pool: its statistics
    and /metrics say how many are open; without it they are the pool's (0)."""
    from tests.test_health import parse_prometheus
    from trio_eventstore._exposition import render_metrics

    def exposed(stats: EventStoreStatistics) -> float:
        samples = parse_prometheus(render_metrics(stats))
        key = ("eventstore_writer_connections", frozenset({("schema", initialized.schema)}))
        return samples[key]

    async with open_event_store(initialized.with_changes(replica_appends=True)) as store:
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(store.append_to_stream, f"s{i}", NO_STREAM, [ev(i)])
        stats = store.statistics()
        assert stats.writer is not None
        assert 1 <= stats.writer.connections <= 4
        assert exposed(stats) == stats.writer.connections
    async with open_event_store(initialized) as store:
        await store.append_to_stream("plain", NO_STREAM, [ev(1)])
        stats = store.statistics()
        assert stats.writer is not None
        assert stats.writer.connections == 0
        assert exposed(stats) == 0
