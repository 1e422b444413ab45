"""The consumer-testing kit: strategies, the redelivery check, wait_caught_up, fixtures."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import math
import os
import re
import subprocess
import sys
import typing
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import attrs
import pytest
import trio
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from trio_eventstore import (
    ANY_VERSION,
    EventData,
    EventStore,
    EventStoreConfig,
    JsonSerializer,
    RecordedEvent,
    SnapshotData,
    SnapshotNotFoundError,
    admin,
    open_event_store,
)
from trio_eventstore.testing import (
    Delivery,
    RedeliveryError,
    check_redelivery,
    check_redelivery_async,
    event_data,
    money_decimals,
    recorded_histories,
    redeliveries,
    stream_ids,
    temporary_postgres,
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
    with pytest.raises(TypeError, match="state_survives: expected a bool"):  # "False" is true
        check_redelivery(
            Fold,
            history,
            [Delivery(2, "crash")],
            state=lambda p: p.total,
            state_survives="False",  # type: ignore[arg-type]
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
            # Compare encoded forms (with decimals=st.decimals(), a NaN is not equal to itself).
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


# -- a consumer whose read model lives in a database, checked from an async test --------------


class SnapshotBalances:
    """Balances kept in the store's snapshots (a read model in the database), one per
    account: idempotent through the last event number applied to each."""

    def __init__(self, store: EventStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self.accounts: set[str] = set()

    async def handle(self, event: RecordedEvent) -> None:
        if not isinstance(event.data, Deposited):
            return
        account = event.data.account_id
        self.accounts.add(account)
        key = f"{self.prefix}/{account.encode().hex()}"  # any text: NUL too
        try:
            snapshot = await self.store.read_snapshot(key)
            balance, applied = snapshot.data["balance"], snapshot.source_version  # type: ignore[index]
        except SnapshotNotFoundError:
            balance, applied = 0, 0
        if event.event_number <= applied:
            return  # delivered again: already in the read model
        await self.store.record_snapshot(
            SnapshotData(
                source_uuid=key,
                source_version=event.event_number,
                source_type="Balance",
                data={"balance": balance + event.data.amount},
            )
        )

    async def read_balances(self) -> dict[str, int]:
        balances = {}
        for account in sorted(self.accounts):
            snapshot = await self.store.read_snapshot(f"{self.prefix}/{account.encode().hex()}")
            balances[account] = snapshot.data["balance"]  # type: ignore[index]
        return balances


class NaiveSnapshotBalances(SnapshotBalances):
    async def handle(self, event: RecordedEvent) -> None:
        if not isinstance(event.data, Deposited):
            return
        account = event.data.account_id
        self.accounts.add(account)
        key = f"{self.prefix}/{account.encode().hex()}"  # any text: NUL too
        try:
            balance = (await self.store.read_snapshot(key)).data["balance"]  # type: ignore[index]
        except SnapshotNotFoundError:
            balance = 0
        await self.store.record_snapshot(
            SnapshotData(
                source_uuid=key,
                source_version=event.event_number,
                source_type="Balance",
                data={"balance": balance + event.data.amount},
            )
        )


@settings(max_examples=8, deadline=None, database=None)
@given(history=recorded_histories(Deposited, streams=2, max_events=8), schedule=redeliveries())
async def test_a_database_backed_consumer_from_an_async_test_with_a_fresh_store_per_example(
    fresh_event_store: Callable[..., AbstractAsyncContextManager[EventStore]],
    history: list[RecordedEvent],
    schedule: list[Delivery],
) -> None:
    async with fresh_event_store(serializer=serializer) as store:
        await store.append_to_stream("probe", ANY_VERSION, [EventData(Deposited("p", 1))])
        await check_redelivery_async(
            lambda: SnapshotBalances(store, uuid.uuid4().hex),  # a read model per pass
            history,
            schedule,
            state=SnapshotBalances.read_balances,
        )


async def test_a_non_idempotent_database_backed_consumer_is_caught(
    fresh_event_store: Callable[..., AbstractAsyncContextManager[EventStore]],
) -> None:
    at = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    history = [
        RecordedEvent(n, uuid.uuid4(), "a", n, "Deposited", Deposited("a", n), None, None, None, at)
        for n in range(1, 4)
    ]
    async with fresh_event_store() as store:

        async def factory() -> NaiveSnapshotBalances:  # factories may be async
            return NaiveSnapshotBalances(store, uuid.uuid4().hex)

        with pytest.raises(RedeliveryError, match="twice"):
            await check_redelivery_async(
                factory,
                history,
                [Delivery(2, "duplicate")],
                state=SnapshotBalances.read_balances,
            )


async def test_the_sync_check_inside_an_async_test_says_what_to_use() -> None:
    with pytest.raises(RuntimeError, match="check_redelivery_async"):
        check_redelivery(IdempotentBalances, [], [], state=lambda p: p.balances)


# -- decimals --------------------------------------------------------------------------------


@attrs.frozen
class Invoice:
    lines: list[decimal.Decimal]
    discount: decimal.Decimal | None
    renamed: Renamed | None = None


def test_decimal_fields_are_money_by_default() -> None:
    """No NaN, infinities or sNaN unless asked, in fields, lists, optionals and nested
    classes: exactly two places."""

    def decimals_of(event: EventData) -> list[decimal.Decimal]:
        data = event.data
        if isinstance(data, Renamed):
            return [data.fee]
        assert isinstance(data, Invoice)
        found = [*data.lines, *([data.discount] if data.discount is not None else [])]
        return found + ([data.renamed.fee] if data.renamed is not None else [])

    def money(value: decimal.Decimal) -> bool:
        return value.is_finite() and value.as_tuple().exponent == -2

    @settings(max_examples=300, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(event_data(Renamed, Invoice))
    def check(event: EventData) -> None:
        assert all(money(d) for d in decimals_of(event))

    check()
    # A knob for the rest: NaN, sNaN and infinities when asked for.
    found = find(
        event_data(Renamed, decimals=st.decimals()),
        lambda e: e.data.fee.is_snan(),
        settings=settings(database=None, max_examples=2000),
    )
    assert isinstance(found.data, Renamed)
    assert found.data.fee.is_snan()
    places = find(
        recorded_histories(Renamed, decimals=money_decimals(places=4)),
        lambda h: len(h) > 0,
        settings=settings(database=None),
    )
    assert isinstance(places[0].data, Renamed)
    assert places[0].data.fee.as_tuple().exponent == -4


Celsius = typing.NewType("Celsius", float)


@attrs.frozen
class Reading:
    value: float
    extra: list[float]
    maybe: float | None
    temperature: Celsius
    nested: Renamed | None = None


def test_float_fields_are_finite() -> None:
    """The store refuses NaN and infinities (JSON has none): a consumer under test must
    never be handed events no store could hold (they came out of `st.from_type(float)`)."""

    @settings(max_examples=300, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(event_data(Reading))
    def check(event: EventData) -> None:
        data = event.data
        assert isinstance(data, Reading)
        values = [data.value, *data.extra, *([data.maybe] if data.maybe is not None else [])]
        values.append(data.temperature)
        assert all(math.isfinite(v) for v in values), values

    check()


# -- a throwaway server ------------------------------------------------------------------------


def test_temporary_postgres_gives_a_url_a_store_opens() -> None:
    async def use(url: str) -> int:
        config = EventStoreConfig(url=url)
        await admin.create(config)
        await admin.init(config)
        async with open_event_store(config) as store:
            await store.append_to_stream("s", ANY_VERSION, [EventData(Deposited("a", 1))])
            return (await store.stream_info("s")).stream_version

    with temporary_postgres("demo") as url:
        assert url.startswith("postgresql://")
        assert url.endswith("/demo")
        assert trio.run(use, url) == 1


# -- the README's async example -----------------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_block(first_line: str) -> str:
    blocks: list[str] = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    [block] = [b for b in blocks if b.startswith(first_line)]
    return block


def run_pytest(folder: Path, server_url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_")}
    env["TRIO_EVENTSTORE_TEST_URL"] = server_url
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
        cwd=folder,
    )


def test_readme_database_backed_consumer_test_passes_and_catches_a_bug(
    server_url: str, tmp_path: Path
) -> None:
    """The README's test_projection.py passes with the kit's fixtures, and fails once
    the consumer's idempotence check is deleted (as its comment says)."""
    source = readme_python_block("# test_projection.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n")
    (tmp_path / "test_projection.py").write_text(source)
    result = run_pytest(tmp_path, server_url)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    check = "if event.event_number > applied:  # delete this check and the test fails"
    assert check in source
    broken = source.replace(check, "if True:").replace(
        "@settings(max_examples=20, deadline=None)",
        "@settings(max_examples=20, deadline=None, phases=[Phase.generate])",  # no shrinking
    )
    broken = "from hypothesis import Phase\n" + broken
    (tmp_path / "test_projection.py").write_text(broken)
    result = run_pytest(tmp_path, server_url)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "RedeliveryError" in result.stdout
