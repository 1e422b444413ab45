"""A node the failover tests run in another process: ``python -m tests.failover_node N``.

Opens the store named by ``EVENTSTORE_*`` with the default settings, subscribes to
``$all`` as ``p0`` .. ``p<N-1>``, prints ``held`` once it holds all of them, then one line
per change of a subscription's state (``state p0 waiting_for_lock``) and per event it
receives (``got p0 7``), acknowledging each. Runs until killed.
"""

from __future__ import annotations

import contextlib
import sys

import trio

from trio_eventstore import EventStoreConfig, Subscription, open_event_store


def say(line: str) -> None:
    print(line, flush=True)


async def consume(name: str, sub: Subscription) -> None:
    async for batch in sub:
        for event in batch.events:
            say(f"got {name} {event.event_number}")
        sub.ack(batch)


async def watch(subs: dict[str, Subscription]) -> None:
    states = {name: "subscribed" for name in subs}
    while True:
        for name, sub in subs.items():
            state = sub.statistics().state
            if state == "catching_up":
                state = "subscribed"
            if state != states[name]:
                states[name] = state
                say(f"state {name} {state}")
        await trio.sleep(0.02)


async def main(count: int) -> None:
    config = EventStoreConfig.from_env()
    async with open_event_store(config) as store, contextlib.AsyncExitStack() as stack:
        subs = {
            f"p{i}": await stack.enter_async_context(
                store.subscribe_to_all_streams(f"p{i}", buffer_size=10)
            )
            for i in range(count)
        }
        for sub in subs.values():
            await sub.wait_subscribed()
        say("held")
        async with trio.open_nursery() as nursery:
            for name, sub in subs.items():
                nursery.start_soon(consume, name, sub)
            nursery.start_soon(watch, subs)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]))
