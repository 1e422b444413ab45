"""Persistent subscriptions as the store sees them: `Subscriptions`, the registry of this
store's drivers by (stream, name), run in the store's nursery, which also tracks the
store's own appends (to hand their events to drivers without a read); and `Subscription`,
the handle a consumer iterates and acknowledges with, in its own task."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from . import _storage, _transient
from ._balance import split_group_name
from ._config import EventStoreConfig
from ._driver import Driver
from ._errors import (
    CheckpointFailedError,
    EventStoreClosedError,
    SubscriptionAlreadyExistsError,
    SubscriptionFailedError,
    TooManySubscribersError,
    shown,
    single_errors,
)
from ._inbox import Consumer, Inbox
from ._locks import LockKeeper
from ._metrics import StoreMetrics, TracingSpan
from ._notifications import Notifier, wait_any
from ._pg import CLEANUP_TIMEOUT, Database
from ._subscription_types import EventBatch, SubscriptionOptions, SubscriptionStatistics
from ._transient import TransientSubscription
from ._types import ALL_STREAMS, RecordedEvent

__all__ = ["Subscription", "Subscriptions", "is_current", "iteration_ended"]


class Subscription:
    """One consumer of a persistent subscription: an async iterator of `EventBatch`.

    Ack what you processed with `ack`; the checkpoint advances over the contiguous
    acknowledged prefix. Unacknowledged events are delivered again after a restart or
    takeover (at-least-once).
    """

    __slots__ = ("_consumer", "_driver", "_span")

    def __init__(self, driver: Driver, consumer: Consumer) -> None:
        self._driver = driver
        self._consumer = consumer
        #: when traced: the span of the batch in hand (ends when the next is asked for)
        self._span: TracingSpan | None = None

    def __aiter__(self) -> Subscription:
        return self

    def _end_span(self) -> None:
        span, self._span = self._span, None
        if span is not None:
            span.end()

    async def __anext__(self) -> EventBatch:
        if self._span is not None:
            self._end_span()
        batch = await self._next_batch()
        tracing = self._driver.owner.metrics.tracing
        if tracing is not None:
            driver, events = self._driver, batch.events
            self._span = tracing.start_span(
                "eventstore.subscription.batch",
                {
                    "eventstore.stream": driver.stream_uuid,
                    "eventstore.subscription": driver.name,
                    "eventstore.events": len(events),
                    "eventstore.first_event_number": events[0].event_number,
                    "eventstore.last_event_number": events[-1].event_number,
                },
            )
        return batch

    async def _next_batch(self) -> EventBatch:
        while True:
            try:
                batch = await self._consumer.receive()
            except trio.EndOfChannel:
                failure = self._driver.failure
                if failure is not None:
                    raise SubscriptionFailedError(
                        f"subscription {self._driver.name!r} failed: {failure}",
                        stream_uuid=self._driver.stream_uuid,
                        subscription_name=self._driver.name,
                    ) from failure
                raise iteration_ended(self._driver) from None
            if is_current(self._driver, self._consumer, batch):
                self._consumer.received(batch)
                mapper = self._driver.options.mapper
                if mapper is None:
                    return batch
                # The mapper runs here, in the consumer's own task.
                return EventBatch(
                    [mapper(e) for e in batch.events],
                    batch.events,
                    batch.session,
                    batch.epoch,
                    batch.consumer,
                )
            # Delivered by a session that has since lost its lock, or before a nack of
            # this consumer: it comes again.

    async def wait_subscribed(self) -> None:
        """Wait until this store holds the subscription's lock and delivery has begun.

        Raises:
            SubscriptionFailedError: the subscription failed.
            EventStoreClosedError: the store closed first.
        """
        while True:
            if self._driver.subscribed.is_set() and self._driver.failure is None:
                return
            _raise_if_stopped(self._driver)
            with single_errors():  # cancelled, a `trio.Cancelled`, not a group of two
                await wait_any(self._driver.subscribed, self._driver.done)

    async def wait_acked(self, event_number: int) -> None:
        """Wait until every event up to ``event_number`` has been acknowledged (or
        skipped by the selector).

        Raises:
            SubscriptionFailedError: the subscription failed.
            EventStoreClosedError: the store closed first.
        """
        driver = self._driver
        while driver.last_ack() < event_number:
            _raise_if_stopped(driver)
            await driver.progress.wait()

    async def wait_checkpointed(self, event_number: int) -> None:
        """Wait until the persisted checkpoint has reached ``event_number``.

        Raises:
            SubscriptionFailedError: the subscription failed.
            EventStoreClosedError: the store closed first.
        """
        driver = self._driver
        while driver.last_persisted < event_number:
            _raise_if_stopped(driver)
            await driver.checkpointed.wait()

    def ack(
        self, events_or_event_number: EventBatch | RecordedEvent | Sequence[RecordedEvent] | int
    ) -> None:
        """Acknowledge the given event and every event delivered to this subscriber
        before it (sync, non-blocking).

        An empty list acknowledges nothing.

        Raises:
            UnexpectedAckError: the event is not in flight for this subscriber.
        """
        if isinstance(events_or_event_number, list | tuple) and not events_or_event_number:
            return  # e.g. a handler that processed none of what it was given
        number = _ack_number(events_or_event_number)
        target = self._target(events_or_event_number, number)
        if target is not None and not _stale_batch(*target, events_or_event_number):
            target[0].ack(target[1], number)

    def _target(self, value: object, number: int) -> tuple[Driver, Consumer] | None:
        """The driver and consumer that delivered ``value`` (event ``number``); None:
        an ack of it is stale, to be ignored."""
        return self._driver, self._consumer

    def nack(
        self,
        event_or_event_number: EventBatch | RecordedEvent | Sequence[RecordedEvent] | int,
        *,
        retry: bool = True,
        error: BaseException | str | None = None,
    ) -> None:
        """Give an event back (sync, non-blocking): it was not processed.

        The events delivered to this subscriber before it count as acknowledged (as
        `ack` of the one before it); the events delivered after it are delivered again,
        after it. With ``retry=True`` it is delivered again after the back-off of the
        subscription's ``retry_policy``, or parked once the policy is exhausted;
        ``retry=False`` parks it now. Parking stores it with ``error`` (its text) and the
        attempts, and the subscription goes on past it. Until it is delivered again or
        parked, this subscriber gets no other event. A batch or a list stands for its
        first event.

        Raises:
            UnexpectedAckError: the event is not in flight for this subscriber.
        """
        if not isinstance(retry, bool):
            raise TypeError("retry: expected a bool")
        if error is not None and not isinstance(error, (BaseException, str)):
            raise TypeError("error: expected an exception, a str or None")
        if isinstance(event_or_event_number, list | tuple) and not event_or_event_number:
            raise ValueError("nack: an empty list holds no event to give back")
        number = _nack_number(event_or_event_number)
        target = self._target(_first_event(event_or_event_number), number)
        if target is not None and not _stale_batch(*target, event_or_event_number):
            target[0].nack(target[1], number, retry, error)

    def _park(self, event: RecordedEvent, error: str, attempts: int) -> None:
        """Park ``event`` now, recording ``attempts`` (the daemon retried it itself)."""
        target = self._target(event, event.event_number)
        if target is not None:
            target[0].nack(target[1], event.event_number, False, error, attempts=attempts)

    def statistics(self) -> SubscriptionStatistics:
        return subscription_statistics(self._driver)

    async def _leave(self, subscriptions: Subscriptions) -> CheckpointFailedError | None:
        """Leave (see `Subscriptions.leave`)."""
        return await subscriptions.leave(self._driver, self._consumer)


_ROLES = {
    "catching_up": "holder",
    "subscribed": "holder",
    "hibernating": "hibernated",
    "waiting_for_lock": "standby",
    "subscribing": "starting",
}


def subscription_statistics(driver: Driver) -> SubscriptionStatistics:
    """The driver's statistics with the figures metrics report (role, lag, ages)."""
    stats = driver.statistics()
    lag = max(0, stats.head - stats.last_ack)
    lag_seconds = 0.0
    fsm = driver.fsm
    if fsm is not None and lag:
        oldest = [c.in_flight[0] for c in fsm.consumers.values() if c.in_flight]
        if fsm.pending:
            oldest.append(fsm.pending[0])
        if oldest:
            event = min(oldest, key=lambda item: item[0])[2]
            lag_seconds = max(0.0, time.time() - event.created_at.timestamp())
    checkpoint_time = driver.checkpoint_time
    groups = driver.options.partition_groups
    owner = driver.owner
    return attrs.evolve(
        stats,
        stream_uuid=driver.stream_uuid,
        name=driver.name,
        groups=groups,
        group=_group_number(driver.name) if groups is not None else None,
        balance_member=owner.locks.member if owner.config.balance_subscriptions else None,
        role=_ROLES.get(stats.state, stats.state),
        lag=lag,
        lag_seconds=lag_seconds,
        checkpoint_age=(
            time.monotonic() - checkpoint_time
            if checkpoint_time is not None and fsm is not None
            else None
        ),
        delivered=driver.delivered,
        # every event delivered again (after a lost lock or session, or a `nack`);
        # ``parked`` comes from the driver's poison-event handling
        redeliveries=driver.redeliveries,
    )


