"""Poison events on a real PostgreSQL: retry per policy, park, list, replay, discard."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Callable

import attrs
import pytest
import trio

import trio_eventstore as es
from trio_eventstore import (
    ANY_VERSION,
    EventData,
    EventStore,
    EventStoreConfig,
    JsonSerializer,
    RecordedEvent,
    RetryPolicy,
    SubscriberSpec,
    _operator,
    _parking,
    admin,
    open_event_store,
    open_subscriber_daemon,
)
from trio_eventstore.__main__ import main

from .helpers import Role, until_parked

HANG_GUARD = 30  # seconds: a guard against hangs, never a speed assertion
QUICK = RetryPolicy(max_attempts=3, backoff=0.01, max_backoff=0.02)


def ev(n: int, key: str = "k", **kw: object) -> EventData:
    return EventData({"n": n, "k": key}, event_type="Counted", **kw)  # type: ignore[arg-type]


def n_of(event: RecordedEvent) -> object:
    data = event.data
    return data["n"] if isinstance(data, dict) else getattr(data, "n", data)


async def append(store: EventStore, stream: str, *ns: int, key: str = "k") -> None:
    await store.append_to_stream(stream, ANY_VERSION, [ev(n, key) for n in ns])


def _quick(config: EventStoreConfig) -> EventStoreConfig:
    return config.with_changes(subscription_retry_interval=0.2, notification_poll_interval=0.5)


@pytest.fixture
def cfg(initialized: EventStoreConfig) -> EventStoreConfig:
    return _quick(initialized)


@pytest.fixture(params=["bytea", "jsonb"])
async def typed_cfg(
    request: pytest.FixtureRequest, config: EventStoreConfig
) -> AsyncIterator[EventStoreConfig]:
    """Both column data types (park records and raw events read back from each)."""
    cfg = _quick(config.with_changes(column_data_type=request.param))
    await admin.create(cfg)
    await admin.init(cfg)
    yield cfg
    with trio.CancelScope(shield=True):
        await admin.drop(cfg)


async def _until(condition: Callable[[], bool]) -> None:
    """Poll a statistic (the holder forgets a replayed event after its ack, in its task)."""
    for _ in range(HANG_GUARD * 100):
        if condition():
            return
        await trio.sleep(0.01)
    raise AssertionError("timed out")


async def _parked_become(store: EventStore, name: str, numbers: list[int]) -> None:
    """Poll the parked events of ``s``/``name`` (the holder parks in its own task)."""
    for _ in range(HANG_GUARD * 100):
        if [p.event.event_number for p in await store.parked_events("s", name)] == numbers:
            return
        await trio.sleep(0.01)
    raise AssertionError("timed out")


async def _next(sub: es.Subscription) -> es.EventBatch:
    with trio.fail_after(HANG_GUARD):
        return await sub.__anext__()


def test_retry_policy_is_validated_before_any_io() -> None:
    assert es.DEFAULT_RETRY_POLICY.max_attempts == 5
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(TypeError, match="max_attempts"):
        RetryPolicy(max_attempts=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_backoff"):
        RetryPolicy(backoff=2.0, max_backoff=1.0)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=1.0)
    with pytest.raises(ValueError, match="deadline"):
        RetryPolicy(deadline=math.inf)
    with pytest.raises(TypeError, match="retry_policy"):
        es.SubscriberSpec(name="x", handler=print, retry_policy=3)  # type: ignore[arg-type]
    policy = RetryPolicy(backoff=1.0, max_backoff=4.0, jitter=0.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 4.0]
    assert RetryPolicy(deadline=1.0).exhausted(1, 2.0)


async def test_nack_retries_per_policy_then_parks_and_the_subscription_goes_on(
    cfg: EventStoreConfig,
) -> None:
    seen: list[object] = []
    async with open_event_store(cfg) as store:
        await append(store, "s", 1, 2, 3)
        async with store.subscribe_to_stream("s", "sub", retry_policy=QUICK) as sub:
            while True:
                [event] = await _next(sub)
                seen.append(n_of(event))
                if n_of(event) == 2:
                    sub.nack(event, error=RuntimeError("boom"))
                else:
                    sub.ack(event)
                if n_of(event) == 3:
                    break
            await sub.wait_checkpointed(3)
            stats = sub.statistics()
        assert seen == [1, 2, 2, 2, 3]
        assert (stats.parked, stats.redeliveries) == (1, 2)
        [parked] = await store.parked_events("s", "sub")
        assert n_of(parked.event) == 2
        assert parked.event.event_number == 2
        assert parked.attempts == 3
        assert "RuntimeError: boom" in parked.error
        assert not parked.replay_requested
        linked = await store.read_stream_forward("$parked-sub")
        assert [e.event_id for e in linked] == [parked.event.event_id]


async def test_nack_without_retry_parks_at_once(cfg: EventStoreConfig) -> None:
    async with open_event_store(cfg) as store:
        await append(store, "s", 1, 2)
        async with store.subscribe_to_stream("s", "sub", buffer_size=2) as sub:
            batch = await _next(sub)
            assert [n_of(e) for e in batch] == [1, 2]
            sub.nack(batch.events[1], retry=False, error="bad data")  # acknowledges 1
            await sub.wait_checkpointed(2)
            with pytest.raises(es.UnexpectedAckError):
                sub.ack(batch.events[1])
        [parked] = await store.parked_events("s", "sub")
        assert (n_of(parked.event), parked.attempts, parked.error) == (2, 1, "bad data")


@attrs.frozen
class State:
    n: int


async def test_the_snapshot_api_never_reads_replaces_or_deletes_a_parked_events_record(
    cfg: EventStoreConfig,
) -> None:
    """Park records are rows of the snapshots table: a snapshot named like one read it,
    replaced it (the parked event lost its record) and deleted it."""
    async with open_event_store(cfg) as store:
        await append(store, "s", 1)
        async with store.subscribe_to_stream("s", "sub") as sub:
            batch = await _next(sub)
            sub.nack(batch.events[0], retry=False, error="bad data")
            await sub.wait_checkpointed(1)
        [parked] = await store.parked_events("s", "sub")
        key = _parking.record_key("s", "sub", parked.event.event_id)
        with pytest.raises(es.SnapshotNotFoundError):
            await store.read_snapshot(key)
        with pytest.raises(ValueError, match="parked event's record"):
            await store.record_snapshot(
                es.SnapshotData(source_uuid=key, source_version=9, data={}, source_type="Mine")
            )
        await store.delete_snapshot(key)
        [still] = await store.parked_events("s", "sub")
        assert (n_of(still.event), still.error) == (1, "bad data")
        # nor does a class registered under one of the records' types
        serializer = es.JsonSerializer()
        serializer.register(State, event_type="$parked")
        async with open_event_store(cfg.with_changes(serializer=serializer)) as typed:
            with pytest.raises(ValueError, match="the store's own"):
                await typed.record_snapshot(
                    es.SnapshotData(source_uuid="agg", source_version=1, data=State(1))
                )
        with pytest.raises(es.SnapshotNotFoundError):
            await store.read_snapshot("agg")
    for reserved in ("$parked", "$replay"):
        with pytest.raises(ValueError, match="the store's own"):
            es.SnapshotData(source_uuid="x", source_version=1, data={}, source_type=reserved)


async def test_an_empty_list_acks_nothing_and_cannot_be_given_back(cfg: EventStoreConfig) -> None:
    """``ack([])`` (a handler that processed none of what it got) is a no-op: it raised
    ``TypeError`` "expected ... a list of events"; ``nack([])`` names what is wrong."""
    async with open_event_store(cfg) as store:
        await append(store, "s", 1, 2)
        async with store.subscribe_to_stream("s", "sub", buffer_size=2) as sub:
            batch = await _next(sub)
            sub.ack([])
            sub.ack(())
            with pytest.raises(ValueError, match="empty list"):
                sub.nack([])
            assert (sub.statistics().last_ack, sub.statistics().in_flight) == (0, 2)
            sub.ack(batch)
            await sub.wait_checkpointed(2)


@pytest.fixture(params=["owner", "application-role"])
async def role_cfg(
    request: pytest.FixtureRequest, cfg: EventStoreConfig, application_role: Role
) -> EventStoreConfig:
    """The store's owner, and an application role with only what `admin.grant` gives."""
    return await application_role.use(cfg) if request.param == "application-role" else cfg


