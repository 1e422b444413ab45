"""Rows of the ``subscriptions`` table: create, read, checkpoint, reset, delete."""

from __future__ import annotations

import functools

from ._quoting import quote_ident


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


def reset_subscriptions(schema: str) -> str:
    """Parameters: subscription ids, last_seen (may move backwards)."""
    return (
        f"UPDATE {quote_ident(schema)}.subscriptions SET last_seen = $2 "
        "WHERE subscription_id = ANY($1::bigint[])"
    )
