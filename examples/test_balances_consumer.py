"""A consumer test with trio-eventstore's testing kit: copy it, swap in your consumer.

Run it with ``pytest examples/test_balances_consumer.py``. Hypothesis generates event
histories and at-least-once delivery schedules (duplicates, crashes before the ack) and
checks that the consumer ends in the same state as after one clean pass; when it does
not, it shrinks to the smallest history and says which redelivery broke it.
"""

from __future__ import annotations

import attrs
from hypothesis import given, settings

from trio_eventstore import ANY_VERSION, EventData, EventStore, JsonSerializer, RecordedEvent
from trio_eventstore.testing import (
    Delivery,
    check_redelivery,
    recorded_histories,
    redeliveries,
    wait_caught_up,
)

serializer = JsonSerializer()


@serializer.register(event_type="Elixir.Bank.Events.Deposited")
@attrs.frozen
class Deposited:
    account_id: str
    amount: int


class Balances:
    """The consumer under test: a projection of balances per account."""

    def __init__(self) -> None:
        self.balances: dict[str, int] = {}
        self.applied: set[object] = set()

    async def handle(self, event: RecordedEvent) -> None:
        if event.event_id in self.applied:  # idempotent: delete this check and the test fails
            return
        self.applied.add(event.event_id)
        if isinstance(event.data, Deposited):
            account = event.data.account_id
            self.balances[account] = self.balances.get(account, 0) + event.data.amount


@settings(max_examples=50)
@given(history=recorded_histories(Deposited, streams=3), schedule=redeliveries())
def test_balances_survive_at_least_once_delivery(
    history: list[RecordedEvent], schedule: list[Delivery]
) -> None:
    check_redelivery(Balances, history, schedule, state=lambda b: b.balances)


async def test_balances_from_a_real_subscription(event_store: EventStore) -> None:
    """The same consumer on a real store (fixtures from trio_eventstore.pytest_plugin)."""
    await event_store.append_to_stream(
        "account-1", ANY_VERSION, [EventData(Deposited("account-1", n)) for n in (5, 7)]
    )
    balances = Balances()
    async with event_store.subscribe_to_all_streams("balances", buffer_size=10) as sub:
        async for batch in sub:
            for event in batch.events:
                await balances.handle(event)
            sub.ack(batch)
            break
        await wait_caught_up(event_store, sub)
    # Events read back as dicts here: this store's serializer has no registered classes.
    assert balances.applied
