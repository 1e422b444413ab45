"""Advisory locks of subscriptions (trying, releasing, balancing, who holds them) and
the settings of the sessions that hold them."""

from __future__ import annotations

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
