"""Storage operations on the rows of streams, events and subscriptions: the write path
(encode, append, link), reads (stream pages, the subscription drivers' paged reads),
delete, paginate, subscription rows. Units of work here are asyncio-flavoured functions
of a `Conn`, run by `_pg` in one bridge crossing; the `async def`s taking a `Database`
are Trio-flavoured (schema state: `_schema_state`; snapshots: `_snapshots`)."""

from __future__ import annotations

import datetime
import re
import uuid
from collections.abc import Sequence

import attrs

from . import _sql
from ._config import EventStoreConfig
from ._errors import (
    DatabaseError,
    DuplicateEventError,
    EventNotFoundError,
    EventStoreError,
    EventTooLargeError,
    SerializationError,
    StorageUnavailableError,
    StreamDeletedError,
    StreamExistsError,
    StreamNotFoundError,
    WrongExpectedVersionError,
)
from ._pg import Conn, Database, Row
from ._serialization import JsonSerializer, Serializer
from ._types import (
    EventData,
    ExpectedVersion,
    Page,
    RecordedEvent,
    StartFrom,
    StreamInfo,
)

__all__ = ["stream_info"]


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


@attrs.frozen
class EncodedEvent:
    """An event ready for the events table (serialized before any I/O)."""

    event_id: uuid.UUID
    event_type: str
    causation_id: uuid.UUID | None
    correlation_id: uuid.UUID | None
    data: bytes
    metadata: bytes


def encode_events(serializer: Serializer, events: Sequence[EventData]) -> list[EncodedEvent]:
    """Serialize ``events``. Raises SerializationError; does no I/O."""
    encoded = []
    for event in events:
        event_type = event.event_type or serializer.event_type_of(event.data)
        encoded.append(
            EncodedEvent(
                event_id=event.event_id,
                event_type=event_type,
                causation_id=event.causation_id,
                correlation_id=event.correlation_id,
                data=serializer.serialize(event.data),
                metadata=serializer.serialize_metadata(event.metadata),
            )
        )
    return encoded


def _expectation(expected: ExpectedVersion | int) -> tuple[int, int]:
    """``expected`` as the (kind, version) parameters of `_sql.append_batch`."""
    if expected is ExpectedVersion.ANY_VERSION:
        return _sql.EXPECT_ANY, 0
    if expected is ExpectedVersion.NO_STREAM:
        return _sql.EXPECT_NO_STREAM, 0
    if expected is ExpectedVersion.STREAM_EXISTS:
        return _sql.EXPECT_EXISTS, 0
    assert isinstance(expected, int)
    return _sql.EXPECT_VERSION, expected


#: Bytes of a row beside its data and metadata (ids, type, both stream_events rows).
ROW_OVERHEAD = 160


@attrs.frozen(eq=False)
class AppendRequest:
    """One append, encoded and checked, ready to be written alone or in a batch."""

    stream_uuid: str
    expected: ExpectedVersion | int
    events: list[EncodedEvent]
    kind: int
    version: int
    #: about how many bytes it sends
    size: int

    @classmethod
    def build(
        cls, stream_uuid: str, expected: ExpectedVersion | int, events: list[EncodedEvent]
    ) -> AppendRequest:
        """Raises DuplicateEventError when an event id occurs twice (before any I/O)."""
        ids = {e.event_id for e in events}
        if len(ids) != len(events):
            raise DuplicateEventError(f"the same event id is given twice for {stream_uuid!r}")
        kind, version = _expectation(expected)
        size = sum(len(e.data) + len(e.metadata) + len(e.event_type) for e in events)
        size += len(stream_uuid) + ROW_OVERHEAD * len(events)
        return cls(stream_uuid, expected, events, kind, version, size)


@attrs.frozen
class Appended:
    """What an append wrote: the stream's new version, the `$all` number of its first
    event (numbers are dense: the others follow) and the events' created_at."""

    version: int
    first_event_number: int
    created_at: datetime.datetime


#: An append's outcome in a batch: written, refused (the error its caller gets), or
#: None: the stream was created concurrently, try again (nothing was written).
Outcome = Appended | EventStoreError | None


