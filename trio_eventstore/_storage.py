"""Storage operations on the rows of streams, events and subscriptions: reads (stream
pages, the subscription drivers' paged reads), delete, paginate, subscription rows; the
write path (encode, append, link) is `_appends`, re-exported here. Units of work here
are asyncio-flavoured functions of a `Conn`, run by `_pg` in one bridge crossing; the
`async def`s taking a `Database` are Trio-flavoured (schema state: `_schema_state`;
snapshots: `_snapshots`)."""

from __future__ import annotations

import datetime

from . import _sql
from ._appends import (  # the write path, re-exported: `_storage` is where callers look
    ALL_APART_EVENTS,
    DEADLOCK,
    DEADLOCK_ATTEMPTS,
    Appended,
    AppendRequest,
    EncodedEvent,
    Outcome,
    append,
    append_batch,
    batch_outcomes,
    batch_statement,
    encode_events,
    link,
    lone_statement,
    recorded_from_append,
)
from ._config import EventStoreConfig
from ._errors import (
    DatabaseError,
    SerializationError,
    StreamDeletedError,
    StreamExistsError,
    StreamNotFoundError,
    UnknownEventTypeError,
    WrongExpectedVersionError,
    shown,
)
from ._pg import Conn, Database, Row
from ._serialization import JsonSerializer, Serializer
from ._types import (
    ExpectedVersion,
    Page,
    RecordedEvent,
    StartFrom,
    StreamInfo,
)

__all__ = [
    "ALL_APART_EVENTS",
    "AppendRequest",
    "Appended",
    "EncodedEvent",
    "Outcome",
    "append",
    "append_batch",
    "batch_outcomes",
    "batch_statement",
    "encode_events",
    "link",
    "lone_statement",
    "recorded_from_append",
    "stream_info",
]


def _utc(value: datetime.datetime | None) -> datetime.datetime | None:
    return None if value is None else value.astimezone(datetime.UTC)


async def stream_info(db: Database, stream_uuid: str) -> StreamInfo:
    """The stream's row. Raises StreamNotFoundError."""
    sql = _sql.stream_info(db.config.schema)

    async def unit(conn: Conn) -> Row | None:
        return await conn.fetchrow(sql, stream_uuid)

    row = await db.run(unit)
    if row is None:
        raise StreamNotFoundError(stream_uuid=stream_uuid)
    return _stream_info(row)


def _stream_info(row: Row) -> StreamInfo:
    created_at = _utc(row["created_at"])
    assert created_at is not None
    return StreamInfo(
        stream_uuid=row["stream_uuid"],
        stream_id=row["stream_id"],
        stream_version=row["stream_version"],
        created_at=created_at,
        deleted_at=_utc(row["deleted_at"]),
    )


# -- events ----------------------------------------------------------------------------------


async def read(
    db: Database, stream_uuid: str, start_version: int, count: int, *, forward: bool
) -> list[RecordedEvent]:
    """Read a page of a stream (``$all`` included)."""
    config = db.config
    schema = config.schema
    query = _sql.read_stream(schema, config.column_data_type, forward=forward)
    if not forward and start_version < 0:
        start_version = 2**63 - 1

    async def unit(conn: Conn) -> list[Row]:
        row = await conn.fetchrow(_sql.stream_info(schema), stream_uuid)
        if row is None:
            raise StreamNotFoundError(stream_uuid=stream_uuid)
        if row["deleted_at"] is not None:
            raise StreamDeletedError(stream_uuid=stream_uuid)
        return await conn.fetch(query, row["stream_id"], start_version, count)

    return recorded(config, await db.run(unit))


