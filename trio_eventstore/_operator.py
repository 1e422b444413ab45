"""Operator commands behind the ``trio-eventstore`` command line: list streams and
subscriptions with their lag, show streams and events, reset or delete a subscription
safely (refused while any node holds its lock), say what ``drop``/``reset`` would destroy."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from . import _parking, _schema_state, _sql, _storage, _subscription_rows
from ._arguments import check_int, parse_event_id
from ._config import EventStoreConfig
from ._errors import (
    DatabaseNotFoundError,
    SubscriptionAlreadyExistsError,
    SubscriptionNotFoundError,
)
from ._locks import lock_key2
from ._pg import Conn, open_connection
from ._store import EventStore
from ._subscription_rows import SubscriptionRow
from ._types import RecordedEvent

__all__ = [
    "Destruction",
    "delete_subscription",
    "destruction",
    "event_dict",
    "parked_command",
    "read_event",
    "reset_subscription",
    "store_config",
    "subscriptions_with_lag",
]


async def store_config(config: EventStoreConfig) -> EventStoreConfig:
    """``config`` with the column data type the schema was initialised with (the
    commands read any store, whatever ``column_data_type`` the environment says)."""
    try:
        async with open_connection(config, role=f"operator {config.schema}") as conn:
            state = await conn.run(lambda c: _schema_state.read_schema_state(c, config.schema))
    except DatabaseNotFoundError:
        return config  # opening the store will say so
    if state.data_type == "jsonb" and config.column_data_type != "jsonb":
        return attrs.evolve(config, column_data_type="jsonb")
    if state.data_type == "bytea" and config.column_data_type != "bytea":
        return attrs.evolve(config, column_data_type="bytea")
    return config


@attrs.frozen
class Destruction:
    """What ``drop`` or ``reset`` would destroy: ``name`` (the database or schema, which
    an operator types to confirm) and a description with sizes."""

    name: str
    description: str


def size_text(size: int) -> str:
    """Bytes for people, as ``pg_size_pretty`` writes them."""
    value = float(size)
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if value < 10 * 1024 or unit == "TB":
            return f"{value:.0f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


async def destruction(config: EventStoreConfig, task: str) -> Destruction | None:
    """What ``task`` (``"drop"`` or ``"reset"``) would destroy, or None when there is
    nothing (no such database or schema, or no store to reset: the task then says so)."""
    database, schema = config.database_name, config.schema
    try:
        async with open_connection(config, role=f"operator {schema}") as conn:
            sizes = {row["schema"]: row for row in await conn.fetch(_sql.SCHEMA_SIZES)}
            if task == "drop" and schema == "public":
                total = int(await conn.fetchval(_sql.DATABASE_SIZE))
                tables = ", ".join(
                    f"{row['tables']} in {name}" for name, row in sizes.items() if row["tables"]
                )
                return Destruction(
                    database,
                    f"the whole database {database!r} ({size_text(total)}; tables: "
                    f"{tables or 'none'}), not only the event store",
                )
            if schema not in sizes:
                return None
            row = sizes[schema]
            where = f"schema {schema!r} in database {database!r}"
            size = f"{size_text(int(row['bytes']))} in {row['tables']} tables"
            if task == "drop":
                return Destruction(schema, f"{where} ({size})")
            state = await conn.run(lambda c: _schema_state.read_schema_state(c, schema))
            if not state.initialized:
                return None  # reset refuses it
            head = await conn.fetch(_sql.stream_info(schema), "$all")
            events = int(head[0]["stream_version"]) if head else 0
            return Destruction(
                schema,
                f"every event ({events}), stream, subscription and snapshot in {where} ({size})",
            )
    except DatabaseNotFoundError:
        return None


def event_dict(event: RecordedEvent) -> dict[str, Any]:
    return {
        "event_number": event.event_number,
        "event_id": str(event.event_id),
        "stream_uuid": event.stream_uuid,
        "stream_version": event.stream_version,
        "event_type": event.event_type,
        "data": event.data if not hasattr(event.data, "__dict__") else repr(event.data),
        "metadata": event.metadata,
        "causation_id": str(event.causation_id) if event.causation_id else None,
        "correlation_id": str(event.correlation_id) if event.correlation_id else None,
        "created_at": event.created_at.isoformat(),
    }


async def subscriptions_with_lag(store: EventStore) -> list[dict[str, Any]]:
    """Every subscription row, with its stream's head, the lag behind it, and the
    session holding its lock, if any (Elixir or Python, on any machine: from pg_locks
    and pg_stat_activity). Standbys try the lock now and then: they do not show."""
    rows = await store._db.fetch(_sql.list_subscriptions(store.config.schema))
    key1 = store._subscriptions.lock_key1 & 0xFFFFFFFF  # pg_locks shows it unsigned
    holders = {int(h["key2"]): h for h in await store._db.fetch(_sql.SUBSCRIPTION_HOLDERS, key1)}
    result = []
    for row in rows:
        try:
            head = (await store.stream_info(row["stream_uuid"])).stream_version
        except LookupError:
            head = 0
        last_seen = int(row["last_seen"] or 0)
        holder = holders.get(lock_key2(int(row["subscription_id"])))
        result.append(
            {
                "subscription_id": row["subscription_id"],
                "stream_uuid": row["stream_uuid"],
                "subscription_name": row["subscription_name"],
                "last_seen": last_seen,
                "head": head,
                "lag": max(0, head - last_seen),
                "state": "held" if holder is not None else "free",
                "holder_pid": holder["pid"] if holder is not None else None,
                "holder": _holder_text(holder) if holder is not None else None,
                "holder_since": (
                    holder["backend_start"].isoformat()
                    if holder is not None and holder["backend_start"] is not None
                    else None
                ),
                "created_at": row["created_at"].isoformat(),
            }
        )
    return result


def _holder_text(holder: Any) -> str:
    """``application_name@client_addr`` of a lock holder's session."""
    name = holder["application_name"] or "?"
    addr = holder["client_addr"] or "local"
    return f"{name}@{addr}"


