"""Helpers shared by the benchmarks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import asyncpg

from trio_eventstore import EventStoreConfig, _sql

T = TypeVar("T")


def run_asyncio(coro: Coroutine[Any, Any, T]) -> T:
    """Run a baseline on a plain asyncio event loop.

    Importing trio-asyncio replaces the loop `asyncio.run` would make with its own
    (a Trio loop run in a greenlet); baselines must not pay for that.
    """
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(coro)


async def _vacuum(config: EventStoreConfig) -> None:
    conn = await asyncpg.connect(**config.connect_params())
    try:
        await conn.execute("VACUUM (ANALYZE)")
    finally:
        await conn.close()


def vacuum(config: EventStoreConfig) -> None:
    """VACUUM ANALYZE after filling tables, before reads are measured.

    Freshly written rows are read slowly the first time (hint bits, visibility map):
    a read measured right after a fill was up to twice as slow as the same read later,
    whichever side ran first.
    """
    run_asyncio(_vacuum(config))


async def raw_read_rate(config: EventStoreConfig, stream_id: int, total: int) -> float:
    """Events per second of the store's own read SELECT through asyncpg, in pages of
    1000, rows left as they come (no decoding): the raw-read baseline."""
    conn = await asyncpg.connect(**config.connect_params())
    query = _sql.read_stream(config.schema, config.column_data_type, forward=True)
    try:
        started = time.perf_counter()
        position, count = 0, 0
        while count < total:
            rows = await conn.fetch(query, stream_id, position + 1, 1000)
            if not rows:
                break
            count += len(rows)
            position = rows[-1]["event_number"]
        return count / (time.perf_counter() - started)
    finally:
        await conn.close()


async def keep_session(_conn: Any) -> None:
    """The baseline pools' reset on release: nothing (as our own pool: units of work
    never change session state), so both sides skip the RESET ALL round trip."""
