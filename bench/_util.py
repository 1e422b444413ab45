"""Helpers shared by the benchmarks."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import asyncpg

from trio_eventstore import EventStoreConfig

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
