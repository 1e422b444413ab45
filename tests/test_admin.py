"""Admin tasks: create, init, migrate, reset, drop (library functions and the command)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import pytest
import trio

import trio_eventstore as es
from trio_eventstore import EventStoreConfig, admin, open_event_store
from trio_eventstore._pg import Conn, open_connection
from trio_eventstore._sql import quote_ident

from .helpers import run_cli, url_for


async def scalar(config: EventStoreConfig, sql: str, *args: object) -> object:
    async with open_connection(config) as conn:
        return await conn.fetchval(sql, *args)


async def execute(config: EventStoreConfig, *statements: str) -> None:
    async with open_connection(config) as conn:
        for statement in statements:
            await conn.execute(statement)


@pytest.fixture
async def database_url(server_url: str) -> AsyncIterator[str]:
    """A database name nothing has created yet (dropped afterwards)."""
    url = url_for(server_url, f"adm_{uuid.uuid4().hex[:10]}")
    yield url
    with trio.CancelScope(shield=True):
        await admin.drop(EventStoreConfig(url=url))


async def test_create_init_migrate_reset_drop_cycle(database_url: str) -> None:
    config = EventStoreConfig(url=database_url)
    created = await admin.create(config)
    assert created.changed
    assert "has been created" in created.message
    assert not (await admin.create(config)).changed
    assert (await admin.init(config)).changed
    assert not (await admin.init(config)).changed
    assert not (await admin.migrate(config)).changed
    async with open_event_store(config) as store:
        assert (await store.stream_info("$all")).stream_version == 0
    assert (await admin.reset(config)).changed
    dropped = await admin.drop(config)
    assert dropped.changed
    assert "dropped" in dropped.message
    assert not (await admin.drop(config)).changed
    assert not await scalar(
        EventStoreConfig(url=url_for(database_url, "postgres")),
        "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
        config.database_name,
    )


async def test_named_schema_drop_keeps_database(database_url: str) -> None:
    config = EventStoreConfig(url=database_url, schema="example")
    await admin.create(config)
    await admin.init(config)
    await admin.drop(config)
    public = EventStoreConfig(url=database_url)
    assert await scalar(public, "SELECT to_regnamespace('example') IS NULL")
    assert await scalar(public, "SELECT 1") == 1  # the database is still there


async def test_a_schema_that_holds_no_event_store_is_not_dropped(database_url: str) -> None:
    """A typo or the wrong --schema must not drop somebody else's tables, even one named
    like a store's; an empty schema (``create`` without ``init``), a partly initialised
    store holding nothing else, and an initialised one still go."""
    config = EventStoreConfig(url=database_url, schema="billing")
    public = EventStoreConfig(url=database_url)
    sql = functools.partial(execute, public)

    await admin.create(config)
    await sql(
        "CREATE TABLE billing.invoices (id int)", "CREATE TABLE billing.subscriptions (id int)"
    )
    with pytest.raises(es.SchemaNotInitializedError, match="holds no event store, and 2 objects "):
        await admin.drop(config)
    assert await scalar(public, "SELECT to_regclass('billing.invoices') IS NOT NULL")
    await sql("DROP TABLE billing.invoices", "DROP TABLE billing.subscriptions")
    for only in (  # each alone: somebody else's
        "CREATE TABLE billing.events (id int, payload text)",
        "CREATE TABLE billing.events (id int, event_type text, created_at timestamptz)",
        "CREATE SEQUENCE billing.numbers",
        "CREATE TYPE billing.money AS (amount numeric, currency text)",
        "CREATE TYPE billing.mood AS ENUM ('ok')",
        "CREATE VIEW billing.v AS SELECT 1 AS one",
        "CREATE FUNCTION billing.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    ):
        await sql(only)
        with pytest.raises(es.SchemaNotInitializedError, match="and 1 object "):
            await admin.drop(config)
        await sql("DROP SCHEMA billing CASCADE", "CREATE SCHEMA billing")
    assert (await admin.drop(config)).changed  # empty: dropped
    await admin.create(config)
    await admin.init(config)
    await sql("DROP TABLE billing.schema_migrations")  # partly initialised
    await sql("CREATE TABLE billing.invoices (id int)")
    with pytest.raises(es.SchemaNotInitializedError):
        await admin.drop(config)
    await sql("DROP TABLE billing.invoices")
    assert (await admin.drop(config)).changed  # partly initialised, nothing else
    await admin.create(config)
    await admin.init(config)
    await sql("CREATE TABLE billing.read_model (id int)")
    assert (await admin.drop(config)).changed  # a store, with tables of its users
    assert await scalar(public, "SELECT to_regnamespace('billing') IS NULL")


async def test_a_database_that_holds_no_event_store_is_not_dropped(database_url: str) -> None:
    """A wrong --url must not drop somebody else's database: with no event store in
    ``public``, a database holding anything (in ``public`` or another schema) is kept;
    an empty one (``create`` without ``init``) and a store's still go."""
    config = EventStoreConfig(url=database_url)
    sql = functools.partial(execute, config)

    await admin.create(config)
    for setup, undo in (
        ("CREATE TABLE public.orders (id int)", "DROP TABLE public.orders"),
        ("CREATE SCHEMA crm; CREATE TABLE crm.people (id int)", "DROP SCHEMA crm CASCADE"),
    ):
        await sql(setup)
        with pytest.raises(es.SchemaNotInitializedError, match="holds no event store"):
            await admin.drop(config)
        assert await scalar(config, "SELECT 1") == 1  # still there
        await sql(undo)
    await sql("CREATE SCHEMA empty")  # a schema holding nothing is no one's data
    await admin.init(config.with_changes(schema="tenant"))  # nor is another event store
    assert (await admin.drop(config)).changed
    await admin.create(config)
    await admin.init(config)
    await sql("CREATE TABLE public.read_model (id int)", "CREATE SCHEMA crm")
    assert (await admin.drop(config)).changed  # a store, with tables of its users


