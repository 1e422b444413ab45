"""What a schema holds: whether `init` made an event store there, with which
column_data_type and at which version (`read_schema_state`), whether a config can
open it (`check_schema`), and whether appends may skip its triggers
(`check_replica_appends`)."""

from __future__ import annotations

import attrs

from . import _sql
from ._config import EventStoreConfig
from ._errors import NotSupportedError, SchemaMismatchError, SchemaNotInitializedError
from ._pg import Conn

__all__ = [
    "SchemaState",
    "check_replica_appends",
    "check_schema",
    "latest_version",
    "read_schema_state",
]


_TABLES = 6


@attrs.frozen
class SchemaState:
    """What `init` left in a schema."""

    schema: str
    table_count: int
    data_type: str | None
    version: tuple[int, int, int] | None
    lock_key: int | None

    @property
    def initialized(self) -> bool:
        return self.version is not None

    @property
    def empty(self) -> bool:
        return self.table_count == 0


async def read_schema_state(conn: Conn, schema: str) -> SchemaState:
    """(asyncio-flavoured) Inspect ``schema``."""
    row = await conn.fetchrow(_sql.SCHEMA_STATE, schema)
    assert row is not None
    version: tuple[int, int, int] | None = None
    if row["has_migrations"]:
        vrow = await conn.fetchrow(_sql.schema_version(schema))
        if vrow is not None:
            version = (int(vrow[0]), int(vrow[1]), int(vrow[2]))
    return SchemaState(
        schema=schema,
        table_count=int(row["table_count"]),
        data_type=row["data_type"],
        version=version,
        lock_key=row["lock_key"],
    )


def latest_version() -> tuple[int, int, int]:
    return _sql.MIGRATIONS[-1][0] if _sql.MIGRATIONS else _sql.SCHEMA_VERSION


def check_schema(state: SchemaState, config: EventStoreConfig) -> None:
    """Raise unless ``state`` is a store this config can open.

    Raises:
        SchemaNotInitializedError: no event store in the schema.
        SchemaMismatchError: another column_data_type, or a layout this library does not know.
    """
    if not state.initialized or state.table_count < _TABLES:
        hint = "run `trio-eventstore init`" if state.empty else "the schema is partly initialised"
        raise SchemaNotInitializedError(
            f"schema {state.schema!r} of database {config.database_name!r} holds no event "
            f"store: {hint}"
        )
    if state.data_type != config.column_data_type:
        raise SchemaMismatchError(
            f"schema {state.schema!r} was initialised with column_data_type "
            f"{state.data_type!r}, but the config says {config.column_data_type!r}"
        )
    assert state.version is not None
    if state.version > latest_version():
        raise SchemaMismatchError(
            f"schema {state.schema!r} is at version {_dotted(state.version)}, newer than this "
            f"library knows ({_dotted(latest_version())})"
        )
    if state.version < latest_version():
        raise SchemaMismatchError(
            f"schema {state.schema!r} is at version {_dotted(state.version)}: run "
            f"`trio-eventstore migrate` to bring it to {_dotted(latest_version())}"
        )


def _dotted(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))


async def check_replica_appends(conn: Conn, schema: str) -> None:
    """(asyncio-flavoured, on a ``replica_appends`` connection) Raise unless appends
    on ``conn`` may skip the triggers of ``schema``'s tables: the connection runs with
    ``session_replication_role = replica``, and the tables carry no trigger or rule
    (not disabled), foreign key or deferrable constraint beyond the Elixir layout's
    (those would go unenforced).

    Raises:
        NotSupportedError: what would go unenforced, or the setting did not hold.
    """
    row = await conn.fetchrow(
        _sql.REPLICA_APPENDS_CHECK, schema, list(_sql.REPLICA_TRIGGERS), list(_sql.REPLICA_KEYS)
    )
    assert row is not None
    if row["role"] != "replica":
        raise NotSupportedError(
            "replica_appends: the connections run with session_replication_role = "
            f"{row['role']!r}, not 'replica' (a proxy in between dropped the setting?)"
        )
    extra = [
        f"{kind} {', '.join(names)}"
        for kind, names in (
            ("triggers", row["triggers"]),
            ("foreign keys", row["keys"]),
            ("rules", row["rules"]),
            ("deferrable constraints", row["deferrable"]),
        )
        if names
    ]
    if extra:
        effect = "would skip them"
        if any("(enabled " in name for name in [*row["triggers"], *row["rules"]]):
            # ENABLE ALWAYS / REPLICA: they fire, but what they write is not checked.
            effect += (
                ", or run those enabled always or replica with the triggers and foreign "
                "keys of what they write skipped"
            )
        raise NotSupportedError(
            f"replica_appends: the tables of schema {schema!r} carry {'; '.join(extra)} "
            "beyond the event store's own; appends with session_replication_role = replica "
            f"{effect} (drop or disable them, or open the store without replica_appends)"
        )