async def parked_command(
    store: EventStore, action: str, stream_uuid: str, name: str, event_ids: list[str] | None
) -> tuple[list[dict[str, Any]], str]:
    """``trio-eventstore parked list|replay|discard``: rows to print and a footer."""
    if action == "list":
        parked = await store.parked_events(stream_uuid, name)
        rows = [
            {
                "event_number": p.event.event_number,
                "event_id": str(p.event.event_id),
                "event_type": p.event.event_type,
                "stream": f"{p.event.stream_uuid}/{p.event.stream_version}",
                "attempts": p.attempts,
                "error": p.error,
                "parked_at": p.parked_at.isoformat(),
                "replay_requested": p.replay_requested,
            }
            for p in parked
        ]
        return rows, f"{len(rows)} parked events"
    ids = [parse_event_id(i, "--event") for i in event_ids] if event_ids else None
    if action == "replay":
        count = await store.replay_parked(stream_uuid, name, ids)
        return [], f"{count} parked events to be replayed"
    count = await store.discard_parked(stream_uuid, name, ids)
    return [], f"{count} parked events discarded"


async def read_event(store: EventStore, event_id: str) -> RecordedEvent:
    """The event with this id, as its original stream holds it.

    Raises:
        ValueError: not a UUID.
        LookupError: no such event.
    """
    ident = parse_event_id(event_id)
    config = store.config
    rows = await store._db.fetch(_sql.read_event(config.schema, config.column_data_type), ident)
    if not rows:
        raise LookupError(f"no event {event_id}")
    [event] = _storage.recorded(config, rows)
    return event


