"""The subscriber daemon's values: handlers, `SubscriberSpec`, `SubscriberStatistics`
and `HandlerFailedError` (the daemon itself is in `_daemon` and `_daemon_runner`)."""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Literal

import attrs

from ._errors import EventStoreError
from ._store import EventStore
from ._subscription_types import (
    DEFAULT_MAX_BUFFER_BYTES,
    DEFAULT_RETRY_POLICY,
    RetryPolicy,
    SubscriptionOptions,
)
from ._types import ALL_STREAMS, RecordedEvent, StartFrom

__all__ = [
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "BatchHandler",
    "EventHandler",
    "Handler",
    "HandlerContext",
    "HandlerFailedError",
    "SubscriberSpec",
    "SubscriberStatistics",
]


#: Called with each event, in order (sync or async).
Handler = Callable[[RecordedEvent], Awaitable[None] | None]
#: Called with each delivered batch (a list of events, in order; up to ``buffer_size``).
BatchHandler = Callable[[list[RecordedEvent]], Awaitable[None] | None]

#: Seconds the handlers in hand get to finish once the daemon is asked to stop.
DEFAULT_SHUTDOWN_TIMEOUT = 10.0


@attrs.frozen
class HandlerContext:
    """What an `EventHandler` lifecycle is given when its subscriber starts.

    Attributes:
        store: the open store (read streams, append, record snapshots ...).
        subscription_name: the subscription the handler runs on.
        stream_uuid: its stream, or ``"$all"``.
        logger: a logger named after the subscription.
    """

    store: EventStore
    subscription_name: str
    stream_uuid: str
    logger: logging.Logger


@attrs.frozen(kw_only=True)
class EventHandler:
    """A handler with batches, or a lifecycle, or both (give exactly one of ``handle``
    and ``lifecycle``).

    Args:
        handle: called with each event, or with ``batch=True`` with each delivered
            batch as a list of events (sync or async).
        lifecycle: called with a `HandlerContext` when the subscriber starts; returns
            an async context manager whose value is the ``handle`` function. Setup
            before it yields, teardown after the subscriber has stopped and flushed its
            checkpoint (``contextlib.asynccontextmanager`` makes one from a generator).
        batch: ``handle`` takes a list of events (up to the subscription's
            ``buffer_size``); the batch is acknowledged once ``handle`` returns.
    """

    handle: Callable[[Any], Awaitable[None] | None] | None = None
    lifecycle: Callable[[HandlerContext], contextlib.AbstractAsyncContextManager[Any]] | None = None
    batch: bool = False

    def __attrs_post_init__(self) -> None:
        if (self.handle is None) == (self.lifecycle is None):
            raise TypeError("EventHandler: give exactly one of handle= and lifecycle=")
        for name in ("handle", "lifecycle"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"EventHandler.{name}: expected a callable")
        if not isinstance(self.batch, bool):
            raise TypeError("EventHandler.batch: expected a bool")


