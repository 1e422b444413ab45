"""Owner and application roles: `admin.grant` gives an application role what the store
needs, each grant is needed, admin tasks say which privilege they lack and whom to run
them as, and a schema's owner can init it without CREATE on the database."""

from __future__ import annotations

import subprocess
import urllib.parse
import uuid
from collections.abc import AsyncIterator

import pytest
import trio

import trio_eventstore as es
from trio_eventstore import (
    ANY_VERSION,
    NO_STREAM,
    EventData,
    EventStoreConfig,
    SnapshotData,
    admin,
    open_event_store,
)
from trio_eventstore._pg import open_connection
from trio_eventstore._sql import APPLICATION_GRANTS, quote_ident, quote_literal

from .helpers import Role, run_cli, url_for

HANG_GUARD = 60  # seconds: a guard against hangs, never a speed assertion


def ev(n: int) -> EventData:
    return EventData({"n": n}, event_type="E")


async def as_superuser(config: EventStoreConfig, *statements: str) -> None:
    async with open_connection(config) as conn:
        for statement in statements:
            await conn.execute(statement)


async def everything_the_store_does(config: EventStoreConfig) -> None:
    """Appends (new and existing streams), links, reads, a soft delete, snapshots, and a
    persistent subscription (its row, lock, delivery, checkpoint, deletion)."""
    with trio.fail_after(HANG_GUARD):
        async with open_event_store(config) as store:
            stream = f"s-{uuid.uuid4().hex[:8]}"
            await store.append_to_stream(stream, NO_STREAM, [ev(1)])
            await store.append_to_stream(stream, 1, [ev(2)])
            events = await store.read_stream_forward(stream)
            await store.link_to_stream(f"{stream}-links", ANY_VERSION, events)
            assert len(await store.read_all_streams_forward()) >= 2
            await store.delete_stream(f"{stream}-links", 2)
            snapshot = SnapshotData(
                source_uuid=stream, source_version=2, source_type="Snap", data={"n": 2}
            )
            await store.record_snapshot(snapshot)
            await store.record_snapshot(snapshot)  # replaces it
            assert (await store.read_snapshot(stream)).source_version == 2
            await store.delete_snapshot(stream)
            name = f"p-{uuid.uuid4().hex[:8]}"
            async with store.subscribe_to_stream(stream, name) as sub:
                await sub.wait_subscribed()
                batch = await sub.__anext__()
                sub.ack(batch)
                await sub.wait_checkpointed(batch.last_event_number)
            await store.delete_subscription(stream, name)


