"""The write path's storage: events encoded before any I/O (`encode_events`), appends
to any number of streams in one statement or, for big batches, one transaction
(`append_batch`, `append`), links (`link`), and each append's outcome. `_storage`
re-exports these names; the group-commit writer (`_writer`) batches the appends."""

from __future__ import annotations

import datetime
import re
import uuid
from collections.abc import Sequence
from functools import partial

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
    shown,
)
from ._pg import Conn, Database, Row, waiting_out_overload
from ._serialization import Serializer
from ._types import EventData, ExpectedVersion, RecordedEvent

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
]


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
        data = serializer.serialize(event.data)
        metadata = serializer.serialize_metadata(event.metadata)
        if type(data) is not bytes:
            data = _payload(serializer, "serialize", data)
        if type(metadata) is not bytes:
            metadata = _payload(serializer, "serialize_metadata", metadata)
        encoded.append(
            EncodedEvent(
                event_id=event.event_id,
                event_type=event_type,
                causation_id=event.causation_id,
                correlation_id=event.correlation_id,
                data=data,
                metadata=metadata,
            )
        )
    return encoded


def _payload(serializer: Serializer, method: str, value: object) -> bytes:
    """What a serializer's ``method`` returned, as bytes: a bytes-like value is copied;
    anything else is refused here, before it is queued (in a batch it would fail the
    batch's other appends)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise SerializationError(
        f"{type(serializer).__name__}.{method} returned {type(value).__name__}, not bytes"
    )


def refuse_repeated_ids(stream_uuid: str, ids: Sequence[uuid.UUID]) -> None:
    """Raise DuplicateEventError naming the first event id given twice in one append or
    link (before any I/O)."""
    if len(set(ids)) == len(ids):
        return
    seen: set[uuid.UUID] = set()
    for event_id in ids:
        if event_id in seen:
            raise DuplicateEventError(
                f"event {event_id} is given twice for {shown(stream_uuid)}",
                stream_uuid=stream_uuid,
                event_id=event_id,
            )
        seen.add(event_id)


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
        refuse_repeated_ids(stream_uuid, [e.event_id for e in events])
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
        event_id = _key_event_id(exc.detail)
        named = f"event {event_id}" if event_id is not None else "an event"
        where = (
            f"already in stream {shown(stream_uuid)}"  # a link of an event the stream holds
            if exc.constraint_name == "stream_events_pkey"
            else f"already stored (writing to stream {shown(stream_uuid)})"
        )
        return DuplicateEventError(
            f"{named} is {where}", stream_uuid=stream_uuid, event_id=event_id
        )
    if _data_refused(exc):
        # A data exception (class 22: text that is not JSON, a number beyond numeric's
        # range, ...) or a program limit (class 54: a jsonb document too large or too
        # deep): what a serializer gave for one of the events.
        kind = SerializationError if (exc.sqlstate or "").startswith("22") else EventTooLargeError
        return kind(f"the database rejected the event data: {exc}")
    return exc


def _data_refused(exc: DatabaseError) -> bool:
    """Whether the server refused an event's data (`_translate_write_error`)."""
    return exc.sqlstate is not None and exc.sqlstate[:2] in ("22", "54")


def _event_columns(events: Sequence[EncodedEvent]) -> list[list[object]]:
    """The events' rows as the statements take them: one array per column."""
    return [
        [e.event_id for e in events],
        [e.event_type for e in events],
        [e.causation_id for e in events],
        [e.correlation_id for e in events],
        [e.data for e in events],
        [e.metadata for e in events],
    ]


def batch_statement(
    config: EventStoreConfig,
    requests: Sequence[AppendRequest],
    *,
    pipelined: bool = False,
    notify: bool = False,
) -> tuple[str, tuple[object, ...], datetime.datetime]:
    """`_sql.append_batch`, its parameters for ``requests`` and the created_at they
    give the events (no I/O). ``pipelined``: the parameters of its first part;
    ``notify``: the statement sends the notifications (see `Database.replica`)."""
    sql = _sql.append_batch(
        config.schema,
        config.column_data_type,
        lone=len(requests) == 1,
        pipelined=pipelined,
        notify=notify,
    )
    created_at = datetime.datetime.now(datetime.UTC)
    events = [e for r in requests for e in r.events]
    params: tuple[object, ...] = (
        [r.stream_uuid for r in requests],
        [len(r.events) for r in requests],
        [r.kind for r in requests],
        [r.version for r in requests],
        [k for k, r in enumerate(requests, 1) for _ in r.events],
        [p for r in requests for p in range(1, len(r.events) + 1)],
        *_event_columns(events),
        created_at,
    )
    if pipelined:
        params += (1,)
    return sql, params, created_at


