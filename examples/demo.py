"""The demo: create and initialise a store, append with optimistic concurrency, link,
read back, and run a projection on a persistent subscription that resumes after a
restart.

With ``EVENTSTORE_URL`` set it uses that database; otherwise it starts a throwaway
PostgreSQL for the run and removes it afterwards.
"""

from __future__ import annotations

import decimal
import sys
import uuid

import attrs
import trio
from _common import database_url

from trio_eventstore import (
    NO_STREAM,
    EventData,
    EventStoreConfig,
    JsonSerializer,
    WrongExpectedVersionError,
    admin,
    open_event_store,
)

serializer = JsonSerializer()


@serializer.register(event_type="Elixir.Bank.Events.Deposited")
@attrs.frozen
class Deposited:
    account_id: str
    amount: decimal.Decimal


async def demo(config: EventStoreConfig) -> None:
    print(await admin.create(config))
    print(await admin.init(config))
    print(await admin.migrate(config))
    account = f"account-{uuid.uuid4().hex[:6]}"  # new streams on every run
    async with open_event_store(config) as store:
        version = await store.append_to_stream(
            account, NO_STREAM, [EventData(Deposited(account, decimal.Decimal("10.00")))]
        )
        print(f"appended to {account}: version {version}")
        try:  # a second writer that read version 0 loses
            await store.append_to_stream(
                account, 0, [EventData(Deposited(account, decimal.Decimal("5")))]
            )
        except WrongExpectedVersionError as exc:
            print(f"optimistic concurrency: {exc}")
        await store.append_to_stream(
            account, 1, [EventData(Deposited(account, decimal.Decimal("2.50")))]
        )
        events = await store.read_stream_forward(account)
        await store.link_to_stream(f"big-deposits-{account}", NO_STREAM, [events[0]])
        for event in await store.read_stream_forward(f"big-deposits-{account}"):
            print(f"  linked: {event.stream_uuid}/{event.stream_version} {event.data}")
        async for event in store.stream_forward(account):
            print(f"  {account} #{event.event_number}: {event.event_type} {event.data}")
        # A projection on a persistent subscription: it handles what is there, "restarts"
        # (leaves; its checkpoint is persisted), and resumes after the checkpoint.
        name = f"totals-{account}"
        total = decimal.Decimal(0)
        async with store.subscribe_to_stream(account, name, buffer_size=10) as sub:
            async for batch in sub:
                total += sum(e.data.amount for e in batch.events if isinstance(e.data, Deposited))
                sub.ack(batch)
                print(f"projection: handled {account} up to version {batch.last_event_number}")
                break
        await store.append_to_stream(
            account, 2, [EventData(Deposited(account, decimal.Decimal("7.25")))]
        )
    print("store closed: the projection's checkpoint was persisted when it left")
    async with open_event_store(config) as store:  # the service restarts
        async with store.subscribe_to_stream(account, name, buffer_size=10) as sub:
            batch = await sub.__anext__()
            total += sum(e.data.amount for e in batch.events if isinstance(e.data, Deposited))
            sub.ack(batch)
            print(
                f"projection: resumed after the restart at version "
                f"{batch.events[0].stream_version}; total deposited {total}"
            )
        info = await store.stream_info("$all")
        print(f"stream {info.stream_uuid!r}: version {info.stream_version}, {info.status.value}")
        print(store.statistics())


def main() -> int:
    with database_url("trio_eventstore_demo") as url:
        config = EventStoreConfig.from_env(url=url, serializer=serializer)
        trio.run(demo, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
