"""Streams and their events: stream rows, reads, deletes, pagination, and the
notifications of the ``streams`` table's trigger.
"""

from __future__ import annotations

import functools

from ._quoting import _data_columns, quote_ident


@functools.lru_cache(maxsize=64)  # built once per schema: a hot path
def stream_info(schema: str) -> str:
    """Parameter: stream_uuid."""
    return (
        "SELECT stream_id, stream_uuid, stream_version, created_at, deleted_at "
        f"FROM {quote_ident(schema)}.streams WHERE stream_uuid = $1"
    )


#: Parameter: stream_uuid. Locks the stream's row for the rest of the transaction.
def lock_stream(schema: str) -> str:
    return (
        "SELECT stream_id, stream_version, deleted_at "
        f"FROM {quote_ident(schema)}.streams WHERE stream_uuid = $1 FOR UPDATE"
    )


def _select_events(schema: str, column_data_type: str) -> str:
    """The columns a read returns, in the order `_storage` reads them by position, from
    stream_events ``se`` joined to the original stream and the event."""
    s = quote_ident(schema)
    return (
        "SELECT se.stream_version AS event_number, e.event_id, s.stream_uuid, "
        "se.original_stream_version AS stream_version, e.event_type, e.causation_id, "
        f"e.correlation_id, {_data_columns(column_data_type)}, e.created_at "
        f"FROM {s}.stream_events se "
        f"JOIN {s}.streams s ON s.stream_id = se.original_stream_id "
        f"JOIN {s}.events e ON e.event_id = se.event_id "
    )


@functools.lru_cache(maxsize=64)  # built once per schema: a hot path
def read_stream(schema: str, column_data_type: str, *, forward: bool) -> str:
    """Parameters: stream_id, start version (inclusive), count."""
    op, order = (">=", "ASC") if forward else ("<=", "DESC")
    return (
        _select_events(schema, column_data_type)
        + f"WHERE se.stream_id = $1 AND se.stream_version {op} $2 "
        f"ORDER BY se.stream_version {order} LIMIT $3"
    )


def _event_bytes(column_data_type: str) -> str:
    """An event's stored size, without detoasting it (jsonb: its stored, possibly
    compressed, size)."""
    if column_data_type == "bytea":
        return "octet_length(e.data) + coalesce(octet_length(e.metadata), 0)"
    return "pg_column_size(e.data) + coalesce(pg_column_size(e.metadata), 0)"


def read_stream_bounded(schema: str, column_data_type: str) -> str:
    """Parameters: stream_id, start version (inclusive), count, bytes. A forward page
    that stops at the first event whose running size reaches ``bytes`` (so it holds at
    least one event): the `read_stream` columns, then ``running_bytes``. Events past
    the cut are neither detoasted nor sent."""
    s = quote_ident(schema)
    size = _event_bytes(column_data_type)
    data = _data_columns(column_data_type, table="")
    return (
        "SELECT event_number, event_id, stream_uuid, stream_version, event_type, "
        f"causation_id, correlation_id, {data}, created_at, running_bytes FROM ("
        "SELECT se.stream_version AS event_number, e.event_id, s.stream_uuid, "
        "se.original_stream_version AS stream_version, e.event_type, e.causation_id, "
        "e.correlation_id, e.data, e.metadata, e.created_at, "
        f"sum({size}) OVER (ORDER BY se.stream_version ROWS UNBOUNDED PRECEDING) "
        f"AS running_bytes, {size} AS event_bytes "
        f"FROM {s}.stream_events se "
        f"JOIN {s}.streams s ON s.stream_id = se.original_stream_id "
        f"JOIN {s}.events e ON e.event_id = se.event_id "
        "WHERE se.stream_id = $1 AND se.stream_version >= $2 "
        "ORDER BY se.stream_version ASC LIMIT $3"
        ") page WHERE running_bytes - event_bytes < $4 ORDER BY event_number ASC"
    )


@functools.lru_cache(maxsize=64)  # built once per schema: a hot path
def read_event(schema: str, column_data_type: str) -> str:
    """Parameter: event_id. The event, numbered as in ``$all``."""
    return _select_events(schema, column_data_type) + "WHERE se.event_id = $1 AND se.stream_id = 0"


