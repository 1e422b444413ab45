"""The write path: appends (`append_batch`, `append_lone`) and links (`link_events`),
each in ONE statement, and the outcome and expected-version codes they share with
their callers.
"""

from __future__ import annotations

import functools

from ._quoting import _stored, quote_ident, quote_literal

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


def _notify(schema: str, rows: str) -> str:
    """A step that sends, in order, what the Elixir schema's ``event_notification``
    trigger sends for each stream row written (``rows``: a query of (o, p), the order
    and the payload ``'<stream_uuid>,<stream_id>,<first version>,<last version>'``),
    for statements run with ``session_replication_role = replica`` (the trigger does
    not fire then). One row (the count of notifications): join it to the result."""
    channel = quote_literal(f"{schema}.events")
    return (
        f"nt AS (SELECT count(pg_catalog.pg_notify({channel}, x.p)) AS c"
        f" FROM ({rows} ORDER BY 1 OFFSET 0) AS x(o, p))"
    )


def _payload(uuid: str, stream_id: str, before: str, n: str) -> str:
    """A stream's notification payload, for ``n`` events written after ``before``."""
    return f"{uuid} || ',' || {stream_id} || ',' || {_range(before, n)}"


def _range(before: str, n: str) -> str:
    return f"({before} + 1) || ',' || ({before} + {n})"


@functools.lru_cache(maxsize=64)  # built once per schema: a hot path
def append_batch(
    schema: str,
    column_data_type: str,
    *,
    lone: bool = False,
    pipelined: bool = False,
    notify: bool = False,
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

    ``notify``: the statement sends the notifications itself (`_notify`), for a
    connection whose triggers do not fire (``session_replication_role = replica``):
    the streams' (new streams first, then by stream_uuid), then `$all`'s, as the
    trigger would have queued them.
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
        + (_all_part(s) if pipelined else "")
        + (", " + _notify(schema, _batch_notifications(pipelined)) if notify else "")
        + " SELECT st.k, st.outcome, st.stream_id, st.before, a.base + ok.offs AS all_base,"
        " d.id AS duplicate_id"
        " FROM st LEFT JOIN ok ON ok.k = st.k LEFT JOIN a ON true"
        " LEFT JOIN dup d ON d.a = st.k"
        + (" CROSS JOIN nt" if notify else "")
        + (
            " CROSS JOIN rec"  # part 1: records what it wrote (one row per append)
            " UNION ALL SELECT 0, NULL, NULL, NULL, a2.base, NULL FROM a2"
            + (" CROSS JOIN nt" if notify else "")
            if pipelined
            else ""
        )
        + " ORDER BY 1"
    )


def _batch_notifications(pipelined: bool) -> str:
    """`append_batch`'s notifications (see `_notify`): each stream written, then `$all`
    (when ``pipelined``, part 1 has only the streams', part 2 only `$all`'s)."""
    streams = (
        "SELECT row_number() OVER (ORDER BY ok.existed, r.uuid),"
        f" {_payload('r.uuid', 'ok.stream_id', 'ok.before', 'ok.n')}"
        " FROM ok JOIN req r ON r.k = ok.k"
    )
    if pipelined:
        return (
            f"{streams} UNION ALL SELECT 0, '$all,0,' || {_range('a2.base', 't.total')}"
            " FROM a2, (SELECT count(*) AS total FROM evs) t"
        )
    return (
        f"{streams} UNION ALL SELECT 1 + (SELECT count(*) FROM ok),"
        f" '$all,0,' || {_range('a.base', 't.total')}"
        " FROM a, (SELECT sum(ok.n)::bigint AS total FROM ok) t"
    )


# `append_batch`'s `$all` part when ``pipelined``: part 1 records the appends it wrote
#: (``rec``: their indexes, stream ids and versions before, in transaction-local
#: settings); part 2 reads them back (``wrote``), locks `$all` (``a2``) and inserts the
#: `$all` rows of their events, in order.
def _all_part(s: str) -> str:
    return (
        ", rec AS ("
        " SELECT pg_catalog.set_config('trio_eventstore.k',"
        " coalesce((SELECT array_agg(ok.k ORDER BY ok.k) FROM ok), '{}')::text, true)"
        " || pg_catalog.set_config('trio_eventstore.sid',"
        " coalesce((SELECT array_agg(ok.stream_id ORDER BY ok.k) FROM ok), '{}')::text, true)"
        " || pg_catalog.set_config('trio_eventstore.before',"
        " coalesce((SELECT array_agg(ok.before ORDER BY ok.k) FROM ok), '{}')::text, true)"
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
        f" UPDATE {s}.streams SET stream_version = stream_version + t.total"
        " FROM (SELECT count(*) AS total FROM evs) t"
        " WHERE stream_id = 0 AND t.total > 0"
        " RETURNING stream_version - t.total AS base"
        "), se2 AS ("
        f" INSERT INTO {s}.stream_events"
        " (event_id, stream_id, stream_version, original_stream_id, original_stream_version)"
        " SELECT evs.id, 0, a2.base + evs.n, evs.sid, evs.v FROM a2, evs"
        ")"
    )