def _all_part(params: tuple[object, ...]) -> tuple[object, ...]:
    """The parameters of a pipelined `_sql.append_batch`'s `$all` part, from those of
    its first part: the events' appends, positions and ids, and created_at."""
    empty: list[object] = []
    return (
        empty,
        empty,
        empty,
        empty,
        *params[4:7],
        empty,
        empty,
        empty,
        empty,
        empty,
        params[12],
        2,
    )


def batch_outcomes(
    requests: Sequence[AppendRequest],
    rows: Sequence[Row],
    created_at: datetime.datetime,
    all_base: int = 0,
) -> list[Outcome]:
    """Each request's outcome, from the rows `batch_statement` returned (``all_base``:
    what the `$all` part of a ``pipelined`` statement returned)."""
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


#: A batch of at least this many events (an append alone: `ALL_APART_LONE_EVENTS`) is
#: written as two statements sent together (`_write_batch`): its `$all` part holds the
#: `$all` lock over half the foreign-key checks.
ALL_APART_EVENTS = 256
ALL_APART_LONE_EVENTS = 100


def _lone_step(request: AppendRequest) -> str:
    kind, version = request.kind, request.version
    if kind == _sql.EXPECT_NO_STREAM or (kind == _sql.EXPECT_VERSION and version == 0):
        return _sql.LONE_NEW
    if kind == _sql.EXPECT_VERSION:
        return _sql.LONE_VERSION
    return _sql.LONE_EXISTS if kind == _sql.EXPECT_EXISTS else _sql.LONE_ANY


def lone_statement(
    config: EventStoreConfig, request: AppendRequest, *, notify: bool = False
) -> tuple[str, list[object], datetime.datetime]:
    """`_sql.append_lone` for ``request``, its parameters and the created_at they give
    the events (no I/O). ``notify``: as `batch_statement`'s."""
    step = _lone_step(request)
    events = request.events
    single = len(events) == 1
    sql = _sql.append_lone(
        config.schema, config.column_data_type, step, single=single, notify=notify
    )
    created_at = datetime.datetime.now(datetime.UTC)
    params: list[object] = [request.stream_uuid]
    if single:
        (e,) = events
        params += [e.event_id, e.event_type, e.causation_id, e.correlation_id, e.data, e.metadata]
    else:
        params += _event_columns(events)
    params.append(created_at)
    if step == _sql.LONE_VERSION:
        params.append(request.version)
    return sql, params, created_at