def _group_number(row_name: str) -> int | None:
    parsed = split_group_name(row_name)
    return None if parsed is None else parsed[1]


def is_current(driver: Driver, consumer: Consumer, batch: EventBatch) -> bool:
    """Whether ``batch``, received from the consumer's channel, is still to be handed
    to it: sent by the running session, since the consumer's last `nack`."""
    fsm = driver.fsm
    return (
        fsm is not None
        and batch.session == driver.session
        and batch.epoch == fsm.epoch(consumer.consumer_id)
    )


def iteration_ended(driver: Driver) -> Exception:
    """What ends a consumer's iteration once its subscription stopped without failing:
    `EventStoreClosedError` when the store closed (as a transient subscription's
    iteration ends), else StopAsyncIteration."""
    return EventStoreClosedError() if driver.owner.closed else StopAsyncIteration()


def _raise_if_stopped(driver: Driver) -> None:
    failure = driver.failure
    if failure is not None:
        raise SubscriptionFailedError(
            f"subscription {driver.name!r} failed: {type(failure).__name__}: {failure}",
            stream_uuid=driver.stream_uuid,
            subscription_name=driver.name,
        ) from failure
    if driver.done.is_set():
        if driver.owner.closed:  # as iteration, and a transient subscription
            raise EventStoreClosedError()
        raise SubscriptionFailedError(
            f"subscription {driver.name!r} has stopped",
            stream_uuid=driver.stream_uuid,
            subscription_name=driver.name,
        )


