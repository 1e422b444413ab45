"""The subscriber daemon: run handlers on persistent subscriptions for as long as the
process lives, and stop cleanly.

`open_subscriber_daemon` runs the subscribers (`_daemon_runner.SubscriberDaemon`: how a
handler is called, retried, parked and stopped) and, by option, writes a status file and
serves ``/metrics`` and ``/health``; `run_subscribers` also opens the store and stops on
SIGINT/SIGTERM (a second signal cancels the handlers in hand at once); `load_handler`
resolves the command line's ``package.module:name`` handlers.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import signal
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import trio

from ._config import EventStoreConfig
from ._daemon_runner import SubscriberDaemon
from ._daemon_types import DEFAULT_SHUTDOWN_TIMEOUT, EventHandler, Handler, SubscriberSpec
from ._errors import single_errors
from ._health import HealthEndpoint, serve_health
from ._imports import import_named
from ._store import EventStore, open_event_store

__all__ = ["load_handler", "open_subscriber_daemon", "run_subscribers"]

logger = logging.getLogger("trio_eventstore.daemon")


@contextlib.asynccontextmanager
async def open_subscriber_daemon(
    store: EventStore,
    specs: Sequence[SubscriberSpec],
    *,
    status_file: Path | None = None,
    status_interval: float = 5.0,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    http_port: int | None = None,
    http_host: str = "127.0.0.1",
) -> AsyncIterator[SubscriberDaemon]:
    """Run the subscribers until the block exits (which stops them cleanly) or one
    fails with ``on_error="stop"`` (`HandlerFailedError` then comes out of the block).

    Args:
        status_file: write a JSON snapshot of `SubscriberDaemon.statistics` here every
            ``status_interval`` seconds (atomically: a temporary file, then a rename).
        shutdown_timeout: once stopping, how long the handlers in hand may run before
            they are cancelled (what was acknowledged is flushed either way).
        http_port: serve ``/metrics`` (Prometheus text), ``/health``, ``/health/live``
            and ``/health/ready`` on this port of ``http_host`` (0: a free port, see
            `SubscriberDaemon.http_port`); None: not served.

    Raises:
        ValueError: it cannot serve on ``http_host``:``http_port`` (the port is in use,
            the host unknown), before any subscriber starts.
    """
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError("specs: subscription names must be unique")
    if isinstance(shutdown_timeout, bool) or not isinstance(shutdown_timeout, (int, float)):
        raise TypeError("shutdown_timeout: expected a number of seconds")
    if not 0 <= shutdown_timeout < math.inf:
        raise ValueError("shutdown_timeout: must be a finite number of seconds >= 0")
    if http_port is not None and (
        isinstance(http_port, bool) or not isinstance(http_port, int) or not 0 <= http_port < 65536
    ):
        raise ValueError(f"http_port: expected None or a port number, got {http_port!r}")
    daemon = SubscriberDaemon(store, specs, shutdown_timeout=shutdown_timeout)
    await daemon._load_positions()
    status_scope, http_scope = trio.CancelScope(), trio.CancelScope()
    endpoint = HealthEndpoint(store, lambda: [s.as_dict() for s in daemon.statistics()])

    async def write_status() -> None:
        assert status_file is not None
        with status_scope:
            await _write_status(daemon, status_file, status_interval)

    with single_errors():
        async with trio.open_nursery() as nursery:
            if http_port is not None:  # first: a port it cannot serve on stops it here
                daemon.http_port = await nursery.start(
                    _serve_until, http_scope, endpoint, http_host, http_port
                )
            for spec in daemon.specs:
                nursery.start_soon(daemon._run_one, spec)
            if status_file is not None:
                nursery.start_soon(write_status)
            try:
                yield daemon
            finally:
                daemon.stop()  # the subscribers finish what they have in hand, then return
                status_scope.cancel()
                http_scope.cancel()
    if status_file is not None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await _write_status_once(daemon, status_file)


async def _serve_until(
    scope: trio.CancelScope,
    endpoint: HealthEndpoint,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await serve_health(endpoint, host, port, task_status=task_status)


async def _write_status_once(daemon: SubscriberDaemon, path: Path) -> None:
    await daemon._refresh_heads()
    snapshot = {"time": time.time(), "subscribers": [s.as_dict() for s in daemon.statistics()]}
    tmp = path.with_suffix(path.suffix + ".tmp")
    await trio.Path(tmp).write_text(json.dumps(snapshot, indent=2))
    await trio.Path(tmp).replace(path)


async def _write_status(daemon: SubscriberDaemon, path: Path, interval: float) -> None:
    while True:
        with contextlib.suppress(Exception):
            await _write_status_once(daemon, path)
        await trio.sleep(interval)


async def run_subscribers(
    config: EventStoreConfig,
    specs: Sequence[SubscriberSpec],
    *,
    status_file: Path | None = None,
    handle_signals: bool = True,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    http_port: int | None = None,
    http_host: str = "127.0.0.1",
) -> None:
    """Open the store and run the subscribers until SIGINT/SIGTERM, then stop cleanly
    (`SubscriberDaemon.stop`); a second signal cancels the handlers in hand at once.
    Either way what was handled is acknowledged and flushed. ``http_port``,
    ``http_host``: as for `open_subscriber_daemon`."""
    receiver = (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)
        if handle_signals
        else contextlib.nullcontext(None)
    )
    with receiver as signals, single_errors():
        async with open_event_store(config) as store, trio.open_nursery() as nursery:
            async with open_subscriber_daemon(
                store,
                specs,
                status_file=status_file,
                shutdown_timeout=shutdown_timeout,
                http_port=http_port,
                http_host=http_host,
            ) as daemon:
                if signals is not None:
                    nursery.start_soon(_watch_signals, signals, daemon)
                await daemon._stop_requested.wait()
                # Leaving the block waits for the subscribers to finish what they hold.
            nursery.cancel_scope.cancel()


async def _watch_signals(signals: AsyncIterator[int], daemon: SubscriberDaemon) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if daemon.stopping:
            logger.warning("received %s again: stopping now", name)
            daemon.stop(now=True)
        else:
            logger.info("received %s (send it again to stop at once)", name)
            daemon.stop()


def load_handler(target: str) -> Handler | EventHandler:
    """``"package.module:name"`` -> the handler function or `EventHandler` it names.

    Raises:
        ValueError: not of that form, not found, or not a handler.
    """
    handler = import_named(target, "handler", "package.module:function")
    if isinstance(handler, EventHandler):
        return handler
    if handler is None:
        raise ValueError(f"handler {target!r}: no handler function or EventHandler of that name")
    if not callable(handler) or inspect.isclass(handler):
        kind = "class" if inspect.isclass(handler) else type(handler).__name__
        kind = ("an " if kind[0].lower() in "aeiou" else "a ") + kind
        raise ValueError(f"handler {target!r}: is {kind}, not a handler function or EventHandler")
    result: Handler = handler
    return result
