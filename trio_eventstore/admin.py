"""Create, initialise, migrate, reset and drop an event store: the Elixir mix tasks
(`mix event_store.create`, `.init`, `.migrate`, `.drop`, and the test-only reset).

Each is ``async def f(config) -> AdminResult``, usable from a release without the
source tree; ``trio-eventstore <task>`` runs them from a shell. They are idempotent:
running one twice reports that nothing was left to do.
"""

from __future__ import annotations

import logging

import attrs

from . import _sql, _storage
from ._config import EventStoreConfig
from ._errors import DatabaseError, EventStoreError, SchemaMismatchError, StorageUnavailableError
from ._pg import Conn, Connection, open_connection

__all__ = ["AdminResult", "create", "drop", "init", "migrate", "reset"]

logger = logging.getLogger("trio_eventstore.admin")

#: Databases to connect to for CREATE / DROP DATABASE, in order of preference.
MAINTENANCE_DATABASES = ("postgres", "template1")


@attrs.frozen
class AdminResult:
    """What a task did: ``changed`` is False when there was nothing to do."""

    task: str
    changed: bool
    message: str

    def __str__(self) -> str:
        return self.message


def _result(task: str, changed: bool, message: str) -> AdminResult:
    logger.info("%s: %s", task, message)
    return AdminResult(task, changed, message)


async def _with_maintenance_connection(
    config: EventStoreConfig, sql: str, *args: object, execute: bool = False
) -> object:
    """Run one statement on a maintenance database (CREATE/DROP DATABASE need one)."""
    last: EventStoreError | None = None
    for name in MAINTENANCE_DATABASES:
        try:
            async with open_connection(config, database=name) as conn:
                if execute:
                    return await conn.execute(sql, *args)
                return await conn.fetchval(sql, *args)
        except DatabaseError as exc:
            if exc.sqlstate != "3D000":  # invalid_catalog_name: try the next one
                raise
            last = exc
    assert last is not None
    raise last


async def create(config: EventStoreConfig) -> AdminResult:
    """Create the database, and the schema when it is not ``public``, if missing.

    Ports ``mix event_store.create``.
    """
    database = config.database_name
    exists = await _with_maintenance_connection(config, _sql.DATABASE_EXISTS, database)
    messages = []
    changed = False
    if exists:
        messages.append(f"The EventStore database {database!r} already exists.")
    else:
        try:
            await _with_maintenance_connection(config, _sql.create_database(database), execute=True)
            messages.append(f"The EventStore database {database!r} has been created.")
            changed = True
        except DatabaseError as exc:
            if exc.sqlstate != "42P04":  # duplicate_database: created concurrently
                raise
            messages.append(f"The EventStore database {database!r} already exists.")
    async with open_connection(config) as conn:
        if await conn.fetchval(_sql.SCHEMA_EXISTS, config.schema):
            messages.append(f"The EventStore schema {config.schema!r} already exists.")
        else:
            await conn.execute(_sql.create_schema(config.schema))
            messages.append(f"The EventStore schema {config.schema!r} has been created.")
            changed = True
    return _result("create", changed, " ".join(messages))


async def init(config: EventStoreConfig) -> AdminResult:
    """Create every table, index, sequence, trigger and function of the Elixir layout
    (version 1.3.2) in the schema, in one transaction. A no-op on an initialised schema.

    Ports ``mix event_store.init``.

    Raises:
        SchemaMismatchError: the schema holds some of the tables but not a whole store,
            or a store with another ``column_data_type``.
    """
    statements = _sql.init_statements(config.schema, config.column_data_type)

    async def unit(conn: Conn) -> _storage.SchemaState | None:
        await conn.execute(_sql.create_schema(config.schema))
        await conn.execute(_sql.INIT_LOCK, config.schema)
        state = await _storage.read_schema_state(conn, config.schema)
        if not state.empty:
            return state
        for statement in statements:
            await conn.execute(statement)
        return None

    async with open_connection(config) as conn:
        state = await conn.transaction(unit)
    where = f"schema {config.schema!r} of database {config.database_name!r}"
    if state is None:
        return _result("init", True, f"The EventStore {where} has been initialized.")
    if not state.initialized:
        raise SchemaMismatchError(
            f"{where} holds {state.table_count} event store table(s) but no schema_migrations: "
            "it is not an event store this task can initialise; drop it first"
        )
    if state.data_type != config.column_data_type:
        raise SchemaMismatchError(
            f"{where} is already initialised with column_data_type {state.data_type!r}, "
            f"not {config.column_data_type!r}"
        )
    return _result("init", False, f"The EventStore {where} has already been initialized.")


