"""Handlers the daemon tests run in a subprocess (``tests.daemon_handlers:record``)."""

from __future__ import annotations

import os
from pathlib import Path

from trio_eventstore import RecordedEvent


def record(event: RecordedEvent) -> None:
    """Append the event number to the file named by DAEMON_LOG."""
    with Path(os.environ["DAEMON_LOG"]).open("a") as log:
        log.write(f"{event.event_number}\n")