def _refusal(
    stream_uuid: str,
    expected: ExpectedVersion | int,
    outcome: int,
    current: int,
    event_id: uuid.UUID | None = None,
) -> EventStoreError:
    """The error of a write the statement refused (``outcome``, an ``APPEND_*``)."""
    if outcome == _sql.APPEND_DELETED:
        return StreamDeletedError(stream_uuid=stream_uuid)
    if outcome == _sql.APPEND_EXISTS:
        return StreamExistsError(stream_uuid=stream_uuid, expected=expected, current=current)
    if outcome == _sql.APPEND_NOT_FOUND:
        return StreamNotFoundError(stream_uuid=stream_uuid)
    if outcome == _sql.APPEND_WRONG_VERSION:
        return WrongExpectedVersionError(
            stream_uuid=stream_uuid, expected=expected, current=current
        )
    assert outcome == _sql.APPEND_DUPLICATE, outcome
    return DuplicateEventError(stream_uuid=stream_uuid, event_id=event_id)


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _key_event_id(detail: str | None) -> uuid.UUID | None:
    """The event id in a unique violation's DETAIL ("Key (event_id)=(...) already
    exists."; None when the server does not say)."""
    found = _UUID.search(detail or "")
    return uuid.UUID(found.group()) if found else None


def _translate_write_error(exc: DatabaseError, stream_uuid: str) -> EventStoreError:
    if exc.sqlstate == "23505" and exc.constraint_name in ("events_pkey", "stream_events_pkey"):
        return DuplicateEventError(
            f"an event id is already in stream {stream_uuid!r}: {exc}",
            stream_uuid=stream_uuid,
            event_id=_key_event_id(exc.detail),
        )
    if exc.sqlstate == "22P02" or exc.sqlstate == "22021":
        return SerializationError(f"the database rejected the event data: {exc}")
    if exc.sqlstate == "54000":  # program_limit_exceeded: e.g. a jsonb document too large
        return EventTooLargeError(f"the database rejected the event data: {exc}")
    return exc


#: SQLSTATEs after which a failed batch is written again one append at a time: a
#: duplicate event id committed while the statement ran (its check did not see it), or
#: data the database refused in one of the appends.
_SPLIT_STATES = frozenset({"23505", "22P02", "22021"})


def batch_statement(
    config: EventStoreConfig, requests: Sequence[AppendRequest], *, all_apart: bool = False
) -> tuple[str, tuple[object, ...], datetime.datetime]:
    """`_sql.append_batch`, its parameters for ``requests`` and the created_at they
    give the events (no I/O)."""
    sql = _sql.append_batch(
        config.schema, config.column_data_type, lone=len(requests) == 1, all_apart=all_apart
    )
    created_at = datetime.datetime.now(datetime.UTC)
    events = [e for r in requests for e in r.events]
    params = (
        [r.stream_uuid for r in requests],
        [len(r.events) for r in requests],
        [r.kind for r in requests],
        [r.version for r in requests],
        [k for k, r in enumerate(requests, 1) for _ in r.events],
        [p for r in requests for p in range(1, len(r.events) + 1)],
        [e.event_id for e in events],
        [e.event_type for e in events],
        [e.causation_id for e in events],
        [e.correlation_id for e in events],
        [e.data for e in events],
        [e.metadata for e in events],
        created_at,
    )
    return sql, params, created_at


def batch_outcomes(
    requests: Sequence[AppendRequest],
    rows: Sequence[Row],
    created_at: datetime.datetime,
    all_base: int = 0,
) -> list[Outcome]:
    """Each request's outcome, from the rows `batch_statement` returned (``all_base``:
    what `_sql.append_to_all` returned, after a statement written ``all_apart``)."""
    outcomes: list[Outcome] = []
    for request, row in zip(requests, rows, strict=True):
        outcome, before = int(row["outcome"]), int(row["before"])
        if outcome == _sql.APPEND_OK:
            n = len(request.events)
            first = all_base + int(row["all_base"]) + 1
            outcomes.append(Appended(before + n, first, created_at))
        elif outcome == _sql.APPEND_RETRY:
            outcomes.append(None)
        else:
            outcomes.append(
                _refusal(
                    request.stream_uuid, request.expected, outcome, before, row["duplicate_id"]
                )
            )
    return outcomes