def denied(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a missing privilege."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, es.InsufficientPrivilegeError):
            return True
        seen = seen.__cause__
    return False


@pytest.fixture
async def granted(initialized: EventStoreConfig, application_role: Role) -> EventStoreConfig:
    return await application_role.use(initialized)


async def test_an_application_role_runs_the_whole_store(granted: EventStoreConfig) -> None:
    await everything_the_store_does(granted)


async def test_hard_deletes_need_their_own_grant(
    initialized: EventStoreConfig, application_role: Role
) -> None:
    config = (await application_role.use(initialized)).with_changes(enable_hard_deletes=True)
    async with open_event_store(config) as store:
        await store.append_to_stream("doomed", ANY_VERSION, [ev(1)])
        with pytest.raises(es.InsufficientPrivilegeError, match="permission denied") as info:
            await store.delete_stream("doomed", ANY_VERSION, hard=True)
        assert info.value.sqlstate == "42501"
        assert info.value.role == application_role.name
        result = await admin.grant(initialized, application_role.name, hard_deletes=True)
        assert any("DELETE ON TABLE" in sql and "events" in sql for sql in result.statements)
        await store.delete_stream("doomed", ANY_VERSION, hard=True)
        with pytest.raises(es.StreamNotFoundError):
            await store.stream_info("doomed")


def _each_privilege() -> list[tuple[str, str, str]]:
    return [
        (kind, name, privilege.strip())
        for kind, name, privileges in APPLICATION_GRANTS
        for privilege in privileges.split(",")
    ]


async def test_each_grant_is_needed(
    initialized: EventStoreConfig, application_role: Role, granted: EventStoreConfig
) -> None:
    """Revoke one privilege at a time: the store then fails with a missing privilege."""
    schema, role = quote_ident(initialized.schema), quote_ident(application_role.name)
    unneeded = []
    for kind, name, privilege in _each_privilege():
        target = schema if kind == "SCHEMA" else f"{schema}.{quote_ident(name)}"
        await as_superuser(initialized, f"REVOKE {privilege} ON {kind} {target} FROM {role}")
        try:
            await everything_the_store_does(granted)
        except BaseException as exc:
            if not denied(exc):
                raise
        else:
            unneeded.append(f"{privilege} on {kind} {name}")
        await admin.grant(initialized, application_role.name)
    assert not unneeded, f"granted but never needed: {unneeded}"
    await everything_the_store_does(granted)


async def test_grant_reports_what_it_changed(
    initialized: EventStoreConfig, application_role: Role
) -> None:
    first = await admin.grant(initialized, application_role.name)
    assert first.changed
    assert len(first.statements) == len(APPLICATION_GRANTS)
    again = await admin.grant(initialized, application_role.name)
    assert not again.changed
    assert "already" in again.message


async def test_grant_prints_without_connecting() -> None:
    config = EventStoreConfig(url="postgresql://u:pw@127.0.0.1:1/nowhere", schema='odd "name"')
    result = await admin.grant(config, "app", apply=False)
    assert not result.changed
    assert result.statements[0] == 'GRANT USAGE ON SCHEMA "odd ""name""" TO "app"'
    assert result.message.splitlines()[1:] == [f"{sql};" for sql in result.statements]
    with_deletes = await admin.grant(config, "app", apply=False, hard_deletes=True)
    assert len(with_deletes.statements) == len(APPLICATION_GRANTS) + 3


@pytest.mark.parametrize("role", ["", "x" * 64, "a\x00b"])
async def test_grant_refuses_a_bad_role_name_before_io(role: str) -> None:
    config = EventStoreConfig(url="postgresql://u:pw@127.0.0.1:1/nowhere")
    with pytest.raises(ValueError, match="role"):
        await admin.grant(config, role)


@pytest.mark.parametrize("flags", [{"apply": "False"}, {"hard_deletes": "no"}, {"apply": 0}])
async def test_grant_refuses_a_flag_that_is_not_a_bool_before_io(flags: dict[str, object]) -> None:
    """``apply="False"`` is truthy: it would have run the grants."""
    config = EventStoreConfig(url="postgresql://u:pw@127.0.0.1:1/nowhere")
    with pytest.raises(TypeError, match="expected a bool"):
        await admin.grant(config, "app", **flags)  # type: ignore[arg-type]


async def test_grant_needs_a_store_and_a_role(config: EventStoreConfig) -> None:
    await admin.create(config)
    try:
        with pytest.raises(es.SchemaNotInitializedError):
            await admin.grant(config, "postgres")
        await admin.init(config)
        with pytest.raises(es.DatabaseError, match="does not exist") as info:
            await admin.grant(config, "no_such_role_here")
        assert info.value.sqlstate == "42704"
    finally:
        await admin.drop(config)


async def test_a_store_in_public_names_its_tables_owner_not_pg_database_owner(
    server_url: str, application_role: Role
) -> None:
    """On PostgreSQL 15 the schema public belongs to ``pg_database_owner``, whom nobody
    can log in as: "run it as 'pg_database_owner'" was no help. The store's tables'
    owner is named instead."""
    config = EventStoreConfig(url=url_for(server_url, f"pub_{uuid.uuid4().hex[:10]}"))
    await admin.create(config)
    try:
        await admin.init(config)
        owner = (config.effective_username or "").lower()
        as_app = await application_role.use(config)
        with pytest.raises(es.InsufficientPrivilegeError) as info:
            await admin.reset(as_app)
        assert f"run it as {owner!r} (the schema's owner)" in str(info.value)
        assert "pg_database_owner" not in str(info.value)
    finally:
        await admin.drop(config)


async def test_admin_tasks_name_the_privilege_and_the_role_to_use(
    initialized: EventStoreConfig, granted: EventStoreConfig, application_role: Role
) -> None:
    owner = (initialized.effective_username or "").lower()
    app = application_role.name
    empty = initialized.with_changes(schema=f"t_{uuid.uuid4().hex[:12]}")
    await admin.create(empty)  # by the owner: init is left to do
    empty_as_app = granted.with_changes(schema=empty.schema)
    for task, config, privilege in (
        (admin.init, empty_as_app, f"CREATE on schema {empty.schema!r}"),
        (admin.reset, granted, "TRUNCATE"),
        (admin.drop, granted, f"ownership of schema {initialized.schema!r}"),
    ):
        with pytest.raises(es.InsufficientPrivilegeError) as info:
            await task(config)
        error = info.value
        assert privilege in str(error)
        assert error.privilege is not None
        assert privilege in error.privilege
        assert (error.role, error.sqlstate) == (app, "42501")
        assert f"run it as {owner!r} (the schema's owner)" in str(error)
        assert application_role.password not in str(error)
    with pytest.raises(es.InsufficientPrivilegeError, match="to grant on them") as granting:
        await admin.grant(granted, app)
    assert f"run it as {owner!r}" in str(granting.value)
    new_schema = granted.with_changes(schema=f"t_{uuid.uuid4().hex[:12]}")
    with pytest.raises(es.InsufficientPrivilegeError) as creating:
        await admin.create(new_schema)
    assert f"CREATE on database {granted.database_name!r}" in str(creating.value)
    assert "(the database's owner)" in str(creating.value)
    await admin.drop(empty)


@pytest.fixture
async def schema_owner(config: EventStoreConfig) -> AsyncIterator[EventStoreConfig]:
    """A role that owns the config's (empty) schema and has no CREATE on the database."""
    name, password = f"owner_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await as_superuser(
        config,
        f"CREATE ROLE {quote_ident(name)} LOGIN PASSWORD {quote_literal(password)}",
        f"CREATE SCHEMA {quote_ident(config.schema)} AUTHORIZATION {quote_ident(name)}",
    )
    async with open_connection(config) as conn:
        may_create = await conn.fetchval(
            "SELECT has_database_privilege($1, current_database(), 'CREATE')", name
        )
    assert not may_create
    try:
        yield config.with_changes(username=name, password=password)
    finally:
        with trio.CancelScope(shield=True):
            await admin.drop(config)
            await as_superuser(config, f"DROP OWNED BY {quote_ident(name)}")
            await as_superuser(config, f"DROP ROLE {quote_ident(name)}")


