"""The subscriber daemon: handlers on persistent subscriptions, clean stop, retries."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

import trio_eventstore as es
from trio_eventstore import (
    ANY_VERSION,
    BatchHandler,
    EventData,
    EventHandler,
    EventStoreConfig,
    Handler,
    HandlerContext,
    RecordedEvent,
    SubscriberSpec,
    _storage,
    open_event_store,
    open_subscriber_daemon,
)
from trio_eventstore._pg import open_connection

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


async def eventually(predicate: Callable[[], bool]) -> None:
    """Statistics are snapshots, not events: look again until it holds (the test's
    fail_after guards against a hang)."""
    for _ in itertools.count():
        if predicate():
            return
        await trio.sleep(0.01)


# -- stopping ------------------------------------------------------------------------------


async def _checkpoint(config: EventStoreConfig, name: str) -> int | None:
    async with open_event_store(config) as store:
        return await _storage.subscription_checkpoint(store._db, "$all", name)


def _daemon_env(config: EventStoreConfig, log: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_")}
    env.update(
        DAEMON_LOG=str(log),
        EVENTSTORE_URL=config.url or "",
        EVENTSTORE_SCHEMA=config.schema,
        PYTHONPATH=str(Path.cwd()),
    )
    return env


def _start(config: EventStoreConfig, log: Path, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "trio_eventstore", "run", *args]
    return subprocess.Popen(
        command,
        env=_daemon_env(config, log),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_log(process: subprocess.Popen[str], log: Path, lines: int) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().split()) >= lines:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"the daemon did not log {lines} events")


def _exit_status(process: subprocess.Popen[str], within: float) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        raise AssertionError(f"the daemon did not stop within {within} s:\n{err[-3000:]}") from None
    return process.returncode, err


def test_sigterm_stops_a_daemon_backing_off_and_flushes(
    eventstore_config: EventStoreConfig, tmp_path: Path
) -> None:
    """A handler failing for ever: SIGTERM ends the back-off at once, flushes what was
    handled (events 1 and 2; the failing event 3 comes again) and exits 0."""
    log = tmp_path / "seen.log"
    trio.run(_append, eventstore_config, 1, 2, 3, 4)
    process = _start(
        eventstore_config,
        log,
        "tests.daemon_handlers:fail_from_3=f",
        "--checkpoint-threshold",
        "1000",
        "--checkpoint-after",
        "600",  # nothing is persisted before the stop
        "--retry-delay",
        "0.2",
    )
    _wait_for_log(process, log, 5)  # 1, 2, then event 3 failed three times: backing off
    process.send_signal(signal.SIGTERM)
    status, err = _exit_status(process, 10)
    assert status == 0, err
    assert "stopped while backing off" in err
    assert trio.run(_checkpoint, eventstore_config, "f") == 2


def test_second_sigterm_cancels_the_handler_in_hand_flushes_and_exits_0(
    eventstore_config: EventStoreConfig, tmp_path: Path
) -> None:
    log = tmp_path / "seen.log"
    trio.run(_append, eventstore_config, 1, 2, 3)
    process = _start(
        eventstore_config,
        log,
        "tests.daemon_handlers:hang_on_2=h",
        "--checkpoint-threshold",
        "1000",
        "--checkpoint-after",
        "600",
        "--shutdown-timeout",
        "600",
    )
    _wait_for_log(process, log, 2)  # event 2's handler hangs
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert process.poll() is None  # it waits for the handler in hand (shutdown timeout) ...
    process.send_signal(signal.SIGTERM)  # ... unless told again
    status, err = _exit_status(process, 10)
    assert status == 0, err
    assert "cancelled after the shutdown timeout" in err
    assert trio.run(_checkpoint, eventstore_config, "h") == 1


async def test_shutdown_timeout_cancels_the_handler_in_hand(initialized: EventStoreConfig) -> None:
    """Stopping waits for the event in hand (not for the rest of the batch), at most
    shutdown_timeout; what was handled before is acknowledged and flushed."""
    entered = trio.Event()
    seen: list[int] = []

    async def hang_on_3(event: RecordedEvent) -> None:
        seen.append(event.event_number)
        if event.event_number == 3:
            entered.set()
            await trio.sleep_forever()

    spec = SubscriberSpec(
        name="slow",
        handler=hang_on_3,
        buffer_size=10,
        checkpoint_threshold=1000,
    )
    async with open_event_store(initialized) as store:
        await store.append_to_stream("s", ANY_VERSION, [ev(i) for i in range(5)])
        with trio.fail_after(HANG_GUARD):
            async with open_subscriber_daemon(store, [spec], shutdown_timeout=0.5) as daemon:
                await entered.wait()
                stopping_at = trio.current_time()
        assert trio.current_time() - stopping_at < 5  # 0.5 s, then a flush
        [stats] = daemon.statistics()
        assert (stats.state, stats.handled, stats.last_checkpoint) == ("stopped", 2, 2)
        async with store.subscribe_to_all_streams("slow") as sub:
            batch = await sub.__anext__()
            assert batch.events[0].event_number == 3  # the cancelled event comes again
    assert seen == [1, 2, 3]


# -- statistics that tell the truth --------------------------------------------------------


async def test_statistics_show_the_stored_checkpoint_head_and_lag_at_once(
    initialized: EventStoreConfig,
) -> None:
    gate = trio.Event()
    handled = Recorder()

    async def gated(event: RecordedEvent) -> None:
        if event.event_number > 3:
            await gate.wait()
        handled(event)

    spec = SubscriberSpec(name="p", handler=gated)
    with trio.fail_after(HANG_GUARD):
        async with open_event_store(initialized) as store:
            await store.append_to_stream("s", ANY_VERSION, [ev(i) for i in range(3)])
            async with open_subscriber_daemon(store, [spec]):
                await handled.wait_for(3)
            # A new daemon: before it has even subscribed, the stored checkpoint counts.
            async with open_subscriber_daemon(store, [spec]) as daemon:
                [stats] = daemon.statistics()
                assert (stats.last_checkpoint, stats.last_ack, stats.head, stats.lag) == (
                    3,
                    3,
                    3,
                    0,
                )
                await store.append_to_stream("s", ANY_VERSION, [ev(3), ev(4)])
                await eventually(lambda: daemon.statistics()[0].head == 5)  # notifications
                [stats] = daemon.statistics()
                assert (stats.head, stats.lag) == (5, 2)
                gate.set()
                await handled.wait_for(5)
            [stats] = daemon.statistics()
            assert (stats.state, stats.last_checkpoint, stats.lag) == ("stopped", 5, 0)


async def test_standby_reports_standby_and_stops_at_once(
    initialized: EventStoreConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """A second node's daemon waits for the lock: its state says so, its checkpoint is
    the stored one, and stopping it does not wait for the lock."""
    caplog.set_level(logging.INFO, logger="trio_eventstore.daemon")
    handled = Recorder()
    with trio.fail_after(HANG_GUARD):
        async with (
            open_event_store(initialized) as store_a,
            open_event_store(initialized) as store_b,
        ):
            await store_a.append_to_stream("s", ANY_VERSION, [ev(i) for i in range(4)])
            spec = SubscriberSpec(name="p", handler=handled, checkpoint_threshold=1)
            async with open_subscriber_daemon(store_a, [spec]) as active:
                await handled.wait_for(4)
                await eventually(lambda: active.statistics()[0].last_checkpoint == 4)
                async with open_subscriber_daemon(store_b, [spec]) as standby:
                    await eventually(lambda: standby.statistics()[0].state == "standby")
                    [stats] = standby.statistics()
                    assert (stats.last_checkpoint, stats.head, stats.lag) == (4, 4, 0)
                    assert active.statistics()[0].state == "running"
    assert "subscriber p: stopped, checkpoint 4" in caplog.text


async def test_a_lost_connection_reports_reconnecting(initialized: EventStoreConfig) -> None:
    handled = Recorder()
    spec = SubscriberSpec(name="p", handler=handled)
    with trio.fail_after(HANG_GUARD):
        async with open_event_store(initialized) as store:
            await store.append_to_stream("s", ANY_VERSION, [ev(1)])
            async with open_subscriber_daemon(store, [spec]) as daemon:
                await handled.wait_for(1)
                assert daemon.statistics()[0].state == "running"
                pid = store.statistics().lock_pid
                assert pid is not None
                async with open_connection(initialized) as conn:
                    await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
                # Delivery pauses until the subscription retry interval has passed.
                await eventually(lambda: daemon.statistics()[0].state != "running")
                assert daemon.statistics()[0].state == "reconnecting"


# -- handlers: context, lifecycle, batches -------------------------------------------------


async def test_lifecycle_context_and_batches(initialized: EventStoreConfig) -> None:
    calls: list[object] = []
    done = trio.Event()

    @contextlib.asynccontextmanager
    async def lifecycle(context: HandlerContext) -> AsyncIterator[BatchHandler]:
        calls.append(("setup", context.subscription_name, context.stream_uuid))
        assert context.store is store

        async def handle(events: list[RecordedEvent]) -> None:
            assert isinstance(events, list)
            calls.append([e.event_number for e in events])
            if events[-1].event_number == 6:
                done.set()

        yield handle
        calls.append("teardown")

    spec = SubscriberSpec(
        name="batches",
        handler=EventHandler(lifecycle=lifecycle, batch=True),
        stream_uuid="s",
        buffer_size=4,
    )
    with trio.fail_after(HANG_GUARD):
        async with open_event_store(initialized) as store:
            await store.append_to_stream("s", ANY_VERSION, [ev(i) for i in range(6)])
            async with open_subscriber_daemon(store, [spec]) as daemon:
                await done.wait()
                assert calls[-1] != "teardown"
    assert calls[0] == ("setup", "batches", "s")
    assert calls[-1] == "teardown"
    batches = calls[1:-1]
    assert [n for b in batches for n in b] == [1, 2, 3, 4, 5, 6]  # type: ignore[attr-defined]
    assert max(len(b) for b in batches) > 1  # type: ignore[arg-type]
    [stats] = daemon.statistics()
    assert (stats.handled, stats.last_checkpoint) == (6, 6)


async def test_a_plain_batch_handler(initialized: EventStoreConfig) -> None:
    got: list[list[int]] = []
    done = trio.Event()

    def handle(events: list[RecordedEvent]) -> None:
        got.append([e.event_number for e in events])
        if events[-1].event_number == 3:
            done.set()

    spec = SubscriberSpec(name="b", handler=EventHandler(handle=handle, batch=True))
    with trio.fail_after(HANG_GUARD):
        async with open_event_store(initialized) as store:
            await store.append_to_stream("s", ANY_VERSION, [ev(i) for i in range(3)])
            async with open_subscriber_daemon(store, [spec]):
                await done.wait()
    assert [n for b in got for n in b] == [1, 2, 3]


async def test_lifecycle_setup_and_teardown_failures_say_so(
    initialized: EventStoreConfig,
) -> None:
    @contextlib.asynccontextmanager
    async def broken_setup(context: HandlerContext) -> AsyncIterator[Handler]:
        raise OSError("read model unreachable")
        yield print  # pragma: no cover

    @contextlib.asynccontextmanager
    async def broken_teardown(context: HandlerContext) -> AsyncIterator[Handler]:
        yield lambda event: None
        raise OSError("could not close")

    async with open_event_store(initialized) as store:
        spec = SubscriberSpec(name="a", handler=EventHandler(lifecycle=broken_setup))
        with pytest.raises(es.HandlerFailedError, match=r"setup failed.*unreachable"):
            async with open_subscriber_daemon(store, [spec]):
                await trio.sleep_forever()
        spec = SubscriberSpec(name="b", handler=EventHandler(lifecycle=broken_teardown))
        with pytest.raises(es.HandlerFailedError, match=r"teardown failed.*could not close"):
            async with open_subscriber_daemon(store, [spec]):
                pass


async def test_a_lifecycle_given_as_a_plain_handler_is_refused(
    initialized: EventStoreConfig,
) -> None:
    @contextlib.asynccontextmanager
    async def lifecycle(event: object) -> AsyncIterator[Handler]:
        yield print  # pragma: no cover

    spec = SubscriberSpec(name="x", handler=lifecycle)  # type: ignore[arg-type]
    async with open_event_store(initialized) as store:
        await store.append_to_stream("s", ANY_VERSION, [ev(1)])
        with pytest.raises(es.HandlerFailedError, match="EventHandler\\(lifecycle="):
            async with open_subscriber_daemon(store, [spec]):
                await trio.sleep_forever()


def test_event_handler_validation() -> None:
    with pytest.raises(TypeError, match="exactly one"):
        EventHandler()
    with pytest.raises(TypeError, match="exactly one"):
        EventHandler(handle=print, lifecycle=print)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SubscriberSpec(name="x", handler=Recorder)  # type: ignore[arg-type]


# -- the command line: a serializer, the current directory, the README's example -----------

README = Path(__file__).resolve().parents[1] / "README.md"
CONSOLE_SCRIPT = str(Path(sys.executable).with_name("trio-eventstore"))


def readme_python_block(first_line: str) -> str:
    """The README's ```python block that starts with ``first_line``."""
    blocks: list[str] = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    [block] = [b for b in blocks if b.startswith(first_line)]
    return block


