"""A projection's position, in the user's schema (never the store's, unless the user
names it): the table of Commanded.Projections.Ecto (``projection_versions``, one row per
projection, its position in ``last_seen_event_number``; a NULL there, which its
migrations allow, is 0); and ``projection_replays``, ours, one row per replayed parked
event a projection applied (below its position: the position cannot tell)."""

from __future__ import annotations

from ._quoting import quote_ident

#: Parameters: schema, table. Whether the table exists (whatever the search path).
TABLE_EXISTS = (
    "SELECT pg_catalog.to_regclass("
    "pg_catalog.quote_ident($1) || '.' || pg_catalog.quote_ident($2)) IS NOT NULL"
)


def create_projection_versions(schema: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {quote_ident(schema)}.projection_versions ("
        "projection_name text PRIMARY KEY, "
        "last_seen_event_number bigint, "
        "inserted_at timestamptz NOT NULL DEFAULT now(), "
        "updated_at timestamptz NOT NULL DEFAULT now())"
    )


def lock_projection_version(schema: str) -> str:
    """Parameter: projection_name. Its position, the row locked until the transaction
    ends (no row: no result)."""
    return (
        "SELECT coalesce(last_seen_event_number, 0) "
        f"FROM {quote_ident(schema)}.projection_versions "
        "WHERE projection_name = $1 FOR UPDATE"
    )


def insert_projection_version(schema: str) -> str:
    """Parameter: projection_name. Its row at position 0, unless it exists (a concurrent
    insert: waits for its outcome)."""
    return (
        f"INSERT INTO {quote_ident(schema)}.projection_versions "
        "(projection_name, last_seen_event_number, inserted_at, updated_at) "
        "VALUES ($1, 0, now(), now()) ON CONFLICT (projection_name) DO NOTHING"
    )


def update_projection_version(schema: str) -> str:
    """Parameters: projection_name, last_seen_event_number."""
    return (
        f"UPDATE {quote_ident(schema)}.projection_versions "
        "SET last_seen_event_number = $2, updated_at = now() WHERE projection_name = $1"
    )


def projection_version(schema: str) -> str:
    """Parameter: projection_name. Its position (no row: no result)."""
    return (
        "SELECT coalesce(last_seen_event_number, 0) "
        f"FROM {quote_ident(schema)}.projection_versions WHERE projection_name = $1"
    )


def create_projection_replays(schema: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {quote_ident(schema)}.projection_replays ("
        "projection_name text NOT NULL, "
        "event_number bigint NOT NULL, "
        "applied_at timestamptz NOT NULL DEFAULT now(), "
        "PRIMARY KEY (projection_name, event_number))"
    )


def mark_projection_replays(schema: str) -> str:
    """Parameters: projection_name, event numbers (bigint[]). The numbers not marked
    before, now marked (a concurrent marker of the same number: waits for its outcome)."""
    return (
        f"INSERT INTO {quote_ident(schema)}.projection_replays (projection_name, event_number) "
        "SELECT $1, n FROM unnest($2::bigint[]) AS n "
        "ON CONFLICT (projection_name, event_number) DO NOTHING RETURNING event_number"
    )
