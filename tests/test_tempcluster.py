"""The throwaway cluster: fast (not durable) for tests, durable on request (benchmarks)."""

from __future__ import annotations

import pytest

from trio_eventstore import EventStoreConfig
from trio_eventstore._pg import open_connection
from trio_eventstore._tempcluster import temp_cluster


async def _settings(url: str) -> list[str]:
    async with open_connection(EventStoreConfig(url=url)) as conn:
        return [
            await conn.fetchval(f"SHOW {name}")
            for name in ("fsync", "synchronous_commit", "full_page_writes")
        ]


@pytest.mark.parametrize(("durable", "expected"), [(False, "off"), (True, "on")])
async def test_durable_keeps_fsync_and_synchronous_commit(durable: bool, expected: str) -> None:
    with temp_cluster(durable=durable) as cluster:
        assert await _settings(cluster.url()) == [expected] * 3