#: A batch of at least this many events is written in a transaction of two statements
#: (`_write_batch`): its round trips cost little next to its foreign-key checks.
ALL_APART_EVENTS = 256


async def _write_batch(db: Database, requests: Sequence[AppendRequest]) -> list[Outcome]:
    """Write ``requests`` (distinct streams, distinct event ids) in one statement; a
    batch of `ALL_APART_EVENTS` or more in one transaction: the streams' rows, then
    `$all` (`_sql.append_to_all`), so that the foreign-key checks of the streams'
    rows run before `$all` is locked, in parallel with other writers, and the lock is
    held over the `$all` rows' checks only."""
    n_events = sum(len(r.events) for r in requests)
    if n_events < ALL_APART_EVENTS:
        sql, params, created_at = batch_statement(db.config, requests)

        async def unit(conn: Conn) -> list[Row]:
            return await conn.fetch(sql, *params)

        rows = await db.run(unit, statements=1 + n_events // 1000)
        return batch_outcomes(requests, rows, created_at)

    sql, params, created_at = batch_statement(db.config, requests, all_apart=True)
    to_all = _sql.append_to_all(db.config.schema)

    async def apart(conn: Conn) -> tuple[list[Row], int]:
        rows = await conn.fetch(sql, *params)
        ids: list[uuid.UUID] = []
        stream_ids: list[int] = []
        versions: list[int] = []
        for request, row in zip(requests, rows, strict=True):
            if row["outcome"] == _sql.APPEND_OK:
                before = int(row["before"])
                ids += [e.event_id for e in request.events]
                stream_ids += [int(row["stream_id"])] * len(request.events)
                versions += range(before + 1, before + 1 + len(request.events))
        base = int(await conn.fetchval(to_all, ids, stream_ids, versions)) if ids else 0
        return rows, base

    rows, base = await db.transaction(apart, statements=4 + 2 * n_events // 1000)
    return batch_outcomes(requests, rows, created_at, base)


async def append_batch(db: Database, requests: Sequence[AppendRequest]) -> list[Outcome]:
    """Write appends to distinct streams, with distinct event ids, together: one
    statement, one commit. Each gets its own outcome; a refused one wrote nothing.

    Raises only what fails them all (StorageUnavailableError, ...)."""
    try:
        return await _write_batch(db, requests)
    except DatabaseError as exc:
        if exc.sqlstate not in _SPLIT_STATES:
            raise
        if len(requests) == 1:
            return [_translate_write_error(exc, requests[0].stream_uuid)]
    # Rare: write them one by one, so that only the culprit fails.
    return [(await append_batch(db, [r]))[0] for r in requests]


async def append(db: Database, request: AppendRequest) -> Appended:
    """Append atomically, in one statement (one round trip)."""
    for _ in range(10):
        outcome = (await append_batch(db, [request]))[0]
        if isinstance(outcome, EventStoreError):
            raise outcome
        if outcome is not None:
            return outcome
    raise StorageUnavailableError(f"stream {request.stream_uuid!r} is being created elsewhere")


def recorded_from_append(
    config: EventStoreConfig,
    stream_uuid: str,
    appended: Appended,
    events: list[EncodedEvent],
    *,
    all_numbers: bool,
) -> list[RecordedEvent]:
    """The events of an append as a read would return them (from ``$all`` when
    ``all_numbers``, else from the stream), decoded from the very bytes written."""
    n = len(events)
    first_version = appended.version - n + 1
    first_number = appended.first_event_number if all_numbers else first_version
    deserialize = config.serializer.deserialize
    deserialize_metadata = config.serializer.deserialize_metadata
    return [
        RecordedEvent(
            first_number + i,
            e.event_id,
            stream_uuid,
            first_version + i,
            e.event_type,
            deserialize(e.data, e.event_type),
            deserialize_metadata(e.metadata),
            e.causation_id,
            e.correlation_id,
            appended.created_at,
        )
        for i, e in enumerate(events)
    ]


async def link(
    db: Database, stream_uuid: str, expected: ExpectedVersion | int, event_ids: list[uuid.UUID]
) -> int:
    """Link existing events into a stream, in one statement; returns its new version."""
    sql = _sql.link_events(db.config.schema)
    kind, version = _expectation(expected)

    async def unit(conn: Conn) -> Row | None:
        return await conn.fetchrow(sql, stream_uuid, kind, version, event_ids)

    for _ in range(10):
        try:
            row = await db.run(unit, statements=1 + len(event_ids) // 1000)
        except DatabaseError as exc:
            raise _translate_write_error(exc, stream_uuid) from exc
        assert row is not None
        outcome, before = int(row["outcome"]), int(row["before"])
        if outcome == _sql.APPEND_OK:
            return before + len(event_ids)
        if outcome == _sql.APPEND_DUPLICATE:
            raise EventNotFoundError(event_ids=row["missing"])
        if outcome != _sql.APPEND_RETRY:
            raise _refusal(stream_uuid, expected, outcome, before)
    raise StorageUnavailableError(f"stream {stream_uuid!r} is being created elsewhere")


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
    except SerializationError as exc:
        if type(exc) is not SerializationError:
            raise  # UnknownEventTypeError and the like say what they need to
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
            return SerializationError(
                f"event {r[1]} (number {r[0]}, {r[2]!r} version {r[3]}) cannot be read: {found}"
            )
    return exc


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
                f"stream {stream_uuid!r} has already been deleted", stream_uuid=stream_uuid
            )
        _check_expected(stream_uuid, expected, int(row["stream_version"]))
        if hard:
            await conn.execute(_sql.hard_delete_stream(schema), row["stream_id"])
        else:
            await conn.execute(_sql.soft_delete_stream(schema), row["stream_id"])

    settings = {"eventstore.enable_hard_deletes": "on"} if hard else None
    await db.transaction(unit, settings=settings)


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
        if start_from is StartFrom.ORIGIN:
            initial = 0
        elif start_from is StartFrom.CURRENT:
            row = await conn.fetchrow(_sql.stream_info(schema), stream_uuid)
            initial = 0 if row is None else int(row["stream_version"])
        else:
            initial = start_from
        await conn.execute(_sql.create_subscription(schema), stream_uuid, name, initial)
        row = await conn.fetchrow(_sql.get_subscription(schema), stream_uuid, name)
        assert row is not None
        return int(row["subscription_id"]), int(row["last_seen"] or 0)

    return await db.run(unit)


async def checkpoint_subscription(
    db: Database, stream_uuid: str, name: str, last_seen: int
) -> None:
    await db.execute(_sql.checkpoint_subscription(db.config.schema), stream_uuid, name, last_seen)


async def delete_subscription(db: Database, stream_uuid: str, name: str) -> bool:
    status = await db.execute(_sql.delete_subscription(db.config.schema), stream_uuid, name)
    return status != "DELETE 0"


async def read_page(
    db: Database, stream_uuid: str, after: int, limit: int, stream_id: int | None
) -> tuple[list[RecordedEvent], bool, int | None]:
    """Events above ``after`` (at most ``limit``), whether that reached the head, and
    the stream's id (pass it back: one statement per page then). A stream that does not
    exist (yet) or was deleted reads as empty."""
    config = db.config
    if stream_id is None:
        try:
            events = await read(db, stream_uuid, after + 1, limit, forward=True)
        except (StreamNotFoundError, StreamDeletedError):
            return [], True, None
        if events or stream_uuid == "$all":
            info_id = 0 if stream_uuid == "$all" else None
            if info_id is None:
                info_id = (await stream_info(db, stream_uuid)).stream_id
            return events, len(events) < limit, info_id
        return events, True, None
    events = recorded(config, await read_rows(db, stream_id, after, limit))
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
