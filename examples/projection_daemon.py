"""A projection daemon: keep a read model (account balances) in a Postgres table.

The handler runs under the subscriber daemon (`open_subscriber_daemon`; in production
`trio-eventstore run module:handler` or `run_subscribers`, which stop cleanly on
SIGTERM). It is idempotent under at-least-once delivery: each row remembers the last
event applied to it, and an event at or below that number changes nothing.
The read model uses its own driver (asyncpg through trio-asyncio here).
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import trio
import trio_asyncio
from _common import database_url

from trio_eventstore import (
    ANY_VERSION,
    EventData,
    EventStoreConfig,
    RecordedEvent,
    SubscriberSpec,
    admin,
    open_event_store,
    open_subscriber_daemon,
)

UPSERT = """
INSERT INTO read_model_balances (account_id, balance, last_event) VALUES ($1, $2, $3)
ON CONFLICT (account_id) DO UPDATE
  SET balance = read_model_balances.balance + EXCLUDED.balance, last_event = EXCLUDED.last_event
  WHERE read_model_balances.last_event < EXCLUDED.last_event
"""


class BalancesProjection:
    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.applied = trio.Event()
        self.count = 0

    async def handle(self, event: RecordedEvent) -> None:
        assert isinstance(event.data, dict)
        await trio_asyncio.aio_as_trio(self.conn.execute)(
            UPSERT, event.stream_uuid, event.data["amount"], event.event_number
        )
        self.count += 1
        if self.count == 6:
            self.applied.set()


async def main(config: EventStoreConfig) -> None:
    await admin.create(config)
    await admin.init(config)
    url = config.url or ""
    async with trio_asyncio.open_loop():
        conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(url)
        await trio_asyncio.aio_as_trio(conn.execute)(
            "CREATE TABLE IF NOT EXISTS read_model_balances "
            "(account_id text PRIMARY KEY, balance bigint NOT NULL, last_event bigint NOT NULL)"
        )
        run = uuid.uuid4().hex[:6]
        projection = BalancesProjection(conn)
        async with open_event_store(config) as store:
            head = (await store.stream_info("$all")).stream_version
            spec = SubscriberSpec(
                name=f"balances-{run}",
                handler=projection.handle,
                start_from=head,
                buffer_size=10,
            )
            async with open_subscriber_daemon(store, [spec]) as daemon:
                for i in range(6):
                    await store.append_to_stream(
                        f"acct-{run}-{i % 2}",
                        ANY_VERSION,
                        [EventData({"amount": 10 * (i + 1)}, event_type="Deposited")],
                    )
                with trio.fail_after(60):
                    await projection.applied.wait()
                print(daemon.statistics()[0].as_dict())
        rows = await trio_asyncio.aio_as_trio(conn.fetch)(
            "SELECT account_id, balance FROM read_model_balances WHERE account_id LIKE $1 "
            "ORDER BY account_id",
            f"acct-{run}-%",
        )
        for row in rows:
            print(f"read model: {row['account_id']} balance {row['balance']}")
        assert [r["balance"] for r in rows] == [90, 120]
        await trio_asyncio.aio_as_trio(conn.close)()


if __name__ == "__main__":
    with database_url("projection") as url:
        trio.run(main, EventStoreConfig.from_env(url=url))
