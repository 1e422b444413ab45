"""Every SQL statement and the DDL, as functions of the (quoted) schema name.

The layout is the Elixir EventStore 1.4's (schema version 1.3.2), object for object;
the function bodies are our own. Identifiers from users are always quoted with
`quote_ident`; values are always parameters.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "SCHEMA_VERSION",
    "quote_ident",
    "quote_literal",
]

#: The Elixir EventStore schema version this layout is.
SCHEMA_VERSION = (1, 3, 2)


def quote_ident(name: str) -> str:
    """``name`` as a double-quoted SQL identifier (embedded quotes doubled)."""
    if "\x00" in name:
        raise ValueError("identifiers cannot contain NUL characters")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """``value`` as a standard-conforming SQL string literal (for DDL only)."""
    if "\x00" in value:
        raise ValueError("literals cannot contain NUL characters")
    return "'" + value.replace("'", "''") + "'"


# -- DDL ----------------------------------------------------------------------------------


def create_schema(schema: str) -> str:
    return f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}"


def drop_schema(schema: str) -> str:
    return f"DROP SCHEMA IF EXISTS {quote_ident(schema)} CASCADE"


def create_database(database: str) -> str:
    return f"CREATE DATABASE {quote_ident(database)}"


def drop_database(database: str) -> str:
    return f"DROP DATABASE IF EXISTS {quote_ident(database)}"


DATABASE_EXISTS = "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_database WHERE datname = $1)"
SCHEMA_EXISTS = "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1)"


def init_statements(schema: str, column_data_type: Literal["bytea", "jsonb"]) -> list[str]:
    """The statements of ``mix event_store.init``, in order, for one transaction."""
    if column_data_type not in ("bytea", "jsonb"):
        raise ValueError(f"column_data_type: must be 'bytea' or 'jsonb', got {column_data_type!r}")
    s = quote_ident(schema)
    data = column_data_type
    return [
        # Functions used by the triggers (bodies are ours; names and wiring are Elixir's).
        f"""
CREATE FUNCTION {s}.event_store_exception() RETURNS trigger
LANGUAGE plpgsql AS $body$
BEGIN
  RAISE EXCEPTION USING MESSAGE = 'EventStore: ' || TG_ARGV[0];
END;
$body$""",
        f"""
CREATE FUNCTION {s}.event_store_delete() RETURNS trigger
LANGUAGE plpgsql AS $body$
BEGIN
  IF coalesce(current_setting('eventstore.enable_hard_deletes', true), 'off') = 'on'
     OR coalesce(current_setting('eventstore.reset', true), 'off') = 'on' THEN
    RETURN NULL;  -- a BEFORE ... FOR EACH STATEMENT trigger's result is ignored
  END IF;
  RAISE EXCEPTION USING MESSAGE = 'EventStore: ' || TG_ARGV[0], ERRCODE = 'feature_not_supported';
END;
$body$""",
        f"""
CREATE FUNCTION {s}.notify_events() RETURNS trigger
LANGUAGE plpgsql AS $body$
DECLARE
  first_version bigint;
BEGIN
  -- Payload: '<stream_uuid>,<stream_id>,<first_stream_version>,<last_stream_version>'
  -- on channel '<schema>.events'.
  IF TG_OP = 'UPDATE' THEN
    first_version := OLD.stream_version + 1;
  ELSE
    first_version := 1;
  END IF;
  PERFORM pg_notify(
    TG_TABLE_SCHEMA || '.events',
    NEW.stream_uuid || ',' || NEW.stream_id || ',' || first_version || ',' || NEW.stream_version
  );
  RETURN NULL;
END;
$body$""",
        f"""
CREATE TABLE {s}.streams (
  stream_id bigserial PRIMARY KEY NOT NULL,
  stream_uuid text NOT NULL,
  stream_version bigint DEFAULT 0 NOT NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  deleted_at timestamp with time zone
)""",
        f"CREATE UNIQUE INDEX ix_streams_stream_uuid ON {s}.streams (stream_uuid)",
        # The $all stream: before the notification trigger exists, without the sequence.
        f"INSERT INTO {s}.streams (stream_id, stream_uuid, stream_version) VALUES (0, '$all', 0)",
        f"""
CREATE TRIGGER event_notification AFTER INSERT OR UPDATE ON {s}.streams
FOR EACH ROW EXECUTE PROCEDURE {s}.notify_events()""",
        f"""
