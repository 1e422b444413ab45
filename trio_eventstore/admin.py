"""Create, initialise, migrate, reset and drop an event store: the Elixir mix tasks
(`mix event_store.create`, `.init`, `.migrate`, `.drop`, and the test-only reset); and
`grant`, which lets an application role use the store.

Each is ``async def f(config) -> AdminResult``, usable from a release without the
source tree; ``trio-eventstore <task>`` runs them from a shell. They are idempotent:
running one twice reports that nothing was left to do.

They run as the store's owner (the role that owns the schema, or the database for
schema ``public``), not as an application role: a privilege they lack raises
`InsufficientPrivilegeError` naming the privilege and the role to run them as.
"""

from __future__ import annotations

import logging

import attrs

from . import _schema_state, _sql
from ._arguments import check_bool
from ._config import EventStoreConfig
from ._errors import (
    DatabaseError,
    EventStoreError,
    InsufficientPrivilegeError,
    SchemaMismatchError,
    SchemaNotInitializedError,
    StorageUnavailableError,
)
from ._pg import Conn, Connection, open_connection

__all__ = ["AdminResult", "create", "drop", "grant", "init", "migrate", "reset"]

logger = logging.getLogger("trio_eventstore.admin")

#: Databases to connect to for CREATE / DROP DATABASE, in order of preference.
MAINTENANCE_DATABASES = ("postgres", "template1")


@attrs.frozen
class AdminResult:
    """What a task did: ``changed`` is False when there was nothing to do."""

    task: str
    changed: bool
    message: str
    #: the SQL statements the task ran, or (``grant(apply=False)``) would run
    statements: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.message


def _result(
    task: str, changed: bool, message: str, statements: tuple[str, ...] = ()
) -> AdminResult:
    logger.info("%s: %s", task, message)
    return AdminResult(task, changed, message, statements)


@attrs.frozen
class _Owners:
    current: str | None = None
    schema: str | None = None
    database: str | None = None


async def _owners(config: EventStoreConfig) -> _Owners:
    """Who is connected and who owns the schema and the database (best effort: for
    messages only)."""
    for database in (None, *MAINTENANCE_DATABASES):
        try:
            async with open_connection(config, database=database) as conn:
                row = (await conn.fetch(_sql.OWNERS, config.schema, config.database_name))[0]
        except EventStoreError:
            continue
        schema_owner = row["schema_owner"] if database is None else None
        return _Owners(row["current_role"], schema_owner, row["database_owner"])
    return _Owners(config.effective_username)