def read_events_by_id(schema: str, column_data_type: str) -> str:
    """Parameter: event ids. Those events, numbered as in ``$all``."""
    return (
        _select_events(schema, column_data_type)
        + "WHERE se.event_id = ANY($1::uuid[]) AND se.stream_id = 0"
    )


def soft_delete_stream(schema: str) -> str:
    """Parameter: stream_id."""
    return f"UPDATE {quote_ident(schema)}.streams SET deleted_at = now() WHERE stream_id = $1"


def hard_delete_stream(schema: str) -> str:
    """Parameter: stream_id. Removes the stream's own events with every link to them,
    the links in the stream, and the stream row; events only linked into the stream stay.
    (Foreign keys are checked at the end of the statement, when all of it is gone.)"""
    s = quote_ident(schema)
    return (
        "WITH doomed AS ("
        f"  SELECT event_id FROM {s}.stream_events WHERE stream_id = $1 AND original_stream_id = $1"
        "), gone_links AS ("
        f"  DELETE FROM {s}.stream_events WHERE stream_id = $1"
        "   OR event_id IN (SELECT event_id FROM doomed) RETURNING 1"
        "), gone_events AS ("
        f"  DELETE FROM {s}.events WHERE event_id IN (SELECT event_id FROM doomed) RETURNING 1"
        f") DELETE FROM {s}.streams WHERE stream_id = $1"
    )


#: The columns `paginate_streams` sorts by (Elixir's `query_streams`).
STREAM_SORT_COLUMNS = ("stream_id", "stream_uuid", "stream_version", "created_at", "deleted_at")


def paginate_streams(schema: str, sort_by: str, sort_dir: str) -> str:
    """Parameters: LIKE pattern (or NULL), limit, offset. Every row, ``$all`` (stream_id 0)
    included, as Elixir's `query_streams`; the search is case-sensitive (``LIKE``, whose
    escape character is the backslash). `sort_by`/`sort_dir` must be validated by the
    caller (they are a column name and a keyword); ties are broken by stream_id."""
    assert sort_by in STREAM_SORT_COLUMNS
    assert sort_dir in ("ASC", "DESC")
    return (
        "SELECT stream_id, stream_uuid, stream_version, created_at, deleted_at, "
        "count(*) OVER () AS total "
        f"FROM {quote_ident(schema)}.streams "
        "WHERE $1::text IS NULL OR stream_uuid LIKE $1 "
        f"ORDER BY {sort_by} {sort_dir}, stream_id {sort_dir} LIMIT $2 OFFSET $3"
    )


def count_streams(schema: str) -> str:
    """Parameter: LIKE pattern (or NULL). Elixir's `count_streams`."""
    return (
        f"SELECT count(*) FROM {quote_ident(schema)}.streams "
        "WHERE $1::text IS NULL OR stream_uuid LIKE $1"
    )


# -- notifications ---------------------------------------------------------------------------


def stream_versions(schema: str) -> str:
    """Parameter: array of stream_uuid. The id and current version of each existing
    stream."""
    return (
        f"SELECT stream_uuid, stream_id, stream_version FROM {quote_ident(schema)}.streams "
        "WHERE stream_uuid = ANY($1::text[])"
    )


def notification_channel(schema: str) -> str:
    """The channel `notify_events()` uses: the schema name + '.events', as an identifier."""
    return f"{schema}.events"


def listen(schema: str) -> str:
    """LISTEN on `notification_channel`."""
    return f"LISTEN {quote_ident(notification_channel(schema))}"


def notify_stream(schema: str) -> str:
    """Parameter: stream_uuid. A notification of the stream at its current version (as
    `notify_events()` sends for an append): a hint to re-read it, nothing more."""
    channel = notification_channel(schema).replace("'", "''")
    return (
        f"SELECT pg_catalog.pg_notify('{channel}', stream_uuid || ',' || stream_id || ',' "
        "|| stream_version || ',' || stream_version) "
        f"FROM {quote_ident(schema)}.streams WHERE stream_uuid = $1"
    )
