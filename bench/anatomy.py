"""Where a lone append's time goes: its statement sent raw, the Trio/asyncio crossing,
and the store around them (part of ``python -m bench --only=writes``).

Four measurements, one writer each, taken in turns (`bench.writes.alternate`):

* ``SELECT 1`` with asyncpg on plain asyncio, and through the store's pool from Trio: the
  difference is what one crossing of the Trio/asyncio bridge costs per round trip;
* the store's own append statement (a new stream, one event) sent raw by asyncpg on
  asyncio, and a whole ``append_to_stream`` through the store: the difference is the
  store around its statement (the crossing, encoding, the group-commit writer's hand-off,
  its LISTEN connection reading the append's own notifications).
"""

from __future__ import annotations

import functools
import uuid
from typing import Any

import asyncpg
import trio

from bench._util import run_asyncio
from bench.writes import (
    OurAppends,
    Report,
    Run,
    Timing,
    alternate,
    drive_asyncio,
    drive_trio,
    events,
)
from trio_eventstore import NO_STREAM, EventStoreConfig, _storage, open_event_store


async def _raw(config: EventStoreConfig, timing: Timing, *, statement: bool) -> Run:
    conn = await asyncpg.connect(**config.connect_params())
    prefix = f"anatomy-raw-{uuid.uuid4().hex[:8]}"
    count = 0

    async def one(_k: int) -> int:
        nonlocal count
        if not statement:
            await conn.fetchval("SELECT 1")
            return 1
        count += 1
        encoded = _storage.encode_events(config.serializer, events(1))
        request = _storage.AppendRequest.build(f"{prefix}-{count}", NO_STREAM, encoded)
        sql, params, _ = _storage.lone_statement(config, request)
        await conn.fetch(sql, *params)
        return 1

    try:
        return await drive_asyncio(1, one, timing)
    finally:
        await conn.close()


async def _store(config: EventStoreConfig, timing: Timing, *, statement: bool) -> Run:
    async with open_event_store(config) as store:
        if statement:
            work = OurAppends(store, f"anatomy-{uuid.uuid4().hex[:8]}", 1, fresh=True)
            return await drive_trio(1, work.one, timing)
        db: Any = store._db  # the store's own pool, as its reads use it

        async def one(_k: int) -> int:
            await db.fetchval("SELECT 1")
            return 1

        return await drive_trio(1, one, timing)


def run(config: EventStoreConfig, timing: Timing, report: Report) -> None:
    runs = alternate(
        {
            "raw SELECT 1": lambda t: run_asyncio(_raw(config, t, statement=False)),
            "store SELECT 1": lambda t: trio.run(
                functools.partial(_store, config, t, statement=False)
            ),
            "raw append statement": lambda t: run_asyncio(_raw(config, t, statement=True)),
            "store append": lambda t: trio.run(
                functools.partial(_store, config, t, statement=True)
            ),
        },
        timing,
    )
    print("\nWhere a lone append's time goes (1 writer; a new stream, one event)")
    print(f"  {'':22} {'p50 ms':>8} {'CPU us':>8}")
    for side, r in runs.items():
        print(f"  {side:22} {r.p50:8.3f} {r.cpu_per_event:8.1f}")
    raw1, store1 = runs["raw SELECT 1"], runs["store SELECT 1"]
    raw_append, store_append = runs["raw append statement"], runs["store append"]
    bridge_ms, bridge_cpu = store1.p50 - raw1.p50, store1.cpu_per_event - raw1.cpu_per_event
    around_ms = store_append.p50 - raw_append.p50
    around_cpu = store_append.cpu_per_event - raw_append.cpu_per_event
    print(f"  one crossing of the bridge:   {bridge_ms:+.3f} ms p50, {bridge_cpu:+.1f} us CPU")
    print(f"  the store around its statement: {around_ms:+.3f} ms p50, {around_cpu:+.1f} us CPU")
    print(
        f"  the statement itself (server, network, asyncpg): {raw_append.p50:.3f} ms p50, "
        f"of which a bare round trip {raw1.p50:.3f} ms"
    )
    report.data["anatomy"] = {side: r.summary() for side, r in runs.items()}
