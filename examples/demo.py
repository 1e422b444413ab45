"""The demo: create and initialise a store, then show what it holds.

With ``EVENTSTORE_URL`` set it uses that database; otherwise it starts a throwaway
PostgreSQL for the run and removes it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import trio

from trio_eventstore import EventStoreConfig, admin, open_event_store
from trio_eventstore._tempcluster import temp_cluster


@contextlib.contextmanager
def database_url() -> Iterator[str]:
    if os.environ.get("EVENTSTORE_URL"):
        yield os.environ["EVENTSTORE_URL"]
        return
    print("EVENTSTORE_URL is not set: starting a throwaway PostgreSQL ...")
    with temp_cluster() as cluster:
        yield cluster.url("trio_eventstore_demo")


async def demo(config: EventStoreConfig) -> None:
    print(await admin.create(config))
    print(await admin.init(config))
    print(await admin.migrate(config))
    async with open_event_store(config) as store:
        info = await store.stream_info("$all")
        print(
            f"stream {info.stream_uuid!r}: id {info.stream_id}, version "
            f"{info.stream_version}, {info.status.value} at {info.created_at:%Y-%m-%d %H:%M:%S}Z"
        )
        print(store.statistics())


def main() -> int:
    with database_url() as url:
        config = EventStoreConfig.from_env(url=url)
        trio.run(demo, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
