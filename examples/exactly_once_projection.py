"""An exactly-once projection: a read model in Postgres that survives kill -9.

The program appends 600 deposits to 6 accounts, then runs the projection in a child
process and kills it with SIGKILL three times at random moments (often in the middle of a
batch's transaction), restarting it each time. The read model then holds each account's
exact total and deposit count: no deposit lost, none counted twice. The projection's
position lives in ``example_read_model.projection_versions`` and commits with the read
model; the subscription's checkpoint is persisted only every 100 events, so every restart
is handed events again, which the projection skips.

    python examples/exactly_once_projection.py      # a throwaway server, or EVENTSTORE_URL
"""

from __future__ import annotations

import random
import sys
import uuid
from collections import Counter

import asyncpg
import trio
import trio_asyncio
from _common import database_url

from trio_eventstore import (
    ANY_VERSION,
    EventData,
    EventStoreConfig,
    Projection,
    RecordedEvent,
    TransactionConnection,
    admin,
    open_event_store,
)

SCHEMA = "example_read_model"
ACCOUNTS = 6
DEPOSITS = 600


async def create_tables(conn: TransactionConnection) -> None:
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {SCHEMA}.balances (account_id text PRIMARY KEY, "
        "balance bigint NOT NULL, deposits bigint NOT NULL)"
    )


async def add_deposits(conn: TransactionConnection, events: list[RecordedEvent]) -> None:
    """The read model's SQL for one batch, inside the batch's transaction."""
    totals: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for event in events:
        assert isinstance(event.data, dict)
        totals[event.stream_uuid] += event.data["amount"]
        counts[event.stream_uuid] += 1
    await conn.executemany(
        f"INSERT INTO {SCHEMA}.balances VALUES ($1, $2, $3) ON CONFLICT (account_id) DO UPDATE "
        "SET balance = balances.balance + $2, deposits = balances.deposits + $3",
        [(account, totals[account], counts[account]) for account in sorted(totals)],
    )
    await trio.sleep(0.08)  # a slow read model: kills land inside the transaction


def projection(run: str) -> Projection:
    return Projection(
        f"balances-{run}", add_deposits, schema=SCHEMA, batch=True, setup=create_tables
    )


async def project(config: EventStoreConfig, run: str, start: int, until: int) -> None:
    """The child process: run the projection until it has applied event ``until``."""
    balances = projection(run)
    async with (
        open_event_store(config) as store,
        store.subscribe_to_all_streams(
            balances.name, start_from=start, buffer_size=20, checkpoint_threshold=100
        ) as sub,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(balances.run, store, sub)
        await sub.wait_acked(until)
        nursery.cancel_scope.cancel()


async def main(config: EventStoreConfig) -> None:
    await admin.create(config)
    await admin.init(config)
    run = uuid.uuid4().hex[:6]
    rng = random.Random()
    async with open_event_store(config) as store:
        start = (await store.stream_info("$all")).stream_version
        expected: Counter[str] = Counter()
        for i in range(ACCOUNTS):
            account = f"account-{run}-{i}"
            amounts = [rng.randint(1, 100) for _ in range(DEPOSITS // ACCOUNTS)]
            expected[account] = sum(amounts)
            await store.append_to_stream(
                account,
                ANY_VERSION,
                [EventData({"amount": amount}, event_type="Deposited") for amount in amounts],
            )
        until = (await store.stream_info("$all")).stream_version
        print(f"appended {DEPOSITS} deposits (events {start + 1}..{until})")

        balances = projection(run)
        child = [sys.executable, __file__, "--project", config.url or "", run, str(start)]
        child.append(str(until))
        for _ in range(3):
            process = await trio.lowlevel.open_process(child)
            await trio.sleep(rng.uniform(0.8, 2.0))
            process.kill()  # SIGKILL: no cleanup, no checkpoint flush
            await process.wait()
            applied = await balances.position(store) - start
            print(f"killed the projection with SIGKILL after {max(applied, 0)} events applied")
        await trio.run_process(child)  # to the end
        print(f"projection finished at event {await balances.position(store)}")

    async with trio_asyncio.open_loop():
        conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(config.url)
        rows = await trio_asyncio.aio_as_trio(conn.fetch)(
            f"SELECT account_id, balance, deposits FROM {SCHEMA}.balances "
            "WHERE account_id LIKE $1 ORDER BY account_id",
            f"account-{run}-%",
        )
        await trio_asyncio.aio_as_trio(conn.close)()
    for row in rows:
        print(
            f"read model: {row['account_id']} balance {row['balance']} "
            f"from {row['deposits']} deposits"
        )
    assert {row["account_id"]: row["balance"] for row in rows} == dict(expected)
    assert all(row["deposits"] == DEPOSITS // ACCOUNTS for row in rows)
    print("every deposit counted exactly once")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--project"]:
        url, run, start, until = sys.argv[2:]
        trio.run(project, EventStoreConfig.from_env(url=url), run, int(start), int(until))
    else:
        with database_url("exactly_once") as url:
            trio.run(main, EventStoreConfig.from_env(url=url))