@pytest.mark.parametrize(("task", "schema"), [("reset", "public"), ("drop", "billing")])
async def test_reset_and_schema_drop_are_refused_while_a_subscription_runs(
    database_url: str, task: str, schema: str
) -> None:
    """Reset under a running subscription: it kept its position in memory and skipped
    the new events up to it, silently. Schema dropped under a running store: its appends
    failed with a raw 'relation does not exist'. Refused now, nothing changed; once the
    subscription stopped, they go."""
    config = EventStoreConfig(url=database_url, schema=schema)
    run = admin.reset if task == "reset" else admin.drop
    await admin.create(config)
    await admin.init(config)
    async with open_event_store(config) as store:
        await store.append_to_stream("s", es.NO_STREAM, [es.EventData({"n": 1}, event_type="T")])
        async with store.subscribe_to_all_streams("sub") as sub:
            await sub.wait_subscribed()
            with pytest.raises(es.StorageUnavailableError, match="1 subscription running"):
                await run(config)
            assert (await store.stream_info("$all")).stream_version == 1  # nothing changed
    assert (await run(config)).changed


async def test_drop_database_in_use_fails_and_keeps_it(database_url: str) -> None:
    config = EventStoreConfig(url=database_url)
    await admin.create(config)
    await admin.init(config)
    async with open_event_store(config):
        with pytest.raises(es.StorageUnavailableError, match="other sessions"):
            await admin.drop(config)
    assert (await admin.init(config)).changed is False


async def test_hostile_schema_name_executes_nothing(initialized: EventStoreConfig) -> None:
    # A table named y in public that the hostile name would drop if it were spliced in.
    probe = f"y_{uuid.uuid4().hex[:8]}"
    public = initialized.with_changes(schema="public")
    async with open_connection(public) as conn:
        await conn.execute(f"CREATE TABLE {probe} (id int)")
    try:
        hostile = initialized.with_changes(schema=f'x"; drop table {probe}; --')
        for task in (admin.create, admin.init, admin.migrate, admin.reset, admin.drop):
            await task(hostile)
        assert await scalar(public, "SELECT to_regclass($1) IS NOT NULL", probe)
    finally:
        async with open_connection(public) as conn:
            await conn.execute(f"DROP TABLE IF EXISTS {probe}")


async def test_init_refuses_partial_schema(config: EventStoreConfig) -> None:
    await admin.create(config)
    try:
        async with open_connection(config) as conn:
            await conn.execute(f"CREATE TABLE {quote_ident(config.schema)}.streams (x int)")
        with pytest.raises(es.SchemaMismatchError, match="schema_migrations"):
            await admin.init(config)
        # Nor will drop take that "streams" (not the store's) for a store's.
        with pytest.raises(es.SchemaNotInitializedError):
            await admin.drop(config)
    finally:
        async with open_connection(config) as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(config.schema)} CASCADE")