async def test_a_schema_owner_can_init_without_create_on_the_database(
    schema_owner: EventStoreConfig,
) -> None:
    assert (await admin.init(schema_owner)).changed
    assert not (await admin.init(schema_owner)).changed
    assert (await admin.grant(schema_owner, "postgres", apply=False)).statements
    async with open_event_store(schema_owner) as store:
        await store.append_to_stream("s", NO_STREAM, [ev(1)])
    with pytest.raises(es.InsufficientPrivilegeError) as creating:
        await admin.create(schema_owner.with_changes(schema=f"t_{uuid.uuid4().hex[:12]}"))
    assert "CREATE on database" in str(creating.value)


def test_the_grant_command_prints_or_applies(
    eventstore_config: EventStoreConfig, application_role: Role
) -> None:
    url = eventstore_config.url or ""
    parts = urllib.parse.urlsplit(url)
    password = parts.password
    assert password
    env = {"EVENTSTORE_URL": url, "EVENTSTORE_SCHEMA": eventstore_config.schema}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=env, timeout=HANG_GUARD)

    printed = cli("grant", application_role.name, "--print")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.count("GRANT ") == len(APPLICATION_GRANTS)
    assert f'TO "{application_role.name}";' in printed.stdout
    applied = cli("grant", application_role.name)
    assert applied.returncode == 0, applied.stderr
    assert "may now use" in applied.stdout
    # As the application role itself: refused, the owner named, no password shown.
    role = application_role
    app_netloc = f"{role.name}:{role.password}@{parts.hostname}:{parts.port}"
    app_url = urllib.parse.urlunsplit(parts._replace(netloc=app_netloc))
    env["EVENTSTORE_URL"] = app_url
    refused = cli("grant", application_role.name)
    assert refused.returncode == 1
    assert "InsufficientPrivilegeError" in refused.stderr
    for output in (printed, applied, refused):
        assert password not in output.stdout + output.stderr
        assert application_role.password not in output.stdout + output.stderr


async def test_a_role_without_connect_is_told_so(server_url: str, application_role: Role) -> None:
    database = f"noconnect_{uuid.uuid4().hex[:8]}"
    owner = EventStoreConfig(url=url_for(server_url, database))
    await admin.create(owner)
    try:
        await admin.init(owner)
        app = await application_role.use(owner)
        await as_superuser(owner, f"REVOKE CONNECT ON DATABASE {quote_ident(database)} FROM PUBLIC")
        with trio.fail_after(HANG_GUARD), pytest.raises(es.InsufficientPrivilegeError) as info:
            async with open_event_store(app):
                pytest.fail("opened a store without CONNECT")
        assert not isinstance(info.value, es.StorageUnavailableError)  # retrying cannot help
        assert info.value.role == application_role.name
        assert "CONNECT" in (info.value.detail or "")
    finally:
        await admin.drop(owner)
