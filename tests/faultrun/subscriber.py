"""A subscriber process of the fault run: ``python -m tests.faultrun.subscriber FOLDER URL
SCHEMA ROLE SUBSCRIPTION``.

Holds the persistent ``$all`` subscription ``single`` (one consumer) or ``competing``
(`records.CONSUMERS` consumers, ``partition_by`` `records.partition_of`), writes every
delivered event to ``deliveries-ROLE.jsonl`` before acknowledging it, and runs until
SIGTERM: then it leaves its subscriptions (which persists the last acknowledgement) and
writes a ``stop`` line with the persisted checkpoint (``clean`` unless that failed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
import traceback
from pathlib import Path

import trio

from trio_eventstore import (
    CheckpointFailedError,
    EventStoreConfig,
    Subscription,
    open_event_store,
)

from .records import COMPETING, CONSUMERS, SINGLE, JsonLines, Opening, now, partition_of

#: whether this process's store opened (its exit code on an error says so)
OPENING = Opening()


def subscription_options(subscription: str) -> dict[str, object]:
    if subscription == SINGLE:
        return {"buffer_size": 10, "checkpoint_threshold": 7, "checkpoint_after": 0.5}
    assert subscription == COMPETING
    return {
        "buffer_size": 5,
        "checkpoint_threshold": 5,
        "checkpoint_after": 0.5,
        "concurrency_limit": CONSUMERS,
        "partition_by": lambda event: partition_of(event.stream_uuid),
    }


async def consume(
    sub: Subscription, log: JsonLines, session: str, subscription: str, rng: random.Random
) -> None:
    async for batch in sub:
        at = now()
        ses = f"{session}:{batch.session}"
        log.write_many(
            [
                {
                    "k": "d",
                    "sub": subscription,
                    "ses": ses,
                    "n": e.event_number,
                    "s": e.stream_uuid,
                    "v": e.stream_version,
                    "t": at,
                }
                for e in batch.events
            ]
        )
        await trio.sleep(rng.uniform(0, 0.005))  # some work
        sub.ack(batch)


async def run(
    config: EventStoreConfig, log: JsonLines, role: str, subscription: str, stop: trio.Event
) -> None:
    pid = os.getpid()
    rng = random.Random(pid)
    count = CONSUMERS if subscription == COMPETING else 1
    options = subscription_options(subscription)
    error = ""
    subs: list[Subscription] = []
    with trio.CancelScope() as opening:

        async def cancel_opening_on_stop() -> None:
            await stop.wait()
            if not subs:
                opening.cancel()

        async with trio.open_nursery() as watcher:
            watcher.start_soon(cancel_opening_on_stop)
            async with open_event_store(config) as store:
                OPENING.opened = True
                try:
                    async with contextlib.AsyncExitStack() as stack:
                        for _ in range(count):
                            subs.append(
                                await stack.enter_async_context(
                                    store.subscribe_to_all_streams(subscription, **options)  # type: ignore[arg-type]
                                )
                            )
                        log.write(k="ready", role=role, sub=subscription, pid=pid, t=now())
                        async with trio.open_nursery() as consumers:
                            for i, sub in enumerate(subs):
                                session = f"{role}:{pid}:{i}"
                                consumers.start_soon(consume, sub, log, session, subscription, rng)
                            await stop.wait()
                            consumers.cancel_scope.cancel()
                except CheckpointFailedError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                checkpoint = subs[0].statistics().last_persisted
                log.write(
                    k="stop",
                    sub=subscription,
                    role=role,
                    pid=pid,
                    cp=checkpoint,
                    clean=not error,
                    err=error,
                    t=now(),
                )
            watcher.cancel_scope.cancel()


async def main(folder: Path, url: str, schema: str, role: str, subscription: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    config = EventStoreConfig(
        url=url,
        schema=schema,
        timeout=3.0,
        subscription_retry_interval=0.5,
        notification_poll_interval=1.0,
    )
    log = JsonLines(folder / f"deliveries-{role}.jsonl")
    log.write(k="start", role=role, sub=subscription, pid=os.getpid(), t=now())
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_sigterm() -> None:
                async for _ in signals:
                    stop.set()

            nursery.start_soon(on_sigterm)
            await run(config, log, role, subscription, stop)
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    folder, url, schema, role, subscription = sys.argv[1:]
    try:
        trio.run(main, Path(folder), url, schema, role, subscription)
    except Exception:
        traceback.print_exc()
        sys.exit(OPENING.exit_code())