async def _denied(
    config: EventStoreConfig,
    task: str,
    exc: InsufficientPrivilegeError,
    privilege: str,
    owner: str | None,
) -> InsufficientPrivilegeError:
    """The error for a privilege ``task`` lacks: what it needs, and whom to run it as
    (``owner``: ``"schema"`` or ``"database"``, whose owner has it; None: a superuser)."""
    found = await _owners(config)
    current = found.current or exc.role
    use = None
    if owner == "schema":
        use, what = found.schema or found.database, "the schema's owner"
        if found.schema is None:
            what = "the database's owner"
    elif owner == "database":
        use, what = found.database, "the database's owner"
    if use is not None and use != current:
        hint = f"run it as {use!r} ({what}) or a superuser"
    else:
        hint = "run it as a superuser, or as a role that has it"
    return InsufficientPrivilegeError(
        f"{task}: the role {current!r} lacks {privilege} ({exc}): {hint}. Application "
        "roles (`trio-eventstore grant`) use the store; its owner administers it",
        sqlstate=exc.sqlstate,
        detail=exc.detail,
        role=current,
        privilege=privilege,
    )


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
        except InsufficientPrivilegeError as exc:
            privilege = f"CREATEDB (to create database {database!r})"
            raise await _denied(config, "create", exc, privilege, None) from exc
        except DatabaseError as exc:
            if exc.sqlstate != "42P04":  # duplicate_database: created concurrently
                raise
            messages.append(f"The EventStore database {database!r} already exists.")
    try:
        async with open_connection(config) as conn:
            if await conn.fetchval(_sql.SCHEMA_EXISTS, config.schema):
                messages.append(f"The EventStore schema {config.schema!r} already exists.")
            else:
                await conn.execute(_sql.create_schema(config.schema))
                messages.append(f"The EventStore schema {config.schema!r} has been created.")
                changed = True
    except InsufficientPrivilegeError as exc:
        privilege = f"CREATE on database {database!r} (to create schema {config.schema!r})"
        raise await _denied(config, "create", exc, privilege, "database") from exc
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
    schema_existed = True

    async def unit(conn: Conn) -> _schema_state.SchemaState | None:
        nonlocal schema_existed
        # CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema
        # exists: the schema's owner need not have it.
        schema_existed = bool(await conn.fetchval(_sql.SCHEMA_EXISTS, config.schema))
        if not schema_existed:
            await conn.execute(_sql.create_schema(config.schema))
        await conn.execute(_sql.INIT_LOCK, config.schema)
        state = await _schema_state.read_schema_state(conn, config.schema)
        if not state.empty:
            return state
        for statement in statements:
            await conn.execute(statement)
        return None

    where = f"schema {config.schema!r} of database {config.database_name!r}"
    try:
        async with open_connection(config) as conn:
            state = await conn.transaction(unit)
    except InsufficientPrivilegeError as exc:
        if schema_existed:
            privilege = f"CREATE on schema {config.schema!r} (to create the store's tables)"
            raise await _denied(config, "init", exc, privilege, "schema") from exc
        privilege = f"CREATE on database {config.database_name!r} (to create the schema)"
        raise await _denied(config, "init", exc, privilege, "database") from exc
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
    try:
        async with open_connection(config, session_mode=True) as conn:
            state = await conn.run(lambda c: _schema_state.read_schema_state(c, config.schema))
            if not state.initialized:
                _schema_state.check_schema(state, config)  # raises SchemaNotInitializedError
            assert state.lock_key is not None
            await conn.fetchval(_sql.MIGRATION_LOCK, state.lock_key)
            try:
                applied = await _apply_migrations(conn, config)
            finally:
                await conn.fetchval(_sql.MIGRATION_UNLOCK, state.lock_key)
    except InsufficientPrivilegeError as exc:
        privilege = f"ownership of the store's tables in schema {config.schema!r}"
        raise await _denied(config, "migrate", exc, privilege, "schema") from exc
    where = f"schema {config.schema!r} of database {config.database_name!r}"
    if not applied:
        return _result("migrate", False, f"The EventStore {where} is already up to date.")
    versions = ", ".join(".".join(map(str, v)) for v in applied)
    return _result("migrate", True, f"The EventStore {where} has been migrated to {versions}.")


