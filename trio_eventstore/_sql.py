"""Every SQL statement and the DDL, as functions of the (quoted) schema name.

The layout is the Elixir EventStore 1.4's (schema version 1.3.2), object for object;
the function bodies are our own. Identifiers from users are always quoted with
`quote_ident`; values are always parameters.
"""

from __future__ import annotations

import functools
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

#: The size of the connected database, in bytes (what ``drop`` would destroy).
DATABASE_SIZE = "SELECT pg_catalog.pg_database_size(pg_catalog.current_database())"

#: Per user schema of the connected database: its tables and their total size in bytes
#: (indexes and TOAST included), largest first.
SCHEMA_SIZES = """
SELECT n.nspname AS schema, count(c.oid) AS tables,
       coalesce(sum(pg_catalog.pg_total_relation_size(c.oid)), 0)::bigint AS bytes
  FROM pg_catalog.pg_namespace n
  LEFT JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relkind IN ('r', 'p', 'm')
 WHERE n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
 GROUP BY n.nspname
 ORDER BY bytes DESC, n.nspname
"""


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


# -- privileges ----------------------------------------------------------------------------

#: What an application role needs to run the store (appends, links, reads, soft deletes,
#: subscriptions with their locks and checkpoints, snapshots), by object of the schema.
#: Each one is needed (tests/test_privileges.py revokes them one at a time).
APPLICATION_GRANTS: tuple[tuple[str, str, str], ...] = (
    ("SCHEMA", "", "USAGE"),
    ("TABLE", "streams", "SELECT, INSERT, UPDATE"),
    ("TABLE", "events", "SELECT, INSERT"),
    ("TABLE", "stream_events", "SELECT, INSERT"),
    ("TABLE", "subscriptions", "SELECT, INSERT, UPDATE, DELETE"),
    ("TABLE", "snapshots", "SELECT, INSERT, UPDATE, DELETE"),
    ("TABLE", "schema_migrations", "SELECT"),
    ("SEQUENCE", "streams_stream_id_seq", "USAGE"),
    ("SEQUENCE", "subscriptions_subscription_id_seq", "USAGE"),
)

#: And for hard deletes (``enable_hard_deletes``).
HARD_DELETE_GRANTS: tuple[tuple[str, str, str], ...] = (
    ("TABLE", "streams", "DELETE"),
    ("TABLE", "events", "DELETE"),
    ("TABLE", "stream_events", "DELETE"),
)


def grant_statements(schema: str, role: str, *, hard_deletes: bool) -> list[str]:
    """The GRANT statements that let ``role`` run the store in ``schema``."""
    s = quote_ident(schema)
    grants = APPLICATION_GRANTS + (HARD_DELETE_GRANTS if hard_deletes else ())
    return [
        f"GRANT {privileges} ON {kind} {s if kind == 'SCHEMA' else f'{s}.{quote_ident(name)}'} "
        f"TO {quote_ident(role)}"
        for kind, name, privileges in grants
    ]


#: Parameter: schema name. Whether the connected role may grant privileges on the schema
#: and on every table and sequence in it: it owns them (or is a member of the owning
#: role, or a superuser). A GRANT without that only warns "no privileges were granted".
CAN_GRANT = """
SELECT pg_catalog.pg_has_role(n.nspowner, 'USAGE')
       AND coalesce((SELECT pg_catalog.bool_and(pg_catalog.pg_has_role(c.relowner, 'USAGE'))
                       FROM pg_catalog.pg_class c
                      WHERE c.relnamespace = n.oid AND c.relkind IN ('r', 'S')), true)
  FROM pg_catalog.pg_namespace n WHERE n.nspname = $1
"""

#: Parameter: role name. Whether it exists.
ROLE_EXISTS = "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)"

#: Parameters: schema name, database name. The connected role, the schema's owner (NULL
#: when there is no such schema in the connected database) and the database's owner; for
#: messages about missing privileges.
OWNERS = """
SELECT current_user::text AS current_role,
       (SELECT nspowner::regrole::text FROM pg_catalog.pg_namespace WHERE nspname = $1)
         AS schema_owner,
       (SELECT datdba::regrole::text FROM pg_catalog.pg_database WHERE datname = $2)
         AS database_owner
"""