CREATE TRIGGER no_delete_streams BEFORE DELETE ON {s}.streams
FOR EACH STATEMENT EXECUTE PROCEDURE {s}.event_store_delete('Cannot delete streams')""",
        f"""
CREATE TABLE {s}.events (
  event_id uuid PRIMARY KEY NOT NULL,
  event_type text NOT NULL,
  causation_id uuid NULL,
  correlation_id uuid NULL,
  data {data} NOT NULL,
  metadata {data} NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL
)""",
        f"""
CREATE TRIGGER no_update_events BEFORE UPDATE ON {s}.events
FOR EACH STATEMENT EXECUTE PROCEDURE {s}.event_store_exception('Cannot update events')""",
        f"""
CREATE TRIGGER no_delete_events BEFORE DELETE ON {s}.events
FOR EACH STATEMENT EXECUTE PROCEDURE {s}.event_store_delete('Cannot delete events')""",
        f"""
CREATE TABLE {s}.stream_events (
  event_id uuid NOT NULL REFERENCES {s}.events (event_id),
  stream_id bigint NOT NULL REFERENCES {s}.streams (stream_id),
  stream_version bigint NOT NULL,
  original_stream_id bigint REFERENCES {s}.streams (stream_id),
  original_stream_version bigint,
  PRIMARY KEY (event_id, stream_id)
)""",
        f"CREATE UNIQUE INDEX ix_stream_events ON {s}.stream_events (stream_id, stream_version)",
        f"""
CREATE TRIGGER no_update_stream_events BEFORE UPDATE ON {s}.stream_events
FOR EACH STATEMENT EXECUTE PROCEDURE {s}.event_store_exception('Cannot update stream events')""",
        f"""
CREATE TRIGGER no_delete_stream_events BEFORE DELETE ON {s}.stream_events
FOR EACH STATEMENT EXECUTE PROCEDURE {s}.event_store_delete('Cannot delete stream events')""",
        f"""
CREATE TABLE {s}.subscriptions (
  subscription_id bigserial PRIMARY KEY NOT NULL,
  stream_uuid text NOT NULL,
  subscription_name text NOT NULL,
  last_seen bigint NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL
)""",
        f"""
CREATE UNIQUE INDEX ix_subscriptions_stream_uuid_subscription_name
ON {s}.subscriptions (stream_uuid, subscription_name)""",
        f"""
CREATE TABLE {s}.snapshots (
  source_uuid text PRIMARY KEY NOT NULL,
  source_version bigint NOT NULL,
  source_type text NOT NULL,
  data {data} NOT NULL,
  metadata {data} NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL
)""",
        f"""
CREATE TABLE {s}.schema_migrations (
  major_version int NOT NULL,
  minor_version int NOT NULL,
  patch_version int NOT NULL,
  migrated_at timestamp with time zone DEFAULT now() NOT NULL,
  PRIMARY KEY (major_version, minor_version, patch_version)
)""",
        record_migration(schema),
    ]


def record_migration(schema: str) -> str:
    """Record `SCHEMA_VERSION` in schema_migrations (the last statement of init)."""
    major, minor, patch = SCHEMA_VERSION
    return (
        f"INSERT INTO {quote_ident(schema)}.schema_migrations "
        f"(major_version, minor_version, patch_version) VALUES ({major}, {minor}, {patch})"
    )


def insert_migration(schema: str) -> str:
    """Parameters: major, minor, patch."""
    return (
        f"INSERT INTO {quote_ident(schema)}.schema_migrations "
        "(major_version, minor_version, patch_version) VALUES ($1, $2, $3)"
    )


#: Migrations above 1.3.2, in order: (version, statements for a schema). Each runs in
#: its own transaction under the migration lock and records its version.
MIGRATIONS: list[tuple[tuple[int, int, int], list[str]]] = []


# -- introspection ------------------------------------------------------------------------

#: Parameter: schema name. One row: whether each table exists, and the data column type.
SCHEMA_STATE = """
SELECT
  pg_catalog.to_regclass(pg_catalog.quote_ident($1) || '.schema_migrations') IS NOT NULL
    AS has_migrations,
  pg_catalog.to_regclass(pg_catalog.quote_ident($1) || '.subscriptions')::oid::int
    AS lock_key,
  (SELECT count(*) FROM pg_catalog.pg_class c
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = $1 AND c.relkind = 'r'
      AND c.relname IN ('streams', 'events', 'stream_events', 'subscriptions', 'snapshots',
                        'schema_migrations')) AS table_count,
  (SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a
    WHERE a.attrelid = pg_catalog.to_regclass(pg_catalog.quote_ident($1) || '.events')
      AND a.attname = 'data' AND NOT a.attisdropped) AS data_type