def _console_env(config: EventStoreConfig) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_") and k != "PYTHONPATH"
    }
    env.update(EVENTSTORE_URL=config.url or "", EVENTSTORE_SCHEMA=config.schema)
    return env


def _wait_for_status(process: subprocess.Popen[str], status: Path, handled: int) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            [sub] = json.loads(status.read_text())["subscribers"]
            if sub["handled"] >= handled:
                return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"the daemon did not handle {handled} events")


@pytest.mark.parametrize("serializer_from", ["option", "environment"])
def test_readme_daemon_example_runs_from_the_current_directory(
    eventstore_config: EventStoreConfig, tmp_path: Path, serializer_from: str
) -> None:
    """The README's projections.py, run by the console script from its folder, with its
    serializer given as --serializer or EVENTSTORE_SERIALIZER: batches of registered
    classes, setup and teardown."""
    source = tmp_path / "projections.py"
    source.write_text(readme_python_block("# projections.py"))
    spec = importlib.util.spec_from_file_location("readme_projections", source)
    assert spec is not None
    assert spec.loader is not None
    projections = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(projections)

    async def append() -> None:
        config = eventstore_config.with_changes(serializer=projections.serializer)
        async with open_event_store(config) as store:
            deposits = [("acct-1", 5), ("acct-2", 7), ("acct-1", 10)]
            await store.append_to_stream(
                "bank",
                ANY_VERSION,
                [EventData(projections.Deposited(a, n)) for a, n in deposits],
            )

    trio.run(append)
    status = tmp_path / "status.json"
    command = [CONSOLE_SCRIPT, "run", "projections:balances", "--status-file", str(status)]
    env = _console_env(eventstore_config)
    if serializer_from == "option":
        command += ["--serializer", "projections:serializer"]
    else:
        env["EVENTSTORE_SERIALIZER"] = "projections:serializer"
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_status(process, status, 3)
    process.send_signal(signal.SIGTERM)
    code, err = _exit_status(process, HANG_GUARD)
    assert code == 0, err
    assert "balances at exit: {'acct-1': 15, 'acct-2': 7}" in err