async def _write_lone(db: Database, request: AppendRequest) -> Appended | None:
    """``request`` in `_sql.append_lone`'s one lean statement; None when it wrote
    nothing (the general statement then tells why)."""
    sql, params, created_at = lone_statement(db.config, request, notify=db.replica)
    row = await db.fetchrow_direct(sql, *params, statements=1 + len(request.events) // 1000)
    if row is None:
        return None
    n = len(request.events)
    return Appended(int(row["before"]) + n, int(row["base"]) + 1, created_at)


async def _write_batch(
    db: Database, requests: Sequence[AppendRequest], *, contended: bool = True
) -> list[Outcome]:
    """Write ``requests`` (distinct streams, distinct event ids) in one statement; a
    batch of `ALL_APART_EVENTS` or more (an append alone: `ALL_APART_LONE_EVENTS`) in
    two, sent together (one round trip, one transaction: `_sql.append_batch`
    ``pipelined``): the streams' rows, then `$all`, so that the foreign-key checks of
    the streams' rows run before `$all` is locked, in parallel with other writers, and
    the lock is held over the `$all` rows' checks and the commit only.

    Not ``contended`` (the caller knows of no other append in flight): an append alone
    goes in the one lean statement whatever its size (the second execution and the
    hand-over between them cost a lone big append 15-20%, and there is nobody to
    share the `$all` lock with)."""
    n_events = sum(len(r.events) for r in requests)
    if len(requests) == 1 and (n_events < ALL_APART_LONE_EVENTS or not contended):
        appended = await _write_lone(db, requests[0])
        if appended is not None:
            return [appended]
        # Refused, or a case the lean statement leaves to the general one: it says why.
    if n_events < (ALL_APART_LONE_EVENTS if len(requests) == 1 else ALL_APART_EVENTS) or (
        len(requests) == 1 and not contended
    ):
        sql, params, created_at = batch_statement(db.config, requests, notify=db.replica)
        rows = await db.fetch_direct(sql, *params, statements=1 + n_events // 1000)
        return batch_outcomes(requests, rows, created_at)

    sql, params, created_at = batch_statement(
        db.config, requests, pipelined=True, notify=db.replica
    )
    rows = await db.fetchmany_direct(
        sql, [params, _all_part(params)], statements=2 + 2 * n_events // 1000
    )
    base = next((int(r["all_base"]) for r in rows if r["k"] == 0), 0)
    return batch_outcomes(requests, [r for r in rows if r["k"] != 0], created_at, base)


#: SQLSTATE deadlock_detected. Writers lock stream rows in one order, `$all` last, yet
#: PostgreSQL can still find a cycle between two statements writing the same stream: one
#: that has locked a row's newest version reaches it again through the version its
#: snapshot sees, and queues on the heavyweight lock of that old version behind a
#: waiter that waits for it. The statement aborted wrote nothing: it is sent again, up to
#: this many times in all (a writer that locks in another order, another program's, can
#: deadlock with it too).
DEADLOCK, DEADLOCK_ATTEMPTS = "40P01", 5


async def append_batch(
    db: Database, requests: Sequence[AppendRequest], *, contended: bool = True
) -> list[Outcome]:
    """Write appends to distinct streams, with distinct event ids, together: one
    statement, one commit. Each gets its own outcome; a refused one wrote nothing.
    ``contended``: see `_write_batch`.

    Raises only what fails them all (StorageUnavailableError, ...)."""
    for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
        try:
            return await _write_batch(db, requests, contended=contended)
        except DatabaseError as exc:
            if exc.sqlstate == DEADLOCK and attempt < DEADLOCK_ATTEMPTS:
                continue  # aborted whole (one statement, or two in one transaction)
            # A duplicate event id committed while the statement ran (its check did not
            # see it), or data the database refused in one of the appends: only the
            # culprit fails.
            if exc.sqlstate != "23505" and not _data_refused(exc):
                raise
            if len(requests) == 1:
                return [_translate_write_error(exc, requests[0].stream_uuid)]
            break
    # Rare: write them one by one. From the first one's commit on, the batch must never
    # be written again: each waits out an overloaded pool on its own, and an error that
    # fails one (the database gone, ...) is its own outcome.
    outcomes: list[Outcome] = []
    for request in requests:
        try:
            (outcome,) = await waiting_out_overload(partial(append_batch, db, [request]))
        except EventStoreError as exc:
            outcome = exc
        outcomes.append(outcome)
    return outcomes


async def append(db: Database, request: AppendRequest, *, contended: bool = True) -> Appended:
    """Append atomically, in one statement (one round trip). ``contended``: see
    `_write_batch`."""
    for _ in range(10):
        outcome = (await append_batch(db, [request], contended=contended))[0]
        if isinstance(outcome, EventStoreError):
            raise outcome
        if outcome is not None:
            return outcome
    raise StorageUnavailableError(f"stream {shown(request.stream_uuid)} is being created elsewhere")


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


#: A link aborted by these wrote nothing and is made again: a deadlock (`DEADLOCK`; with
#: a writer that locks in another order, such as a hard delete of another program that
#: deletes the events before it takes their stream's row) and an event deleted (hard)
#: after the link found it, before its foreign-key check.
_LINK_AGAIN = frozenset({DEADLOCK, "23503"})


async def link(
    db: Database, stream_uuid: str, expected: ExpectedVersion | int, event_ids: list[uuid.UUID]
) -> int:
    """Link existing events into a stream, in one statement; returns its new version."""
    sql = _sql.link_events(db.config.schema)
    kind, version = _expectation(expected)

    async def unit(conn: Conn) -> Row | None:
        return await conn.fetchrow(sql, stream_uuid, kind, version, event_ids)

    again: DatabaseError | None = None  # what aborted the last attempt, if anything did
    for _ in range(10):
        try:
            row = await db.run(unit, statements=1 + len(event_ids) // 1000)
        except DatabaseError as exc:
            if exc.sqlstate in _LINK_AGAIN:
                again = exc
                continue  # it wrote nothing; again, it sees what the other one did
            raise _translate_write_error(exc, stream_uuid) from exc
        again = None
        assert row is not None
        outcome, before = int(row["outcome"]), int(row["before"])
        if outcome == _sql.APPEND_OK:
            return before + len(event_ids)
        if outcome == _sql.APPEND_DUPLICATE:
            raise EventNotFoundError(event_ids=row["missing"])
        if outcome != _sql.APPEND_RETRY:
            raise _refusal(stream_uuid, expected, outcome, before)
    if again is not None:
        raise _translate_write_error(again, stream_uuid) from again
    raise StorageUnavailableError(f"stream {shown(stream_uuid)} is being created elsewhere")
