"""Subscription benchmarks: ratios against baselines measured in the same run.

* append -> delivery latency of a persistent subscription at the head, vs the raw
  NOTIFY round trip of the same append (asyncpg on plain asyncio: one connection runs
  our append statement, another LISTENs and wakes on the trigger's notification);
* catch-up throughput of a subscription over N events, vs a raw read of the same
  events in pages of 1000 (same SELECT, no deserialization), and vs this store's own
  paged read of them (same decoding: what the subscription machinery costs);
* memory (Python heap, tracemalloc) per idle, hibernated subscription;
* many subscriptions in one store (10,000; 2,000 in quick mode), each with its own
  consumer task: the time until all are subscribed, the Python heap per hibernated one
  (the consumer's task included), and the append -> delivery latency of one of them,
  woken from hibernation while the others hibernate, vs the same with that subscription
  alone in its store (the baseline).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import statistics
import time
import tracemalloc
from typing import Any

import asyncpg
import trio

from bench._util import raw_read_rate, run_asyncio, vacuum
from trio_eventstore import (
    ANY_VERSION,
    EventData,
    EventStoreConfig,
    _sql,
    _storage,
    open_event_store,
)


def _event() -> EventData:
    return EventData({"account_id": "acc", "amount": 1}, event_type="Deposited")


def _event_with_metadata() -> EventData:
    """The shape the stream benchmarks use: a few fields and some metadata."""
    return EventData(
        {"account_id": "acc", "amount": 1, "note": "benchmark"},
        event_type="Deposited",
        metadata={"user": "bench"},
    )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def ours_latency(config: EventStoreConfig, n: int, threshold: int) -> list[float]:
    times = []
    stream = f"lat-{threshold}-{time.time_ns()}"  # a new stream: the subscription is at its head
    async with (
        open_event_store(config) as store,
        store.subscribe_to_stream(
            stream,
            f"bench-latency-{threshold}",
            buffer_size=1,
            checkpoint_threshold=threshold,
            checkpoint_after=1.0,
        ) as sub,
    ):
        await store.append_to_stream(stream, ANY_VERSION, [_event()])
        async for batch in sub:  # the first one, to be at the head
            sub.ack(batch)
            break
        for _ in range(n):
            event = [_event()]
            started = time.perf_counter()
            await store.append_to_stream(stream, ANY_VERSION, event)
            batch = await sub.__anext__()
            times.append(time.perf_counter() - started)
            sub.ack(batch)
    return times


async def baseline_latency(config: EventStoreConfig, n: int) -> list[float]:
    listener = await asyncpg.connect(**config.connect_params())
    writer = await asyncpg.connect(**config.connect_params())
    queue: asyncio.Queue[str] = asyncio.Queue()
    channel = _sql.notification_channel(config.schema)
    await listener.add_listener(channel, lambda *args: queue.put_nowait(args[3]))
    times = []
    try:
        for _ in range(n):
            event = [_event()]
            started = time.perf_counter()  # encoding included, as in ours
            encoded = _storage.encode_events(config.serializer, event)
            request = _storage.AppendRequest.build("lat-base", ANY_VERSION, encoded)
            sql, params, _ = _storage.batch_statement(config, [request])
            await writer.fetch(sql, *params)
            while not (await queue.get()).startswith("$all,"):
                pass
            times.append(time.perf_counter() - started)
    finally:
        await listener.close()
        await writer.close()
    return times


async def ours_catch_up(config: EventStoreConfig, total: int, stream: str = "$all") -> float:
    async with open_event_store(config) as store:
        started = time.perf_counter()
        count = 0
        async with store.subscribe_to_stream(
            stream,
            f"bench-catch-up-{time.time_ns()}",
            buffer_size=1000,
            max_size=3000,  # read the next pages while the consumer handles this one
            checkpoint_threshold=1000,
        ) as sub:
            async for batch in sub:
                count += len(batch)
                sub.ack(batch)
                if count >= total:
                    break
        return count / (time.perf_counter() - started)


async def store_read(config: EventStoreConfig, total: int) -> float:
    """The same events read with `stream_all_forward` (decoded, as RecordedEvents):
    what a subscription adds on top of reading."""
    async with open_event_store(config) as store:
        started = time.perf_counter()
        count = 0
        async for _ in store.stream_all_forward(read_batch_size=1000):
            count += 1
            if count >= total:
                break
        return count / (time.perf_counter() - started)


async def idle_memory(config: EventStoreConfig, count: int) -> float:
    """Bytes of Python heap per idle, hibernated subscription."""
    config = config.with_changes(subscription_hibernate_after=0.2, pool_size=20)
    async with open_event_store(config) as store:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        ready = trio.Semaphore(0)

        async def idle(i: int) -> None:
            async with store.subscribe_to_stream(f"idle-{i}", f"idle-{i}") as sub:
                await sub.wait_subscribed()
                ready.release()
                await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(idle, i)
            for _ in range(count):
                await ready.acquire()
            await trio.sleep(1.0)  # past subscription_hibernate_after
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
            hibernating = sum(1 for d in store._subscriptions.active() if d.state == "hibernating")
            nursery.cancel_scope.cancel()
        tracemalloc.stop()
    print(f"  ({hibernating} of {count} subscriptions hibernating)")
    return (after - before) / count


async def _many(
    config: EventStoreConfig, count: int, samples: int, *, trace: bool
) -> dict[str, Any]:
    """``count`` subscriptions of their own streams, each iterated by a task of its own;
    once all hibernate, ``samples`` events appended to one of them (by another store,
    which this one is notified of; and by this store, handed over), each after it has
    hibernated again. With ``trace``, the Python heap is measured (tracemalloc slows
    everything down: the times of such a run are not reported)."""
    config = config.with_changes(subscription_hibernate_after=0.1)
    tag = time.time_ns()
    result: dict[str, Any] = {}
    async with open_event_store(config) as store, open_event_store(config) as other:
        if trace:
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
        subscribed = trio.Semaphore(0)
        delivered: dict[int, trio.Event] = {}

        async def consume(i: int) -> None:
            async with store.subscribe_to_stream(f"many-{tag}-{i}", f"many-{tag}-{i}") as sub:
                if i == 0:
                    result["sub"] = sub
                await sub.wait_subscribed()
                subscribed.release()
                async for batch in sub:
                    sub.ack(batch)
                    delivered.pop(i).set()

        async def hibernated() -> None:
            sub = result["sub"]
            while sub.statistics().state != "hibernating":  # noqa: ASYNC110 (statistics)
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            # All at once; traced, in waves (tracemalloc slows the process down so
            # much that thousands starting at once overload it).
            wave = 200 if trace else count
            started = time.perf_counter()
            for first in range(0, count, wave):
                for i in range(first, min(count, first + wave)):
                    nursery.start_soon(consume, i)
                for _ in range(first, min(count, first + wave)):
                    await subscribed.acquire()
            result["startup"] = time.perf_counter() - started
            subs = store._subscriptions
            while sum(1 for d in subs.active() if d.state == "hibernating") < count:  # noqa: ASYNC110
                await trio.sleep(0.1)
            if trace:
                await trio.sleep(0.5)
                gc.collect()
                result["bytes"] = (tracemalloc.get_traced_memory()[0] - before) / count
                tracemalloc.stop()
            for key, appender in (("notified", other), ("own", store)):
                times = []
                for _ in range(samples):
                    await hibernated()
                    delivered[0] = done = trio.Event()
                    started = time.perf_counter()
                    await appender.append_to_stream(f"many-{tag}-0", ANY_VERSION, [_event()])
                    await done.wait()
                    times.append(time.perf_counter() - started)
                result[key] = times
            nursery.cancel_scope.cancel()
    return result


def many(config: EventStoreConfig, quick: bool, report: Any) -> None:
    count = 2_000 if quick else 10_000
    samples = 30 if quick else 100
    print(f"many subscriptions in one store ({count}, each with its own consumer task):")
    alone = trio.run(functools.partial(_many, config, 1, samples, trace=False))
    crowd = trio.run(functools.partial(_many, config, count, samples, trace=False))
    print(f"{'  startup, until all are subscribed':40} {crowd['startup']:10.1f} s")
    for key, how in (("notified", "appended by another store"), ("own", "appended here")):
        report(
            f"  wake 1 of {count} hibernated, p50 ({how})",
            statistics.median(crowd[key]) * 1e6,
            statistics.median(alone[key]) * 1e6,
            "us",
            lower_is_better=True,
        )
    traced = trio.run(functools.partial(_many, config, count, 1, trace=True))
    print(
        f"{'  memory per hibernated subscription':40} {traced['bytes'] / 1024:10.1f} KiB "
        f"(goal <= 10; Python heap, its consumer's task included)"
    )


def run(config: EventStoreConfig, quick: bool, report: Any) -> None:
    n = 200 if quick else 1000
    base = run_asyncio(baseline_latency(config, n))
    for threshold in (1, 100):
        mine = trio.run(ours_latency, config, n, threshold)
        label = f"append->delivery (checkpoint/{threshold})"
        report(
            f"{label} p50",
            statistics.median(mine) * 1e6,
            statistics.median(base) * 1e6,
            "us",
            lower_is_better=True,
        )
        report(
            f"{label} p99",
            _percentile(mine, 0.99) * 1e6,
            _percentile(base, 0.99) * 1e6,
            "us",
            lower_is_better=True,
        )
    total = int(trio.run(_all_version, config))
    target = 20_000 if quick else 100_000
    if total < target:
        trio.run(_fill, config, target - total)
        total = target
    vacuum(config)
    # Alternate them, best of three each: the machine's background load varies.
    base_rates, our_rates, read_rates = [], [], []
    for _ in range(3):
        base_rates.append(run_asyncio(raw_read_rate(config, 0, total)))
        our_rates.append(trio.run(ours_catch_up, config, total))
        read_rates.append(trio.run(store_read, config, total))
    report(
        f"catch-up over {total} small events",
        max(our_rates),
        max(base_rates),
        "ev/s",
        lower_is_better=False,
    )
    report(
        "  same, vs this store's own read of them",
        max(our_rates),
        max(read_rates),
        "ev/s",
        lower_is_better=False,
    )
    stream_id = trio.run(_fill_stream, config, "catch-up-meta", target)
    vacuum(config)
    base_rates, our_rates = [], []
    for _ in range(3):
        base_rates.append(run_asyncio(raw_read_rate(config, stream_id, target)))
        our_rates.append(trio.run(ours_catch_up, config, target, "catch-up-meta"))
    report(
        f"catch-up over {target} events with metadata",
        max(our_rates),
        max(base_rates),
        "ev/s",
        lower_is_better=False,
    )
    count = 200 if quick else 1000
    per = trio.run(idle_memory, config, count)
    print(
        f"{'memory per idle hibernated subscription':40} {per / 1024:10.1f} KiB "
        f"({count} subscriptions, Python heap)"
    )
    many(config, quick, report)


async def _all_version(config: EventStoreConfig) -> int:
    async with open_event_store(config) as store:
        return (await store.stream_info("$all")).stream_version


async def _fill(config: EventStoreConfig, count: int) -> None:
    async with open_event_store(config) as store:
        for start in range(0, count, 1000):
            size = min(1000, count - start)
            await store.append_to_stream("fill", ANY_VERSION, [_event() for _ in range(size)])


async def _fill_stream(config: EventStoreConfig, stream: str, count: int) -> int:
    """A stream of ``count`` events with metadata (created once); returns its id."""
    async with open_event_store(config) as store:
        try:
            info = await store.stream_info(stream)
        except LookupError:
            info = None
        if info is None or info.stream_version < count:
            for start in range(0, count, 1000):
                size = min(1000, count - start)
                await store.append_to_stream(
                    stream, ANY_VERSION, [_event_with_metadata() for _ in range(size)]
                )
            info = await store.stream_info(stream)
        return info.stream_id