def test_run_imports_handlers_from_the_current_directory(
    eventstore_config: EventStoreConfig, tmp_path: Path
) -> None:
    log = tmp_path / "seen.log"
    (tmp_path / "mine.py").write_text(
        "import os\n\n\ndef handle(event):\n"
        "    with open(os.environ['DAEMON_LOG'], 'a') as log:\n"
        "        log.write(f'{event.event_number}\\n')\n"
    )
    trio.run(_append, eventstore_config, 1)
    env = _console_env(eventstore_config)
    env["DAEMON_LOG"] = str(log)
    process = subprocess.Popen(
        [CONSOLE_SCRIPT, "run", "mine:handle"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_log(process, log, 1)
    process.send_signal(signal.SIGTERM)
    code, err = _exit_status(process, HANG_GUARD)
    assert code == 0, err


def test_run_refuses_a_serializer_it_cannot_load(
    eventstore_config: EventStoreConfig, tmp_path: Path
) -> None:
    env = _console_env(eventstore_config)
    env["EVENTSTORE_SERIALIZER"] = "no_such_module:serializer"
    result = subprocess.run(
        [CONSOLE_SCRIPT, "run", "tests.daemon_handlers:record"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        check=False,
    )
    assert result.returncode == 2
    assert "EVENTSTORE_SERIALIZER" in result.stderr
    assert "no_such_module" in result.stderr
