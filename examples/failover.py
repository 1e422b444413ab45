"""Two processes share one subscription: one delivers, the other stands by and takes
over (from the last checkpoint) when the first one dies.

Run without arguments: it starts two node processes, kills the active one, appends
more events and shows that the standby delivered them (it takes over about a second
after the kill, with the default settings).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import trio
from _common import database_url

from trio_eventstore import ANY_VERSION, EventData, EventStoreConfig, admin, open_event_store


async def node(config: EventStoreConfig, name: str) -> None:
    async with (
        open_event_store(config) as store,
        store.subscribe_to_all_streams("audit-log", buffer_size=10) as sub,
    ):
        await sub.wait_subscribed()
        print(f"{name}: holds the subscription", flush=True)
        async for batch in sub:
            for event in batch.events:
                print(f"{name}: event {event.event_number}", flush=True)
            sub.ack(batch)


async def append(config: EventStoreConfig, *numbers: int) -> None:
    async with open_event_store(config) as store:
        await store.append_to_stream(
            "log", ANY_VERSION, [EventData({"n": n}, event_type="Logged") for n in numbers]
        )


def start(name: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--node", name], env=env, stdout=subprocess.PIPE, text=True
    )


def wait_for_line(process: subprocess.Popen[str], text: str) -> None:
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line:
            print("  " + line.rstrip())
        if text in line:
            return
    raise TimeoutError(text)


def main(url: str) -> None:
    schema = f"fo_{uuid.uuid4().hex[:6]}"
    config = EventStoreConfig.from_env(url=url, schema=schema)
    trio.run(admin.create, config)
    trio.run(admin.init, config)
    env = {**os.environ, "EVENTSTORE_URL": url, "EVENTSTORE_SCHEMA": schema}
    first = start("node-a", env)
    wait_for_line(first, "holds the subscription")
    second = start("node-b", env)  # stands by: the lock is taken
    trio.run(append, config, 1, 2)
    wait_for_line(first, "event 2")
    print("killing node-a ...")
    first.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    first.wait()
    trio.run(append, config, 3)
    wait_for_line(second, "holds the subscription")
    print(f"node-b took over {time.monotonic() - killed:.1f} s after the kill (default settings)")
    wait_for_line(second, "event 3")
    second.terminate()
    second.wait()
    trio.run(admin.drop, config)
    print("node-b took over from the last persisted checkpoint (at-least-once: what node-a")
    print("handled but had not yet checkpointed comes again)")


if __name__ == "__main__":
    if "--node" in sys.argv:
        name = sys.argv[sys.argv.index("--node") + 1]
        trio.run(node, EventStoreConfig.from_env(), name)
    else:
        with database_url("failover") as url:
            main(url)
