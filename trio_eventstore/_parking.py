"""Parked events: the events a persistent subscription has set aside, kept in the store.

Where they live (no table, column or function is added: the layout stays Elixir's):

* each parked event is linked into the stream ``$parked-<subscription name>`` (once: a
  link keeps the original event, and any reader, an Elixir one too, can read the stream);
* its *park record* (why, how often, when, and whether a replay was asked for) is a row
  of the ``snapshots`` table: ``source_uuid`` ``"$parked-<name>|<stream>|<event id>"``,
  ``source_version`` the event's position in the subscription's stream, ``source_type``
  ``"$parked"`` (``"$replay"`` once a replay is asked for) and ``data`` a JSON object.
  Records, unlike events, can be changed and deleted: a replay marks them, the holder
  deletes them once the event is acknowledged, a discard deletes them, and so does
  deleting the subscription. They never show in ``$all`` (no subscriber or projection
  sees them).

A replay or discard asks the subscription's holder (whichever node holds its lock) by
a notification of its parked stream; the holder also re-reads the records at every
notifier poll while it has parked events, so a lost notification only delays it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import attrs

from . import _sql, _storage
from ._config import EventStoreConfig
from ._errors import DuplicateEventError, EventNotFoundError, SerializationError
from ._pg import Conn, Database, Row
from ._subscription_types import ParkedEvent
from ._types import ANY_VERSION, RecordedEvent, UndecodedEvent

__all__ = [
    "PARKED",
    "REPLAY",
    "ParkRecord",
    "decode_rows",
    "delete_records",
    "delete_subscription_records",
    "discard_parked",
    "list_parked",
    "load_records",
    "notify",
    "parked_stream",
    "read_parked_events",
    "record_key",
    "replay_parked",
    "set_state",
    "write_record",
]

logger = logging.getLogger("trio_eventstore.subscriptions")

#: ``source_type`` of a park record: parked; a replay was asked for.
PARKED, REPLAY = "$parked", "$replay"


def parked_stream(name: str) -> str:
    """The stream the events parked by subscription ``name`` are linked into."""
    return f"$parked-{name}"


def _prefix(stream_uuid: str, name: str) -> str:
    return f"$parked-{name}|{stream_uuid}|"


def record_key(stream_uuid: str, name: str, event_id: uuid.UUID) -> str:
    return _prefix(stream_uuid, name) + str(event_id)


@attrs.define
class ParkRecord:
    """One parked event of one subscription, as its record says."""

    key: str
    event_id: uuid.UUID
    #: its position in the subscription's stream
    number: int
    error: str
    attempts: int
    parked_at: datetime.datetime
    replay: bool = False

    def data(self, stream_uuid: str, name: str) -> bytes:
        return json.dumps(
            {
                "subscription_name": name,
                "stream_uuid": stream_uuid,
                "event_id": str(self.event_id),
                "event_number": self.number,
                "error": self.error,
                "attempts": self.attempts,
                "parked_at": self.parked_at.isoformat(),
            }
        ).encode()


def _record(row: Row, stream_uuid: str, name: str) -> ParkRecord | None:
    try:
        data: dict[str, Any] = json.loads(bytes(row["data"]))
        if data.get("stream_uuid") != stream_uuid or data.get("subscription_name") != name:
            return None  # another subscription's whose key shares the prefix
        return ParkRecord(
            key=row["source_uuid"],
            event_id=uuid.UUID(data["event_id"]),
            number=int(row["source_version"]),
            error=str(data.get("error", "")),
            attempts=int(data.get("attempts", 0)),
            parked_at=row["created_at"].astimezone(datetime.UTC),
            replay=row["source_type"] == REPLAY,
        )
    except (ValueError, KeyError, TypeError):
        logger.warning("ignoring an unreadable park record %r", row["source_uuid"])
        return None


def decode_rows(config: EventStoreConfig, rows: list[Row]) -> list[RecordedEvent]:
    """Decode rows of `_sql.read_stream`; an event the serializer cannot decode comes
    back as an `UndecodedEvent` (the others decode as usual)."""
    try:
        return _storage.recorded(config, rows)
    except SerializationError:
        pass
    events: list[RecordedEvent] = []
    for row in rows:
        try:
            events.extend(_storage.recorded(config, [row]))
        except SerializationError as exc:
            events.append(_undecoded(config, row, exc))
    return events


def _undecoded(config: EventStoreConfig, row: Row, exc: SerializationError) -> UndecodedEvent:
    metadata = None
    if row[8] is not None and row[8] != b"null":
        try:
            metadata = config.serializer.deserialize_metadata(row[8])
        except SerializationError:
            metadata = None
    created_at = row[9].astimezone(datetime.UTC)
    return UndecodedEvent(
        row[0], row[1], row[2], row[3], row[4], bytes(row[7]), metadata, row[5], row[6],
        created_at, f"{type(exc).__name__}: {exc}",
    )  # fmt: skip


async def load_records(db: Database, stream_uuid: str, name: str) -> list[ParkRecord]:
    """The park records of a subscription, by position (one query; no scan when it has
    never parked anything)."""
    config = db.config
    rows = await db.fetch(
        _sql.parked_records(config.schema, config.column_data_type),
        parked_stream(name),
        _prefix(stream_uuid, name),
    )
    return [r for r in (_record(row, stream_uuid, name) for row in rows) if r is not None]


async def read_parked_events(
    db: Database, records: Sequence[ParkRecord]
) -> dict[uuid.UUID, RecordedEvent]:
    """The original events of ``records``, numbered by their position in the
    subscription's stream (an event since hard-deleted is left out)."""
    if not records:
        return {}
    config = db.config
    sql = _sql.read_events_by_id(config.schema, config.column_data_type)
    rows = await db.fetch(sql, [r.event_id for r in records])
    found = {event.event_id: event for event in decode_rows(config, rows)}
    return {
        r.event_id: attrs.evolve(found[r.event_id], event_number=r.number)
        for r in records
        if r.event_id in found
    }