async def test_replay_redelivers_parked_events_then_they_leave_the_list(
    role_cfg: EventStoreConfig,
) -> None:
    cfg = role_cfg
    async with open_event_store(cfg) as store:
        await append(store, "s", 1, 2, 3)
        async with store.subscribe_to_stream("s", "sub") as sub:
            for _ in range(3):
                [event] = await _next(sub)
                if n_of(event) in (1, 2):
                    sub.nack(event, retry=False)
                else:
                    sub.ack(event)
            await sub.wait_checkpointed(3)
            assert sub.statistics().parked == 2
            parked = await store.parked_events("s", "sub")
            assert [n_of(p.event) for p in parked] == [1, 2]
            # Only event 1 again; it is acknowledged and leaves the list.
            assert await store.replay_parked("s", "sub", [parked[0].event.event_id]) == 1
            [again] = await _next(sub)
            assert (n_of(again), again.event_number) == (1, 1)
            sub.ack(again)
            await _until(lambda: sub.statistics().parked == 1)
            left = await store.parked_events("s", "sub")
            assert [n_of(p.event) for p in left] == [2]
            assert await store.discard_parked("s", "sub") == 1
            assert await store.parked_events("s", "sub") == []
            await append(store, "s", 4)
            [event] = await _next(sub)
            assert n_of(event) == 4  # the discarded event 2 never came again
            sub.ack(event)


