"""A bank-account aggregate: optimistic concurrency and snapshots.

Two tellers withdraw from one account at the same time; the one that loses the race
(WrongExpectedVersionError) reloads the account and tries again, and an overdraft is
refused. The aggregate is rebuilt from its latest snapshot plus the events after it.
"""

from __future__ import annotations

import uuid

import attrs
import trio
import trio.lowlevel
from _common import database_url

from trio_eventstore import (
    EventData,
    EventStore,
    EventStoreConfig,
    JsonSerializer,
    SnapshotData,
    SnapshotNotFoundError,
    WrongExpectedVersionError,
    admin,
    open_event_store,
)

serializer = JsonSerializer()


@serializer.register(event_type="Elixir.Bank.Events.Deposited")
@attrs.frozen
class Deposited:
    amount: int


@serializer.register(event_type="Elixir.Bank.Events.Withdrawn")
@attrs.frozen
class Withdrawn:
    amount: int


@serializer.register(event_type="Elixir.Bank.AccountState")
@attrs.frozen
class Account:
    balance: int = 0

    def apply(self, event: object) -> Account:
        if isinstance(event, Deposited):
            return Account(self.balance + event.amount)
        if isinstance(event, Withdrawn):
            return Account(self.balance - event.amount)
        return self


async def load(store: EventStore, account_id: str) -> tuple[Account, int]:
    """The account at its current version: the snapshot, then the events after it."""
    try:
        snapshot = await store.read_snapshot(account_id)
        state, version = snapshot.data, snapshot.source_version
        assert isinstance(state, Account)
    except SnapshotNotFoundError:
        state, version = Account(), 0
    try:
        async for event in store.stream_forward(account_id, start_version=version + 1):
            state, version = state.apply(event.data), event.stream_version
    except LookupError:
        pass  # a new account
    return state, version


async def withdraw(store: EventStore, account_id: str, amount: int, teller: str) -> None:
    for attempt in range(1, 10):
        state, version = await load(store, account_id)
        await trio.lowlevel.checkpoint()  # let the other teller read the same version
        if state.balance < amount:
            print(f"{teller}: refused {amount} (balance {state.balance})")
            return
        try:
            await store.append_to_stream(account_id, version, [EventData(Withdrawn(amount))])
            print(f"{teller}: withdrew {amount} at version {version + 1} (attempt {attempt})")
            return
        except WrongExpectedVersionError:
            print(f"{teller}: lost the race at version {version}, reloading")
            await trio.lowlevel.checkpoint()


async def main(config: EventStoreConfig) -> None:
    await admin.create(config)
    await admin.init(config)
    account = f"account-{uuid.uuid4().hex[:6]}"
    async with open_event_store(config) as store:
        await store.append_to_stream(account, 0, [EventData(Deposited(100))])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(withdraw, store, account, 70, "teller A")
            nursery.start_soon(withdraw, store, account, 60, "teller B")
        state, version = await load(store, account)
        await store.record_snapshot(
            SnapshotData(source_uuid=account, source_version=version, data=state)
        )
        await store.append_to_stream(account, version, [EventData(Deposited(5))])
        state, version = await load(store, account)  # snapshot + 1 event
        print(f"{account}: balance {state.balance} at version {version}")
        assert state.balance in (35, 45)


if __name__ == "__main__":
    with database_url("bank") as url:
        trio.run(main, EventStoreConfig.from_env(url=url, serializer=serializer))
