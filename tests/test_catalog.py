"""Our `init` produces the Elixir EventStore 1.4 layout, object for object.

Runs the catalog query stored in tests/reference/elixir-schema-catalog.json (read from
a database the real Elixir library initialised) against schemas made by our `init`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from trio_eventstore import EventStoreConfig, admin
from trio_eventstore._pg import Conn, open_connection
from trio_eventstore._sql import quote_ident, quote_literal

from .helpers import REFERENCE, url_for

CATALOG = json.loads((REFERENCE / "elixir-schema-catalog.json").read_text())
#: Keys of a catalog entry that the query does not produce (notes about the Elixir run).
NOT_FROM_QUERY = {
    "eventstore_config",
    "schema_owner_note",
    "state_after_init",
    "schema_migrations_note",
}


def catalog_sql(schema: str) -> tuple[str, str]:
    """The stored psql query with its variables bound: (SET statement, query)."""
    text = CATALOG["catalog_query_psql"]
    text = text.replace(":'schema'", quote_literal(schema)).replace(
        ':"schema"', quote_ident(schema)
    )
    lines = [line for line in text.splitlines() if not line.startswith("--")]
    body = "\n".join(lines).strip()
    set_stmt, query = body.split(";", 1)
    return set_stmt, query.strip().rstrip(";")


def normalize(value: Any, schema: str) -> Any:
    """The stored normalization rule: schema references become '<schema>'."""
    if isinstance(value, dict):
        return {k: normalize(v, schema) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize(v, schema) for v in value]
    if isinstance(value, str):
        if value == schema:
            return "<schema>"
        pattern = "(?:" + re.escape(quote_ident(schema)) + "|" + re.escape(schema) + r")\."
        return re.sub(pattern, "<schema>.", value)
    return value


def without_bodies(catalog: dict[str, Any]) -> dict[str, Any]:
    result = {k: v for k, v in catalog.items() if k not in NOT_FROM_QUERY}
    result["functions"] = [
        {k: v for k, v in f.items() if k != "body_md5_ws_normalized"} for f in result["functions"]
    ]
    return result


async def read_catalog(config: EventStoreConfig) -> dict[str, Any]:
    set_stmt, query = catalog_sql(config.schema)

    async def unit(conn: Conn) -> str:
        await conn.execute(set_stmt)
        try:
            value: str = await conn.fetchval(query)
        finally:
            await conn.execute("RESET search_path")
        return value

    async with open_connection(config) as conn:
        raw = await conn.run(unit)
    result: dict[str, Any] = normalize(json.loads(raw), config.schema)
    return result


@pytest.fixture
async def fresh_database(server_url: str) -> AsyncIterator[str]:
    name = f"cat_{uuid.uuid4().hex[:10]}"
    url = url_for(server_url, name)
    yield url
    with trio.CancelScope(shield=True):
        await admin.drop(EventStoreConfig(url=url))


def assert_catalog_equal(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    actual, expected = without_bodies(actual), without_bodies(expected)
    assert actual.keys() == expected.keys()
    for key in expected:
        if key == "tables":
            assert [t["name"] for t in actual[key]] == [t["name"] for t in expected[key]]
            for mine, theirs in zip(actual[key], expected[key], strict=True):
                assert mine == theirs, f"table {theirs['name']} differs"
        else:
            assert actual[key] == expected[key], f"{key} differs"


async def state_after_init(config: EventStoreConfig) -> dict[str, Any]:
    s = quote_ident(config.schema)
    async with open_connection(config) as conn:
        streams = await conn.fetch(
            f"SELECT stream_id, stream_uuid, stream_version, deleted_at FROM {s}.streams"
        )
        counts = {
            f"{table}_count": await conn.fetchval(f"SELECT count(*) FROM {s}.{table}")
            for table in ("events", "stream_events", "subscriptions", "snapshots")
        }
        seqs = {}
        for name in ("streams_stream_id_seq", "subscriptions_subscription_id_seq"):
            row = (await conn.fetch(f"SELECT last_value, is_called FROM {s}.{name}"))[0]
            seqs[name] = {"last_value": row["last_value"], "is_called": row["is_called"]}
    return {"streams": [dict(r.items()) for r in streams], **counts, **seqs}


@pytest.mark.parametrize(
    ("reference", "schema", "column_data_type"),
    [
        ("public", "public", "bytea"),
        ("jsonbstore", "jsonbstore", "jsonb"),
        ("public", 'x"; drop table y; --', "bytea"),
    ],
)
async def test_init_matches_elixir_catalog(
    fresh_database: str, reference: str, schema: str, column_data_type: str
) -> None:
    config = EventStoreConfig(url=fresh_database, schema=schema, column_data_type=column_data_type)  # type: ignore[arg-type]
    await admin.create(config)
    result = await admin.init(config)
    assert result.changed
    expected = CATALOG["schemas"][reference]
    assert_catalog_equal(await read_catalog(config), expected)
    assert await state_after_init(config) == expected["state_after_init"]
    # A second init is a no-op and leaves the same catalog.
    again = await admin.init(config)
    assert not again.changed
    assert_catalog_equal(await read_catalog(config), expected)