def _stale_batch(driver: Driver, consumer: Consumer, value: object) -> bool:
    """Whether ``value`` is a batch that an ended session, or the consumer before its
    last nack, delivered: its events come again, and an ack or nack of it (even once
    the subscriber holds the batch that brings them again) counts for nothing."""
    return isinstance(value, EventBatch) and not is_current(driver, consumer, value)


def _ack_number(value: object) -> int:
    if isinstance(value, EventBatch):
        return value.last_event_number
    if isinstance(value, RecordedEvent):
        return value.event_number
    if isinstance(value, bool):
        raise TypeError("ack: expected an event, a batch, a list of events or an event number")
    if isinstance(value, int):
        return value
    if isinstance(value, Sequence) and value:
        events = [e for e in value if isinstance(e, RecordedEvent)]
        if len(events) == len(value):
            return max(e.event_number for e in events)
    raise TypeError("ack: expected an event, a batch, a list of events or an event number")


def _first_event(value: object) -> object:
    """The event a nack of ``value`` gives back (a batch or a list: its first)."""
    if isinstance(value, EventBatch):
        return value.events[0]
    if isinstance(value, Sequence) and value:
        return value[0]
    return value


def _nack_number(value: object) -> int:
    if isinstance(value, EventBatch):
        return value.events[0].event_number
    if isinstance(value, (RecordedEvent, int)) and not isinstance(value, bool):
        return _ack_number(value)
    if isinstance(value, Sequence) and value and isinstance(value[0], RecordedEvent):
        return int(value[0].event_number)
    raise TypeError("nack: expected an event, a batch, a list of events or an event number")