async def test_parked_events_survive_a_restart_and_the_next_holder_replays(
    typed_cfg: EventStoreConfig,
) -> None:
    cfg = typed_cfg
    async with open_event_store(cfg) as store:
        await append(store, "s", 1, 2)
        async with store.subscribe_to_stream("s", "sub") as sub:
            [event] = await _next(sub)
            sub.nack(event, retry=False, error="poison")
            [event] = await _next(sub)
            sub.ack(event)
    async with open_event_store(cfg) as store:
        [parked] = await store.parked_events("s", "sub")
        assert (n_of(parked.event), parked.error) == (1, "poison")
        assert await store.replay_parked("s", "sub") == 1  # nobody holds it now
        assert (await store.parked_events("s", "sub"))[0].replay_requested
        async with store.subscribe_to_stream("s", "sub") as sub:
            [event] = await _next(sub)
            assert n_of(event) == 1
            assert sub.statistics().parked == 1
            sub.ack(event)
            await _until(lambda: sub.statistics().parked == 0)
        assert await store.parked_events("s", "sub") == []


async def test_a_replay_from_another_store_reaches_the_holder(cfg: EventStoreConfig) -> None:
    async with open_event_store(cfg) as holder, open_event_store(cfg) as operator:
        await append(holder, "s", 1)
        async with holder.subscribe_to_stream("s", "sub") as sub:
            [event] = await _next(sub)
            sub.nack(event, retry=False)
            await sub.wait_checkpointed(1)
            assert await operator.replay_parked("s", "sub") == 1
            [again] = await _next(sub)  # by notification (or the notifier's poll)
            assert n_of(again) == 1
            sub.ack(again)
        assert await operator.parked_events("s", "sub") == []


@attrs.frozen
class Counted:
    n: int
    k: str


def _typed(config: EventStoreConfig) -> EventStoreConfig:
    serializer = JsonSerializer()
    serializer.register(Counted, event_type="Counted")
    return config.with_changes(serializer=serializer)


async def _append_with_a_bad_payload(config: EventStoreConfig) -> None:
    """Events 1 and 3 fit `Counted`; event 2's payload does not (a plain store writes it)."""
    async with open_event_store(config) as store:
        await append(store, "s", 1)
        await store.append_to_stream(
            "s", ANY_VERSION, [EventData({"n": "two"}, event_type="Counted")]
        )
        await append(store, "s", 3)


@pytest.mark.parametrize("keyed", [False, True])
async def test_an_undecodable_event_is_parked_and_the_others_delivered(
    cfg: EventStoreConfig, keyed: bool
) -> None:
    """``keyed``: with a key function that reads the data (which an undecodable event's
    bytes do not have): the event has no partition, and is parked all the same."""
    await _append_with_a_bad_payload(cfg)
    key = (lambda e: e.data.k) if keyed else None
    async with open_event_store(_typed(cfg)) as store:
        async with store.subscribe_to_stream(
            "s", "sub", buffer_size=10, partition_by=key, concurrency_limit=2 if keyed else None
        ) as sub:
            got: list[RecordedEvent] = []
            while len(got) < 2:
                batch = await _next(sub)
                got.extend(batch.events)
                sub.ack(batch)
            await sub.wait_checkpointed(3)
        assert [e.data for e in got] == [Counted(1, "k"), Counted(3, "k")]
        [parked] = await store.parked_events("s", "sub")
        assert isinstance(parked.event, es.UndecodedEvent)
        assert parked.event.event_number == 2
        assert parked.attempts == 0
        assert "does not fit" in parked.error or "Serialization" in parked.error


async def test_an_undecodable_event_is_delivered_raw_when_asked(
    typed_cfg: EventStoreConfig,
) -> None:
    cfg = typed_cfg
    await _append_with_a_bad_payload(cfg)
    async with open_event_store(_typed(cfg)) as store:
        async with store.subscribe_to_stream(
            "s", "sub", buffer_size=10, undecodable="deliver"
        ) as sub:
            got: list[RecordedEvent] = []
            while len(got) < 3:
                batch = await _next(sub)
                got.extend(batch.events)
                sub.ack(batch)
        raw = got[1]
        assert isinstance(raw, es.UndecodedEvent)
        assert isinstance(raw.data, bytes)
        assert b"two" in raw.data
        assert raw.error
        assert [got[0].data, got[2].data] == [Counted(1, "k"), Counted(3, "k")]
        assert await store.parked_events("s", "sub") == []


