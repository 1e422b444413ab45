"""The fault run's writers: tasks appending to a few streams with random expected versions,
each append written down before and after (`tests.faultrun.records`).

The harness runs them in its own stores; ``python -m tests.faultrun.writer FOLDER URL
SCHEMA SEED TASKS`` runs them in another process until SIGTERM (its appends in flight are
written down as ambiguous) or SIGKILL (they have no outcome line: ambiguous too).
"""

from __future__ import annotations

import os
import random
import signal
import sys
import traceback
import uuid
from pathlib import Path

import trio

from trio_eventstore import (
    ANY_VERSION,
    NO_STREAM,
    STREAM_EXISTS,
    DuplicateEventError,
    EventData,
    EventStore,
    EventStoreConfig,
    EventStoreError,
    StreamDeletedError,
    StreamNotFoundError,
    WrongExpectedVersionError,
    open_event_store,
)
from trio_eventstore._types import ExpectedVersion

from .records import STREAMS, JsonLines, Opening, now

#: whether this process's store opened (its exit code on an error says so)
OPENING = Opening()

#: typed refusals: the append was refused and wrote nothing
REFUSALS = (WrongExpectedVersionError, StreamNotFoundError, StreamDeletedError, DuplicateEventError)
#: a guard per append, past the store's own timeouts (the outcome is then ambiguous)
APPEND_GUARD = 30.0
#: the longest pause between two appends of one task (seconds)
PAUSE = 0.06


def choose_expected(rng: random.Random, known: int | None) -> tuple[ExpectedVersion | int, str]:
    """An expected version: mostly the version this writer last saw (often stale, as
    other writers append too), sometimes a marker or a guess near it."""
    r = rng.random()
    if r < 0.45 and known is not None:
        return known, str(known)
    if r < 0.60:
        return ANY_VERSION, "any"
    if r < 0.68:
        return NO_STREAM, "no_stream"
    if r < 0.76:
        return STREAM_EXISTS, "stream_exists"
    guess = max(0, (known or 0) + rng.randint(-2, 2))
    return guess, str(guess)


async def write(store: EventStore, writer: str, rng: random.Random, log: JsonLines) -> None:
    """Append until cancelled, writing each attempt and its outcome to ``log``."""
    known: dict[str, int] = {}
    op = 0
    while True:
        op += 1
        stream = rng.choice(STREAMS)
        expected, label = choose_expected(rng, known.get(stream))
        events = [
            EventData({"w": writer, "op": op, "i": i}, event_type="FaultRun", event_id=uuid.uuid4())
            for i in range(rng.randint(1, 4))
        ]
        ids = [str(e.event_id) for e in events]
        log.write(k="attempt", w=writer, op=op, s=stream, e=label, ids=ids, t=now())
        outcome, error, version = "ok", "", None
        try:
            with trio.fail_after(APPEND_GUARD):
                version = await store.append_to_stream(stream, expected, events)
            known[stream] = version
        except REFUSALS as exc:
            outcome, error = "failed", type(exc).__name__
            current = getattr(exc, "current", None)
            if isinstance(current, int):
                known[stream] = current
            elif isinstance(exc, StreamNotFoundError):
                known[stream] = 0
        except (EventStoreError, trio.TooSlowError) as exc:
            outcome, error = "ambiguous", type(exc).__name__
        except trio.Cancelled:
            log.write(k="outcome", w=writer, op=op, o="ambiguous", err="Cancelled", t=now())
            raise
        log.write(k="outcome", w=writer, op=op, o=outcome, err=error, v=version, t=now())
        await trio.sleep(rng.uniform(0, PAUSE))


async def main(folder: Path, url: str, schema: str, seed: int, tasks: int) -> None:
    config = EventStoreConfig(url=url, schema=schema, timeout=3.0)
    pid = os.getpid()
    log = JsonLines(folder / f"appends-P{pid}.jsonl")
    async with trio.open_nursery() as nursery:

        async def stop_on_sigterm() -> None:
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

        nursery.start_soon(stop_on_sigterm)
        async with open_event_store(config) as store, trio.open_nursery() as writers:
            OPENING.opened = True
            for i in range(tasks):
                rng = random.Random(f"{seed}-{pid}-{i}")
                writers.start_soon(write, store, f"P{pid}-{i}", rng, log)


if __name__ == "__main__":
    folder, url, schema, seed, tasks = sys.argv[1:]
    try:
        trio.run(main, Path(folder), url, schema, int(seed), int(tasks))
    except Exception:
        traceback.print_exc()
        sys.exit(OPENING.exit_code())