#: Parameter: schema name. The access privileges of the schema and of its tables and
#: sequences (what `grant` may change).
SCHEMA_ACLS = """
SELECT coalesce((SELECT nspacl::text FROM pg_catalog.pg_namespace WHERE nspname = $1), '')
       || ' ' ||
       coalesce((SELECT pg_catalog.array_agg(c.relname || ':' || coalesce(c.relacl::text, '')
                                             ORDER BY c.relname)
                   FROM pg_catalog.pg_class c
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relkind IN ('r', 'S'))::text, '')
"""


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


def _stored(expression: str, column_data_type: str, *, metadata: bool = False) -> str:
    """A bytea value (UTF-8 JSON from the serializer) as the data column stores it. A
    jsonb store keeps absent metadata (JSON ``null``) as SQL NULL, as the Elixir
    library's JsonbSerializer writes it; a bytea store keeps the bytes ``null``."""
    if column_data_type == "bytea":
        return expression
    if metadata:
        return f"nullif(convert_from({expression}, 'UTF8')::jsonb, 'null'::jsonb)"
    return f"convert_from({expression}, 'UTF8')::jsonb"


#: Outcomes of one append in `append_batch` (its ``outcome`` column).
APPEND_OK, APPEND_DELETED, APPEND_EXISTS, APPEND_WRONG_VERSION = 0, 1, 2, 3
APPEND_NOT_FOUND, APPEND_DUPLICATE, APPEND_RETRY = 4, 5, 6

#: Expected-version kinds, as `append_batch` and `link_events` take them.
EXPECT_ANY, EXPECT_NO_STREAM, EXPECT_EXISTS, EXPECT_VERSION = 0, 1, 2, 3


def _outcome(kind: str, expected: str, locked: str, created: str, duplicate: str) -> str:
    """The outcome of one write to a stream (SQL CASE over its locked row, if any)."""
    return (
        "CASE"
        f" WHEN {locked}.stream_id IS NOT NULL AND {locked}.deleted_at IS NOT NULL"
        f" THEN {APPEND_DELETED}"
        f" WHEN {locked}.stream_id IS NOT NULL AND {kind} = {EXPECT_NO_STREAM}"
        f" AND {locked}.stream_version <> 0 THEN {APPEND_EXISTS}"
        f" WHEN {locked}.stream_id IS NOT NULL AND {kind} = {EXPECT_VERSION}"
        f" AND {locked}.stream_version <> {expected} THEN {APPEND_WRONG_VERSION}"
        f" WHEN {locked}.stream_id IS NULL AND {kind} = {EXPECT_EXISTS} THEN {APPEND_NOT_FOUND}"
        f" WHEN {locked}.stream_id IS NULL AND {kind} = {EXPECT_VERSION} AND {expected} <> 0"
        f" THEN {APPEND_WRONG_VERSION}"
        f" WHEN {duplicate} THEN {APPEND_DUPLICATE}"
        f" WHEN {locked}.stream_id IS NOT NULL OR {created}.stream_id IS NOT NULL"
        f" THEN {APPEND_OK}"
        f" ELSE {APPEND_RETRY} END"
    )


def _creatable(kind: str, expected: str) -> str:
    return f"({kind} <> {EXPECT_EXISTS} AND ({kind} <> {EXPECT_VERSION} OR {expected} = 0))"


