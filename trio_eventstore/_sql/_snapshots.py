"""Rows of the ``snapshots`` table: snapshots, and the records of parked events."""

from __future__ import annotations

from ._quoting import _data_columns, _stored, quote_ident

#: Rows of ``snapshots`` that are parked events' records (their ``source_type``), which
#: the snapshot operations neither read, replace nor delete.
NOT_A_RECORD = "source_type NOT IN ('$parked', '$replay')"


def upsert_snapshot(schema: str, column_data_type: str, *, snapshot: bool = False) -> str:
    """Parameters: source_uuid, source_version, source_type, data, metadata, created_at.
    ``snapshot``: a user's snapshot, which never replaces a parked event's record (then
    it returns no row; else one)."""
    data = _stored("$4", column_data_type)
    meta = _stored("$5", column_data_type, metadata=True)
    return (
        f"INSERT INTO {quote_ident(schema)}.snapshots "
        "(source_uuid, source_version, source_type, data, metadata, created_at) "
        f"VALUES ($1, $2, $3, {data}, {meta}, $6) "
        "ON CONFLICT (source_uuid) DO UPDATE SET source_version = EXCLUDED.source_version, "
        "source_type = EXCLUDED.source_type, data = EXCLUDED.data, "
        "metadata = EXCLUDED.metadata, created_at = EXCLUDED.created_at"
        + (f" WHERE snapshots.{NOT_A_RECORD} RETURNING 1" if snapshot else "")
    )


def read_snapshot(schema: str, column_data_type: str) -> str:
    """Parameter: source_uuid. A snapshot (never a parked event's record)."""
    cols = _data_columns(column_data_type)
    return (
        f"SELECT e.source_uuid, e.source_version, e.source_type, {cols}, e.created_at "
        f"FROM {quote_ident(schema)}.snapshots e WHERE e.source_uuid = $1 AND e.{NOT_A_RECORD}"
    )


def delete_snapshot(schema: str) -> str:
    """Parameter: source_uuid. A snapshot (never a parked event's record)."""
    return f"DELETE FROM {quote_ident(schema)}.snapshots WHERE source_uuid = $1 AND {NOT_A_RECORD}"


# -- parked events: one row of the snapshots table per parked event -------------------------
#
# A parked event's record (why, how often, when) is a row of ``snapshots``: source_uuid
# "$parked-<name>|<stream>|<event id>", source_version its position in the subscription's
# stream, source_type "$parked" (or "$replay" once a replay is asked for), data a JSON
# object. No table, column or function is added (the layout stays Elixir's).


def parked_records(schema: str, column_data_type: str) -> str:
    """Parameters: the parked stream ("$parked-<name>"), the key prefix. The records of
    one subscription; none at once (no scan) when its parked stream does not exist."""
    s = quote_ident(schema)
    cols = _data_columns(column_data_type)
    return (
        f"SELECT e.source_uuid, e.source_version, e.source_type, {cols}, e.created_at "
        f"FROM {s}.snapshots e "
        f"WHERE EXISTS (SELECT 1 FROM {s}.streams WHERE stream_uuid = $1) "
        "AND starts_with(e.source_uuid, $2) AND e.source_type IN ('$parked', '$replay') "
        "ORDER BY e.source_version"
    )


def mark_parked(schema: str) -> str:
    """Parameters: keys, new source_type, the source_type they must have. Returns the
    keys changed."""
    return (
        f"UPDATE {quote_ident(schema)}.snapshots SET source_type = $2 "
        "WHERE source_uuid = ANY($1::text[]) AND source_type = $3 RETURNING source_uuid"
    )


def delete_parked(schema: str) -> str:
    """Parameter: keys. Returns the keys deleted."""
    return (
        f"DELETE FROM {quote_ident(schema)}.snapshots "
        "WHERE source_uuid = ANY($1::text[]) AND source_type IN ('$parked', '$replay') "
        "RETURNING source_uuid"
    )
