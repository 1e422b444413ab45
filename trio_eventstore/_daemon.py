"""The subscriber daemon: run handlers on persistent subscriptions for as long as the
process lives, and stop cleanly.

On SIGINT/SIGTERM (or `SubscriberDaemon.stop`) it stops taking new events, lets each
handler finish the batch in hand, acknowledges it, flushes checkpoints and returns.
A handler that raises is retried with back-off (the batch is handled again, never
skipped) or stops the daemon, by option.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import math
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import trio

from ._config import EventStoreConfig
from ._errors import EventStoreError, single_errors
from ._store import EventStore, open_event_store
from ._subscriptions import Subscription, SubscriptionOptions
from ._types import ALL_STREAMS, RecordedEvent, StartFrom

__all__ = [
    "Handler",
    "HandlerFailedError",
    "SubscriberDaemon",
    "SubscriberSpec",
    "SubscriberStatistics",
    "load_handler",
    "open_subscriber_daemon",
    "run_subscribers",
]

logger = logging.getLogger("trio_eventstore.daemon")

Handler = Callable[[RecordedEvent], Awaitable[None] | None]


@attrs.frozen(kw_only=True)
class SubscriberSpec:
    """One handler on one persistent subscription.

    Args:
        name: the subscription name (its checkpoint and lock).
        handler: called for every event, in order (sync or async).
        stream_uuid: the stream, or ``"$all"``.
        on_error: ``"retry"`` (back-off from ``retry_delay`` doubling up to
            ``max_retry_delay``) or ``"stop"`` (the daemon stops and reports it).
        start_from, concurrency_limit, partition_by, buffer_size, max_size,
            checkpoint_threshold, checkpoint_after, selector: the
            `EventStore.subscribe_to_stream` options (validated here, before any I/O).
    """

    name: str
    handler: Handler
    stream_uuid: str = ALL_STREAMS
    on_error: Literal["retry", "stop"] = "retry"
    retry_delay: float = 0.5
    max_retry_delay: float = 30.0
    start_from: StartFrom | int = StartFrom.ORIGIN
    concurrency_limit: int | None = None
    partition_by: Callable[[RecordedEvent], Hashable] | None = None
    buffer_size: int = 1
    max_size: int = 1000
    checkpoint_threshold: int = 1
    checkpoint_after: float = 0.0
    selector: Callable[[RecordedEvent], bool] | None = None

    def __attrs_post_init__(self) -> None:
        SubscriptionOptions(  # raises on a bad option, before any I/O
            start_from=self.start_from,
            concurrency_limit=self.concurrency_limit,
            partition_by=self.partition_by,
            buffer_size=self.buffer_size,
            max_size=self.max_size,
            checkpoint_threshold=self.checkpoint_threshold,
            checkpoint_after=self.checkpoint_after,
            selector=self.selector,
        )
        if not callable(self.handler):
            raise TypeError("handler: expected a callable taking a RecordedEvent")
        if self.on_error not in ("retry", "stop"):
            raise ValueError(f"on_error: expected 'retry' or 'stop', got {self.on_error!r}")
        if not (0 < self.retry_delay <= self.max_retry_delay < math.inf):
            raise ValueError("retry_delay, max_retry_delay: need 0 < retry_delay <= max")


@attrs.define
class SubscriberStatistics:
    """What an operator reads about one subscriber (`SubscriberDaemon.statistics`)."""

    name: str
    stream_uuid: str
    state: str = "starting"
    handled: int = 0
    errors: int = 0
    last_error: str | None = None
    last_ack: int = 0
    last_checkpoint: int = 0
    head: int = 0

    @property
    def lag(self) -> int:
        """Events in the stream not yet acknowledged."""
        return max(0, self.head - self.last_ack)

    def as_dict(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "lag": self.lag}


class HandlerFailedError(EventStoreError):
    """A handler raised and its spec says ``on_error="stop"`` (its error is the cause)."""


class SubscriberDaemon:
    """Runs `SubscriberSpec` handlers; made by `open_subscriber_daemon`."""

    def __init__(self, store: EventStore, specs: Sequence[SubscriberSpec]) -> None:
        self.store = store
        self.specs = list(specs)
        self._stats = {
            spec.name: SubscriberStatistics(spec.name, spec.stream_uuid) for spec in self.specs
        }
        self._stopping = False
        self._waits: set[trio.CancelScope] = set()
        self._subs: dict[str, Subscription] = {}

    def stop(self) -> None:
        """Stop taking new events; handlers finish the batch in hand."""
        if not self._stopping:
            logger.info("daemon stopping: finishing the batches in hand")
        self._stopping = True
        for scope in list(self._waits):
            scope.cancel()

    def statistics(self) -> list[SubscriberStatistics]:
        for name, sub in self._subs.items():
            stats = sub.statistics()
            self._stats[name].last_ack = stats.last_ack
            self._stats[name].last_checkpoint = stats.last_persisted
        return list(self._stats.values())

    async def _refresh_heads(self) -> None:
        for stats in self._stats.values():
            with contextlib.suppress(LookupError):
                stats.head = (await self.store.stream_info(stats.stream_uuid)).stream_version

    async def _run_one(self, spec: SubscriberSpec) -> None:
        stats = self._stats[spec.name]
        async with self.store.subscribe_to_stream(
            spec.stream_uuid,
            spec.name,
            start_from=spec.start_from,
            concurrency_limit=spec.concurrency_limit,
            partition_by=spec.partition_by,
            buffer_size=spec.buffer_size,
            max_size=spec.max_size,
            checkpoint_threshold=spec.checkpoint_threshold,
            checkpoint_after=spec.checkpoint_after,
            selector=spec.selector,
        ) as sub:
            self._subs[spec.name] = sub
            stats.state = "waiting_for_lock"
            await sub.wait_subscribed()
            stats.state = "running"
            logger.info("subscriber %s: subscribed to %s", spec.name, spec.stream_uuid)
            while not self._stopping:
                with trio.CancelScope() as wait:
                    self._waits.add(wait)
                    if self._stopping:
                        wait.cancel()
                    try:
                        batch = await sub.__anext__()
                    except StopAsyncIteration:
                        break
                    finally:
                        self._waits.discard(wait)
                if wait.cancelled_caught:
                    break
                for event in batch.events:
                    await self._handle(spec, stats, event)
                sub.ack(batch)
            stats.state = "stopping"
        stats.state = "stopped"
        logger.info("subscriber %s: stopped, checkpoint %s", spec.name, stats.last_checkpoint)

    async def _handle(
        self, spec: SubscriberSpec, stats: SubscriberStatistics, event: RecordedEvent
    ) -> None:
        delay = spec.retry_delay
        while True:
            try:
                result = spec.handler(event)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                stats.errors += 1
                stats.last_error = f"{type(exc).__name__}: {exc}"
                if spec.on_error == "stop":
                    stats.state = "failed"
                    logger.error(
                        "subscriber %s: event %s failed, stopping: %s",
                        spec.name,
                        event.event_number,
                        stats.last_error,
                    )
                    raise HandlerFailedError(
                        f"subscriber {spec.name!r} failed on event {event.event_number}: "
                        f"{stats.last_error}"
                    ) from exc
                stats.state = "retrying"
                logger.warning(
                    "subscriber %s: event %s failed (%s); retrying in %.2f s",
                    spec.name,
                    event.event_number,
                    stats.last_error,
                    delay,
                )
                await trio.sleep(delay)
                delay = min(delay * 2, spec.max_retry_delay)
                continue
            stats.handled += 1
            stats.state = "running"
            return


@contextlib.asynccontextmanager
async def open_subscriber_daemon(
    store: EventStore,
    specs: Sequence[SubscriberSpec],
    *,
    status_file: Path | None = None,
    status_interval: float = 5.0,
) -> AsyncIterator[SubscriberDaemon]:
    """Run the subscribers until the block exits (which stops them cleanly) or one
    fails with ``on_error="stop"`` (`HandlerFailedError` then comes out of the block)."""
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError("specs: subscription names must be unique")
    daemon = SubscriberDaemon(store, specs)
    status_scope = trio.CancelScope()

    async def write_status() -> None:
        assert status_file is not None
        with status_scope:
            await _write_status(daemon, status_file, status_interval)

    with single_errors():
        async with trio.open_nursery() as nursery:
            for spec in daemon.specs:
                nursery.start_soon(daemon._run_one, spec)
            if status_file is not None:
                nursery.start_soon(write_status)
            try:
                yield daemon
            finally:
                daemon.stop()  # the subscribers finish the batch in hand, then return
                status_scope.cancel()
    if status_file is not None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await _write_status_once(daemon, status_file)


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
) -> None:
    """Open the store and run the subscribers until SIGINT/SIGTERM, then stop cleanly."""
    async with (
        open_event_store(config) as store,
        open_subscriber_daemon(store, specs, status_file=status_file) as daemon,
    ):
        if not handle_signals:
            await trio.sleep_forever()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                logger.info("received %s", signal.Signals(signum).name)
                daemon.stop()
                break
        # Leaving the block waits for the subscribers to finish their batches.


def load_handler(target: str) -> Handler:
    """``"package.module:function"`` -> the function.

    Raises:
        ValueError: not of that form, or not found.
    """
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"handler {target!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"handler {target!r}: cannot import {module_name!r}: {exc}") from exc
    handler = getattr(module, attr, None)
    if handler is None or not callable(handler):
        raise ValueError(f"handler {target!r}: {module_name!r} has no callable {attr!r}")
    result: Handler = handler
    return result