async def _apply_migrations(
    conn: Connection, config: EventStoreConfig
) -> list[tuple[int, int, int]]:
    state = await conn.run(lambda c: _schema_state.read_schema_state(c, config.schema))
    assert state.version is not None
    if state.version > _schema_state.latest_version():
        _schema_state.check_schema(state, config)  # raises: newer than we know
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
        StorageUnavailableError: a subscription runs on it (a store, Python or Elixir,
            holds its lock): nothing is reset.
    """
    statements = _sql.reset_statements(config.schema)

    async def unit(conn: Conn) -> None:
        state = await _schema_state.read_schema_state(conn, config.schema)
        _schema_state.check_schema(state, config)
        row = await conn.fetchrow(_sql.STORE_IN_USE, config.schema)
        if row is not None and row["locks"]:  # a subscription's, a node's migration's
            # A running subscription keeps its position in memory: after the reset it
            # would skip the new events up to it, without a word.
            raise StorageUnavailableError(
                f"schema {config.schema!r} of database {config.database_name!r} has "
                f"{row['locks']} subscription{'s' if row['locks'] != 1 else ''} running "
                "(held by a store, Python or Elixir): they would skip the events appended "
                "after the reset; stop them first (nothing was reset)"
            )
        for statement in statements:
            await conn.execute(statement)

    try:
        async with open_connection(config) as conn:
            await conn.transaction(unit, settings={"eventstore.reset": "on"})
    except InsufficientPrivilegeError as exc:
        privilege = f"TRUNCATE on the store's tables in schema {config.schema!r}"
        raise await _denied(config, "reset", exc, privilege, "schema") from exc
    return _result(
        "reset",
        True,
        f"The EventStore schema {config.schema!r} of database {config.database_name!r} "
        "has been reset.",
    )


async def drop(config: EventStoreConfig) -> AdminResult:
    """Drop the database (schema ``public``) or only the schema (any other schema).

    Ports ``mix event_store.drop``. Dropping a database that other sessions use, or a
    schema on which subscriptions run (a store holds their locks), fails with
    `StorageUnavailableError` and drops nothing.

    Raises:
        SchemaNotInitializedError: the schema holds no event store (initialised; a partly
            initialised one goes if it holds nothing else) but other objects; for
            ``public`` (the database is dropped), also when another schema of the database
            holds anything but an event store (nothing is dropped).
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
                state = await conn.run(lambda c: _schema_state.read_schema_state(c, config.schema))
                others = (
                    0
                    if state.initialized
                    else await conn.fetchval(_sql.SCHEMA_OBJECTS, config.schema)
                )
                if not others:
                    rows = await conn.fetch(_sql.STORE_IN_USE, config.schema)
                    row = rows[0]
                    if row["locks"]:
                        raise StorageUnavailableError(
                            f"cannot drop schema {config.schema!r}: stores are using it "
                            f"({row['locks']} subscription{'s' if row['locks'] != 1 else ''} "
                            "running); stop them first (nothing dropped)"
                        )
                if others:
                    # Not an event store, nor a partly initialised one (nothing but its
                    # tables): a typo, or the wrong --schema, must not drop somebody
                    # else's tables (a "subscriptions" of theirs included).
                    raise SchemaNotInitializedError(
                        f"schema {config.schema!r} of database {database!r} holds no event "
                        f"store, and {others} object{'s' if others != 1 else ''} (tables, "
                        "views, functions, types) that no event store has: nothing dropped "
                        "(drop it with SQL if you mean to)"
                    )
                await conn.execute(_sql.drop_schema(config.schema))
        except InsufficientPrivilegeError as exc:
            privilege = f"ownership of schema {config.schema!r} (to drop it)"
            raise await _denied(config, "drop", exc, privilege, "schema") from exc
        except DatabaseError as exc:
            if exc.sqlstate != "3D000":
                raise
            return _result("drop", False, f"The EventStore database {database!r} does not exist.")
        return _result("drop", True, f"The EventStore schema {config.schema!r} has been dropped.")
    if not await _with_maintenance_connection(config, _sql.DATABASE_EXISTS, database):
        return _result(
            "drop", False, f"The EventStore database {database!r} has already been dropped."
        )
    others = await _objects_of_no_store(config)
    if others:
        # A wrong --url (or EVENTSTORE_URL) must not drop somebody else's database.
        raise SchemaNotInitializedError(
            f"database {database!r} holds no event store (in schema 'public'), and {others} "
            f"thing{'s' if others != 1 else ''} (tables, views, functions, types, schemas in "
            "use) that no event store has: nothing dropped (drop it with SQL if you mean to, "
            "or give the schema of its event store)"
        )
    try:
        await _with_maintenance_connection(config, _sql.drop_database(database), execute=True)
    except InsufficientPrivilegeError as exc:
        privilege = f"ownership of database {database!r} (to drop it)"
        raise await _denied(config, "drop", exc, privilege, "database") from exc
    except DatabaseError as exc:
        if exc.sqlstate == "55006":  # object_in_use
            raise StorageUnavailableError(
                f"cannot drop database {database!r}: other sessions are using it"
            ) from exc
        raise
    return _result("drop", True, f"The EventStore database {database!r} has been dropped.")


async def _objects_of_no_store(config: EventStoreConfig) -> int:
    """For a database whose ``public`` schema holds no initialised event store: how many
    objects of ``public`` and other schemas in use it holds that no event store has (0
    for a store, a partly initialised one with nothing else, or an empty database)."""
    try:
        async with open_connection(config) as conn:
            state = await conn.run(lambda c: _schema_state.read_schema_state(c, "public"))
            if state.initialized:
                return 0
            public: int = await conn.fetchval(_sql.SCHEMA_OBJECTS, "public")
            schemas: int = await conn.fetchval(_sql.OTHER_SCHEMAS_IN_USE)
            return public + schemas
    except DatabaseError as exc:
        if exc.sqlstate == "3D000":  # dropped meanwhile
            return 0
        raise