@functools.lru_cache(maxsize=64)  # built once per schema: a hot path
def append_batch(
    schema: str, column_data_type: str, *, lone: bool = False, pipelined: bool = False
) -> str:
    """Any number of appends, each to its own stream, in ONE statement (atomic on its
    own: no BEGIN/COMMIT round trips, one commit and one WAL flush for all of them).

    Parameters, one array element per append: $1 stream_uuid, $2 event count, $3 kind
    (``EXPECT_*``), $4 expected version (for ``EXPECT_VERSION``); one per event, appends
    in order: $5 the append's index (1-based), $6 position in its append (1-based),
    $7 event id, $8 type, $9 causation id, $10 correlation id, $11 data, $12 metadata;
    $13 created_at. No two appends may name the same stream or event id. ``lone``: the
    statement for one append (a stored event id then fails it with a unique violation,
    instead of being looked up first).

    Returns one row per append, in order: ``outcome`` (``APPEND_*``), ``stream_id``,
    ``before`` (the stream's version before it, or its current version when refused)
    ``all_base`` (the `$all` number before its first event) and ``duplicate_id`` (for
    ``APPEND_DUPLICATE``: an event id already stored). An append that is
    refused writes nothing; the others commit. ``APPEND_RETRY``: the stream was created
    by a concurrent transaction during the statement (nothing written; try again).

    Locks, in one order for every writer (so writers never deadlock, with each other or
    with an Elixir node, which locks one stream row then `$all`): first the existing
    stream rows, sorted by stream_uuid (``locked``: under READ COMMITTED, waiting for a
    concurrent writer returns the row it committed, so every check is race-free); then
    the new stream rows, sorted (``created``); then, after the events are inserted, the
    `$all` row, held only from there to commit, so `$all` numbers are handed out in
    commit order and stay dense. Each step waits for the previous one through a
    one-time filter on it (``(SELECT count(*) FROM x) >= 0``: an init plan, evaluated
    before the step's first row). Stream notifications are queued before `$all`'s, as
    the Elixir library sends them. Rows are locked ``FOR NO KEY UPDATE`` (what an
    UPDATE of stream_version takes), not ``FOR UPDATE``: a link elsewhere whose events
    come from a locked stream checks its foreign key (``FOR KEY SHARE``) without waiting,
    so it can never wait in a cycle with an append.

    ``pipelined``: for big batches, the statement is run twice in ONE round trip and one
    transaction (``fetchmany``: two executions of one prepared statement before one
    Sync), with $14 the part: 1 the streams' part, 2 the `$all` part. Part 1 is
    everything but `$all`: it writes the streams' own rows, returns ``all_base`` as the
    append's offset among those written, and records what it wrote in transaction-local
    settings; its foreign-key checks run when it ends, before `$all` is locked. Part 2
    (given only $5-$7 and $13; the other arrays empty) locks `$all` and numbers the
    events written by part 1, in order; it returns one row, ``k`` 0 and ``all_base`` the
    `$all` number before the first event (none when nothing was written). So the `$all`
    lock is held over the `$all` rows' checks and the commit only, and no round trip.
    """
    s = quote_ident(schema)
    data = _stored("u.d", column_data_type)
    meta = _stored("u.m", column_data_type, metadata=True)
    outcome = _outcome("r.kind", "r.exp", "l", "c", "d.a IS NOT NULL")
    return (
        "WITH req AS ("
        " SELECT r.k::int AS k, r.uuid, r.n, r.kind, r.exp"
        " FROM unnest($1::text[], $2::bigint[], $3::int[], $4::bigint[])"
        " WITH ORDINALITY AS r(uuid, n, kind, exp, k)"
        + (" WHERE $14::int = 1" if pipelined else "")
        + "), locked AS ("
        " SELECT s.stream_id, s.stream_uuid, s.stream_version, s.deleted_at"
        f" FROM {s}.streams s WHERE s.stream_uuid = ANY($1::text[])"
        " ORDER BY s.stream_uuid FOR NO KEY UPDATE"
        "), dup AS ("
        + (
            # Alone, a duplicate id fails the statement (unique violation), which fails
            # only this append: no need to look the ids up first.
            " SELECT NULL::int AS a, NULL::uuid AS id WHERE false"
            if lone
            else " SELECT u.a, (array_agg(u.id))[1] AS id"
            " FROM unnest($5::int[], $7::uuid[]) AS u(a, id)"
            f" JOIN {s}.events e ON e.event_id = u.id WHERE e.event_id = ANY($7::uuid[])"
            + (" AND $14::int = 1" if pipelined else "")
            + " GROUP BY u.a"
        )
        + "), created AS ("
        f" INSERT INTO {s}.streams (stream_uuid, stream_version)"
        " SELECT r.uuid, r.n FROM req r"
        " WHERE (SELECT count(*) FROM locked) >= 0"
        f" AND {_creatable('r.kind', 'r.exp')}"
        " AND NOT EXISTS (SELECT 1 FROM locked l WHERE l.stream_uuid = r.uuid)"
        " AND NOT EXISTS (SELECT 1 FROM dup WHERE dup.a = r.k)"
        " ORDER BY r.uuid"
        " ON CONFLICT (stream_uuid) DO NOTHING"
        " RETURNING stream_id, stream_uuid"
        "), st AS ("
        " SELECT r.k, r.n, coalesce(l.stream_id, c.stream_id) AS stream_id,"
        " coalesce(l.stream_version, 0) AS before, l.stream_id IS NOT NULL AS existed,"
        f" {outcome} AS outcome"
        " FROM req r LEFT JOIN locked l ON l.stream_uuid = r.uuid"
        " LEFT JOIN created c ON c.stream_uuid = r.uuid"
        " LEFT JOIN dup d ON d.a = r.k"
        "), ok AS ("
        " SELECT st.k, st.n, st.stream_id, st.before, st.existed,"
        " (sum(st.n) OVER (ORDER BY st.k) - st.n)::bigint AS offs"
        f" FROM st WHERE st.outcome = {APPEND_OK}"
        "), upd AS ("
        f" UPDATE {s}.streams s SET stream_version = s.stream_version + ok.n"
        " FROM ok WHERE s.stream_id = ok.stream_id AND ok.existed"
        " RETURNING s.stream_id"
        "), ev AS ("
        f" INSERT INTO {s}.events"
        " (event_id, event_type, causation_id, correlation_id, data, metadata, created_at)"
        f" SELECT u.id, u.t, u.c, u.r, {data}, {meta}, $13"
        " FROM unnest($5::int[], $7::uuid[], $8::text[], $9::uuid[], $10::uuid[],"
        " $11::bytea[], $12::bytea[]) AS u(a, id, t, c, r, d, m)"
        " WHERE u.a IN (SELECT ok.k FROM ok)"
        " RETURNING 1"
        "), a AS ("
        + (
            " SELECT 0::bigint AS base"
            " WHERE (SELECT count(*) FROM upd) >= 0 AND (SELECT count(*) FROM ev) >= 0"
            if pipelined
            else f" UPDATE {s}.streams SET stream_version = stream_version + t.total"
            " FROM (SELECT sum(ok.n)::bigint AS total FROM ok) t"
            " WHERE stream_id = 0 AND t.total > 0"
            " AND (SELECT count(*) FROM upd) >= 0 AND (SELECT count(*) FROM ev) >= 0"
            " RETURNING stream_version - t.total AS base"
        )
        + "), se AS ("
        f" INSERT INTO {s}.stream_events"
        " (event_id, stream_id, stream_version, original_stream_id, original_stream_version)"
        " SELECT u.id, x.sid,"
        " CASE WHEN x.sid = 0 THEN a.base + ok.offs + u.p ELSE ok.before + u.p END,"
        " ok.stream_id, ok.before + u.p"
        " FROM a, unnest($5::int[], $6::int[], $7::uuid[]) AS u(a, p, id)"
        " JOIN ok ON ok.k = u.a,"
        + (
            " LATERAL (VALUES (ok.stream_id)) AS x(sid)"
            if pipelined
            else " LATERAL (VALUES (ok.stream_id), (0::bigint)) AS x(sid)"
        )
        + ")"
        + (_ALL_PART.format(s=s) if pipelined else "")
        + " SELECT st.k, st.outcome, st.stream_id, st.before, a.base + ok.offs AS all_base,"
        " d.id AS duplicate_id"
        " FROM st LEFT JOIN ok ON ok.k = st.k LEFT JOIN a ON true"
        " LEFT JOIN dup d ON d.a = st.k"
        + (
            " CROSS JOIN rec"  # part 1: records what it wrote (one row per append)
            " UNION ALL SELECT 0, NULL, NULL, NULL, a2.base, NULL FROM a2"
            if pipelined
            else ""
        )
        + " ORDER BY 1"
    )