async def test_init_other_column_type_refused(initialized: EventStoreConfig) -> None:
    with pytest.raises(es.SchemaMismatchError, match="bytea"):
        await admin.init(initialized.with_changes(column_data_type="jsonb"))


async def test_concurrent_inits_create_one_store(config: EventStoreConfig) -> None:
    await admin.create(config)
    try:
        results: list[admin.AdminResult] = []

        async def run() -> None:
            results.append(await admin.init(config))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(run)
        assert sorted(r.changed for r in results) == [False, False, False, True]
    finally:
        await admin.drop(config)


async def test_migrate_and_reset_need_a_store(config: EventStoreConfig) -> None:
    await admin.create(config)
    try:
        with pytest.raises(es.SchemaNotInitializedError):
            await admin.migrate(config)
        with pytest.raises(es.SchemaNotInitializedError):
            await admin.reset(config)
    finally:
        await admin.drop(config)


async def test_reset_empties_the_store(initialized: EventStoreConfig) -> None:
    s = quote_ident(initialized.schema)

    async def write(conn: Conn) -> None:
        await conn.execute(f"INSERT INTO {s}.streams (stream_uuid, stream_version) VALUES ('a', 1)")
        await conn.execute(
            f"INSERT INTO {s}.subscriptions (stream_uuid, subscription_name) VALUES ('$all', 'x')"
        )
        await conn.execute(
            f"INSERT INTO {s}.snapshots (source_uuid, source_version, source_type, data) "
            "VALUES ('a', 1, 't', '\\x7b7d')"
        )

    async with open_connection(initialized) as conn:
        await conn.transaction(write)
    await admin.reset(initialized)
    async with open_connection(initialized) as conn:
        rows = await conn.fetch(f"SELECT stream_id, stream_uuid, stream_version FROM {s}.streams")
        assert [tuple(r.items()) for r in rows] == [
            (("stream_id", 0), ("stream_uuid", "$all"), ("stream_version", 0))
        ]
        for table in ("subscriptions", "snapshots", "events", "stream_events"):
            assert await conn.fetchval(f"SELECT count(*) FROM {s}.{table}") == 0
        # Identities restart: the next stream gets id 1 again.
        assert (
            await conn.fetchval(
                f"INSERT INTO {s}.streams (stream_uuid) VALUES ('b') RETURNING stream_id"
            )
            == 1
        )


async def test_guard_triggers(initialized: EventStoreConfig) -> None:
    s = quote_ident(initialized.schema)
    async with open_connection(initialized) as conn:
        for table, message in (
            ("streams", "Cannot delete streams"),
            ("events", "Cannot delete events"),
            ("stream_events", "Cannot delete stream events"),
        ):
            with pytest.raises(es.DatabaseError, match=f"EventStore: {message}") as info:
                await conn.execute(f"DELETE FROM {s}.{table}")
            assert info.value.sqlstate == "0A000"
        for table, message in (
            ("events", "Cannot update events"),
            ("stream_events", "Cannot update stream events"),
        ):
            with pytest.raises(es.DatabaseError, match=f"EventStore: {message}") as info:
                await conn.execute(f"UPDATE {s}.{table} SET event_id = event_id")
            assert info.value.sqlstate == "P0001"

        async def hard_delete(c: Conn) -> str:
            return await c.execute(f"DELETE FROM {s}.events")

        # Allowed with the setting on for the transaction only.
        assert (
            await conn.transaction(hard_delete, settings={"eventstore.enable_hard_deletes": "on"})
            == "DELETE 0"
        )
        with pytest.raises(es.DatabaseError):
            await conn.execute(f"DELETE FROM {s}.events")