async def grant(
    config: EventStoreConfig,
    role: str,
    *,
    apply: bool = True,
    hard_deletes: bool | None = None,
) -> AdminResult:
    """Let ``role`` (an application role) run the store: read, append, link, soft-delete,
    subscribe (locks, checkpoints) and keep snapshots, and nothing more: no DDL, no
    TRUNCATE, no other schema. The role must exist (create it, with its password, as you
    create roles) and may connect to the database (PUBLIC may, by default).

    Grants: USAGE on the schema; SELECT, INSERT, UPDATE on ``streams``; SELECT, INSERT on
    ``events`` and ``stream_events``; SELECT, INSERT, UPDATE, DELETE on ``subscriptions``
    and ``snapshots``; SELECT on ``schema_migrations``; USAGE on the sequences
    ``streams_stream_id_seq`` and ``subscriptions_subscription_id_seq``; and, for hard
    deletes, DELETE on ``streams``, ``events`` and ``stream_events``.

    Args:
        role: the role to grant to.
        apply: run the statements (as the store's owner); False: only return them, without
            connecting (for a database administrator to run).
        hard_deletes: grant what hard deletes need too (default: the config's
            ``enable_hard_deletes``).

    Returns:
        An `AdminResult` whose ``statements`` are the GRANT statements.

    Raises:
        ValueError: ``role`` is not a role name.
        SchemaNotInitializedError: the schema holds no event store.
        DatabaseError: the role does not exist (SQLSTATE 42704).
        InsufficientPrivilegeError: the connected role may not grant these (run it as
            the store's owner).
    """
    if not isinstance(role, str):
        raise TypeError(f"role: expected a str, got {type(role).__name__}")
    if not role or "\x00" in role or len(role.encode()) > 63:
        raise ValueError("role: must be a role name of 1 to 63 bytes without NUL characters")
    check_bool("apply", apply)
    if hard_deletes is None:
        hard_deletes = config.enable_hard_deletes
    check_bool("hard_deletes", hard_deletes)
    statements = tuple(_sql.grant_statements(config.schema, role, hard_deletes=hard_deletes))
    where = f"schema {config.schema!r} of database {config.database_name!r}"
    if not apply:
        return AdminResult(
            "grant",
            False,
            f"-- run as the owner of {where}\n" + "".join(f"{sql};\n" for sql in statements),
            statements,
        )

    async def unit(conn: Conn) -> bool:
        state = await _schema_state.read_schema_state(conn, config.schema)
        data_type = state.data_type if state.data_type in ("bytea", "jsonb") else None
        _schema_state.check_schema(
            state, config.with_changes(column_data_type=data_type or "bytea")
        )
        if not await conn.fetchval(_sql.CAN_GRANT, config.schema):
            raise InsufficientPrivilegeError(
                "permission denied: only the owner of the schema and its tables may grant "
                "privileges on them",
                role=config.effective_username,
            )
        if not await conn.fetchval(_sql.ROLE_EXISTS, role):
            raise DatabaseError(
                f"role {role!r} does not exist: create it first (CREATE ROLE ... LOGIN "
                "PASSWORD ...), then grant it the store",
                sqlstate="42704",
            )
        before = await conn.fetchval(_sql.SCHEMA_ACLS, config.schema)
        for statement in statements:
            await conn.execute(statement)
        return bool(before != await conn.fetchval(_sql.SCHEMA_ACLS, config.schema))

    try:
        async with open_connection(config) as conn:
            changed = await conn.transaction(unit)
    except InsufficientPrivilegeError as exc:
        privilege = (
            f"ownership of the store's tables in schema {config.schema!r} (to grant on them)"
        )
        raise await _denied(config, "grant", exc, privilege, "schema") from exc
    if changed:
        message = f"The role {role!r} may now use the EventStore in {where}."
    else:
        message = f"The role {role!r} already had every privilege it needs in {where}."
    return _result("grant", changed, message, statements)
