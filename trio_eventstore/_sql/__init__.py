"""Every SQL statement and the DDL, as functions of the (quoted) schema name.

This package is the one place for the project's SQL. Callers import it as a whole
(``from . import _sql``) and look statements up on it when they run them
(``_sql.append_batch(...)``); the submodules are private, one per responsibility:

- `_quoting`: `quote_ident`, `quote_literal` and the column expressions shared by
  several statements;
- `_schema`: create, init, drop, reset, migrations, privileges, introspection, and the
  locks of ``init`` and ``migrate``;
- `_writes`: the write path (appends and links) and its outcome and expected-version
  codes;
- `_streams`: stream rows and their events: reads, deletes, pagination, notifications;
- `_snapshots`: rows of ``snapshots``: snapshots and the records of parked events;
- `_subscriptions`: rows of ``subscriptions``;
- `_locks`: subscription advisory locks, balancing, and lock-connection sessions;
- `_projections`: a projection's position, in the user's schema.

The layout is the Elixir EventStore 1.4's (schema version 1.3.2), object for object;
the function bodies are our own. Identifiers from users are always quoted with
`quote_ident`; values are always parameters.
"""

from __future__ import annotations

from ._locks import (
    BALANCE_ROUND,
    PING,
    SET_APPLICATION_NAME,
    SET_SESSION_SETTINGS,
    SUBSCRIPTION_HOLDERS,
    TRY_LOCK,
    TRY_LOCKS,
    UNLOCK,
)
from ._projections import (
    TABLE_EXISTS,
    create_projection_replays,
    create_projection_versions,
    insert_projection_version,
    lock_projection_version,
    mark_projection_replays,
    projection_version,
    update_projection_version,
)
from ._quoting import (
    quote_ident,
    quote_literal,
)
from ._schema import (
    APPLICATION_GRANTS,
    CAN_GRANT,
    DATABASE_EXISTS,
    DATABASE_SIZE,
    HARD_DELETE_GRANTS,
    INIT_LOCK,
    MIGRATION_LOCK,
    MIGRATION_UNLOCK,
    MIGRATIONS,
    OTHER_SCHEMAS_IN_USE,
    OWNERS,
    ROLE_EXISTS,
    SCHEMA_ACLS,
    SCHEMA_EXISTS,
    SCHEMA_OBJECTS,
    SCHEMA_SIZES,
    SCHEMA_STATE,
    SCHEMA_VERSION,
    STORE_IN_USE,
    create_database,
    create_schema,
    drop_database,
    drop_schema,
    grant_statements,
    init_statements,
    insert_migration,
    record_migration,
    reset_statements,
    schema_version,
)
from ._snapshots import (
    delete_parked,
    delete_snapshot,
    mark_parked,
    parked_records,
    read_snapshot,
    upsert_snapshot,
)
from ._streams import (
    STREAM_SORT_COLUMNS,
    count_streams,
    hard_delete_stream,
    listen,
    lock_stream,
    notification_channel,
    notify_stream,
    paginate_streams,
    read_event,
    read_events_by_id,
    read_stream,
    read_stream_bounded,
    soft_delete_stream,
    stream_info,
    stream_versions,
)
from ._subscriptions import (
    checkpoint_subscription,
    create_subscription,
    create_subscriptions,
    delete_subscriptions,
    get_subscription,
    list_subscriptions,
    reset_subscriptions,
    subscription_rows,
)
from ._writes import (
    APPEND_DELETED,
    APPEND_DUPLICATE,
    APPEND_EXISTS,
    APPEND_NOT_FOUND,
    APPEND_OK,
    APPEND_RETRY,
    APPEND_WRONG_VERSION,
    EXPECT_ANY,
    EXPECT_EXISTS,
    EXPECT_NO_STREAM,
    EXPECT_VERSION,
    LONE_ANY,
    LONE_EXISTS,
    LONE_NEW,
    LONE_VERSION,
    REPLICA_APPENDS_CHECK,
    REPLICA_KEYS,
    REPLICA_TRIGGERS,
    append_batch,
    append_lone,
    link_events,
)

__all__ = [
    # _quoting
    "quote_ident",
    "quote_literal",
    # _schema
    "SCHEMA_VERSION",
    "create_schema",
    "drop_schema",
    "create_database",
    "drop_database",
    "DATABASE_EXISTS",
    "SCHEMA_EXISTS",
    "SCHEMA_OBJECTS",
    "OTHER_SCHEMAS_IN_USE",
    "STORE_IN_USE",
    "DATABASE_SIZE",
    "SCHEMA_SIZES",
    "init_statements",
    "record_migration",
    "insert_migration",
    "MIGRATIONS",
    "APPLICATION_GRANTS",
    "HARD_DELETE_GRANTS",
    "grant_statements",
    "CAN_GRANT",
    "ROLE_EXISTS",
    "OWNERS",
    "SCHEMA_ACLS",
    "SCHEMA_STATE",
    "schema_version",
    "INIT_LOCK",
    "MIGRATION_LOCK",
    "MIGRATION_UNLOCK",
    "reset_statements",
    # _writes
    "APPEND_OK",
    "APPEND_DELETED",
    "APPEND_EXISTS",
    "APPEND_WRONG_VERSION",
    "APPEND_NOT_FOUND",
    "APPEND_DUPLICATE",
    "APPEND_RETRY",
    "EXPECT_ANY",
    "EXPECT_NO_STREAM",
    "EXPECT_EXISTS",
    "EXPECT_VERSION",
    "REPLICA_APPENDS_CHECK",
    "REPLICA_KEYS",
    "REPLICA_TRIGGERS",
    "append_batch",
    "LONE_NEW",
    "LONE_VERSION",
    "LONE_EXISTS",
    "LONE_ANY",
    "append_lone",
    "link_events",
    # _streams
    "stream_info",
    "lock_stream",
    "read_stream",
    "read_stream_bounded",
    "read_event",
    "read_events_by_id",
    "soft_delete_stream",
    "hard_delete_stream",
    "STREAM_SORT_COLUMNS",
    "paginate_streams",
    "count_streams",
    "stream_versions",
    "listen",
    "notification_channel",
    "notify_stream",
    # _snapshots
    "upsert_snapshot",
    "read_snapshot",
    "delete_snapshot",
    "parked_records",
    "mark_parked",
    "delete_parked",
    # _subscriptions
    "create_subscription",
    "get_subscription",
    "checkpoint_subscription",
    "create_subscriptions",
    "subscription_rows",
    "delete_subscriptions",
    "list_subscriptions",
    "reset_subscriptions",
    # _locks
    "TRY_LOCK",
    "SUBSCRIPTION_HOLDERS",
    "UNLOCK",
    "TRY_LOCKS",
    "PING",
    "BALANCE_ROUND",
    "SET_APPLICATION_NAME",
    "SET_SESSION_SETTINGS",
    # _projections
    "TABLE_EXISTS",
    "create_projection_versions",
    "create_projection_replays",
    "mark_projection_replays",
    "lock_projection_version",
    "insert_projection_version",
    "update_projection_version",
    "projection_version",
]