#: `append_batch`'s `$all` part when ``pipelined``: part 1 records the appends it wrote
#: (``rec``: their indexes, stream ids and versions before, in transaction-local
#: settings); part 2 reads them back (``wrote``), locks `$all` (``a2``) and inserts the
#: `$all` rows of their events, in order.
_ALL_PART = (
    ", rec AS ("
    " SELECT pg_catalog.set_config('trio_eventstore.k',"
    " coalesce((SELECT array_agg(ok.k ORDER BY ok.k) FROM ok), '{{}}')::text, true)"
    " || pg_catalog.set_config('trio_eventstore.sid',"
    " coalesce((SELECT array_agg(ok.stream_id ORDER BY ok.k) FROM ok), '{{}}')::text, true)"
    " || pg_catalog.set_config('trio_eventstore.before',"
    " coalesce((SELECT array_agg(ok.before ORDER BY ok.k) FROM ok), '{{}}')::text, true)"
    " WHERE $14::int = 1"
    "), wrote AS ("
    " SELECT w.k, w.sid, w.before FROM unnest("
    "nullif(pg_catalog.current_setting('trio_eventstore.k', true), '')::int[],"
    " nullif(pg_catalog.current_setting('trio_eventstore.sid', true), '')::bigint[],"
    " nullif(pg_catalog.current_setting('trio_eventstore.before', true), '')::bigint[])"
    " AS w(k, sid, before) WHERE $14::int = 2"
    "), evs AS ("
    " SELECT u.id, wrote.sid, wrote.before + u.p AS v,"
    " row_number() OVER (ORDER BY u.a, u.p) AS n"
    " FROM unnest($5::int[], $6::int[], $7::uuid[]) AS u(a, p, id)"
    " JOIN wrote ON wrote.k = u.a"
    "), a2 AS ("
    " UPDATE {s}.streams SET stream_version = stream_version + t.total"
    " FROM (SELECT count(*) AS total FROM evs) t"
    " WHERE stream_id = 0 AND t.total > 0"
    " RETURNING stream_version - t.total AS base"
    "), se2 AS ("
    " INSERT INTO {s}.stream_events"
    " (event_id, stream_id, stream_version, original_stream_id, original_stream_version)"
    " SELECT evs.id, 0, a2.base + evs.n, evs.sid, evs.v FROM a2, evs"
    ")"
)


