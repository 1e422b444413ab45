"""A projection process for the kill -9 tests (`tests/test_projection_kill.py`).

``python -m tests.projection_worker URL SCHEMA READ_SCHEMA MODE UNTIL THRESHOLD``: counts
events per ``data["key"]`` into ``READ_SCHEMA.counts`` from the ``$all`` subscription
``counts`` (its ``checkpoint_threshold``: THRESHOLD), and exits cleanly once it has
handled event number ``UNTIL`` (the tests mostly kill it long before). Modes:

* ``batch``: `Projection.run`, one handler call and one transaction per batch;
* ``events``: `Projection.run`, one handler call per event, one transaction per batch;
* ``daemon``: under the subscriber daemon, one transaction per event (its default
  options: checkpoint after every event);
* ``naive``: no projection: the read model's own transaction per batch, then the ack
  (the checkpoint is the only position): what the others must never do, double apply.

Handlers pause inside their transactions (``PAUSE``), so that kills land there too.
"""

from __future__ import annotations

import sys
from collections import Counter

import trio

from trio_eventstore import (
    EventStore,
    EventStoreConfig,
    Projection,
    RecordedEvent,
    SubscriberSpec,
    TransactionConnection,
    open_event_store,
    open_subscriber_daemon,
)
from trio_eventstore._sql import quote_ident

NAME = "counts"
BUFFER_SIZE = 20
#: seconds inside each transaction (per batch; per event for ``daemon``)
PAUSE = {"batch": 0.03, "events": 0.03, "daemon": 0.001, "naive": 0.03}


def increments(read_schema: str) -> str:
    return (
        f"INSERT INTO {quote_ident(read_schema)}.counts (key, n) VALUES ($1, $2) "
        "ON CONFLICT (key) DO UPDATE SET n = counts.n + EXCLUDED.n"
    )


def projection(read_schema: str, mode: str) -> Projection:
    sql = increments(read_schema)

    async def setup(conn: TransactionConnection) -> None:
        s = quote_ident(read_schema)
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {s}.counts (key text PRIMARY KEY, n bigint NOT NULL)"
        )

    async def per_batch(conn: TransactionConnection, events: list[RecordedEvent]) -> None:
        by_key = Counter(_key(e) for e in events)
        await conn.executemany(sql, sorted(by_key.items()))
        await trio.sleep(PAUSE[mode])

    async def per_event(conn: TransactionConnection, event: RecordedEvent) -> None:
        await conn.execute(sql, _key(event), 1)
        await trio.sleep(PAUSE[mode] / BUFFER_SIZE if mode == "events" else PAUSE[mode])

    if mode == "batch":
        return Projection(NAME, per_batch, schema=read_schema, batch=True, setup=setup)
    return Projection(NAME, per_event, schema=read_schema, setup=setup)


def _key(event: RecordedEvent) -> str:
    assert isinstance(event.data, dict)
    key: str = event.data["key"]
    return key


async def naive(store: EventStore, read_schema: str, until: int, threshold: int) -> None:
    sql = increments(read_schema)
    async with store.subscribe_to_all_streams(
        NAME, buffer_size=BUFFER_SIZE, checkpoint_threshold=threshold
    ) as sub:
        async for batch in sub:
            async with store._db.open_transaction() as conn:  # the read model only
                by_key = Counter(_key(e) for e in batch.events)
                await conn.executemany(sql, sorted(by_key.items()))
                await trio.sleep(PAUSE["naive"])
            sub.ack(batch)  # the checkpoint: a second, later transaction
            if batch.last_event_number >= until:
                return


async def main(
    url: str, schema: str, read_schema: str, mode: str, until: int, threshold: int
) -> None:
    config = EventStoreConfig(url=url, schema=schema, subscription_retry_interval=0.2)
    async with open_event_store(config) as store:
        if mode == "naive":
            await naive(store, read_schema, until, threshold)
            return
        counts = projection(read_schema, mode)
        if mode == "daemon":
            await counts.prepare(store)
            spec = SubscriberSpec(name=NAME, handler=counts.event_handler(store))
            async with open_subscriber_daemon(store, [spec]) as daemon:
                while True:  # its last ack comes after the commit
                    if daemon.statistics()[0].last_ack >= until:
                        break
                    await trio.sleep(0.05)
            return
        async with (
            store.subscribe_to_all_streams(
                NAME, buffer_size=BUFFER_SIZE, checkpoint_threshold=threshold
            ) as sub,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(counts.run, store, sub)
            await sub.wait_acked(until)  # committed, then acked; flushed on leaving
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    url, schema, read_schema, mode, until, threshold = sys.argv[1:]
    trio.run(main, url, schema, read_schema, mode, int(until), int(threshold))
