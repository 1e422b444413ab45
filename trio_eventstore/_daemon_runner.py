"""`SubscriberDaemon`: run each subscriber's handler on its persistent subscription
until the daemon stops, and stop cleanly (`_daemon` opens and hosts it).

On `SubscriberDaemon.stop` (SIGINT/SIGTERM under `run_subscribers`) it stops taking new
events, lets each handler finish the event (or, for a batch handler, the batch) in hand
within ``shutdown_timeout``, acknowledges what was handled, flushes checkpoints and
returns; ``stop(now=True)`` cancels the handlers in hand at once. A handler that raises is
retried with back-off (the same events again; stopping cancels the back-off) per its
`RetryPolicy`, then the event is parked and the handler goes on (``on_error="park"``,
the default); or it is retried for ever, or it stops the daemon, by option.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import trio

from . import _storage
from ._daemon_types import (
    DEFAULT_SHUTDOWN_TIMEOUT,
    EventHandler,
    HandlerContext,
    HandlerFailedError,
    SubscriberSpec,
    SubscriberStatistics,
)
from ._store import EventStore
from ._subscription_types import EventBatch
from ._subscriptions import Subscription
from ._types import RecordedEvent

__all__ = ["SubscriberDaemon"]

logger = logging.getLogger("trio_eventstore.daemon")

#: Subscription states in which this node holds the subscription (and knows its parked
#: events).
_HOLDING = frozenset({"catching_up", "subscribed", "hibernating"})

#: The subscription's state -> the subscriber's, while the subscriber itself runs.
_SUBSCRIPTION_STATES = {
    "starting": "starting",
    "subscribing": "starting",
    "waiting_for_lock": "standby",
    "disconnected": "reconnecting",
    "catching_up": "catching_up",
    "subscribed": "running",
    "hibernating": "running",
    "failed": "failed",
    "stopped": "stopped",
}


class _Stopped(Exception):
    """The daemon stopped while a handler was backing off, or the shutdown timeout
    cancelled it: what it had in hand is not acknowledged."""


class SubscriberDaemon:
    """Runs `SubscriberSpec` handlers; made by `open_subscriber_daemon`."""

    def __init__(
        self,
        store: EventStore,
        specs: Sequence[SubscriberSpec],
        *,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    ) -> None:
        self.store = store
        self.specs = list(specs)
        self.shutdown_timeout = shutdown_timeout
        self._stats = {
            spec.name: SubscriberStatistics(spec.name, spec.stream_uuid) for spec in self.specs
        }
        #: starting, subscribed (then the subscription's state tells), retrying,
        #: stopping, stopped or failed
        self._phase = {spec.name: "starting" for spec in self.specs}
        self._stopping = False
        self._stop_requested = trio.Event()
        self._waits: set[trio.CancelScope] = set()
        self._handler_scopes: set[trio.CancelScope] = set()
        self._handler_deadline = math.inf
        self._subs: dict[str, Subscription] = {}
        #: the port ``/metrics`` and ``/health`` are served on (None: not served)
        self.http_port: int | None = None

    @property
    def stopping(self) -> bool:
        """Whether `stop` was called."""
        return self._stopping

    def stop(self, *, now: bool = False) -> None:
        """Stop taking new events. Handlers finish the event (batch handlers: the batch)
        in hand, within ``shutdown_timeout``; then, or at once with ``now=True``, they
        are cancelled (what they had in hand is not acknowledged: it comes again).
        Back-off waits end at once."""
        if not self._stopping:
            logger.info(
                "daemon stopping: finishing the events in hand (at most %.1f s)",
                self.shutdown_timeout,
            )
        elif now:
            logger.warning("daemon stopping now: cancelling the handlers in hand")
        self._stopping = True
        self._stop_requested.set()
        deadline = trio.current_time() + (0.0 if now else self.shutdown_timeout)
        self._handler_deadline = min(self._handler_deadline, deadline)
        for scope in list(self._handler_scopes):
            scope.deadline = min(scope.deadline, self._handler_deadline)
        for scope in list(self._waits):
            scope.cancel()

    def statistics(self) -> list[SubscriberStatistics]:
        """Each subscriber's state, counts and positions, as of now."""
        for name, stats in self._stats.items():
            phase = self._phase[name]
            stats.state = phase
            sub = self._subs.get(name)
            if sub is None:
                continue
            now = sub.statistics()
            if now.lock_attempts:  # it has read the stored checkpoint itself
                stats.last_ack = now.last_ack
                stats.last_checkpoint = now.last_persisted
            stats.head = max(stats.head, now.head)
            if now.state in _HOLDING:  # else the last count it knew as the holder
                stats.parked = now.parked
            if phase == "subscribed":
                stats.state = _SUBSCRIPTION_STATES.get(now.state, now.state)
        return list(self._stats.values())

    async def _load_positions(self) -> None:
        """The stored checkpoints and the heads, before anything runs (so the first
        status already tells the truth)."""
        for spec in self.specs:
            stats = self._stats[spec.name]
            with contextlib.suppress(LookupError):
                stats.head = (await self.store.stream_info(spec.stream_uuid)).stream_version
            checkpoint = await _storage.subscription_checkpoint(
                self.store._db, spec.stream_uuid, spec.name
            )
            stats.last_ack = stats.last_checkpoint = checkpoint or 0

    async def _refresh_heads(self) -> None:
        for stats in self._stats.values():
            with contextlib.suppress(LookupError):
                head = (await self.store.stream_info(stats.stream_uuid)).stream_version
                stats.head = max(stats.head, head)

    @contextlib.contextmanager
    def _wait_scope(self) -> Iterator[trio.CancelScope]:
        """A wait that `stop` ends (a delivery, the lock, a back-off)."""
        with trio.CancelScope() as scope:
            self._waits.add(scope)
            if self._stopping:
                scope.cancel()
            try:
                yield scope
            finally:
                self._waits.discard(scope)

    async def _run_one(self, spec: SubscriberSpec) -> None:
        stats = self._stats[spec.name]
        handler = spec.handler
        try:
            if not isinstance(handler, EventHandler):
                await self._subscribe_and_handle(spec, stats, False, handler)
                return
            if handler.handle is not None:
                await self._subscribe_and_handle(spec, stats, handler.batch, handler.handle)
                return
            assert handler.lifecycle is not None
            await self._run_lifecycle(spec, stats, handler.lifecycle, handler.batch)
        except Exception:
            self._phase[spec.name] = "failed"
            raise
        finally:
            if self._phase[spec.name] != "failed":
                self._phase[spec.name] = "stopped"
            logger.info("subscriber %s: stopped, checkpoint %s", spec.name, stats.last_checkpoint)

    async def _run_lifecycle(
        self,
        spec: SubscriberSpec,
        stats: SubscriberStatistics,
        lifecycle: Callable[[HandlerContext], contextlib.AbstractAsyncContextManager[Any]],
        batch_mode: bool,
    ) -> None:
        """Setup, the subscriber, teardown: a setup or teardown error is a
        `HandlerFailedError` saying which."""
        context = HandlerContext(
            self.store, spec.name, spec.stream_uuid, logger.getChild(spec.name)
        )
        step = "setup"
        body_error: BaseException | None = None
        try:
            async with lifecycle(context) as handle:
                step = "teardown"
                if not callable(handle):
                    raise HandlerFailedError(
                        f"subscriber {spec.name!r}: the lifecycle yielded {handle!r}, "
                        "not a handler function"
                    )
                try:
                    await self._subscribe_and_handle(spec, stats, batch_mode, handle)
                except BaseException as exc:
                    body_error = exc
                    raise
        except Exception as exc:
            if exc is body_error or isinstance(exc, HandlerFailedError):
                raise
            raise HandlerFailedError(f"subscriber {spec.name!r}: {step} failed: {exc!r}") from exc

    async def _subscribe_and_handle(
        self,
        spec: SubscriberSpec,
        stats: SubscriberStatistics,
        batch_mode: bool,
        handle: Callable[[Any], Awaitable[None] | None],
    ) -> None:
        subscription = self.store.subscribe_to_stream(
            spec.stream_uuid,
            spec.name,
            start_from=spec.start_from,
            concurrency_limit=spec.concurrency_limit,
            partition_by=spec.partition_by,
            partition_groups=spec.partition_groups,
            buffer_size=spec.buffer_size,
            max_size=spec.max_size,
            checkpoint_threshold=spec.checkpoint_threshold,
            checkpoint_after=spec.checkpoint_after,
            selector=spec.selector,
            max_buffer_bytes=spec.max_buffer_bytes,
            retry_policy=spec.policy,
            undecodable=spec.undecodable,
        )
        sub: Subscription | None = None
        try:
            async with subscription as sub:
                self._subs[spec.name] = sub
                self._phase[spec.name] = "subscribed"  # its state: standby, catching up, ...
                try:
                    await self._handle_batches(spec, stats, batch_mode, handle, sub)
                finally:
                    self._phase[spec.name] = "stopping"
        finally:
            if sub is not None:  # leaving the subscription persisted the last ack
                final = sub.statistics()
                stats.last_ack = final.last_ack
                stats.last_checkpoint = final.last_persisted

    async def _handle_batches(
        self,
        spec: SubscriberSpec,
        stats: SubscriberStatistics,
        batch_mode: bool,
        handle: Callable[[Any], Awaitable[None] | None],
        sub: Subscription,
    ) -> None:
        with self._wait_scope():
            await sub.wait_subscribed()
            logger.info("subscriber %s: subscribed to %s", spec.name, spec.stream_uuid)
        while not self._stopping:
            batch: EventBatch | None = None
            with self._wait_scope():
                try:
                    batch = await sub.__anext__()
                except StopAsyncIteration:
                    break
            if batch is None:  # stopped while waiting
                break
            try:
                await self._handle_batch(spec, stats, batch_mode, handle, sub, batch)
            except _Stopped:
                break

    async def _handle_batch(
        self,
        spec: SubscriberSpec,
        stats: SubscriberStatistics,
        batch_mode: bool,
        handle: Callable[[Any], Awaitable[None] | None],
        sub: Subscription,
        batch: EventBatch,
    ) -> None:
        events = batch.events
        if batch_mode:
            label = f"events {events[0].event_number}..{events[-1].event_number}"
            try:
                await self._call(spec, stats, handle, list(events), label)
            except _Exhausted:
                if len(events) == 1:
                    raise
                # One at a time, so that only the events that fail alone are parked.
                await self._handle_each(spec, stats, lambda e: handle([e]), sub, events)
                return
            sub.ack(batch)
            stats.handled += len(events)
            return
        await self._handle_each(spec, stats, handle, sub, events)

    async def _handle_each(
        self,
        spec: SubscriberSpec,
        stats: SubscriberStatistics,
        handle: Callable[[Any], Awaitable[None] | None],
        sub: Subscription,
        events: list[RecordedEvent],
    ) -> None:
        for event in events:
            try:
                await self._call(spec, stats, handle, event, f"event {event.event_number}")
            except _Exhausted as exhausted:
                logger.error(
                    "subscriber %s: parking event %s after %d attempts: %s",
                    spec.name,
                    event.event_number,
                    exhausted.attempts,
                    exhausted.error,
                )
                # The events after it come again, in a new batch.
                sub._park(event, exhausted.error, exhausted.attempts)
                return
            sub.ack(event)  # acknowledged as handled: a stop flushes exactly this
            stats.handled += 1
            if self._stopping:
                raise _Stopped

    async def _call(
        self,
        spec: SubscriberSpec,
        stats: SubscriberStatistics,
        handle: Callable[[Any], Awaitable[None] | None],
        argument: object,
        label: str,
    ) -> None:
        """Call the handler until it succeeds (back-off between attempts).

        Raises:
            _Stopped: the daemon stopped during the back-off, or the shutdown timeout
                cancelled the handler.
            HandlerFailedError: it raised and ``on_error="stop"``.
            _Exhausted: ``on_error="park"`` and the retry policy is exhausted.
        """
        delay = spec.retry_delay
        policy = spec.policy
        failures = 0
        first_failure = time.monotonic()
        while True:
            error: Exception | None = None
            with trio.CancelScope(deadline=self._handler_deadline) as scope:
                self._handler_scopes.add(scope)
                try:
                    result = handle(argument)
                    if inspect.isawaitable(result):
                        await result
                    elif hasattr(result, "__aenter__"):
                        raise HandlerFailedError(
                            f"subscriber {spec.name!r}: the handler returned an async context "
                            "manager: a lifecycle goes in EventHandler(lifecycle=...)"
                        )
                except HandlerFailedError:
                    raise
                except Exception as exc:
                    error = exc
                finally:
                    self._handler_scopes.discard(scope)
            if scope.cancelled_caught:
                logger.warning(
                    "subscriber %s: %s cancelled after the shutdown timeout; "
                    "it will be delivered again",
                    spec.name,
                    label,
                )
                raise _Stopped
            if error is None:
                self._phase[spec.name] = "subscribed"
                return
            stats.errors += 1
            stats.last_error = f"{type(error).__name__}: {error}"
            if spec.on_error == "stop":
                logger.error(
                    "subscriber %s: %s failed, stopping: %s", spec.name, label, stats.last_error
                )
                raise HandlerFailedError(
                    f"subscriber {spec.name!r} failed on {label}: {stats.last_error}"
                ) from error
            if self._stopping:
                raise _Stopped
            failures += 1
            if spec.on_error == "park":
                if policy.exhausted(failures, time.monotonic() - first_failure):
                    self._phase[spec.name] = "subscribed"
                    raise _Exhausted(stats.last_error, failures)
                delay = policy.delay(failures)
            self._phase[spec.name] = "retrying"
            logger.warning(
                "subscriber %s: %s failed (%s); retrying in %.2f s",
                spec.name,
                label,
                stats.last_error,
                delay,
            )
            with self._wait_scope() as wait:
                await trio.sleep(delay)
            if wait.cancelled_caught:
                logger.info("subscriber %s: stopped while backing off on %s", spec.name, label)
                raise _Stopped
            delay = min(delay * 2, spec.max_retry_delay)


class _Exhausted(Exception):
    """The handler failed as often as its retry policy allows: park the event."""

    def __init__(self, error: str, attempts: int) -> None:
        super().__init__(error)
        self.error = error
        self.attempts = attempts