def _key(event: RecordedEvent) -> object:
    assert isinstance(event.data, dict)
    return event.data["k"]


@pytest.mark.parametrize("hold", [True, False])
async def test_a_parked_event_holds_its_partition_unless_the_policy_says_not(
    cfg: EventStoreConfig, hold: bool
) -> None:
    policy = RetryPolicy(max_attempts=1, hold_partition=hold)
    async with open_event_store(cfg) as store:
        await append(store, "s", 1, 2, key="a")
        await append(store, "s", 3, key="b")
        async with store.subscribe_to_stream(
            "s", "sub", concurrency_limit=2, partition_by=_key, retry_policy=policy
        ) as sub:
            [first] = await _next(sub)
            assert n_of(first) == 1
            sub.nack(first)  # one attempt: parked now
            seen: list[object] = []
            with trio.move_on_after(1.0 if hold else HANG_GUARD):
                while len(seen) < 2:
                    [event] = await _next(sub)
                    seen.append(n_of(event))
                    sub.ack(event)
            await sub.wait_checkpointed(3)  # the subscription went on either way
            parked = [n_of(p.event) for p in await store.parked_events("s", "sub")]
            if not hold:
                assert set(seen) == {2, 3}
                assert parked == [1]
                return
            assert seen == [3]
            assert parked == [1, 2]
            [behind] = [p for p in await store.parked_events("s", "sub") if n_of(p.event) == 2]
            assert "held behind parked event 1" in behind.error
            await store.replay_parked("s", "sub")
            order = []
            for _ in range(2):
                [event] = await _next(sub)
                order.append(n_of(event))
                sub.ack(event)
            assert order == [1, 2]  # in the partition's order
            # The partition is free again: a new event of it is delivered.
            await append(store, "s", 4, key="a")
            [event] = await _next(sub)
            assert n_of(event) == 4
            sub.ack(event)
        assert await store.parked_events("s", "sub") == []


async def test_daemon_handler_policy_parks_and_goes_on(cfg: EventStoreConfig) -> None:
    handled: list[object] = []
    done = trio.Event()

    async def handler(event: RecordedEvent) -> None:
        if n_of(event) == 2:
            raise ValueError("cannot handle 2")
        handled.append(n_of(event))
        if n_of(event) == 3:
            done.set()

    spec = SubscriberSpec(
        name="d",
        handler=handler,
        stream_uuid="s",
        retry_policy=RetryPolicy(max_attempts=2, backoff=0.01, max_backoff=0.01),
    )
    assert spec.on_error == "park"
    async with open_event_store(cfg) as store:
        await append(store, "s", 1, 2, 3)
        with trio.fail_after(HANG_GUARD):
            async with open_subscriber_daemon(store, [spec]) as daemon:
                await done.wait()
                [stats] = daemon.statistics()
        assert handled == [1, 3]
        assert (stats.errors, stats.parked) == (2, 1)
        [parked] = await store.parked_events("s", "d")
        assert (n_of(parked.event), parked.attempts) == (2, 2)
        assert "ValueError: cannot handle 2" in parked.error