async def _while_nobody_runs_it(
    config: EventStoreConfig,
    stream_uuid: str,
    name: str,
    change: Callable[[Conn, list[SubscriptionRow]], Awaitable[object]],
    *,
    position: int | None = None,
) -> None:
    """Run ``change(conn, rows)`` on the subscription's rows (its own and its partition
    groups'), in one transaction, holding their locks (so no node runs it). With a
    ``position``, it must not be beyond the head of the stream (``$all``: the last event
    number).

    Raises:
        ValueError: the position is beyond the head.
        SubscriptionNotFoundError: no such subscription.
        SubscriptionAlreadyExistsError: a node (Elixir or Python) holds it (or one of
            its groups) right now.
    """
    schema = config.schema
    locked: list[tuple[int, int]] = []

    async def lock(conn: Conn) -> list[SubscriptionRow]:
        rows = await _subscription_rows.rows_of(conn, schema, stream_uuid, name)
        if not rows:
            raise SubscriptionNotFoundError(stream_uuid=stream_uuid, subscription_name=name)
        state = await _schema_state.read_schema_state(conn, schema)
        assert state.lock_key is not None
        for row in rows:
            key = (state.lock_key, lock_key2(row.subscription_id))
            if not await conn.fetchval(_sql.TRY_LOCK, *key):
                what = repr(name) if row.group is None else f"{name!r} (group {row.name!r})"
                raise SubscriptionAlreadyExistsError(
                    f"subscription {what} on {stream_uuid!r} is active on another node "
                    "(its lock is held); stop it first",
                    stream_uuid=stream_uuid,
                    subscription_name=name,
                )
            locked.append(key)
        if position is not None:
            info = await conn.fetchrow(_sql.stream_info(schema), stream_uuid)
            head = int(info["stream_version"]) if info is not None else 0
            if position > head:
                raise ValueError(
                    f"position {position} is beyond the head of {stream_uuid!r} "
                    f"({head}): subscription {name!r} would skip every event appended "
                    f"up to {position}; give --force to set it anyway"
                )
        return rows

    async def unlock(conn: Conn) -> None:
        for key in locked:
            await conn.fetchval(_sql.UNLOCK, *key)

    # The locks are the session's: taken before the transaction, released after it.
    async with open_connection(config, session_mode=True, role=f"operator {schema}") as conn:
        try:
            rows = await conn.run(lock)
            await conn.transaction(lambda c: change(c, rows))
        finally:
            if locked:
                await conn.run(unlock)


async def delete_subscription(config: EventStoreConfig, stream_uuid: str, name: str) -> None:
    """Delete a subscription (its checkpoint and its parked events; with partition
    groups, every group's), in one transaction, unless some node runs it."""

    async def delete(conn: Conn, rows: list[SubscriptionRow]) -> None:
        names = [row.name for row in rows]
        await _parking.delete_subscription_records(conn, config, stream_uuid, names)
        await conn.execute(
            _sql.delete_subscriptions(config.schema), [row.subscription_id for row in rows]
        )

    await _while_nobody_runs_it(config, stream_uuid, name, delete)


async def reset_subscription(
    config: EventStoreConfig, stream_uuid: str, name: str, position: int, *, force: bool = False
) -> None:
    """Set a subscription's checkpoint to ``position`` (its next event is position + 1);
    with partition groups, every group's.

    Raises:
        ValueError: ``position`` is beyond the stream's head (the subscription would skip
            every event appended up to it), unless ``force``.
        SubscriptionNotFoundError: no such subscription.
        SubscriptionAlreadyExistsError: a node (Elixir or Python) holds it right now.
    """
    check_int("position", position, minimum=0)

    async def reset(conn: Conn, rows: list[SubscriptionRow]) -> None:
        await conn.execute(
            _sql.reset_subscriptions(config.schema), [row.subscription_id for row in rows], position
        )

    await _while_nobody_runs_it(
        config, stream_uuid, name, reset, position=None if force else position
    )