#: The stream step of `append_lone`, by expected-version kind (``EXPECT_VERSION`` 0 is
#: a new stream, as ``EXPECT_NO_STREAM``).
LONE_NEW, LONE_VERSION, LONE_EXISTS, LONE_ANY = "new", "version", "exists", "any"


@functools.lru_cache(maxsize=64)  # built once per schema and step: a hot path
def append_lone(
    schema: str, column_data_type: str, step: str, *, single: bool = False, notify: bool = False
) -> str:
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
    fails the statement (unique violation).

    ``single``: for an append of one event, its parameters are values, not arrays (no
    array to encode, decode and unnest).

    ``notify``: the statement sends the stream's and `$all`'s notifications itself (see
    `append_batch`)."""
    s = quote_ident(schema)
    n = "1::bigint" if single else "cardinality($2::uuid[])"
    update = (
        f"UPDATE {s}.streams SET stream_version = stream_version + {n}"
        " WHERE stream_uuid = $1 AND deleted_at IS NULL"
    )
    updated = f" RETURNING stream_id, stream_version - {n} AS before"

    def insert(condition: str) -> str:
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
        + (
            " FROM (VALUES ($2::uuid, $3::text, $4::uuid, $5::uuid, $6::bytea, $7::bytea))"
            if single
            else " FROM unnest($2::uuid[], $3::text[], $4::uuid[], $5::uuid[], $6::bytea[],"
            " $7::bytea[])"
        )
        + " AS u(id, t, c, r, d, m)"
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
        + (
            " FROM st, a, (VALUES ($2::uuid, 1::bigint)) AS u(id, k),"
            if single
            else " FROM st, a, unnest($2::uuid[]) WITH ORDINALITY AS u(id, k),"
        )
        + " LATERAL (VALUES (st.stream_id), (0::bigint)) AS x(sid)"
        ")"
        + (
            ", "
            + _notify(
                schema,
                f"SELECT 1, {_payload('$1::text', 'st.stream_id', 'st.before', n)} FROM st"
                f" UNION ALL SELECT 2, '$all,0,' || {_range('a.base', n)} FROM a",
            )
            if notify
            else ""
        )
        + " SELECT st.stream_id, st.before, a.base FROM st, a"
        + (", nt" if notify else "")
    )


#: For ``replica_appends`` (on one of its connections; $1 the schema): the connection's
#: ``session_replication_role``, and what on the store's three tables would go
#: unenforced on it beyond the Elixir schema's own: triggers and rules not disabled (as
#: 'table.name', with ' (enabled always)' or ' (enabled replica)' for those that would
#: still fire, with the checks of what they write skipped), foreign keys of their own,
#: deferrable constraints (their checks are internal triggers). The foreign keys of the
#: layout (the ``REPLICA_KEYS``) and its triggers (``REPLICA_TRIGGERS``) are the ones
#: appends keep true by their own locks, and whose notifications they send.
REPLICA_TRIGGERS = (
    "streams.event_notification",
    "streams.no_delete_streams",
    "events.no_update_events",
    "events.no_delete_events",
    "stream_events.no_update_stream_events",
    "stream_events.no_delete_stream_events",
)
REPLICA_KEYS = (
    "stream_events(event_id) -> events",
    "stream_events(stream_id) -> streams",
    "stream_events(original_stream_id) -> streams",
)
REPLICA_APPENDS_CHECK = (
    "WITH t AS ("
    " SELECT c.oid, c.relname FROM pg_catalog.pg_class c"
    " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " WHERE n.nspname = $1 AND c.relname IN ('streams', 'events', 'stream_events')"
    ") SELECT pg_catalog.current_setting('session_replication_role') AS role,"
    " ARRAY(SELECT t.relname || '.' || g.tgname || CASE g.tgenabled"
    " WHEN 'A' THEN ' (enabled always)' WHEN 'R' THEN ' (enabled replica)' ELSE '' END"
    " FROM pg_catalog.pg_trigger g"
    " JOIN t ON t.oid = g.tgrelid WHERE NOT g.tgisinternal AND g.tgenabled <> 'D'"
    " AND t.relname || '.' || g.tgname <> ALL($2::text[]) ORDER BY 1) AS triggers,"
    " ARRAY(SELECT k.key FROM (SELECT t.relname || '(' || (SELECT string_agg(a.attname, ', '"
    " ORDER BY a.attnum) FROM pg_catalog.pg_attribute a WHERE a.attrelid = k.conrelid"
    " AND a.attnum = ANY(k.conkey)) || ') -> ' || f.relname"
    " || CASE WHEN f.relnamespace = c.relnamespace THEN '' ELSE ' (another schema)' END AS key"
    " FROM pg_catalog.pg_constraint k JOIN t ON t.oid = k.conrelid"
    " JOIN pg_catalog.pg_class c ON c.oid = k.conrelid"
    " JOIN pg_catalog.pg_class f ON f.oid = k.confrelid WHERE k.contype = 'f') k"
    " WHERE k.key <> ALL($3::text[]) ORDER BY 1) AS keys,"
    " ARRAY(SELECT t.relname || '.' || r.rulename || CASE r.ev_enabled"
    " WHEN 'A' THEN ' (enabled always)' WHEN 'R' THEN ' (enabled replica)' ELSE '' END"
    " FROM pg_catalog.pg_rewrite r"
    " JOIN t ON t.oid = r.ev_class WHERE r.ev_enabled <> 'D' ORDER BY 1) AS rules,"
    # A deferrable unique, primary-key or exclusion constraint is checked by an internal
    # trigger (unique_key_recheck), which does not fire on such a connection either.
    " ARRAY(SELECT t.relname || '.' || k.conname FROM pg_catalog.pg_constraint k"
    " JOIN t ON t.oid = k.conrelid WHERE k.condeferrable AND k.contype <> 'f'"
    " ORDER BY 1) AS deferrable"
)


@functools.lru_cache(maxsize=64)  # built once per schema: a hot path
def link_events(schema: str) -> str:
    """A link of existing events into one stream, in ONE statement.

    Parameters: $1 stream_uuid, $2 kind (``EXPECT_*``), $3 expected version, $4 the
    event ids in order. Returns one row: ``outcome`` (``APPEND_*``; ``APPEND_DUPLICATE``
    when an event is missing), ``stream_id``, ``before`` and ``missing`` (the ids of
    the events that do not exist). Nothing is written unless the outcome is ``APPEND_OK``.
    An event already in the stream fails the statement (unique violation). Locks: the
    stream row (as `append_batch` takes it), then the rows of the events' own streams,
    sorted, ``FOR KEY SHARE`` (what the foreign-key checks take at the end), before
    anything is written: a hard delete of one of them (which holds its row, then deletes
    its events) is waited for, and its events then count as missing; taken by the
    checks only, the event's row was held first and the two waited for each other.
    Links never touch `$all`.
    """
    s = quote_ident(schema)
    outcome = _outcome("$2::int", "$3::bigint", "l", "c", "m.missing > 0")
    return (
        "WITH locked AS ("
        " SELECT stream_id, stream_uuid, stream_version, deleted_at"
        f" FROM {s}.streams WHERE stream_uuid = $1 FOR NO KEY UPDATE"
        "), seen AS ("
        " SELECT u.k, se.original_stream_id, se.original_stream_version"
        " FROM unnest($4::uuid[]) WITH ORDINALITY AS u(id, k)"
        f" JOIN {s}.stream_events se ON se.event_id = u.id"
        " AND se.stream_id = se.original_stream_id"
        "), sources AS ("
        f" SELECT s.stream_id FROM {s}.streams s"
        " WHERE s.stream_id IN (SELECT seen.original_stream_id FROM seen)"
        " AND (SELECT count(*) FROM locked) >= 0"
        " ORDER BY s.stream_id FOR KEY SHARE"
        "), orig AS ("
        " SELECT seen.k, seen.original_stream_id, seen.original_stream_version FROM seen"
        " WHERE seen.original_stream_id IN (SELECT sources.stream_id FROM sources)"
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