def recorded(config: EventStoreConfig, rows: list[Row]) -> list[RecordedEvent]:
    """Decode rows of `_sql.read_stream` (as `read` and `read_rows` return them)."""
    if not rows:
        return []
    serializer = config.serializer
    utc = datetime.UTC
    try:
        if type(serializer) is JsonSerializer:  # a page in one pass (not for subclasses)
            datas = serializer.deserialize_many([r[7] for r in rows], [r[4] for r in rows])
            metadatas = serializer.deserialize_metadata_many([r[8] for r in rows])
        else:
            deserialize_metadata = serializer.deserialize_metadata
            datas = list(map(serializer.deserialize, [r[7] for r in rows], [r[4] for r in rows]))
            metadatas = [
                None if r[8] is None or r[8] == b"null" else deserialize_metadata(r[8])
                for r in rows
            ]
    except UnknownEventTypeError as exc:
        row = next((r for r in rows if r[4] == exc.event_type), None)
        if row is None:
            raise
        raise UnknownEventTypeError(
            f"{_event_named(row)} cannot be read: {exc}", event_type=exc.event_type
        ) from exc
    except SerializationError as exc:
        if type(exc) is not SerializationError:
            raise  # EventTooLargeError and the like say what they need to
        raise _naming_the_event(serializer, rows, exc) from exc
    return [
        RecordedEvent(
            r[0],  # event_number
            r[1],  # event_id
            r[2],  # stream_uuid
            r[3],  # stream_version
            r[4],  # event_type
            data,
            metadata,
            r[5],  # causation_id
            r[6],  # correlation_id
            r[9] if r[9].tzinfo is utc else r[9].astimezone(utc),
        )
        for r, data, metadata in zip(rows, datas, metadatas, strict=True)
    ]


def _naming_the_event(
    serializer: Serializer, rows: list[Row], exc: SerializationError
) -> SerializationError:
    """``exc``, with the first event of ``rows`` that does not decode named (rows are
    decoded again one by one, only when a page failed)."""
    for r in rows:
        try:
            serializer.deserialize(r[7], r[4])
            if r[8] is not None and r[8] != b"null":
                serializer.deserialize_metadata(r[8])
        except SerializationError as found:
            return SerializationError(f"{_event_named(r)} cannot be read: {found}")
    return exc


def _event_named(row: Row) -> str:
    """``event <id> (number <n>, '<stream>' version <v>)`` of a `_sql.read_stream` row."""
    return f"event {row[1]} (number {row[0]}, {row[2]!r} version {row[3]})"


def _check_expected(stream_uuid: str, expected: ExpectedVersion | int, current: int) -> None:
    """Raise unless ``expected`` admits an existing stream at ``current``."""
    if expected is ExpectedVersion.NO_STREAM and current:
        raise StreamExistsError(stream_uuid=stream_uuid, expected=expected, current=current)
    if isinstance(expected, int) and current != expected:
        raise WrongExpectedVersionError(stream_uuid=stream_uuid, expected=expected, current=current)


async def delete_stream(
    db: Database, stream_uuid: str, expected: ExpectedVersion | int, *, hard: bool
) -> None:
    schema = db.config.schema

    async def unit(conn: Conn) -> None:
        row = await conn.fetchrow(_sql.lock_stream(schema), stream_uuid)
        if row is None:
            raise StreamNotFoundError(stream_uuid=stream_uuid)
        if row["deleted_at"] is not None and not hard:
            raise StreamDeletedError(
                f"stream {shown(stream_uuid)} has already been deleted", stream_uuid=stream_uuid
            )
        _check_expected(stream_uuid, expected, int(row["stream_version"]))
        if hard:
            await conn.execute(_sql.hard_delete_stream(schema), row["stream_id"])
        else:
            await conn.execute(_sql.soft_delete_stream(schema), row["stream_id"])

    settings = {"eventstore.enable_hard_deletes": "on"} if hard else None
    for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
        try:
            await db.transaction(unit, settings=settings)
        except DatabaseError as exc:
            if exc.sqlstate == DEADLOCK and attempt < DEADLOCK_ATTEMPTS:
                continue  # rolled back whole: nothing deleted
            raise
        return


async def paginate_streams(
    db: Database,
    *,
    page_size: int,
    page_number: int,
    search: str | None,
    sort_by: str,
    sort_dir: str,
) -> Page:
    schema = db.config.schema
    pattern = None
    if search:
        escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
    query = _sql.paginate_streams(schema, sort_by, sort_dir.upper())

    async def unit(conn: Conn) -> tuple[list[Row], int]:
        rows = await conn.fetch(query, pattern, page_size, (page_number - 1) * page_size)
        if rows:
            return rows, int(rows[0]["total"])
        return rows, int(await conn.fetchval(_sql.count_streams(schema), pattern))

    rows, total = await db.run(unit)
    return Page(
        entries=[_stream_info(r) for r in rows],
        page_number=page_number,
        page_size=page_size,
        total_entries=total,
    )


# -- subscriptions ---------------------------------------------------------------------------