class Subscriptions:
    """The store's subscriptions: drivers by (stream, name), run in the store's nursery."""

    def __init__(
        self,
        config: EventStoreConfig,
        db: Database,
        notifier: Notifier,
        locks: LockKeeper,
        lock_key1: int,
        nursery: trio.Nursery,
    ) -> None:
        self.config = config
        self.db = db
        self.notifier = notifier
        self.locks = locks
        self.lock_key1 = lock_key1
        self.nursery = nursery
        self._drivers: dict[tuple[str, str], Driver] = {}
        #: the same by stream: an append concerns the drivers of its stream and of $all
        #: only (with thousands of subscriptions, looking at each costs milliseconds)
        self._by_stream: dict[str, list[Driver]] = {}
        #: the store has closed (its block has exited, or is exiting)
        self.closed = False
        #: sessions being opened at once (see `DriverHost.opening`)
        self.opening = trio.Semaphore(max(2, config.pool_size))
        #: this store's appends in flight: token -> stream
        self._own_appends: dict[int, str] = {}
        self._last_token = 0
        #: the store's counters (the facade bumps the append and read ones)
        self.metrics = StoreMetrics()

    def check_open(self) -> None:
        """Raise `EventStoreClosedError` once the store has closed."""
        if self.closed:
            raise EventStoreClosedError()

    async def close(self) -> None:
        """The store is closing: refuse new work, wake transient subscriptions waiting
        for events (they then raise `EventStoreClosedError`), and persist the
        acknowledgements of every persistent subscription while its lock is held
        (shielded, bounded), for consumers that are still in a subscription's block
        (tasks outside the store's block): their iteration then raises
        `EventStoreClosedError`, and leaving their block raises `CheckpointFailedError`
        if what they acknowledged could not be persisted."""
        self.closed = True
        self.notifier.wake_all()
        due = [driver for driver in self._drivers.values() if driver.unpersisted()]
        if not due:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for driver in due:
                    nursery.start_soon(driver.flush_at_close)

    async def transient(
        self,
        stream_uuid: str,
        selector: Callable[[RecordedEvent], bool] | None,
        mapper: Callable[[RecordedEvent], Any] | None,
    ) -> TransientSubscription:
        return await _transient.subscribe(self, stream_uuid, selector, mapper)

    async def join(
        self,
        stream_uuid: str,
        name: str,
        options: SubscriptionOptions,
        *,
        inbox: Inbox | None = None,
    ) -> tuple[Driver, Consumer]:
        """Join the subscription ``name`` of ``stream_uuid`` in this store as a new
        consumer (starting its driver if none runs); its batches go to ``inbox`` when
        given (partition groups share one)."""
        self.check_open()
        await self.notifier.ensure_listening()
        key = (stream_uuid, name)
        driver = self._drivers.get(key)
        if driver is not None and not driver.consumers and not driver.done.is_set():
            # Its last consumer has left and it is flushing: let it finish first (its
            # last checkpoint, then its lock's release, each bounded).
            bound = CLEANUP_TIMEOUT + 2 * self.config.subscription_lease_timeout + 1.0
            with trio.move_on_after(bound):
                await driver.done.wait()
            driver = self._drivers.get(key)
            if driver is not None and not driver.consumers and not driver.done.is_set():
                raise SubscriptionAlreadyExistsError(
                    f"subscription {shown(name)} on {shown(stream_uuid)} is still closing in "
                    f"this store (its last checkpoint or lock release took over {bound:.0f} s); "
                    "try again",
                    stream_uuid=stream_uuid,
                    subscription_name=name,
                )
        if driver is not None and not driver.done.is_set():
            limit = driver.options.concurrency_limit
            if limit is None or options.concurrency_limit is None:
                raise SubscriptionAlreadyExistsError(
                    stream_uuid=stream_uuid, subscription_name=name
                )
            if len(driver.consumers) >= limit:
                raise TooManySubscribersError(
                    stream_uuid=stream_uuid, subscription_name=name, concurrency_limit=limit
                )
            return driver, driver.add_consumer(options.buffer_size, inbox)
        driver = Driver(self, stream_uuid, name, options)
        self._drivers[key] = driver
        self._by_stream.setdefault(stream_uuid, []).append(driver)
        consumer = driver.add_consumer(options.buffer_size, inbox)
        await self.nursery.start(driver.run)
        return driver, consumer

    async def leave(self, driver: Driver, consumer: Consumer) -> CheckpointFailedError | None:
        """A consumer leaves: persist the acknowledged prefix (shielded, bounded). Returns
        the error when that checkpoint could not be persisted (the caller reports it)."""
        fsm = driver.fsm
        driver.remove_consumer(consumer)
        failure: CheckpointFailedError | None = None
        flushed = False
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
            try:
                await driver.flush()
            except CheckpointFailedError as exc:
                failure = exc
            flushed = True
            if not driver.consumers:
                await driver.done.wait()
        if not flushed and fsm is not None and fsm.last_ack > fsm.last_persisted:
            failure = driver.checkpoint_failed(fsm, f"no answer within {CLEANUP_TIMEOUT:g} s")
        if failure is None and driver.closing_failure is not None:
            failure = driver.closing_failure  # the store closed first: see `close`
        return failure

    def append_started(self, stream_uuid: str) -> int:
        """This store begins an append (pair with `append_finished`)."""
        self._last_token += 1
        self._own_appends[self._last_token] = stream_uuid
        return self._last_token

    def append_finished(self, token: int) -> None:
        """The append ended (committed, refused or cancelled): wake the drivers that
        deferred a read for it (see `Driver._behind`)."""
        stream_uuid = self._own_appends.pop(token)
        for driver in self._concerned(stream_uuid):
            driver.own_append_finished(stream_uuid)

    def _concerned(self, stream_uuid: str) -> list[Driver]:
        """The drivers an append to ``stream_uuid`` concerns: its own, and ``$all``'s."""
        by_stream = self._by_stream
        if not by_stream:  # no subscription in this store: an append's usual case
            return []
        return [*by_stream.get(stream_uuid, ()), *by_stream.get(ALL_STREAMS, ())]

    def newest_own_append(self, stream_uuid: str) -> int | None:
        """The newest of this store's appends in flight that writes to ``stream_uuid``
        (any, for ``$all``)."""
        tokens = [
            token
            for token, stream in self._own_appends.items()
            if stream_uuid in (stream, ALL_STREAMS)
        ]
        return max(tokens) if tokens else None

    def own_appends_done(self, stream_uuid: str, up_to: int) -> bool:
        """Whether this store's appends to ``stream_uuid`` up to ``up_to`` have ended."""
        return not any(
            token <= up_to and stream_uuid in (stream, ALL_STREAMS)
            for token, stream in self._own_appends.items()
        )

    def appended(self, request: _storage.AppendRequest, appended: _storage.Appended) -> None:
        """This store just committed an append: hand its events straight to drivers
        that have read everything before them, sparing them a read (others read from
        the database when notified, as usual)."""
        for driver in self._concerned(request.stream_uuid):
            driver.hand_over(request, appended)

    def active(self) -> list[Driver]:
        return list(self._drivers.values())

    def parked_changed(self, stream_uuid: str, name: str) -> None:
        """Parked events of this subscription were replayed or discarded here: tell its
        driver, if it runs in this store (other nodes hear of it by notification)."""
        driver = self._drivers.get((stream_uuid, name))
        if driver is not None:
            driver.parked_changed()

    def discard(self, driver: Driver) -> None:
        """The driver has stopped: forget it (unless a newer one has taken its place)."""
        key = (driver.stream_uuid, driver.name)
        if self._drivers.get(key) is driver:
            del self._drivers[key]
        same = self._by_stream.get(driver.stream_uuid, [])
        if driver in same:
            same.remove(driver)
            if not same:
                del self._by_stream[driver.stream_uuid]