async def write_record(
    db: Database, stream_uuid: str, name: str, event: RecordedEvent, record: ParkRecord
) -> None:
    """Park ``event``: link it into its parked stream (once), then store its record."""
    # Parked before (then replayed), or hard-deleted: the record is the truth.
    with contextlib.suppress(DuplicateEventError, EventNotFoundError):
        await _storage.link(db, parked_stream(name), ANY_VERSION, [event.event_id])
    config = db.config
    sql = _sql.upsert_snapshot(config.schema, config.column_data_type)
    source_type = REPLAY if record.replay else PARKED
    data = record.data(stream_uuid, name)

    async def unit(conn: Conn) -> None:
        await conn.execute(
            sql, record.key, record.number, source_type, data, b"null", record.parked_at
        )

    await db.transaction(unit)


async def set_state(db: Database, keys: list[str], new: str, old: str) -> int:
    """Mark records ``new`` (`PARKED` or `REPLAY`) where they are ``old``."""
    rows = await db.fetch(_sql.mark_parked(db.config.schema), keys, new, old)
    return len(rows)


async def delete_records(db: Database, keys: list[str]) -> set[str]:
    if not keys:
        return set()
    rows = await db.fetch(_sql.delete_parked(db.config.schema), keys)
    return {row[0] for row in rows}


async def delete_subscription_records(
    conn: Conn, config: EventStoreConfig, stream_uuid: str, names: Sequence[str]
) -> int:
    """Delete every park record of the subscription rows ``names`` of ``stream_uuid``
    (a subscription's own row, or its groups'), in the caller's transaction, and notify
    their parked streams (at commit: a holder on another node forgets them, as after a
    discard); returns how many. The links in the parked streams stay, as a discard's.

    Only records that say they are of one of ``names`` on ``stream_uuid`` go: a key
    prefix alone is shared by another subscription whose name extends one of them with
    ``|...`` (`_record` checks each)."""
    if not names:
        return 0
    wanted = set(names)
    rows = await conn.fetchmany(
        _sql.parked_records(config.schema, config.column_data_type),
        [(parked_stream(name), _prefix(stream_uuid, name)) for name in names],
    )
    keys: dict[str, str] = {}  # key: its row's name
    for row in rows:
        data_name = _owner(row)
        if data_name in wanted and _record(row, stream_uuid, data_name) is not None:
            keys[row["source_uuid"]] = data_name
    if not keys:
        return 0
    deleted = await conn.fetch(_sql.delete_parked(config.schema), list(keys))
    changed = sorted({keys[row[0]] for row in deleted})
    if changed:
        await conn.fetchmany(
            _sql.notify_stream(config.schema), [(parked_stream(name),) for name in changed]
        )
    return len(deleted)


def _owner(row: Row) -> str | None:
    """The subscription (row) name a park record says it is of, if it is readable."""
    try:
        name = json.loads(bytes(row["data"])).get("subscription_name")
    except (ValueError, TypeError, AttributeError):
        return None
    return name if isinstance(name, str) else None


async def notify(db: Database, name: str) -> None:
    """Tell the holder (on any node) that the records of ``name`` changed."""
    await db.execute(_sql.notify_stream(db.config.schema), parked_stream(name))


def _chosen(records: list[ParkRecord], event_ids: Sequence[uuid.UUID] | None) -> list[ParkRecord]:
    if event_ids is None:
        return records
    wanted = set(event_ids)
    return [r for r in records if r.event_id in wanted]


async def list_parked(db: Database, stream_uuid: str, name: str) -> list[ParkedEvent]:
    records = await load_records(db, stream_uuid, name)
    events = await read_parked_events(db, records)
    return [
        ParkedEvent(events[r.event_id], r.error, r.attempts, r.parked_at, r.replay)
        for r in records
        if r.event_id in events
    ]


async def replay_parked(
    db: Database, stream_uuid: str, name: str, event_ids: Sequence[uuid.UUID] | None
) -> int:
    """Ask the holder to deliver parked events again; returns how many were marked."""
    records = _chosen(await load_records(db, stream_uuid, name), event_ids)
    keys = [r.key for r in records if not r.replay]
    if not keys:
        return 0
    marked = await set_state(db, keys, REPLAY, PARKED)
    await notify(db, name)
    return marked


async def discard_parked(
    db: Database, stream_uuid: str, name: str, event_ids: Sequence[uuid.UUID] | None
) -> int:
    """Forget parked events (their links stay in the parked stream); returns how many."""
    records = _chosen(await load_records(db, stream_uuid, name), event_ids)
    deleted = await delete_records(db, [r.key for r in records])
    if deleted:
        await notify(db, name)
    return len(deleted)
