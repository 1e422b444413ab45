"""A balancing node the spread tests run in another process:
``python -m tests.balance_node N [GROUPS]``.

Opens the store named by ``EVENTSTORE_*`` with ``balance_subscriptions=True`` and
subscribes to ``$all`` as ``p0`` .. ``p<N-1>``, or, with ``GROUPS``, as one subscription
``g`` split into that many partition groups by stream. Prints ``ready`` once subscribed,
``holding <names>`` whenever the set it holds changes (groups as ``g#g3/8``), and ``got
<name> <event number> <stream> <n>`` per event received (``n`` is the event's data),
acknowledging each batch. SIGTERM stops it cleanly (checkpoints flushed, locks
released): it prints ``bye`` and exits.
"""

from __future__ import annotations

import contextlib
import signal
import sys

import trio

from trio_eventstore import EventStoreConfig, Subscription, open_event_store


def say(line: str) -> None:
    print(line, flush=True)


async def consume(name: str, sub: Subscription) -> None:
    async for batch in sub:
        for event in batch.events:
            data = event.data
            assert isinstance(data, dict)
            say(f"got {name} {event.event_number} {event.stream_uuid} {data['n']}")
        sub.ack(batch)


def held(subs: dict[str, Subscription]) -> list[str]:
    names = []
    for name, sub in subs.items():
        groups = getattr(sub, "group_statistics", None)
        for stats in groups() if groups is not None else [sub.statistics()]:
            if stats.role in ("holder", "hibernated"):
                names.append(stats.name if groups is not None else name)
    return sorted(names)


async def watch(subs: dict[str, Subscription]) -> None:
    last: list[str] | None = None
    while True:
        now = held(subs)
        if now != last:
            last = now
            say("holding " + " ".join(now))
        await trio.sleep(0.02)


async def main(count: int, groups: int | None) -> None:
    config = EventStoreConfig.from_env(balance_subscriptions=True)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with open_event_store(config) as store, contextlib.AsyncExitStack() as stack:
            if groups is None:
                subs = {
                    f"p{i}": await stack.enter_async_context(
                        store.subscribe_to_all_streams(f"p{i}", buffer_size=10)
                    )
                    for i in range(count)
                }
            else:
                subs = {
                    "g": await stack.enter_async_context(
                        store.subscribe_to_all_streams(
                            "g",
                            partition_by=lambda e: e.stream_uuid,
                            partition_groups=groups,
                            buffer_size=10,
                        )
                    )
                }
            say("ready")
            async with trio.open_nursery() as nursery:
                for name, sub in subs.items():
                    nursery.start_soon(consume, name, sub)
                nursery.start_soon(watch, subs)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
    say("bye")


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None)