@attrs.frozen(kw_only=True)
class SubscriberSpec:
    """One handler on one persistent subscription.

    Args:
        name: the subscription name (its checkpoint and lock).
        handler: a function called with every event, in order (sync or async), or an
            `EventHandler` (batches, setup and teardown, a `HandlerContext`).
        stream_uuid: the stream, or ``"$all"``.
        on_error: ``"park"`` (retry per ``retry_policy``, then park the event and go
            on), ``"retry"`` (for ever: back-off from ``retry_delay`` doubling up to
            ``max_retry_delay``) or ``"stop"`` (the daemon stops and reports it).
        retry_policy: with ``on_error="park"``: attempts, back-off and deadline
            (`DEFAULT_RETRY_POLICY` by default, with ``retry_delay`` and
            ``max_retry_delay`` as its back-off). A batch handler
            whose batch exhausts it is called with each event of the batch alone, so
            only the events that fail alone are parked.
        undecodable: ``"park"`` (default) or ``"deliver"`` (the handler gets
            `UndecodedEvent` values for events the serializer cannot decode).
        start_from, concurrency_limit, partition_by, partition_groups, buffer_size, max_size,
            checkpoint_threshold, checkpoint_after, selector, max_buffer_bytes: the
            `EventStore.subscribe_to_stream` options (validated here, before any I/O).
    """

    name: str
    handler: Handler | EventHandler
    stream_uuid: str = ALL_STREAMS
    on_error: Literal["park", "retry", "stop"] = "park"
    retry_delay: float = 0.5
    max_retry_delay: float = 30.0
    retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY
    undecodable: Literal["park", "deliver"] = "park"
    start_from: StartFrom | int = StartFrom.ORIGIN
    concurrency_limit: int | None = None
    partition_by: Callable[[RecordedEvent], Hashable] | None = None
    partition_groups: int | None = None
    buffer_size: int = 1
    max_size: int = 1000
    checkpoint_threshold: int = 1
    checkpoint_after: float = 0.0
    selector: Callable[[RecordedEvent], bool] | None = None
    max_buffer_bytes: int | None = DEFAULT_MAX_BUFFER_BYTES

    def __attrs_post_init__(self) -> None:
        SubscriptionOptions(  # raises on a bad option, before any I/O
            start_from=self.start_from,
            concurrency_limit=self.concurrency_limit,
            partition_by=self.partition_by,
            partition_groups=self.partition_groups,
            buffer_size=self.buffer_size,
            max_size=self.max_size,
            checkpoint_threshold=self.checkpoint_threshold,
            checkpoint_after=self.checkpoint_after,
            selector=self.selector,
            max_buffer_bytes=self.max_buffer_bytes,
            retry_policy=self.policy,
            undecodable=self.undecodable,
        )
        if not isinstance(self.handler, EventHandler) and (
            not callable(self.handler) or inspect.isclass(self.handler)
        ):
            raise TypeError(
                "handler: expected a function taking a RecordedEvent, or an EventHandler"
            )
        if self.on_error not in ("park", "retry", "stop"):
            raise ValueError(f"on_error: expected 'park', 'retry' or 'stop', got {self.on_error!r}")
        if not (0 < self.retry_delay <= self.max_retry_delay < math.inf):
            raise ValueError("retry_delay, max_retry_delay: need 0 < retry_delay <= max")

    @property
    def policy(self) -> RetryPolicy:
        """The retry policy in force: ``retry_policy``; the default one takes
        ``retry_delay`` and ``max_retry_delay`` as its back-off."""
        if not isinstance(self.retry_policy, RetryPolicy):
            raise TypeError(
                f"retry_policy: expected a RetryPolicy, got {type(self.retry_policy).__name__}"
            )
        if self.retry_policy is not DEFAULT_RETRY_POLICY:
            return self.retry_policy
        return attrs.evolve(
            DEFAULT_RETRY_POLICY, backoff=self.retry_delay, max_backoff=self.max_retry_delay
        )


@attrs.define
class SubscriberStatistics:
    """What an operator reads about one subscriber (`SubscriberDaemon.statistics`).

    ``state`` is one of ``starting``, ``standby`` (another node holds the subscription),
    ``catching_up``, ``running``, ``retrying`` (a handler failed; backing off),
    ``reconnecting`` (the database connection or the lock was lost; retrying),
    ``stopping``, ``stopped`` and ``failed``. ``last_checkpoint`` is the stored
    checkpoint, ``head`` the stream's latest known version (event number for
    ``$all``), ``lag`` the events in the stream not yet acknowledged.
    """

    name: str
    stream_uuid: str
    state: str = "starting"
    handled: int = 0
    errors: int = 0
    last_error: str | None = None
    last_ack: int = 0
    last_checkpoint: int = 0
    head: int = 0
    #: events parked by this subscriber's subscription, as its holder knows them (once
    #: this node no longer holds it, e.g. stopped: the last count it knew as the holder)
    parked: int = 0

    @property
    def lag(self) -> int:
        """Events in the stream not yet acknowledged."""
        return max(0, self.head - self.last_ack)

    def as_dict(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "lag": self.lag}


class HandlerFailedError(EventStoreError):
    """A handler raised and its spec says ``on_error="stop"``, or its lifecycle's setup
    or teardown raised (its error is the cause)."""
