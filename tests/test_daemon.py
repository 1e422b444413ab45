"""The subscriber daemon: handlers on persistent subscriptions, clean stop, retries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

import trio_eventstore as es
from trio_eventstore import (
    ANY_VERSION,
    EventData,
    EventStoreConfig,
    RecordedEvent,
    SubscriberSpec,
    open_event_store,
    open_subscriber_daemon,
)

HANG_GUARD = 60


def ev(n: int) -> EventData:
    return EventData({"n": n}, event_type="Counted")


class Recorder:
    def __init__(self) -> None:
        self.seen: list[int] = []
        self._changed = trio.Event()

    def __call__(self, event: RecordedEvent) -> None:
        self.seen.append(event.event_number)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        while len(self.seen) < count:
            await self._changed.wait()


async def test_daemon_runs_handlers_and_stops_cleanly(initialized: EventStoreConfig) -> None:
    first, second = Recorder(), Recorder()
    specs = [
        SubscriberSpec(name="one", handler=first, buffer_size=3),
        SubscriberSpec(name="two", handler=second, stream_uuid="s"),
    ]
    with trio.fail_after(HANG_GUARD):
        async with open_event_store(initialized) as store:
            await store.append_to_stream("s", ANY_VERSION, [ev(i) for i in range(5)])
            async with open_subscriber_daemon(store, specs) as daemon:
                await store.append_to_stream("t", ANY_VERSION, [ev(9)])
                await first.wait_for(6)
                await second.wait_for(5)
                stats = {s.name: s for s in daemon.statistics()}
                assert stats["one"].handled == 6
            # Leaving stopped both and flushed the checkpoints: nothing is redelivered.
            async with store.subscribe_to_all_streams("one") as sub:
                await store.append_to_stream("t", ANY_VERSION, [ev(10)])
                batch = await sub.__anext__()
                assert [e.event_number for e in batch.events] == [7]
    assert first.seen == [1, 2, 3, 4, 5, 6]
    assert second.seen == [1, 2, 3, 4, 5]


async def test_failing_handler_is_retried_then_succeeds(initialized: EventStoreConfig) -> None:
    attempts: list[int] = []
    done = trio.Event()

    async def flaky(event: RecordedEvent) -> None:
        attempts.append(event.event_number)
        if len(attempts) < 3:
            raise RuntimeError("database of the read model is down")
        done.set()

    spec = SubscriberSpec(name="flaky", handler=flaky, retry_delay=0.01)
    with trio.fail_after(HANG_GUARD):
        async with open_event_store(initialized) as store:
            await store.append_to_stream("s", ANY_VERSION, [ev(1)])
            async with open_subscriber_daemon(store, [spec]) as daemon:
                await done.wait()
                [stats] = daemon.statistics()
    assert attempts == [1, 1, 1]  # the same event again: never skipped
    assert (stats.errors, stats.handled) == (2, 1)
    assert "read model is down" in (stats.last_error or "")


async def test_failing_handler_can_stop_the_daemon(initialized: EventStoreConfig) -> None:
    def broken(event: RecordedEvent) -> None:
        raise ValueError("bug")

    spec = SubscriberSpec(name="broken", handler=broken, on_error="stop")
    with trio.fail_after(HANG_GUARD):
        async with open_event_store(initialized) as store:
            await store.append_to_stream("s", ANY_VERSION, [ev(1)])
            with pytest.raises(es.HandlerFailedError, match="bug"):
                async with open_subscriber_daemon(store, [spec]):
                    await trio.sleep_forever()
            # The failing event was not acknowledged: it comes again.
            async with store.subscribe_to_all_streams("broken") as sub:
                batch = await sub.__anext__()
                assert [e.event_number for e in batch.events] == [1]


def test_spec_validation() -> None:
    with pytest.raises(TypeError):
        SubscriberSpec(name="x", handler=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_error"):
        SubscriberSpec(name="x", handler=print, on_error="ignore")  # type: ignore[arg-type]


async def _append(config: EventStoreConfig, *ns: int) -> None:
    async with open_event_store(config) as store:
        await store.append_to_stream("s", ANY_VERSION, [ev(n) for n in ns])


def test_command_line_daemon_sigterm_exits_0_and_resumes(
    eventstore_config: EventStoreConfig, tmp_path: Path
) -> None:
    log, status = tmp_path / "seen.log", tmp_path / "status.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_")}
    env.update(
        DAEMON_LOG=str(log),
        EVENTSTORE_URL=eventstore_config.url or "",
        EVENTSTORE_SCHEMA=eventstore_config.schema,
        PYTHONPATH=str(Path.cwd()),
    )
    command = [
        sys.executable,
        "-m",
        "trio_eventstore",
        "run",
        "tests.daemon_handlers:record",
        "--status-file",
        str(status),
        "--checkpoint-threshold",
        "1",
        "--json",
    ]

    def run_until(count: int) -> subprocess.CompletedProcess[str]:
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + HANG_GUARD
        while time.monotonic() < deadline:
            if log.exists() and len(log.read_text().split()) >= count:
                break
            if process.poll() is not None:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=HANG_GUARD)
        return subprocess.CompletedProcess(command, process.returncode, out, err)

    trio.run(_append, eventstore_config, 1, 2, 3)
    first = run_until(3)
    assert first.returncode == 0, first.stderr
    assert log.read_text().split() == ["1", "2", "3"]
    snapshot = json.loads(status.read_text())
    [sub] = snapshot["subscribers"]
    assert (sub["name"], sub["last_checkpoint"], sub["lag"]) == (
        "tests.daemon_handlers:record",
        3,
        0,
    )
    logs = [json.loads(line) for line in first.stderr.splitlines() if line.startswith("{")]
    assert any("subscribed" in entry["message"] for entry in logs)  # structured logs
    trio.run(_append, eventstore_config, 4)
    second = run_until(4)
    assert second.returncode == 0, second.stderr
    assert log.read_text().split() == ["1", "2", "3", "4"]  # resumed after the checkpoint