#: The stream step of `append_lone`, by expected-version kind (``EXPECT_VERSION`` 0 is
#: a new stream, as ``EXPECT_NO_STREAM``).
LONE_NEW, LONE_VERSION, LONE_EXISTS, LONE_ANY = "new", "version", "exists", "any"


@functools.lru_cache(maxsize=64)  # built once per schema and step: a hot path
def append_lone(schema: str, column_data_type: str, step: str) -> str:
    """One append, the way it usually goes, in ONE lean statement: what the Elixir
    library's own insert statement does, with the expected version checked by the
    statement itself instead of by a SELECT before it.

    Parameters: $1 stream_uuid; per event: $2 id, $3 type, $4 causation id,
    $5 correlation id, $6 data, $7 metadata; $8 created_at; ``LONE_VERSION`` only:
    $9 the expected version (> 0).

    The stream step (``step``) takes the stream row or writes nothing:
    ``LONE_NEW`` creates it (``ON CONFLICT DO NOTHING``: a stream that exists is not
    this statement's to judge); ``LONE_VERSION`` updates it only if it is live and at
    the expected version (under READ COMMITTED an UPDATE that waited for a concurrent
    writer checks the row that writer committed); ``LONE_EXISTS`` only if it is live;
    ``LONE_ANY`` one or the other. Then, only if it took the stream: the events, then
    the `$all` row, locked last and held to commit, then both stream_events rows of
    each event (the same locks, in the same order, as `append_batch` and an Elixir
    node; notifications in the same order too).

    Returns one row (``stream_id``, ``before``: the stream's version before, ``base``:
    the `$all` number before the first event) when the events are written, no row when
    nothing was written: the stream step refused, and `append_batch` (``lone``) tells
    why (or writes it: a stream at version 0 takes ``NO_STREAM``). A stored event id
    fails the statement (unique violation)."""
    s = quote_ident(schema)
    n = "cardinality($2::uuid[])"
    update = (
        f"UPDATE {s}.streams SET stream_version = stream_version + {n}"
        " WHERE stream_uuid = $1 AND deleted_at IS NULL"
    )
    updated = f" RETURNING stream_id, stream_version - {n} AS before"

    def insert(condition: str) -> str:  # (no str.format: the schema's name may hold braces)
        return (
            f"INSERT INTO {s}.streams (stream_uuid, stream_version) SELECT $1, {n}"
            f" WHERE true{condition}"
            " ON CONFLICT (stream_uuid) DO NOTHING RETURNING stream_id, 0::bigint AS before"
        )

    if step == LONE_NEW:
        stream = "st AS (" + insert("") + ")"
    elif step == LONE_VERSION:
        stream = "st AS (" + update + " AND stream_version = $9::bigint" + updated + ")"
    elif step == LONE_EXISTS:
        stream = "st AS (" + update + updated + ")"
    else:
        assert step == LONE_ANY, step
        stream = (
            "upd AS ("
            + update
            + updated
            + "), ins AS ("
            + insert(" AND NOT EXISTS (SELECT 1 FROM upd)")
            + "), st AS (SELECT * FROM upd UNION ALL SELECT * FROM ins)"
        )
    data = _stored("u.d", column_data_type)
    meta = _stored("u.m", column_data_type, metadata=True)
    return (
        f"WITH {stream}, ev AS ("
        f" INSERT INTO {s}.events"
        " (event_id, event_type, causation_id, correlation_id, data, metadata, created_at)"
        f" SELECT u.id, u.t, u.c, u.r, {data}, {meta}, $8"
        " FROM unnest($2::uuid[], $3::text[], $4::uuid[], $5::uuid[], $6::bytea[],"
        " $7::bytea[]) AS u(id, t, c, r, d, m)"
        " WHERE EXISTS (SELECT 1 FROM st)"
        " RETURNING 1"
        "), a AS ("
        f" UPDATE {s}.streams SET stream_version = stream_version + {n}"
        " WHERE stream_id = 0 AND EXISTS (SELECT 1 FROM st)"
        " AND (SELECT count(*) FROM ev) >= 0"
        f" RETURNING stream_version - {n} AS base"
        "), se AS ("
        f" INSERT INTO {s}.stream_events"
        " (event_id, stream_id, stream_version, original_stream_id, original_stream_version)"
        " SELECT u.id, x.sid,"
        " CASE WHEN x.sid = 0 THEN a.base + u.k ELSE st.before + u.k END,"
        " st.stream_id, st.before + u.k"
        " FROM st, a, unnest($2::uuid[]) WITH ORDINALITY AS u(id, k),"
        " LATERAL (VALUES (st.stream_id), (0::bigint)) AS x(sid)"
        ") SELECT st.stream_id, st.before, a.base FROM st, a"
    )