def test_operator_cli_lists_replays_and_discards_parked_events(
    eventstore_config: EventStoreConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _quick(eventstore_config)

    async def park_two() -> None:
        async with open_event_store(config) as store:
            await append(store, "s", 1, 2)
            async with store.subscribe_to_stream("s", "sub") as sub:
                for _ in range(2):
                    [event] = await _next(sub)
                    sub.nack(event, retry=False, error=f"bad {n_of(event)}")
                await sub.wait_checkpointed(2)

    trio.run(park_two)
    args = ["--url", str(config.url), "--schema", config.schema]
    assert main(["parked", "list", "s", "sub", *args]) == 0
    out = capsys.readouterr().out
    assert "bad 1" in out
    assert "bad 2" in out
    assert "2 parked events" in out

    async def first_id() -> str:
        async with open_event_store(config) as store:
            return str((await store.parked_events("s", "sub"))[0].event.event_id)

    event_id = trio.run(first_id)
    assert main(["parked", "replay", "s", "sub", "--event", event_id, *args]) == 0
    assert "1 parked events to be replayed" in capsys.readouterr().out
    assert main(["parked", "list", "s", "sub", "--json", *args]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["replay_requested"] for r in rows] == [True, False]
    assert main(["parked", "discard", "s", "sub", *args]) == 0
    assert "2 parked events discarded" in capsys.readouterr().out
    assert main(["parked", "list", "s", "sub", *args]) == 0
    assert "0 parked events" in capsys.readouterr().out


async def test_a_replayed_event_that_fails_again_is_parked_again(
    cfg: EventStoreConfig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "trio_eventstore.subscriptions")
    async with open_event_store(cfg) as store:
        await append(store, "s", 1, 2)
        async with store.subscribe_to_stream("s", "sub") as sub:
            [event] = await _next(sub)
            sub.nack(event, retry=False, error="first")
            [event] = await _next(sub)
            sub.ack(event)
            await sub.wait_checkpointed(2)
            await store.replay_parked("s", "sub")
            [again] = await _next(sub)
            assert n_of(again) == 1
            sub.nack(again, retry=False, error="second")
            await _until(lambda: sub.statistics().parked == 1)
            await append(store, "s", 3)
            [event] = await _next(sub)
            assert n_of(event) == 3  # not event 1 again: it waits for another replay
            sub.ack(event)
        [parked] = await store.parked_events("s", "sub")
        assert (n_of(parked.event), parked.error, parked.attempts) == (1, "second", 2)
        assert not parked.replay_requested
        # The log counts this round's attempts (as a daemon's log does), then the total.
        parks = [r.getMessage() for r in caplog.records if "parked event" in r.getMessage()]
        assert "after 1 attempts: first" in parks[0]
        assert "after 1 attempts (2 in all, with those before its replay): second" in parks[1]


async def _poison_loop(
    sub: es.Subscription, poison: int, *, fails: int, retry: bool, last: int
) -> tuple[list[list[int]], list[int]]:
    """The README's loop: handle each event of a batch; on a failure nack it and stop
    handling the batch. Event ``poison`` fails ``fails`` times. Returns the batches
    received and the events acknowledged, in order (every ack must be accepted)."""
    batches: list[list[int]] = []
    acked: list[int] = []
    failed = 0
    while not acked or acked[-1] != last:
        batch = await _next(sub)
        batches.append([e.event_number for e in batch])
        for event in batch:
            if event.event_number == poison and failed < fails:
                failed += 1
                sub.nack(event, retry=retry, error="poison")
                break
            sub.ack(event)
            acked.append(event.event_number)
    return batches, acked


@pytest.mark.parametrize("buffer_size", [2, 3, 5])
@pytest.mark.parametrize("retry", [True, False])
async def test_a_nack_in_a_batch_gives_back_the_later_events_and_no_stale_batch_comes(
    cfg: EventStoreConfig, buffer_size: int, retry: bool
) -> None:
    async with open_event_store(cfg) as store:
        await append(store, "s", *range(1, 9))
        async with store.subscribe_to_stream(
            "s", "sub", buffer_size=buffer_size, retry_policy=QUICK
        ) as sub:
            batches, acked = await _poison_loop(sub, 3, fails=1, retry=retry, last=8)
            await sub.wait_checkpointed(8)
        assert acked == ([1, 2, 3, 4, 5, 6, 7, 8] if retry else [1, 2, 4, 5, 6, 7, 8])
        # Nothing after the nack until event 3 comes again (or is parked).
        nacked_in = next(i for i, b in enumerate(batches) if 3 in b)
        after = batches[nacked_in + 1]
        assert after[0] == (3 if retry else 4), batches
        parked = [p.event.event_number for p in await store.parked_events("s", "sub")]
        assert parked == ([] if retry else [3])


async def _ack_from_1_to_3_again(sub: es.Subscription) -> None:
    """Events 1 to 3 come again, from 1: acknowledge them, and wait for the checkpoint."""
    again = await _next(sub)
    assert again.events[0].event_number == 1
    sub.ack(again)
    while again.last_event_number != 3:
        again = await _next(sub)
        sub.ack(again)
    await sub.wait_checkpointed(3)


async def test_acks_of_the_events_given_back_with_a_nacked_one_are_ignored(
    cfg: EventStoreConfig,
) -> None:
    async with open_event_store(cfg) as store:
        await append(store, "s", 1, 2, 3)
        async with store.subscribe_to_stream("s", "sub", buffer_size=3, retry_policy=QUICK) as sub:
            batch = await _next(sub)
            assert [e.event_number for e in batch] == [1, 2, 3]
            sub.nack(batch.events[0])
            sub.ack(batch.events[2])  # given back with event 1: it comes again
            sub.nack(batch.events[1])  # the same
            await _ack_from_1_to_3_again(sub)
        assert await store.parked_events("s", "sub") == []


async def test_an_ack_from_before_a_nack_ignores_the_events_delivered_again_not_yet_received(
    cfg: EventStoreConfig,
) -> None:
    """Event 1 nacked (retry): 1, 2 and 3 come again. An ack of 3 from the batch before
    the nack, made once they wait in the subscriber's inbox again, is of the earlier
    delivery: it must not acknowledge the retry of 1 nobody has handled (before, it did,
    and 1 was checkpointed unprocessed)."""
    async with open_event_store(cfg) as store:
        await append(store, "s", 1, 2, 3)
        async with store.subscribe_to_stream("s", "sub", buffer_size=3, retry_policy=QUICK) as sub:
            batch = await _next(sub)
            assert [e.event_number for e in batch] == [1, 2, 3]
            sub.nack(batch.events[0])
            with trio.fail_after(30):
                while sub.statistics().redeliveries < 3:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            sub.ack(batch.events[2])
            assert sub.statistics().last_ack == 0
            await _ack_from_1_to_3_again(sub)


@pytest.mark.parametrize("buffer_size", [2, 3])
async def test_a_nack_in_a_batch_keeps_partition_order_with_competing_consumers(
    cfg: EventStoreConfig, buffer_size: int
) -> None:
    """Event 3 (key a) is parked at once, holding its partition: the later events of
    ``a`` are parked behind it, never handled before a replay, then in order."""
    policy = RetryPolicy(hold_partition=True)
    handled: list[tuple[str, int]] = []
    async with open_event_store(cfg) as store:
        await store.append_to_stream(
            "s", ANY_VERSION, [ev(n, "ab"[(n - 1) % 2]) for n in range(1, 9)]
        )
        replayed = trio.Event()

        async def consume() -> None:
            async with store.subscribe_to_stream(
                "s",
                "sub",
                concurrency_limit=2,
                partition_by=_key,
                buffer_size=buffer_size,
                retry_policy=policy,
            ) as sub:
                async for batch in sub:
                    for event in batch:
                        key = str(_key(event))
                        if event.event_number == 3 and not replayed.is_set():
                            sub.nack(event, retry=False, error="poison")
                            break
                        handled.append((key, event.event_number))
                        sub.ack(event)

        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                nursery.start_soon(consume)
                expected = [("a", 1), *[("b", n) for n in (2, 4, 6, 8)]]
                await _until(lambda: sorted(handled) == expected)
                await _parked_become(store, "sub", [3, 5, 7])
                assert [n for k, n in handled if k == "a"] == [1]
                replayed.set()
                await store.replay_parked("s", "sub")
                await _until(lambda: len(handled) == 8)
                nursery.cancel_scope.cancel()
        assert [n for k, n in handled if k == "a"] == [1, 3, 5, 7]


@pytest.mark.parametrize("batch", [False, True])
async def test_daemon_parks_a_poison_event_of_a_batch_and_goes_on(
    cfg: EventStoreConfig, batch: bool
) -> None:
    handled: list[int] = []
    done = trio.Event()

    def handle_one(event: RecordedEvent) -> None:
        if event.event_number == 4:
            raise RuntimeError("poison 4")
        handled.append(event.event_number)
        if event.event_number == 8:
            done.set()

    def handle_batch(events: list[RecordedEvent]) -> None:
        for event in events:
            if event.event_number == 4:
                raise RuntimeError("poison 4")
        for event in events:
            handle_one(event)

    spec = SubscriberSpec(
        name="d",
        handler=es.EventHandler(handle=handle_batch, batch=True) if batch else handle_one,
        stream_uuid="s",
        buffer_size=5,
        retry_policy=RetryPolicy(max_attempts=2, backoff=0.01, max_backoff=0.01),
    )
    async with open_event_store(cfg) as store:
        await append(store, "s", *range(1, 9))
        with trio.fail_after(HANG_GUARD):
            async with open_subscriber_daemon(store, [spec]) as daemon:
                await done.wait()
                await _parked_become(store, "d", [4])
                assert daemon.statistics()[0].parked == 1
            # the last status (a status file's, once stopped) still counts it
            assert (daemon.statistics()[0].state, daemon.statistics()[0].parked) == ("stopped", 1)
        assert handled == [1, 2, 3, 5, 6, 7, 8]
        [parked] = await store.parked_events("s", "d")
        assert (parked.event.event_number, parked.attempts) == (4, 2)


async def test_the_parked_api_refuses_a_subscription_that_does_not_exist(
    cfg: EventStoreConfig,
) -> None:
    async with open_event_store(cfg) as store:
        await append(store, "s", 1)
        for call in (store.parked_events, store.replay_parked, store.discard_parked):
            with pytest.raises(es.SubscriptionNotFoundError, match="nosuch"):
                await call("s", "nosuch")
        async with store.subscribe_to_stream("s", "sub") as sub:
            [event] = await _next(sub)
            sub.ack(event)
        assert await store.parked_events("s", "sub") == []  # it exists: none parked
        assert await store.replay_parked("s", "sub") == 0
        with pytest.raises(es.SubscriptionNotFoundError):
            await store.parked_events("other", "sub")  # the name on another stream


def test_operator_cli_refuses_parked_commands_of_an_unknown_subscription(
    eventstore_config: EventStoreConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--url", str(eventstore_config.url), "--schema", eventstore_config.schema]
    for command in ("list", "replay", "discard"):
        assert main(["parked", command, "s", "nosuch", *args]) == 1
        captured = capsys.readouterr()
        assert "SubscriptionNotFoundError" in captured.err
        assert "parked events" not in captured.out


async def test_nack_in_a_subscription_split_into_partition_groups(cfg: EventStoreConfig) -> None:
    """A nack reaches the group that delivered the event (not the first group)."""
    async with open_event_store(cfg) as store:
        await store.append_to_stream("s", ANY_VERSION, [ev(n, f"k{n}") for n in range(1, 9)])
        handled: list[int] = []
        nacked: list[int] = []
        async with store.subscribe_to_stream(
            "s",
            "g",
            partition_by=_key,
            partition_groups=2,
            buffer_size=2,
            retry_policy=RetryPolicy(max_attempts=1),
        ) as sub:
            with trio.fail_after(HANG_GUARD):
                while len(handled) + len(nacked) < 8:
                    batch = await sub.__anext__()
                    for event in batch:
                        if event.event_number in (2, 3) and event.event_number not in nacked:
                            nacked.append(event.event_number)
                            sub.nack(event, retry=False, error="poison")
                            break
                        handled.append(event.event_number)
                        sub.ack(event)
        assert sorted(handled) == [1, 4, 5, 6, 7, 8]
        parked = [
            p.event.event_number
            for name in ("g#g0/2", "g#g1/2")
            for p in await store.parked_events("s", name)
        ]
        assert sorted(parked) == [2, 3]


@pytest.mark.parametrize("how", ["parked", "nack"])
async def test_wait_acked_returns_when_parking_or_a_nack_acknowledges_the_last(
    cfg: EventStoreConfig, how: str
) -> None:
    """`last_ack` moves when an event is parked (it counts as acknowledged) and when a
    nack acknowledges the events before it: waiters wake then too (they waited for ever)."""
    async with open_event_store(cfg) as store:
        await append(store, "s", 1, 2)
        slow = RetryPolicy(max_attempts=3, backoff=60, max_backoff=60)  # no redelivery soon
        async with store.subscribe_to_stream("s", "sub", buffer_size=2, retry_policy=slow) as sub:
            batch = await _next(sub)
            assert [e.event_number for e in batch] == [1, 2]
            if how == "parked":
                sub.ack(batch.events[0])
                sub.nack(batch.events[1], retry=False, error="poison")
                target = 2
            else:
                sub.nack(batch.events[1], error="again")  # 1 counts as acknowledged
                target = 1
            with trio.fail_after(10):
                await sub.wait_acked(target)


# -- deleting a subscription deletes its parked events ----------------------------------------


async def _park_all(
    store: EventStore, stream: str, name: str, count: int, **options: object
) -> None:
    """Subscribe ``name`` to ``stream`` and park its first ``count`` events (error: the
    subscription's own name and stream)."""
    async with store.subscribe_to_stream(stream, name, **options) as sub:  # type: ignore[arg-type]
        with trio.fail_after(HANG_GUARD):
            for _ in range(count):
                [event] = await sub.__anext__()
                sub.nack(event, retry=False, error=f"{name} on {stream}")
        for _ in range(HANG_GUARD * 100):  # the holder parks in its own task
            if len(await store.parked_events(stream, name)) == count:
                return
            await trio.sleep(0.01)
        raise AssertionError("timed out")


async def _delete(store: EventStore, stream: str, name: str, how: str) -> None:
    if how == "store":
        await store.delete_subscription(stream, name)
    else:  # the command line's delete-subscription
        await _operator.delete_subscription(store.config, stream, name)


@pytest.mark.parametrize("how", ["store", "operator"])
async def test_deleting_a_subscription_deletes_its_parked_events_and_no_one_elses(
    typed_cfg: EventStoreConfig, how: str
) -> None:
    """They stayed: no longer listed nor discardable (no such subscription), and a new
    subscription of the same name inherited them (and would replay them)."""
    async with open_event_store(typed_cfg) as store:
        await append(store, "s", 1, 2)
        await append(store, "t", 1)
        await _park_all(store, "s", "sub", 2)
        # Names that extend it (whose keys start the same: "$parked-sub|s|..." for
        # "sub|s" on "t"), and the same name on another stream: theirs stay.
        others = [("s", "sub2"), ("s", "sub|x"), ("t", "sub|s"), ("t", "sub")]
        for stream, name in others:
            await _park_all(store, stream, name, 1)

        await _delete(store, "s", "sub", how)

        for call in (store.parked_events, store.replay_parked, store.discard_parked):
            with pytest.raises(es.SubscriptionNotFoundError):
                await call("s", "sub")
        async with store.subscribe_to_stream("s", "sub", start_from=es.CURRENT) as sub:
            await sub.wait_subscribed()
            assert await store.parked_events("s", "sub") == []
            assert await store.replay_parked("s", "sub") == 0
        for stream, name in others:
            [parked] = await store.parked_events(stream, name)
            assert (parked.event.event_number, parked.error) == (1, f"{name} on {stream}")


@pytest.mark.parametrize("how", ["store", "operator"])
async def test_deleting_a_grouped_subscription_deletes_every_groups_parked_events(
    cfg: EventStoreConfig, how: str
) -> None:
    grouped = {"partition_by": _key, "partition_groups": 2}
    async with open_event_store(cfg) as store:
        await store.append_to_stream("s", ANY_VERSION, [ev(n, f"k{n}") for n in range(1, 9)])
        await _park_all(store, "s", "g", 8, **grouped)
        groups = {name: len(await store.parked_events("s", name)) for name in ("g#g0/2", "g#g1/2")}
        assert sum(groups.values()) == 8
        assert all(groups.values())  # both groups parked some
        await _park_all(store, "s", "g#archive", 1)  # a subscription of its own

        await _delete(store, "s", "g", how)

        async with store.subscribe_to_stream("s", "g", start_from=es.CURRENT, **grouped) as sub:  # type: ignore[arg-type]
            await sub.wait_subscribed()
            assert await store.parked_events("s", "g") == []
        assert len(await store.parked_events("s", "g#archive")) == 1


async def test_a_holder_on_another_node_forgets_the_parked_events_of_a_deleted_subscription(
    cfg: EventStoreConfig,
) -> None:
    """delete_subscription does not refuse a subscription held by another node (as
    before); its parked events go all the same, and the holder is told, as after a
    discard: the partition its parked event held is free again."""
    policy = RetryPolicy(max_attempts=1)  # holds the partition
    async with open_event_store(cfg) as holder, open_event_store(cfg) as other:
        await append(holder, "s", 1)
        async with holder.subscribe_to_stream(
            "s", "sub", concurrency_limit=2, partition_by=_key, retry_policy=policy
        ) as sub:
            [event] = await _next(sub)
            sub.nack(event, retry=False, error="poison")
            await _parked_become(other, "sub", [1])

            assert sub.statistics().parked == 1

            await other.delete_subscription("s", "sub")

            await _until(lambda: sub.statistics().parked == 0)
            await append(other, "s", 2)  # the same partition
            with trio.fail_after(HANG_GUARD):
                [event] = await sub.__anext__()
            assert n_of(event) == 2
            sub.ack(event)


async def test_a_nack_for_good_just_before_leaving_parks_the_event(cfg: EventStoreConfig) -> None:
    """``retry=False`` parks at once, also when the subscriber leaves right after: the
    session's end parks it before its last checkpoint (the park was dropped, and the
    event delivered again)."""
    async with open_event_store(cfg) as store:
        await append(store, "s", 1, 2)
        async with store.subscribe_to_stream("s", "sub") as sub:
            batch = await _next(sub)
            sub.nack(batch.events[0], retry=False, error="poison")
        with trio.fail_after(HANG_GUARD):
            await until_parked(store, "s", "sub")  # the session ends after the block
        [parked] = await store.parked_events("s", "sub")
        assert (parked.event.event_number, parked.error) == (1, "poison")
        async with store.subscribe_to_stream("s", "sub") as sub:
            assert [e.event_number for e in await _next(sub)] == [2]


async def test_a_parked_event_whose_key_cannot_be_computed_does_not_stop_the_next_start(
    cfg: EventStoreConfig,
) -> None:
    """Parked before the key function changed (or by a version where a raising key meant
    no partition): reloading its park record must not fail the subscription."""
    async with open_event_store(cfg) as store:
        await store.append_to_stream("s", ANY_VERSION, [EventData({"n": 1}, event_type="C")])
        async with store.subscribe_to_stream(
            "s",
            "sub",
            partition_by=lambda e: e.data.get("k"),  # type: ignore[attr-defined]
            concurrency_limit=2,
        ) as sub:
            [event] = await _next(sub)
            sub.nack(event, retry=False, error="poison")
        with trio.fail_after(HANG_GUARD):
            await until_parked(store, "s", "sub")
        await store.append_to_stream("s", ANY_VERSION, [EventData({"k": "x"}, event_type="C")])
        async with store.subscribe_to_stream(
            "s",
            "sub",
            partition_by=lambda e: e.data["k"],  # type: ignore[index]
            concurrency_limit=2,
        ) as sub:
            with trio.fail_after(HANG_GUARD):
                assert [e.event_number for e in await _next(sub)] == [2]
