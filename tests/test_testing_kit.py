"""The consumer-testing kit: strategies, the redelivery check, wait_caught_up, fixtures."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import uuid

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_eventstore import (
    ANY_VERSION,
    EventData,
    EventStore,
    EventStoreConfig,
    JsonSerializer,
    RecordedEvent,
    open_event_store,
)
from trio_eventstore.testing import (
    Delivery,
    RedeliveryError,
    check_redelivery,
    event_data,
    recorded_histories,
    redeliveries,
    stream_ids,
    wait_caught_up,
)

serializer = JsonSerializer()


@serializer.register
@attrs.frozen
class Deposited:
    account_id: str
    amount: int


@serializer.register
@dataclasses.dataclass(frozen=True)
class Renamed:
    account_id: str
    name: str | None
    fee: decimal.Decimal


class IdempotentBalances:
    def __init__(self) -> None:
        self.balances: dict[str, int] = {}
        self.seen: set[object] = set()

    async def handle(self, event: RecordedEvent) -> None:
        if event.event_id in self.seen:
            return
        self.seen.add(event.event_id)
        if isinstance(event.data, Deposited):
            key = event.data.account_id
            self.balances[key] = self.balances.get(key, 0) + event.data.amount


class NaiveBalances(IdempotentBalances):
    """Counts every delivery: wrong under at-least-once."""

    async def handle(self, event: RecordedEvent) -> None:
        if isinstance(event.data, Deposited):
            key = event.data.account_id
            self.balances[key] = self.balances.get(key, 0) + event.data.amount


QUICK = settings(max_examples=60, deadline=None, database=None)


@QUICK
@given(history=recorded_histories(Deposited, Renamed), schedule=redeliveries())
def test_an_idempotent_consumer_passes(
    history: list[RecordedEvent], schedule: list[Delivery]
) -> None:
    check_redelivery(IdempotentBalances, history, schedule, state=lambda p: p.balances)


def test_a_non_idempotent_consumer_is_caught_and_the_report_says_why() -> None:
    @QUICK
    @given(history=recorded_histories(Deposited), schedule=redeliveries())
    def check(history: list[RecordedEvent], schedule: list[Delivery]) -> None:
        check_redelivery(NaiveBalances, history, schedule, state=lambda p: p.balances)

    with pytest.raises(RedeliveryError) as info:
        check()
    message = str(info.value)
    assert "twice" in message or "crashed before the ack" in message
    assert "clean pass" in message


def test_in_memory_projection_rebuilt_after_a_crash() -> None:
    """A pure fold, rebuilt from the origin after a crash, is fine without dedup."""
    history = [
        RecordedEvent(
            n,
            uuid.uuid4(),
            "a",
            n,
            "Deposited",
            Deposited("a", n),
            None,
            None,
            None,
            datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
        )
        for n in range(1, 6)
    ]

    class Fold:
        def __init__(self) -> None:
            self.total = 0

        def handle(self, event: RecordedEvent) -> None:  # a sync handler works too
            if isinstance(event.data, Deposited):
                self.total += event.data.amount

    check_redelivery(
        Fold,
        history,
        [Delivery(2, "crash"), Delivery(3, "ack")],
        state=lambda p: p.total,
        state_survives=False,
    )
    with pytest.raises(RedeliveryError):
        check_redelivery(
            Fold, history, [Delivery(2, "crash")], state=lambda p: p.total, state_survives=True
        )


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(stream=stream_ids(), events=st.lists(event_data(Deposited, Renamed), min_size=1, max_size=5))
def test_generated_streams_and_events_round_trip_through_a_store(
    eventstore_config: EventStoreConfig, stream: str, events: list[object]
) -> None:
    config = eventstore_config.with_changes(serializer=serializer)

    async def body() -> None:
        async with open_event_store(config) as store:
            await store.append_to_stream(stream, ANY_VERSION, events)  # type: ignore[arg-type]
            read = await store.read_stream_forward(stream, count=10_000)
            # Compare encoded forms: a Decimal NaN round-trips but is not equal to itself.
            got = [serializer.serialize(e.data) for e in read[-len(events) :]]
            assert got == [serializer.serialize(e.data) for e in events]  # type: ignore[attr-defined]

    trio.run(body)


async def test_wait_caught_up_and_the_fixtures(event_store: EventStore) -> None:
    await event_store.append_to_stream(
        "s", ANY_VERSION, [EventData(Deposited("a", n)) for n in range(5)]
    )
    async with event_store.subscribe_to_all_streams("proj", buffer_size=2) as sub:

        async def consume() -> None:
            async for batch in sub:
                sub.ack(batch)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            with trio.fail_after(30):
                await wait_caught_up(event_store, sub)
            assert sub.statistics().last_ack == 5
            nursery.cancel_scope.cancel()
