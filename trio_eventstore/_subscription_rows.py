"""A persistent subscription's rows as a whole: its own row and its partition groups'
(``<name>#g<group>/<groups>``, `_balance.group_name`), found by name, deleted together,
and seeded when the number of groups changes. Only names `group_name` makes count as
groups: a subscription of the user's own named ``orders#archive`` is not one of
``orders``'s."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs

from . import _sql, _storage
from ._balance import group_name, split_group_name
from ._pg import Conn, Database
from ._types import StartFrom

__all__ = [
    "SubscriptionRow",
    "delete_rows",
    "rows_of",
    "seed_groups",
    "subscription_rows",
]


@attrs.frozen
class SubscriptionRow:
    """One row of a subscription: its own (``group`` None) or one partition group's."""

    subscription_id: int
    name: str
    last_seen: int
    group: int | None = None
    groups: int | None = None


async def rows_of(
    conn: Conn, schema: str, stream_uuid: str, name: str, *, lock: bool = False
) -> list[SubscriptionRow]:
    """The rows of subscription ``name``: its own, if any, and its groups' of any number
    of groups (``lock``: until the transaction ends)."""
    found = []
    for row in await conn.fetch(_sql.subscription_rows(schema, lock=lock), stream_uuid, name):
        row_name = str(row["subscription_name"])
        group = groups = None
        if row_name != name:
            parsed = split_group_name(row_name)
            if parsed is None or parsed[0] != name:
                continue  # another subscription whose name starts the same
            _, group, groups = parsed
        ident, last_seen = int(row["subscription_id"]), int(row["last_seen"] or 0)
        found.append(SubscriptionRow(ident, row_name, last_seen, group, groups))
    return found


async def subscription_rows(db: Database, stream_uuid: str, name: str) -> list[SubscriptionRow]:
    """`rows_of`, in a unit of its own."""
    return await db.run(lambda conn: rows_of(conn, db.config.schema, stream_uuid, name))


async def delete_rows(
    db: Database,
    stream_uuid: str,
    name: str,
    also: Callable[[Conn, list[SubscriptionRow]], Awaitable[object]] | None = None,
) -> bool:
    """Delete the subscription's row and every group's, in one transaction, after
    ``also(conn, rows)`` (what else goes with them, in the same transaction); False when
    it has none."""
    schema = db.config.schema

    async def unit(conn: Conn) -> bool:
        rows = await rows_of(conn, schema, stream_uuid, name, lock=True)
        if rows:
            if also is not None:
                await also(conn, rows)
            await conn.execute(_sql.delete_subscriptions(schema), [r.subscription_id for r in rows])
        return bool(rows)

    return await db.transaction(unit, statements=4 if also is None else 8)


async def seed_groups(
    db: Database, stream_uuid: str, name: str, groups: int, start_from: StartFrom | int
) -> int:
    """Create the rows of ``groups`` partition groups that do not exist yet, in one
    transaction, and delete the rows of any other number of groups; returns the lowest
    checkpoint of the groups.

    New rows start where no event can be skipped (at least once): at the lowest
    checkpoint of the other number's groups when there are any (their keys are spread
    over the groups differently, so each new group may have keys of every old one),
    else at ``start_from`` (with CURRENT and some of the groups there already, at their
    lowest checkpoint).
    """
    schema = db.config.schema

    async def unit(conn: Conn) -> int:
        rows = [r for r in await rows_of(conn, schema, stream_uuid, name, lock=True) if r.groups]
        current = [r for r in rows if r.groups == groups]
        others = [r for r in rows if r.groups != groups]
        missing = sorted(set(range(groups)) - {r.group for r in current})
        if not missing:
            initial = min(r.last_seen for r in current)
        elif others:
            initial = min(r.last_seen for r in others)
        elif current and start_from is StartFrom.CURRENT:
            initial = min(r.last_seen for r in current)
        else:
            initial = await _storage.start_position(conn, schema, stream_uuid, start_from)
        if missing:
            names = [group_name(name, group, groups) for group in missing]
            await conn.execute(_sql.create_subscriptions(schema), stream_uuid, names, initial)
        if others:
            await conn.execute(
                _sql.delete_subscriptions(schema), [r.subscription_id for r in others]
            )
        return min([initial, *(r.last_seen for r in current)])

    return await db.transaction(unit, statements=6)