async def migrate(config: EventStoreConfig) -> AdminResult:
    """Apply pending migrations under the Elixir migration advisory lock.

    Ports ``mix event_store.migrate``. Each migration runs in its own transaction and
    records its version; a concurrent ``migrate`` waits for the lock, then finds
    nothing to do.

    Raises:
        SchemaNotInitializedError: the schema holds no event store.
        SchemaMismatchError: the schema is newer than this library, or older than 1.3.2
            (migrate those with the Elixir library first).
    """
    async with open_connection(config, session_mode=True) as conn:
        state = await conn.run(lambda c: _storage.read_schema_state(c, config.schema))
        if not state.initialized:
            _storage.check_schema(state, config)  # raises SchemaNotInitializedError
        assert state.lock_key is not None
        await conn.fetchval(_sql.MIGRATION_LOCK, state.lock_key)
        try:
            applied = await _apply_migrations(conn, config)
        finally:
            await conn.fetchval(_sql.MIGRATION_UNLOCK, state.lock_key)
    where = f"schema {config.schema!r} of database {config.database_name!r}"
    if not applied:
        return _result("migrate", False, f"The EventStore {where} is already up to date.")
    versions = ", ".join(".".join(map(str, v)) for v in applied)
    return _result("migrate", True, f"The EventStore {where} has been migrated to {versions}.")


async def _apply_migrations(
    conn: Connection, config: EventStoreConfig
) -> list[tuple[int, int, int]]:
    state = await conn.run(lambda c: _storage.read_schema_state(c, config.schema))
    assert state.version is not None
    if state.version > _storage.latest_version():
        _storage.check_schema(state, config)  # raises: newer than we know
    if state.version < _sql.SCHEMA_VERSION:
        raise SchemaMismatchError(
            f"schema {config.schema!r} is at version {'.'.join(map(str, state.version))}, "
            "older than 1.3.2: migrate it with the Elixir library's mix event_store.migrate"
        )
    applied = []
    for version, statements in _sql.MIGRATIONS:
        if version <= state.version:
            continue

        async def unit(
            c: Conn, statements: list[str] = statements, version: tuple[int, int, int] = version
        ) -> None:
            for statement in statements:
                await c.execute(statement)
            await c.execute(_sql.insert_migration(config.schema), *version)

        await conn.transaction(unit)
        applied.append(version)
    return applied


async def reset(config: EventStoreConfig) -> AdminResult:
    """Empty the store: every event, stream, subscription and snapshot (for tests).

    Raises:
        SchemaNotInitializedError: the schema holds no event store.
    """
    statements = _sql.reset_statements(config.schema)

    async def unit(conn: Conn) -> None:
        state = await _storage.read_schema_state(conn, config.schema)
        _storage.check_schema(state, config)
        for statement in statements:
            await conn.execute(statement)

    async with open_connection(config) as conn:
        await conn.transaction(unit, settings={"eventstore.reset": "on"})
    return _result(
        "reset",
        True,
        f"The EventStore schema {config.schema!r} of database {config.database_name!r} "
        "has been reset.",
    )


async def drop(config: EventStoreConfig) -> AdminResult:
    """Drop the database (schema ``public``) or only the schema (any other schema).

    Ports ``mix event_store.drop``. Dropping a database that other sessions use fails
    with `StorageUnavailableError` and drops nothing.
    """
    database = config.database_name
    if config.schema != "public":
        try:
            async with open_connection(config) as conn:
                if not await conn.fetchval(_sql.SCHEMA_EXISTS, config.schema):
                    return _result(
                        "drop",
                        False,
                        f"The EventStore schema {config.schema!r} has already been dropped.",
                    )
                await conn.execute(_sql.drop_schema(config.schema))
        except DatabaseError as exc:
            if exc.sqlstate != "3D000":
                raise
            return _result("drop", False, f"The EventStore database {database!r} does not exist.")
        return _result("drop", True, f"The EventStore schema {config.schema!r} has been dropped.")
    if not await _with_maintenance_connection(config, _sql.DATABASE_EXISTS, database):
        return _result(
            "drop", False, f"The EventStore database {database!r} has already been dropped."
        )
    try:
        await _with_maintenance_connection(config, _sql.drop_database(database), execute=True)
    except DatabaseError as exc:
        if exc.sqlstate == "55006":  # object_in_use
            raise StorageUnavailableError(
                f"cannot drop database {database!r}: other sessions are using it"
            ) from exc
        raise
    return _result("drop", True, f"The EventStore database {database!r} has been dropped.")
