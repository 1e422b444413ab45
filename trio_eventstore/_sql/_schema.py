"""The store's schema: DDL (create, init, drop, reset, migrations), privileges,
introspection and the locks of ``init`` and ``migrate``.

The layout is the Elixir EventStore 1.4's (schema version 1.3.2), object for object;
the function bodies are our own.
"""

from __future__ import annotations

from typing import Literal

from ._quoting import quote_ident

#: The Elixir EventStore schema version this layout is.
SCHEMA_VERSION = (1, 3, 2)


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

#: Parameters: schema name, database name. The connected role, the store's owner there
#: (its tables' owner; else the schema's, unless that is PostgreSQL 15's
#: ``pg_database_owner``, whom nobody can log in as; NULL when neither is known in the
#: connected database) and the database's owner; for messages about missing privileges.
OWNERS = """
SELECT current_user::text AS current_role,
       coalesce(
         (SELECT c.relowner::regrole::text FROM pg_catalog.pg_class c
            JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = $1 AND c.relname = 'streams' AND c.relkind = 'r'),
         (SELECT nspowner::regrole::text FROM pg_catalog.pg_namespace
           WHERE nspname = $1 AND nspowner::regrole::text <> 'pg_database_owner'))
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


#: Parameter: schema. How many tables, views, sequences, functions and types it holds
#: that are no event store's (a schema `drop` must not take somebody else's for a
#: partly initialised store): a table is the store's only under one of its names and
#: with every column of that table; sequences owned by a table go with it.
SCHEMA_OBJECTS = """
SELECT
  (SELECT count(*) FROM pg_catalog.pg_class c
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c')
      AND NOT EXISTS (
        SELECT 1 FROM (VALUES
            ('streams', '{stream_id,stream_uuid,stream_version,created_at,deleted_at}'),
            ('events',
             '{event_id,event_type,causation_id,correlation_id,data,metadata,created_at}'),
            ('stream_events',
             '{event_id,stream_id,stream_version,original_stream_id,original_stream_version}'),
            ('subscriptions',
             '{subscription_id,stream_uuid,subscription_name,last_seen,created_at}'),
            ('snapshots', '{source_uuid,source_version,source_type,data,metadata,created_at}'),
            ('schema_migrations', '{major_version,minor_version,patch_version,migrated_at}')
          ) AS s(t, cols)
         WHERE s.t = c.relname AND c.relkind = 'r'
           AND (SELECT count(*) FROM pg_catalog.pg_attribute a
                 WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                   AND a.attname = ANY (s.cols::text[]))
               = cardinality(s.cols::text[])))
  + (SELECT count(*) FROM pg_catalog.pg_class c
       JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname = $1 AND c.relkind = 'S'
        AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                         WHERE d.classid = 'pg_catalog.pg_class'::regclass
                           AND d.objid = c.oid AND d.deptype IN ('a', 'i')))
  + (SELECT count(*) FROM pg_catalog.pg_proc p
       JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
      WHERE n.nspname = $1
        AND p.proname NOT IN ('event_store_exception', 'event_store_delete', 'notify_events'))
  + (SELECT count(*) FROM pg_catalog.pg_type t
       JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
      WHERE n.nspname = $1 AND t.typtype IN ('e', 'd', 'r', 'm'))
"""


#: Schemas of the connected database other than ``public`` (and the system's) that hold
#: anything (tables, sequences, views, functions, types) and no event store (no
#: ``schema_migrations`` table).
OTHER_SCHEMAS_IN_USE = """
SELECT count(*) FROM pg_catalog.pg_namespace n
 WHERE n.nspname <> 'public' AND n.nspname <> 'information_schema'
   AND n.nspname NOT LIKE 'pg\\_%'
   AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class m
                    WHERE m.relnamespace = n.oid AND m.relname = 'schema_migrations'
                      AND m.relkind = 'r')
   AND (EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.relnamespace = n.oid)
        OR EXISTS (SELECT 1 FROM pg_catalog.pg_proc p WHERE p.pronamespace = n.oid)
        OR EXISTS (SELECT 1 FROM pg_catalog.pg_type t
                    WHERE t.typnamespace = n.oid AND t.typtype IN ('e', 'd', 'r', 'm')))
"""


#: Parameter: the schema. How many subscription locks of the store there other sessions
#: hold (``locks``: subscriptions running on any node, Python or Elixir, or a migration).
#: Sessions are not counted by name: PgBouncer keeps the server sessions of stores long
#: gone, under their names.
STORE_IN_USE = """
SELECT
  (SELECT count(*) FROM pg_catalog.pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
      AND l.pid <> pg_catalog.pg_backend_pid()
      AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                         WHERE d.datname = pg_catalog.current_database())
      AND l.classid = pg_catalog.to_regclass(
            pg_catalog.quote_ident($1) || '.subscriptions')::oid) AS locks
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