"""


def schema_version(schema: str) -> str:
    return (
        "SELECT major_version, minor_version, patch_version "
        f"FROM {quote_ident(schema)}.schema_migrations "
        "ORDER BY major_version DESC, minor_version DESC, patch_version DESC LIMIT 1"
    )


# -- locks ---------------------------------------------------------------------------------

#: Parameters: schema name; an init of the same schema serialises on this.
INIT_LOCK = (
    "SELECT pg_catalog.pg_advisory_xact_lock("
    "pg_catalog.hashtext('trio_eventstore.init'), pg_catalog.hashtext($1))"
)

#: Parameters: key1 (the subscriptions table's oid as int). Elixir's migration lock.
MIGRATION_LOCK = "SELECT pg_catalog.pg_advisory_lock($1, -1)"
MIGRATION_UNLOCK = "SELECT pg_catalog.pg_advisory_unlock($1, -1)"


# -- reset ---------------------------------------------------------------------------------


def reset_statements(schema: str) -> list[str]:
    """Empty the store (run with ``eventstore.reset`` on for the transaction)."""
    s = quote_ident(schema)
    return [
        f"TRUNCATE TABLE {s}.snapshots, {s}.subscriptions, {s}.stream_events, {s}.streams, "
        f"{s}.events RESTART IDENTITY CASCADE",
        f"INSERT INTO {s}.streams (stream_id, stream_uuid, stream_version) VALUES (0, '$all', 0)",
    ]


# -- streams -------------------------------------------------------------------------------


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


def create_stream(schema: str) -> str:
    """Parameters: stream_uuid, stream_version. Returns stream_id, or no row when a
    concurrent transaction created the stream first (it then waits for that one)."""
    return (
        f"INSERT INTO {quote_ident(schema)}.streams (stream_uuid, stream_version) "
        "VALUES ($1, $2) ON CONFLICT (stream_uuid) DO NOTHING RETURNING stream_id"
    )


def set_stream_version(schema: str) -> str:
    """Parameters: stream_id, new stream_version."""
    return f"UPDATE {quote_ident(schema)}.streams SET stream_version = $2 WHERE stream_id = $1"


def _stored(expression: str, column_data_type: str) -> str:
    """A bytea value (UTF-8 JSON from the serializer) as the data column stores it."""
    if column_data_type == "bytea":
        return expression
    return f"convert_from({expression}, 'UTF8')::jsonb"


def insert_events(schema: str, column_data_type: str) -> str:
    """Parameters: arrays of event_id, event_type, causation_id, correlation_id, data,
    metadata; created_at."""
    data, meta = _stored("d", column_data_type), _stored("m", column_data_type)
    return (
        f"INSERT INTO {quote_ident(schema)}.events "
        "(event_id, event_type, causation_id, correlation_id, data, metadata, created_at) "
        f"SELECT i, t, c, r, {data}, {meta}, $7 "
        "FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::bytea[], $6::bytea[]) "
        "AS u(i, t, c, r, d, m)"
    )


def append_to_existing_stream(schema: str, column_data_type: str) -> str:
    """An append to an existing stream in ONE statement (atomic on its own, so it needs
    no BEGIN/COMMIT round trips): if the stream exists, is not deleted and is at the
    expected version (NULL: any), bump its version, insert the events, take the next
    `$all` numbers and write both stream_events rows of each event.

    Parameters: stream_uuid, count, expected version or NULL, then the arrays of event
    id, type, causation id, correlation id, data, metadata ($4..$9) and created_at ($10).
    Returns (stream_id, new version), or no row when the stream is missing, deleted or
    at another version; then nothing was written.

    Locks are taken stream row first, then the `$all` row (as in the multi-statement
    path), and held until the statement commits, so `$all` numbers are handed out in
    commit order. Under READ COMMITTED, waiting for a concurrent writer makes Postgres
    re-check the WHERE clause on the row it committed: the expected-version check is
    race-free. The `$all` update reads `st`, so the stream's notification is queued
    before `$all`'s, as the Elixir library sends them.
    """
    s = quote_ident(schema)
    data, meta = _stored("d", column_data_type), _stored("m", column_data_type)
    return (
        "WITH st AS ("
        f" UPDATE {s}.streams SET stream_version = stream_version + $2"
        " WHERE stream_uuid = $1 AND deleted_at IS NULL"
        " AND ($3::bigint IS NULL OR stream_version = $3)"
        " RETURNING stream_id, stream_version - $2 AS before"
        "), ev AS ("
        f" INSERT INTO {s}.events"
        " (event_id, event_type, causation_id, correlation_id, data, metadata, created_at)"
        f" SELECT i, t, c, r, {data}, {meta}, $10"
        " FROM unnest($4::uuid[], $5::text[], $6::uuid[], $7::uuid[], $8::bytea[], $9::bytea[])"
        " AS u(i, t, c, r, d, m) WHERE EXISTS (SELECT 1 FROM st)"
        "), a AS ("
        f" UPDATE {s}.streams SET stream_version = stream_version + $2"
        " WHERE stream_id = 0 AND EXISTS (SELECT 1 FROM st)"
        " RETURNING stream_version - $2 AS base"
        "), se AS ("
        f" INSERT INTO {s}.stream_events"
        " (event_id, stream_id, stream_version, original_stream_id, original_stream_version)"
        " SELECT u.id, x.sid, CASE WHEN x.sid = 0 THEN a.base + u.k ELSE st.before + u.k END,"
        " st.stream_id, st.before + u.k"
        " FROM st, a, unnest($4::uuid[]) WITH ORDINALITY AS u(id, k),"
        " LATERAL (VALUES (st.stream_id), (0::bigint)) AS x(sid)"
        ") SELECT st.stream_id, st.before + $2 AS stream_version, a.base AS all_base"
        " FROM st, a"
    )


def add_to_all_stream(schema: str) -> str:
    """Give a chunk of appended events their `$all` numbers and write both of their
    stream_events rows. Takes the `$all` row lock, held until commit, so numbers are
    handed out in commit order and stay dense. Parameters: stream_id, the stream version
    before the chunk, array of event ids (in order). Returns the `$all` number before the
    chunk."""
    s = quote_ident(schema)
    return (
        "WITH a AS ("
        f" UPDATE {s}.streams SET stream_version = stream_version + cardinality($3::uuid[])"
        " WHERE stream_id = 0 RETURNING stream_version - cardinality($3::uuid[]) AS base"
        "), se AS ("
        f" INSERT INTO {s}.stream_events"
        " (event_id, stream_id, stream_version, original_stream_id, original_stream_version)"
        " SELECT u.id, x.sid, CASE WHEN x.sid = 0 THEN a.base + u.k ELSE $2 + u.k END,"
        " $1, $2 + u.k"
        " FROM a, unnest($3::uuid[]) WITH ORDINALITY AS u(id, k),"
        " (VALUES ($1::bigint), (0::bigint)) AS x(sid)"
        ") SELECT base FROM a"
    )


def insert_stream_events(schema: str) -> str:
    """Parameters: arrays of event_id, stream_id, stream_version, original_stream_id,
    original_stream_version."""
    return (
        f"INSERT INTO {quote_ident(schema)}.stream_events "
        "(event_id, stream_id, stream_version, original_stream_id, original_stream_version) "
        "SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[])"
    )


def find_originals(schema: str) -> str:
    """Parameter: array of event ids. Where each event was first appended."""
    return (
        "SELECT event_id, original_stream_id, original_stream_version "
        f"FROM {quote_ident(schema)}.stream_events WHERE event_id = ANY($1::uuid[]) "
        "AND stream_id = original_stream_id"
    )


def _data_columns(column_data_type: str, table: str = "e.") -> str:
    if column_data_type == "bytea":
        return f"{table}data, {table}metadata"
    return (
        f"convert_to({table}data::text, 'UTF8') AS data, "
        f"convert_to({table}metadata::text, 'UTF8') AS metadata"
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


def paginate_streams(schema: str, sort_by: str, sort_dir: str) -> str:
    """Parameters: search pattern (or NULL), limit, offset. `sort_by`/`sort_dir` must be
    validated by the caller (they are column names)."""
    assert sort_by in ("stream_id", "stream_uuid", "created_at")
    assert sort_dir in ("ASC", "DESC")
    return (
        "SELECT stream_id, stream_uuid, stream_version, created_at, deleted_at, "
        "count(*) OVER () AS total "
        f"FROM {quote_ident(schema)}.streams "
        "WHERE stream_id <> 0 AND ($1::text IS NULL OR stream_uuid ILIKE $1) "
        f"ORDER BY {sort_by} {sort_dir}, stream_id {sort_dir} LIMIT $2 OFFSET $3"
    )


def count_streams(schema: str) -> str:
    """Parameter: search pattern (or NULL)."""
    return (
        f"SELECT count(*) FROM {quote_ident(schema)}.streams "
        "WHERE stream_id <> 0 AND ($1::text IS NULL OR stream_uuid ILIKE $1)"
    )


def upsert_snapshot(schema: str, column_data_type: str) -> str:
    """Parameters: source_uuid, source_version, source_type, data, metadata, created_at."""
    data, meta = _stored("$4", column_data_type), _stored("$5", column_data_type)
    return (
        f"INSERT INTO {quote_ident(schema)}.snapshots "
        "(source_uuid, source_version, source_type, data, metadata, created_at) "
        f"VALUES ($1, $2, $3, {data}, {meta}, $6) "
        "ON CONFLICT (source_uuid) DO UPDATE SET source_version = EXCLUDED.source_version, "
        "source_type = EXCLUDED.source_type, data = EXCLUDED.data, "
        "metadata = EXCLUDED.metadata, created_at = EXCLUDED.created_at"
    )


def read_snapshot(schema: str, column_data_type: str) -> str:
    """Parameter: source_uuid."""
    cols = _data_columns(column_data_type)
    return (
        f"SELECT e.source_uuid, e.source_version, e.source_type, {cols}, e.created_at "
        f"FROM {quote_ident(schema)}.snapshots e WHERE e.source_uuid = $1"
    )


def delete_snapshot(schema: str) -> str:
    """Parameter: source_uuid."""
    return f"DELETE FROM {quote_ident(schema)}.snapshots WHERE source_uuid = $1"


# -- notifications, locks, subscriptions ------------------------------------------------------


def stream_versions(schema: str) -> str:
    """Parameter: array of stream_uuid. Current version of each existing stream."""
    return (
        f"SELECT stream_uuid, stream_version FROM {quote_ident(schema)}.streams "
        "WHERE stream_uuid = ANY($1::text[])"
    )


def notification_channel(schema: str) -> str:
    """The channel `notify_events()` uses: the schema name + '.events', as an identifier."""
    return f"{schema}.events"


TRY_LOCK = "SELECT pg_catalog.pg_try_advisory_lock($1::int, $2::int)"
UNLOCK = "SELECT pg_catalog.pg_advisory_unlock($1::int, $2::int)"


def create_subscription(schema: str) -> str:
    """Parameters: stream_uuid, subscription_name, last_seen (NULL: from the origin)."""
    return (
        f"INSERT INTO {quote_ident(schema)}.subscriptions "
        "(stream_uuid, subscription_name, last_seen) VALUES ($1, $2, $3) "
        "ON CONFLICT (stream_uuid, subscription_name) DO NOTHING"
    )


def get_subscription(schema: str) -> str:
    """Parameters: stream_uuid, subscription_name."""
    return (
        "SELECT subscription_id, last_seen "
        f"FROM {quote_ident(schema)}.subscriptions "
        "WHERE stream_uuid = $1 AND subscription_name = $2"
    )


def checkpoint_subscription(schema: str) -> str:
    """Parameters: stream_uuid, subscription_name, last_seen. Never moves it backwards."""
    return (
        f"UPDATE {quote_ident(schema)}.subscriptions SET last_seen = $3 "
        "WHERE stream_uuid = $1 AND subscription_name = $2 "
        "AND (last_seen IS NULL OR last_seen < $3)"
    )


def delete_subscription(schema: str) -> str:
    """Parameters: stream_uuid, subscription_name."""
    return (
        f"DELETE FROM {quote_ident(schema)}.subscriptions "
        "WHERE stream_uuid = $1 AND subscription_name = $2"
    )


def list_subscriptions(schema: str) -> str:
    return (
        "SELECT subscription_id, stream_uuid, subscription_name, last_seen, created_at "
        f"FROM {quote_ident(schema)}.subscriptions ORDER BY subscription_id"
    )


def read_event(schema: str, column_data_type: str) -> str:
    """Parameter: event_id. The event, numbered as in ``$all``."""
    return _select_events(schema, column_data_type) + "WHERE se.event_id = $1 AND se.stream_id = 0"


def reset_subscription(schema: str) -> str:
    """Parameters: stream_uuid, subscription_name, last_seen (may move backwards)."""
    return (
        f"UPDATE {quote_ident(schema)}.subscriptions SET last_seen = $3 "
        "WHERE stream_uuid = $1 AND subscription_name = $2"
    )
