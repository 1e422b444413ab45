"""Handlers the daemon tests run in a subprocess (``tests.daemon_handlers:record``, ...)."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from trio_eventstore import RecordedEvent


def record(event: RecordedEvent) -> None:
    """Append the event number to the file named by DAEMON_LOG."""
    with Path(os.environ["DAEMON_LOG"]).open("a") as log:
        log.write(f"{event.event_number}\n")


def fail_from_3(event: RecordedEvent) -> None:
    """Record the event number, then fail for events 3 and later (for ever)."""
    record(event)
    if event.event_number >= 3:
        raise RuntimeError("the read model is down")


async def hang_on_2(event: RecordedEvent) -> None:
    """Record the event number; event 2 never finishes (until cancelled)."""
    record(event)
    if event.event_number == 2:
        await trio.sleep_forever()