@functools.lru_cache(maxsize=64)  # built once per schema: a hot path
def link_events(schema: str) -> str:
    """A link of existing events into one stream, in ONE statement.

    Parameters: $1 stream_uuid, $2 kind (``EXPECT_*``), $3 expected version, $4 the
    event ids in order. Returns one row: ``outcome`` (``APPEND_*``; ``APPEND_DUPLICATE``
    when an event is missing), ``stream_id``, ``before`` and ``missing`` (the ids of
    the events that do not exist). Nothing is written unless the outcome is ``APPEND_OK``.
    An event already in the stream fails the statement (unique violation). Locks: the
    stream row only (as `append_batch` takes it); links never touch `$all`.
    """
    s = quote_ident(schema)
    outcome = _outcome("$2::int", "$3::bigint", "l", "c", "m.missing > 0")
    return (
        "WITH locked AS ("
        " SELECT stream_id, stream_uuid, stream_version, deleted_at"
        f" FROM {s}.streams WHERE stream_uuid = $1 FOR NO KEY UPDATE"
        "), orig AS ("
        " SELECT u.k, se.original_stream_id, se.original_stream_version"
        " FROM unnest($4::uuid[]) WITH ORDINALITY AS u(id, k)"
        f" JOIN {s}.stream_events se ON se.event_id = u.id"
        " AND se.stream_id = se.original_stream_id"
        "), m AS ("
        " SELECT count(*) FILTER (WHERE o.k IS NULL) AS missing,"
        " coalesce(array_agg(u.id ORDER BY u.k) FILTER (WHERE o.k IS NULL), '{}') AS missing_ids"
        " FROM unnest($4::uuid[]) WITH ORDINALITY AS u(id, k) LEFT JOIN orig o ON o.k = u.k"
        "), created AS ("
        f" INSERT INTO {s}.streams (stream_uuid, stream_version)"
        " SELECT $1, cardinality($4::uuid[]) FROM m"
        " WHERE (SELECT count(*) FROM locked) = 0 AND m.missing = 0"
        f" AND {_creatable('$2::int', '$3::bigint')}"
        " ON CONFLICT (stream_uuid) DO NOTHING"
        " RETURNING stream_id"
        "), st AS ("
        " SELECT coalesce(l.stream_id, c.stream_id) AS stream_id,"
        " coalesce(l.stream_version, 0) AS before, l.stream_id IS NOT NULL AS existed,"
        f" m.missing, {outcome} AS outcome"
        " FROM m LEFT JOIN locked l ON true LEFT JOIN created c ON true"
        "), upd AS ("
        f" UPDATE {s}.streams s SET stream_version = s.stream_version + cardinality($4::uuid[])"
        f" FROM st WHERE s.stream_id = st.stream_id AND st.existed AND st.outcome = {APPEND_OK}"
        " RETURNING s.stream_id"
        "), se AS ("
        f" INSERT INTO {s}.stream_events"
        " (event_id, stream_id, stream_version, original_stream_id, original_stream_version)"
        " SELECT u.id, st.stream_id, st.before + u.k, o.original_stream_id,"
        " o.original_stream_version"
        " FROM st, unnest($4::uuid[]) WITH ORDINALITY AS u(id, k)"
        " JOIN orig o ON o.k = u.k"
        f" WHERE st.outcome = {APPEND_OK}"
        ") SELECT st.outcome, st.stream_id, st.before, m.missing_ids AS missing FROM st, m"
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


def upsert_snapshot(schema: str, column_data_type: str) -> str:
    """Parameters: source_uuid, source_version, source_type, data, metadata, created_at."""
    data = _stored("$4", column_data_type)
    meta = _stored("$5", column_data_type, metadata=True)
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


def notify_stream(schema: str) -> str:
    """Parameter: stream_uuid. A notification of the stream at its current version (as
    `notify_events()` sends for an append): a hint to re-read it, nothing more."""
    channel = notification_channel(schema).replace("'", "''")
    return (
        f"SELECT pg_catalog.pg_notify('{channel}', stream_uuid || ',' || stream_id || ',' "
        "|| stream_version || ',' || stream_version) "
        f"FROM {quote_ident(schema)}.streams WHERE stream_uuid = $1"
    )


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

#: Parameter: the store's first lock key, as pg_locks shows it (unsigned). The sessions
#: holding a subscription lock of the store, in this database: one row (key2, pid,
#: application_name, client_addr, backend_start) each.
SUBSCRIPTION_HOLDERS = (
    "SELECT l.objid::text::bigint AS key2, l.pid, a.application_name, "
    "host(a.client_addr) AS client_addr, a.backend_start "
    "FROM pg_catalog.pg_locks l "
    "LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 "
    "AND l.database = (SELECT oid FROM pg_catalog.pg_database "
    "WHERE datname = pg_catalog.current_database()) "
    "AND l.classid::text::bigint = $1"
)
UNLOCK = "SELECT pg_catalog.pg_advisory_unlock($1::int, $2::int)"

#: Parameters: key1s, key2s (int arrays, pairwise). Tries every lock in one round trip;
#: one row (key1, key2, locked) per pair. Same two-int keys as `TRY_LOCK` (Elixir's).
TRY_LOCKS = (
    "SELECT k.key1, k.key2, pg_catalog.pg_try_advisory_lock(k.key1, k.key2) "
    "FROM unnest($1::int[], $2::int[]) AS k(key1, key2)"
)

#: The lock connection's liveness check (a round trip, nothing else).
PING = "SELECT 1"

#: Parameters: key1s, key2s (int arrays, pairwise, in order of preference), limit, and a
#: LIKE pattern of application_names. A balancing store's round (one round trip): tries
#: the first ``limit`` of the locks that no session holds, one row (key1, key2, locked,
#: NULL, NULL) per lock tried; and one row (NULL, NULL, NULL, application_name, held) per
#: other session of this database whose application_name matches (the other members:
#: their lock connections, which hold nothing but subscription locks; ``held`` counts
#: them).
BALANCE_ROUND = (
    "WITH held AS ("
    "SELECT l.classid, l.objid FROM pg_catalog.pg_locks l "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 "
    "AND l.database = (SELECT oid FROM pg_catalog.pg_database "
    "WHERE datname = pg_catalog.current_database())), "
    "free AS ("
    "SELECT k.key1, k.key2 FROM unnest($1::int[], $2::int[]) WITH ORDINALITY AS k(key1, key2, n) "
    "WHERE NOT EXISTS (SELECT 1 FROM held h "
    "WHERE h.classid = k.key1::oid AND h.objid = k.key2::oid) "
    "ORDER BY k.n LIMIT $3) "
    "SELECT f.key1, f.key2, pg_catalog.pg_try_advisory_lock(f.key1, f.key2) AS locked, "
    "NULL::text AS member, NULL::bigint AS held FROM free f "
    "UNION ALL "
    "SELECT NULL, NULL, NULL, a.application_name, "
    "(SELECT count(*) FROM pg_catalog.pg_locks l WHERE l.pid = a.pid "
    "AND l.locktype = 'advisory' AND l.granted AND l.objsubid = 2) "
    "FROM pg_catalog.pg_stat_activity a "
    "WHERE a.datname = pg_catalog.current_database() AND a.pid <> pg_catalog.pg_backend_pid() "
    "AND a.application_name LIKE $4"
)

#: Parameter: the new application_name of this session.
SET_APPLICATION_NAME = "SELECT pg_catalog.set_config('application_name', $1, false)"

#: Parameters: names, values (text arrays, pairwise). Sets session settings, skipping
#: those the server does not know (``tcp_user_timeout`` came with PostgreSQL 12).
SET_SESSION_SETTINGS = (
    "SELECT count(pg_catalog.set_config(s.name, s.setting, false)) "
    "FROM unnest($1::text[], $2::text[]) AS s(name, setting) "
    "WHERE s.name IN (SELECT name FROM pg_catalog.pg_settings)"
)


def create_subscription(schema: str) -> str:
    """Parameters: stream_uuid, subscription_name, last_seen (0: from the origin)."""
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


@functools.lru_cache(maxsize=64)  # built once per schema: a hot path
def checkpoint_subscription(schema: str) -> str:
    """Parameters: stream_uuid, subscription_name, last_seen. Never moves it backwards
    (a NULL, which older rows may hold, is the origin)."""
    return (
        f"UPDATE {quote_ident(schema)}.subscriptions SET last_seen = $3 "
        "WHERE stream_uuid = $1 AND subscription_name = $2 "
        "AND (last_seen IS NULL OR last_seen < $3)"
    )


def create_subscriptions(schema: str) -> str:
    """Parameters: stream_uuid, subscription_names (text array), last_seen. Each row
    that does not exist yet."""
    return (
        f"INSERT INTO {quote_ident(schema)}.subscriptions "
        "(stream_uuid, subscription_name, last_seen) SELECT $1, n, $3 FROM unnest($2::text[]) n "
        "ON CONFLICT (stream_uuid, subscription_name) DO NOTHING"
    )


def subscription_rows(schema: str, *, lock: bool) -> str:
    """Parameters: stream_uuid, subscription_name. The subscription's row and those
    that may be its partition groups' (named ``<name>#g...``: the caller checks the
    rest of the name), by id; ``lock``: locked until the transaction ends."""
    return (
        "SELECT subscription_id, subscription_name, last_seen "
        f"FROM {quote_ident(schema)}.subscriptions WHERE stream_uuid = $1 "
        "AND (subscription_name = $2 OR starts_with(subscription_name, $2 || '#g')) "
        "ORDER BY subscription_id" + (" FOR UPDATE" if lock else "")
    )


def delete_subscriptions(schema: str) -> str:
    """Parameter: subscription ids."""
    return (
        f"DELETE FROM {quote_ident(schema)}.subscriptions WHERE subscription_id = ANY($1::bigint[])"
    )


def list_subscriptions(schema: str) -> str:
    return (
        "SELECT subscription_id, stream_uuid, subscription_name, last_seen, created_at "
        f"FROM {quote_ident(schema)}.subscriptions ORDER BY subscription_id"
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


def reset_subscriptions(schema: str) -> str:
    """Parameters: subscription ids, last_seen (may move backwards)."""
    return (
        f"UPDATE {quote_ident(schema)}.subscriptions SET last_seen = $2 "
        "WHERE subscription_id = ANY($1::bigint[])"
    )


# -- projections: the user's schema (never the store's, unless the user names it) ------------
#
# The table of Commanded.Projections.Ecto (``projection_versions``, one row per projection,
# its position in ``last_seen_event_number``; a NULL there, which its migrations allow, is 0).


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
