"""Competing consumers with partition_by: three workers share one subscription; each
account's events go to one worker at a time, in order, even when a worker crashes."""

from __future__ import annotations

import uuid

import trio
from _common import database_url

from trio_eventstore import (
    ANY_VERSION,
    EventData,
    EventStore,
    EventStoreConfig,
    admin,
    open_event_store,
)


async def worker(
    store: EventStore,
    name: str,
    crash_after: int | None,
    seen: dict[str, list[int]],
    done: trio.Event,
) -> None:
    handled = 0
    async with store.subscribe_to_all_streams(
        "shipping",
        concurrency_limit=3,
        buffer_size=2,
        partition_by=lambda e: e.stream_uuid,
    ) as sub:
        async for batch in sub:
            for event in batch.events:
                seen.setdefault(event.stream_uuid, []).append(event.stream_version)
                handled += 1
                if crash_after is not None and handled == crash_after:
                    print(f"{name}: crashes with events in flight")
                    return
                sub.ack(event)
            if sum(len(v) for v in seen.values()) >= 30:
                done.set()


async def main(config: EventStoreConfig) -> None:
    await admin.create(config)
    await admin.init(config)
    config = config.with_changes(schema=f"cc_{uuid.uuid4().hex[:6]}")
    await admin.create(config)
    await admin.init(config)
    seen: dict[str, list[int]] = {}
    done = trio.Event()
    async with open_event_store(config) as store:
        for i in range(30):
            await store.append_to_stream(
                f"account-{i % 3}", ANY_VERSION, [EventData({"i": i}, event_type="Ordered")]
            )
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(worker, store, "worker-1", 4, seen, done)
                nursery.start_soon(worker, store, "worker-2", None, seen, done)
                nursery.start_soon(worker, store, "worker-3", None, seen, done)
                await done.wait()
                nursery.cancel_scope.cancel()
    for account, versions in sorted(seen.items()):
        first_seen = list(dict.fromkeys(versions))
        print(f"{account}: {len(versions)} deliveries, order {first_seen[:6]}...")
        assert first_seen == sorted(first_seen)  # per-partition order held
    await admin.drop(config)


if __name__ == "__main__":
    with database_url("competing") as url:
        trio.run(main, EventStoreConfig.from_env(url=url))