async def create_subscription(
    db: Database, stream_uuid: str, name: str, start_from: StartFrom | int
) -> tuple[int, int]:
    """The subscription row, created with ``start_from`` when missing (start_from only
    applies then). Returns (subscription_id, last_seen).

    From the origin the row holds ``last_seen = 0``, as the Elixir library writes it; a
    NULL (rows from older versions) reads as 0, the same position."""
    schema = db.config.schema

    async def unit(conn: Conn) -> tuple[int, int]:
        initial = await start_position(conn, schema, stream_uuid, start_from)
        await conn.execute(_sql.create_subscription(schema), stream_uuid, name, initial)
        row = await conn.fetchrow(_sql.get_subscription(schema), stream_uuid, name)
        assert row is not None
        return int(row["subscription_id"]), int(row["last_seen"] or 0)

    return await db.run(unit)


async def start_position(
    conn: Conn, schema: str, stream_uuid: str, start_from: StartFrom | int
) -> int:
    """The checkpoint a new subscription row gets for ``start_from``: 0 from the origin,
    the stream's version for CURRENT (0 before the stream exists), else the number."""
    if start_from is StartFrom.ORIGIN:
        return 0
    if start_from is StartFrom.CURRENT:
        row = await conn.fetchrow(_sql.stream_info(schema), stream_uuid)
        return 0 if row is None else int(row["stream_version"])
    return start_from


async def checkpoint_subscription(
    db: Database, stream_uuid: str, name: str, last_seen: int
) -> None:
    await db.execute(_sql.checkpoint_subscription(db.config.schema), stream_uuid, name, last_seen)


async def read_page(
    db: Database, stream_uuid: str, after: int, limit: int, stream_id: int | None
) -> tuple[list[RecordedEvent], bool, int | None]:
    """Events above ``after`` (at most ``limit``), whether that reached the head, and
    the id of the stream's row they were read from (pass it back: one statement per page
    then). A stream that does not exist (yet) or was deleted reads as empty (id None)."""
    if stream_id is None:
        stream_id = await readable_stream_id(db, stream_uuid)
        if stream_id is None:
            return [], True, None
    events = recorded(db.config, await read_rows(db, stream_id, after, limit))
    return events, len(events) < limit, stream_id


async def read_rows(
    db: Database, stream_id: int, after: int, limit: int, budget: int | None = None
) -> list[Row]:
    """The rows of events above ``after`` (at most ``limit``) of the stream with this id
    (0: ``$all``), not decoded yet (`recorded` decodes them). ``budget``: the page also
    stops at the first event whose running size reaches this many bytes (it always
    holds one event); `more_rows` then says whether the page was cut."""
    config = db.config
    if budget is None:
        return await db.fetch(
            _sql.read_stream(config.schema, config.column_data_type, forward=True),
            stream_id,
            after + 1,
            limit,
        )
    return await db.fetch(
        _sql.read_stream_bounded(config.schema, config.column_data_type),
        stream_id,
        after + 1,
        limit,
        budget,
    )


def more_rows(rows: list[Row], limit: int, budget: int | None) -> bool:
    """Whether events may follow a page of `read_rows` (it was cut by ``limit`` or by
    ``budget``), or the page reached the head of the stream."""
    if len(rows) >= limit:
        return True
    if budget is None or not rows:
        return False
    running: int = rows[-1][10]
    return running >= budget


def row_bytes(row: Row) -> int:
    """The size of a `read_rows` row's data and metadata, as received."""
    data: bytes = row[7]
    metadata: bytes | None = row[8]
    return len(data) + (0 if metadata is None else len(metadata))


async def readable_stream_id(db: Database, stream_uuid: str) -> int | None:
    """The id of the stream, to read it with `read_rows` (0 for ``$all``); None when it
    does not exist (yet) or was deleted."""
    if stream_uuid == "$all":
        return 0
    try:
        info = await stream_info(db, stream_uuid)
    except StreamNotFoundError:
        return None
    return None if info.deleted_at is not None else info.stream_id


def row_event_number(row: Row) -> int:
    """The event number of a row from `read_rows`."""
    number: int = row[0]
    return number


async def subscription_checkpoint(db: Database, stream_uuid: str, name: str) -> int | None:
    """The stored checkpoint (``last_seen``) of a subscription; None: there is no such
    subscription."""
    rows = await db.fetch(_sql.get_subscription(db.config.schema), stream_uuid, name)
    return int(rows[0]["last_seen"] or 0) if rows else None
