"""Snapshots: the snapshots table's rows (record, read, delete), serialized with the
store's serializer and checked before any I/O."""

from __future__ import annotations

import datetime

from . import _sql
from ._appends import _translate_write_error
from ._arguments import check_indexed
from ._btree import MAX_RAW_BYTES
from ._errors import (
    DatabaseError,
    SerializationError,
    SnapshotNotFoundError,
    UnknownEventTypeError,
    shown,
)
from ._pg import Conn, Database
from ._serialization import Serializer
from ._storable import check_storable_snapshot
from ._types import RESERVED_SOURCE_TYPES, SnapshotData

__all__ = ["delete_snapshot", "read_snapshot", "record_snapshot"]


def _source_type_of(serializer: Serializer, data: object) -> str:
    try:
        return serializer.event_type_of(data)
    except UnknownEventTypeError:
        raise
    except SerializationError:
        raise SerializationError(
            f"cannot name the source type of a snapshot of a {type(data).__name__}: register "
            "its class, or give SnapshotData(source_type=...) for plain JSON values"
        ) from None


async def record_snapshot(db: Database, snapshot: SnapshotData) -> None:
    check_indexed(
        "source_uuid",
        "snapshot ids",
        (snapshot.source_uuid,),
        f"at most {MAX_RAW_BYTES} bytes of text that does not compress",
    )
    serializer = db.config.serializer
    source_type = snapshot.source_type or _source_type_of(serializer, snapshot.data)
    if source_type in RESERVED_SOURCE_TYPES:  # a class registered under one of them
        raise ValueError(
            f"source_type {source_type!r} (the type {type(snapshot.data).__name__} is "
            "registered under) is the store's own (parked events' records): register the "
            "class under another type, or give SnapshotData(source_type=...)"
        )
    data = serializer.serialize(snapshot.data)
    metadata = serializer.serialize_metadata(snapshot.metadata)
    check_storable_snapshot(source_type, data, metadata, db.config.column_data_type)
    created_at = snapshot.created_at or datetime.datetime.now(datetime.UTC)
    sql = _sql.upsert_snapshot(db.config.schema, db.config.column_data_type, snapshot=True)

    async def unit(conn: Conn) -> object:
        return await conn.fetchval(
            sql,
            snapshot.source_uuid,
            snapshot.source_version,
            source_type,
            data,
            metadata,
            created_at,
        )

    try:
        written = await db.transaction(unit)
    except DatabaseError as exc:
        raise _translate_write_error(exc, snapshot.source_uuid) from exc
    if written is None:
        raise ValueError(
            f"source_uuid {shown(snapshot.source_uuid)} is a parked event's record (the store "
            "keeps them in the snapshots table): give the snapshot another id"
        )


async def read_snapshot(db: Database, source_uuid: str) -> SnapshotData:
    sql = _sql.read_snapshot(db.config.schema, db.config.column_data_type)
    rows = await db.fetch(sql, source_uuid)
    if not rows:
        raise SnapshotNotFoundError(source_uuid=source_uuid)
    r = rows[0]
    serializer = db.config.serializer
    return SnapshotData(
        source_uuid=r["source_uuid"],
        source_version=r["source_version"],
        source_type=r["source_type"],
        data=serializer.deserialize(r["data"], r["source_type"]),
        metadata=serializer.deserialize_metadata(r["metadata"]),
        created_at=r["created_at"].astimezone(datetime.UTC),
    )


async def delete_snapshot(db: Database, source_uuid: str) -> None:
    await db.execute(_sql.delete_snapshot(db.config.schema), source_uuid)