def test_command_line_cycle(server_url: str) -> None:
    url = url_for(server_url, f"cli_{uuid.uuid4().hex[:10]}")
    try:
        for command, expected in (
            ("create", "has been created"),
            ("init", "has been initialized"),
            ("migrate", "up to date"),
            ("reset", "has been reset"),
        ):
            result = run_cli(command, "--url", url, *(["--yes"] if command == "reset" else []))
            assert result.returncode == 0, result.stderr
            assert expected in result.stdout
        info = run_cli("info", "--json", env={"EVENTSTORE_URL": url})
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["stream_uuid"] == "$all"
        again = run_cli("init", "--json", env={"EVENTSTORE_URL": url})
        payload = json.loads(again.stdout)
        assert (payload["ok"], payload["task"], payload["changed"]) == (True, "init", False)
        dropped = run_cli("drop", "--url", url, "--yes")
        assert dropped.returncode == 0, dropped.stderr
        assert "has been dropped" in dropped.stdout
    finally:
        run_cli("drop", "--url", url, "--yes")


def test_command_line_errors_hide_password(server_url: str) -> None:
    bad = run_cli("create", "--url", "mysql://x/y")
    assert bad.returncode == 2
    assert "url" in bad.stderr
    secret = "hunter2-secret"
    refused = run_cli("init", "--url", f"postgresql://postgres:{secret}@127.0.0.1:1/x")
    assert refused.returncode == 1
    assert "StorageUnavailableError" in refused.stderr
    assert secret not in refused.stderr + refused.stdout


def run_cli_on_a_terminal(*args: str, answer: str) -> tuple[int, str]:
    """Run the command with a terminal as stdin, type ``answer``; (status, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_")}
    controller, terminal = os.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "trio_eventstore", *args],
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        os.write(controller, answer.encode() + b"\n")
        _, stderr = process.communicate(timeout=120)
    finally:
        os.close(controller)
        os.close(terminal)
    return process.returncode, stderr


def test_command_line_drop_and_reset_ask_first(server_url: str) -> None:
    url = url_for(server_url, f"cli_{uuid.uuid4().hex[:10]}")
    config = EventStoreConfig(url=url)
    schema = EventStoreConfig(url=url, schema="other")
    exists = "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)"
    maintenance = EventStoreConfig(url=url_for(server_url, "postgres"))
    try:
        for c in (config, schema):
            trio.run(admin.create, c)
            trio.run(admin.init, c)
        refused = run_cli("drop", "--url", url)  # stdin is not a terminal
        assert refused.returncode == 2
        assert f"would destroy the whole database {config.database_name!r} (" in refused.stderr
        assert "in public" in refused.stderr
        assert "in other" in refused.stderr  # the other schema goes too
        assert "refusing without --yes" in refused.stderr
        assert trio.run(scalar, maintenance, exists, config.database_name)
        as_json = run_cli("reset", "--url", url, "--json")
        assert as_json.returncode == 2
        assert json.loads(as_json.stdout)["error"] == "NotConfirmed"
        assert "every event (0), stream, subscription and snapshot" in as_json.stderr
        refused_schema = run_cli("drop", "--url", url, "--schema", "other")
        assert refused_schema.returncode == 2
        assert "schema 'other' in database" in refused_schema.stderr
        assert "tables)" in refused_schema.stderr

        status, stderr = run_cli_on_a_terminal(
            "drop", "--url", url, "--schema", "other", answer="no"
        )
        assert status == 1
        assert "not confirmed; nothing changed" in stderr
        assert trio.run(scalar, config, "SELECT to_regnamespace('other') IS NOT NULL")
        status, stderr = run_cli_on_a_terminal(
            "drop", "--url", url, "--schema", "other", answer="other"
        )
        assert status == 0, stderr
        assert "Type 'other' to confirm" in stderr
        assert trio.run(scalar, config, "SELECT to_regnamespace('other') IS NULL")

        reset = run_cli("reset", "--url", url, "--yes")
        assert reset.returncode == 0, reset.stderr
        dropped = run_cli("drop", "--url", url, "-y")
        assert dropped.returncode == 0, dropped.stderr
        assert not trio.run(scalar, maintenance, exists, config.database_name)
        nothing_left = run_cli("drop", "--url", url)  # nothing to destroy: no question
        assert nothing_left.returncode == 0, nothing_left.stderr
        assert "already been dropped" in nothing_left.stdout
    finally:
        run_cli("drop", "--url", url, "--yes")


async def test_the_command_names_a_missing_database(server_url: str) -> None:
    url = url_for(server_url, f"missing_{uuid.uuid4().hex[:8]}")
    result = await trio.to_thread.run_sync(lambda: run_cli("info", "--url", url))
    assert result.returncode == 1
    assert "DatabaseNotFoundError" in result.stderr
    assert "trio-eventstore create" in result.stderr
