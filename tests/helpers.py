"""Helpers shared by the tests and property tests."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import attrs
import trio

from trio_eventstore import (
    ANY_VERSION,
    EventData,
    EventStore,
    EventStoreConfig,
    RecordedEvent,
    admin,
)

#: Data written by the real Elixir EventStore 1.4.8 (provenance: reference/README.md).
REFERENCE = Path(__file__).resolve().parent / "reference"


def url_for(server_url: str, database: str) -> str:
    """``server_url`` with another database."""
    parts = urllib.parse.urlsplit(server_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


@attrs.frozen
class Role:
    """A login role with no privileges of its own (an application's role)."""

    name: str
    password: str = attrs.field(repr=False)

    async def use(self, config: EventStoreConfig) -> EventStoreConfig:
        """``config``'s store, granted to this role (`admin.grant`, as the owner), and
        the config that connects as this role."""
        await admin.grant(config, self.name)
        return config.with_changes(username=self.name, password=self.password)


def ev(n: int, **kw: object) -> EventData:
    """A small event numbered ``n`` (read it back with `n_of`)."""
    return EventData({"n": n}, event_type="Counted", **kw)  # type: ignore[arg-type]


def n_of(event: RecordedEvent) -> int:
    assert isinstance(event.data, dict)
    value: int = event.data["n"]
    return value


async def append(store: EventStore, stream: str, *ns: int) -> None:
    await store.append_to_stream(stream, ANY_VERSION, [ev(n) for n in ns])


def failing_callback() -> tuple[Callable[[str, str], None], list[str], trio.Event]:
    """A notification callback that raises for the payload "boom": (it, the payloads it
    took, an event set once it took two)."""
    seen: list[str] = []
    got_two = trio.Event()

    def callback(_channel: str, payload: str) -> None:
        if payload == "boom":
            raise RuntimeError("callback failed")
        seen.append(payload)
        if len(seen) == 2:
            got_two.set()

    return callback, seen, got_two


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m trio_eventstore ARGS`` in a subprocess, with this environment minus its
    ``EVENTSTORE_*`` variables, plus ``env``; ``timeout``: a guard against hangs."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "trio_eventstore", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def until_a_backend_waits_for_a_lock(config: EventStoreConfig, count: int = 1) -> None:
    """Until ``count`` sessions of the database wait for a lock (a statement sent from
    another task has reached the lock it is to wait for). A guard against hangs: 30 s."""
    from trio_eventstore._pg import open_connection

    async with open_connection(config) as conn:
        with trio.fail_after(30):
            while (  # noqa: ASYNC110 (the server's state, polled)
                await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
                < count
            ):
                await trio.sleep(0.01)


async def until_parked(store: EventStore, stream: str, name: str, *, parked: bool = True) -> None:
    """Until subscription ``name`` on ``stream`` has parked events (``parked``), or has
    none left: the holder parks, and deletes acknowledged replays' records, in its own
    task. The caller bounds the wait."""
    while bool(await store.parked_events(stream, name)) != parked:  # noqa: ASYNC110
        await trio.sleep(0.02)
