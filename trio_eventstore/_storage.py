"""Storage operations on rows. Units of work here are asyncio-flavoured functions of a
`Conn`, run by `_pg` in one bridge crossing; the `async def`s taking a `Database` are
Trio-flavoured."""

from __future__ import annotations

import datetime

import attrs

from . import _sql
from ._config import EventStoreConfig
from ._errors import SchemaMismatchError, SchemaNotInitializedError, StreamNotFoundError
from ._pg import Conn, Database
from ._types import StreamInfo

__all__ = ["SchemaState", "check_schema", "read_schema_state", "stream_info"]

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


def _utc(value: datetime.datetime | None) -> datetime.datetime | None:
    return None if value is None else value.astimezone(datetime.UTC)


async def stream_info(db: Database, stream_uuid: str) -> StreamInfo:
    """The stream's row. Raises StreamNotFoundError."""
    sql = _sql.stream_info(db.config.schema)

    async def unit(conn: Conn) -> StreamInfo | None:
        row = await conn.fetchrow(sql, stream_uuid)
        if row is None:
            return None
        created_at = _utc(row["created_at"])
        assert created_at is not None
        return StreamInfo(
            stream_uuid=row["stream_uuid"],
            stream_id=row["stream_id"],
            stream_version=row["stream_version"],
            created_at=created_at,
            deleted_at=_utc(row["deleted_at"]),
        )

    info = await db.run(unit)
    if info is None:
        raise StreamNotFoundError(f"stream {stream_uuid!r} does not exist")
    return info
