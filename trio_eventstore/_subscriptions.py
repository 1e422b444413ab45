"""Subscriptions: transient ones (no task: the iterator reads) and persistent ones (one
driver task per (stream, name), owned by the store, carrying out `SubscriptionFSM`'s
decisions).

A persistent subscription's driver: create (or find) the subscription row, take the
Elixir advisory lock on the store's lock connection, then run a *session*: read, deliver,
take acks, persist checkpoints. The session ends at once when the lease is lost; the
driver then waits for the lock again as a standby (the lock keeper tries all of a store's
standbys in one query every ``subscription_standby_interval``). After a database error it
retries with back-off up to ``subscription_retry_interval``, or at once when the lock
connection reconnects. Consumers are the callers' own tasks, iterating `Subscription`
batches.
"""

from __future__ import annotations

import logging
import math
import operator
import random
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import attrs
import trio

from . import _storage
from ._config import EventStoreConfig
from ._errors import (
    CheckpointFailedError,
    EventStoreClosedError,
    EventStoreError,
    InvalidStartFromError,
    PoolOverloadedError,
    StorageUnavailableError,
    SubscriptionAlreadyExistsError,
    SubscriptionFailedError,
    TooManySubscribersError,
    UnexpectedAckError,
    single_errors,
)
from ._fsm import SubscriptionFSM
from ._locks import Lease, LockKeeper, lock_key2
from ._notifications import Notifier
from ._pg import CLEANUP_TIMEOUT, Database, Row
from ._types import ALL_STREAMS, MAX_BIGINT, RecordedEvent, StartFrom

__all__ = [
    "EventBatch",
    "Subscription",
    "SubscriptionOptions",
    "SubscriptionStatistics",
    "Subscriptions",
    "TransientSubscription",
]

logger = logging.getLogger("trio_eventstore.subscriptions")


class EventBatch(list[Any]):
    """A batch delivered to a consumer: the events (or the mapper's values), with the
    recorded events in ``events`` and ``last_event_number`` (so ``ack(batch)`` works
    whatever the mapper returns)."""

    __slots__ = ("events", "last_event_number", "session")

    def __init__(self, values: Iterable[Any], events: list[RecordedEvent], session: int) -> None:
        super().__init__(values)
        self.events = events
        self.last_event_number = events[-1].event_number
        self.session = session


_event_number: Callable[[RecordedEvent], int] = operator.attrgetter("event_number")

#: ``max_buffer_bytes`` by default: 64 MiB of event data read ahead per subscription.
DEFAULT_MAX_BUFFER_BYTES = 64 * 2**20


@attrs.frozen(kw_only=True)
class SubscriptionOptions:
    """Options of a persistent subscription (validated before any I/O)."""

    start_from: StartFrom | int = StartFrom.ORIGIN
    concurrency_limit: int | None = None
    partition_by: Callable[[RecordedEvent], Hashable] | None = None
    buffer_size: int = 1
    max_size: int = 1000
    max_buffer_bytes: int | None = DEFAULT_MAX_BUFFER_BYTES
    checkpoint_threshold: int = 1
    checkpoint_after: float = 0.0
    selector: Callable[[RecordedEvent], bool] | None = None
    mapper: Callable[[RecordedEvent], Any] | None = None

    def __attrs_post_init__(self) -> None:
        start = self.start_from
        # Delivery reads from start_from + 1, which must be a bigint too.
        if not isinstance(start, StartFrom) and (
            isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < MAX_BIGINT
        ):
            raise InvalidStartFromError(
                "start_from: expected ORIGIN, CURRENT or an event number >= 0 and "
                f"< 2**63 - 1, got {start!r}",
                start_from=start,
            )
        for name in ("buffer_size", "max_size", "checkpoint_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
            if not 1 <= value <= MAX_BIGINT:
                raise ValueError(f"{name}: must be >= 1 and < 2**63, got {value}")
        max_bytes = self.max_buffer_bytes
        if max_bytes is not None and (
            isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1
        ):
            raise ValueError(f"max_buffer_bytes: expected None or an int >= 1, got {max_bytes!r}")
        limit = self.concurrency_limit
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ValueError(f"concurrency_limit: expected None or an int >= 1, got {limit!r}")
        if isinstance(self.checkpoint_after, bool) or not isinstance(
            self.checkpoint_after, (int, float)
        ):
            raise TypeError("checkpoint_after: expected a number of seconds")
        if not 0 <= self.checkpoint_after < math.inf:
            raise ValueError("checkpoint_after: must be a finite number of seconds >= 0")
        for name in ("partition_by", "selector", "mapper"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"{name}: expected a callable or None")
        if self.partition_by is not None and self.concurrency_limit is None:
            raise ValueError("partition_by: only with concurrency_limit (competing consumers)")


@attrs.frozen
class SubscriptionStatistics:
    """A snapshot of a persistent subscription (`Subscription.statistics`)."""

    state: str
    subscribers: int
    last_received: int
    last_ack: int
    last_persisted: int
    in_flight: int
    pending: int
    lock_attempts: int
    sessions: int
    #: pages read from the database (events this store appended itself are handed
    #: over without a read)
    reads: int = 0
    #: bytes of event data and metadata held: read and not yet acknowledged, and
    #: fetched ahead (bounded by ``max_buffer_bytes``, plus at most one event)
    buffered_bytes: int = 0
    #: the stream's latest version known to this store (from notifications, polls and
    #: reads): the event number of the newest event for ``$all``
    head: int = 0


@attrs.define(eq=False)
class _ReadAhead:
    """The next page, fetched while the current one is decoded and delivered."""

    after: int
    limit: int
    budget: int | None
    #: the notifier's generation of the stream before the read (`Notifier.settle`)
    generation: int
    rows: list[Row] | None = None
    bytes: int = 0
    done: trio.Event = attrs.Factory(trio.Event)
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)


@attrs.define(eq=False)
class _Consumer:
    consumer_id: int
    buffer_size: int
    send: trio.MemorySendChannel[EventBatch]
    receive: trio.MemoryReceiveChannel[EventBatch]
    #: highest event number delivered in earlier sessions (their acks are stale)
    stale_up_to: int = -1
    delivered_high: int = -1


class _Driver:
    """One persistent subscription of this store: its consumers, its FSM, its task."""

    def __init__(
        self, owner: Subscriptions, stream_uuid: str, name: str, options: SubscriptionOptions
    ) -> None:
        self.owner = owner
        self.stream_uuid = stream_uuid
        self.name = name
        self.options = options
        self.consumers: dict[int, _Consumer] = {}
        self.fsm: SubscriptionFSM[RecordedEvent] | None = None
        self.session = 0
        self.state = "starting"
        self.subscribed = trio.Event()
        self.failure: BaseException | None = None
        self.done = trio.Event()
        self.lock_attempts = 0
        self.reads = 0
        self._wake = trio.Event()
        self._checkpoint_lock = trio.Lock()
        self._last_activity = time.monotonic()
        self._next_consumer = 0
        self._last_persisted = 0
        self._checkpointed = trio.Event()  # replaced after every checkpoint write
        self._stream_id: int | None = None  # known once the stream exists
        self._progress = trio.Event()  # replaced whenever last_ack advances
        self._prefetch: _ReadAhead | None = None
        #: waiting for this store's own appends up to a token, and last_read then
        #: (see `_behind`)
        self._deferred: tuple[int, int] | None = None
        #: while waiting for the lock or to retry: cancelled when the last consumer leaves
        self._waiting: trio.CancelScope | None = None

    # -- consumer side (sync, called from consumers' tasks) ------------------------------

    def wake(self) -> None:
        self._wake.set()

    def add_consumer(self, buffer_size: int) -> _Consumer:
        self._next_consumer += 1
        send, receive = trio.open_memory_channel[EventBatch](math.inf)
        consumer = _Consumer(self._next_consumer, buffer_size, send, receive)
        self.consumers[consumer.consumer_id] = consumer
        self._last_activity = time.monotonic()
        if self.fsm is not None:
            self.fsm.add_consumer(consumer.consumer_id, buffer_size)
            self._deliver()
        self.wake()
        return consumer

    def remove_consumer(self, consumer: _Consumer) -> None:
        self.consumers.pop(consumer.consumer_id, None)
        if self.fsm is not None:
            self.fsm.remove_consumer(consumer.consumer_id)
            self._deliver()
        consumer.send.close()
        if not self.consumers and self._waiting is not None:
            self._waiting.cancel()
        self.wake()

    def ack(self, consumer: _Consumer, event_number: int) -> None:
        fsm = self.fsm
        cid = consumer.consumer_id
        if fsm is not None and fsm.is_in_flight(cid, event_number):
            before = fsm.last_ack
            fsm.ack(cid, event_number)
            self._last_activity = time.monotonic()
            self._deliver()
            self._signal_progress()
            # Wake the task only when it has something to do: read (room came free),
            # persist (the threshold is reached), or arm the checkpoint_after timer
            # (the first acknowledgement since the last checkpoint). Waking it for
            # every ack of a one-event buffer costs more than the ack itself.
            if (
                fsm.wants_read() is not None
                or fsm.checkpoint_wanted()
                or (fsm.checkpoint_after > 0 and before <= fsm.last_persisted < fsm.last_ack)
            ):
                self.wake()
            return
        if event_number <= consumer.stale_up_to or (
            fsm is None and event_number <= consumer.delivered_high
        ):
            return  # delivered by a session that lost its lock: it will come again
        raise UnexpectedAckError(event_number=event_number)

    # -- the task -------------------------------------------------------------------------

    def _signal_progress(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def last_ack(self) -> int:
        return self.fsm.last_ack if self.fsm is not None else self._last_persisted

    def _deliver(self) -> None:
        fsm = self.fsm
        if fsm is None:
            return
        for consumer_id, events in fsm.take_deliveries().items():
            consumer = self.consumers.get(consumer_id)
            if consumer is None:
                continue
            consumer.delivered_high = max(consumer.delivered_high, events[-1].event_number)
            consumer.send.send_nowait(EventBatch(events, events, self.session))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        config = self.owner.config
        failures = 0
        try:
            while self.consumers:
                retry_after, early = 0.0, False
                try:
                    await self._one_session()
                    failures = 0
                    if self.state == "disconnected":
                        # It lost its lease (its lock connection dropped): give the
                        # standbys of other nodes one round first (this node may be the
                        # one with a problem), then stand by too.
                        retry_after = config.subscription_standby_interval
                except PoolOverloadedError as exc:
                    # A local, passing condition (e.g. many subscriptions starting at
                    # once): retry soon, spread out, not after the full interval.
                    logger.debug("subscription %r: %s; retrying soon", self.name, exc)
                    retry_after = min(config.subscription_retry_interval, random.uniform(0.05, 0.5))
                except StorageUnavailableError as exc:
                    failures += 1
                    retry_after = _retry_delay(failures, config.subscription_retry_interval)
                    logger.warning(
                        "subscription %r: %s; retrying within %.1f s", self.name, exc, retry_after
                    )
                    self.state = "disconnected"
                    early = True
                if self.consumers and retry_after > 0:
                    await self._pause(retry_after, until_reconnected=early)
        except Exception as exc:  # a failure of this subscription reaches its consumers
            logger.exception("subscription %r failed", self.name)
            self.failure = exc
            self.state = "failed"
            for consumer in list(self.consumers.values()):
                consumer.send.close()
        finally:
            self.state = "stopped" if self.failure is None else "failed"
            if self.owner._drivers.get((self.stream_uuid, self.name)) is self:
                del self.owner._drivers[(self.stream_uuid, self.name)]
            for consumer in list(self.consumers.values()):
                consumer.send.close()  # the store is closing: iteration ends
            self.done.set()
            self._signal_progress()  # waiters see that it stopped
            self._checkpointed.set()

    async def _wait_wake(self) -> None:
        # Consume the wakeup after waiting: a wake() that came while we were busy is
        # not lost (the loop then re-checks its state and may find nothing to do).
        await self._wake.wait()
        self._wake = trio.Event()

    async def _pause(self, seconds: float, *, until_reconnected: bool) -> None:
        """Wait ``seconds`` before trying again, or until the last consumer leaves;
        ``until_reconnected``: less when the store's lock connection reconnects
        meanwhile (after a database error: the database is back)."""
        reconnected = self.owner.locks.connected
        with trio.move_on_after(seconds), trio.CancelScope() as self._waiting:
            if not self.consumers:
                self._waiting.cancel()
            if reconnected.is_set() or not until_reconnected:
                await trio.sleep_forever()
            else:
                await reconnected.wait()
        self._waiting = None

    async def _wait_for_lock(self, subscription_id: int) -> Lease | None:
        """Wait until this store holds the subscription's lock (None once every consumer
        has left). While another session holds it, this is a standby: the lock keeper
        tries it with the store's other standbys, in one query, every
        ``subscription_standby_interval``."""
        owner = self.owner

        def attempted(granted: bool) -> None:
            self.lock_attempts += 1
            if not granted:
                self.state = "waiting_for_lock"

        lease = None
        with trio.CancelScope() as self._waiting:
            if not self.consumers:
                self._waiting.cancel()
            lease = await owner.locks.acquire(
                owner.lock_key1, lock_key2(subscription_id), on_attempt=attempted
            )
        self._waiting = None
        return lease

    async def _one_session(self) -> None:
        owner = self.owner
        self.state = "subscribing"
        subscription_id, last_seen = await _storage.create_subscription(
            owner.db, self.stream_uuid, self.name, self.options.start_from
        )
        self._last_persisted = last_seen  # what the holder has persisted so far
        lease = await self._wait_for_lock(subscription_id)
        if lease is None:
            return  # every consumer has left
        try:
            # Read the checkpoint again now that the lock is ours: a previous holder may
            # have moved it after we read it (or deleted the row: then lock the new one).
            locked_id, last_seen = await _storage.create_subscription(
                owner.db, self.stream_uuid, self.name, self.options.start_from
            )
            if locked_id != subscription_id:
                return
            with trio.CancelScope() as session_scope, single_errors():
                async with trio.open_nursery() as nursery:

                    async def watch_lease() -> None:
                        await lease.lost.wait()
                        session_scope.cancel()

                    nursery.start_soon(watch_lease)
                    await self._session(last_seen)
                    nursery.cancel_scope.cancel()
        finally:
            lost = lease.lost.is_set()
            self._end_session()
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                if not lost:
                    await self._final_checkpoint()
                await lease.release()
            if lost:
                self.state = "disconnected"

    def _end_session(self) -> None:
        fsm = self.fsm
        self.fsm = None
        if self.subscribed.is_set():
            # Replace it only once it has fired: callers of wait_subscribed() still
            # wait on the current one, whatever happened before a session began.
            self.subscribed = trio.Event()
        for consumer in self.consumers.values():
            consumer.stale_up_to = max(consumer.stale_up_to, consumer.delivered_high)
        if fsm is not None:
            self._last_persisted = fsm.last_persisted

    async def _session(self, last_seen: int) -> None:
        owner, options = self.owner, self.options
        self.session += 1
        fsm: SubscriptionFSM[RecordedEvent] = SubscriptionFSM(
            last_seen=last_seen,
            number_of=_event_number,
            max_size=options.max_size,
            max_bytes=options.max_buffer_bytes,
            checkpoint_threshold=options.checkpoint_threshold,
            checkpoint_after=options.checkpoint_after,
            partition_by=options.partition_by,
            selector=options.selector,
        )
        self._last_persisted = last_seen
        for consumer in self.consumers.values():
            fsm.add_consumer(consumer.consumer_id, consumer.buffer_size)
        self.fsm = fsm
        self._deferred = None
        self.state = "catching_up"
        self.subscribed.set()
        self._signal_progress()  # waiters see the stored checkpoint (it may be enough)
        owner.notifier.add_listener(self.stream_uuid, self.wake)
        try:
            with single_errors():
                async with trio.open_nursery() as nursery:  # for reads ahead
                    await self._session_loop(fsm, nursery)
                    nursery.cancel_scope.cancel()
        finally:
            self._prefetch = None
            owner.notifier.remove_listener(self.stream_uuid, self.wake)

    async def _session_loop(
        self, fsm: SubscriptionFSM[RecordedEvent], nursery: trio.Nursery
    ) -> None:
        owner = self.owner
        hibernate_after = owner.config.subscription_hibernate_after
        while self.consumers:
            after = fsm.wants_read()
            if after is not None:
                events, sizes, at_head = await self._read(
                    after, fsm.read_limit(), fsm.read_budget(), nursery
                )
                fsm.on_events(events, at_head=at_head, sizes=sizes)
                if events:
                    self._last_activity = time.monotonic()
                    self._signal_progress()  # filtered events count as acknowledged
                self._deliver()
                self.state = "subscribed" if fsm.at_head else "catching_up"
                await self._checkpoint_if_due()
                continue
            await self._checkpoint_if_due()
            deadline = fsm.next_checkpoint_deadline()
            idle_until = self._last_activity + hibernate_after if hibernate_after > 0 else math.inf
            # FSM times are time.monotonic(); Trio's clock has another origin.
            wait = min(deadline or math.inf, idle_until) - time.monotonic()
            with trio.move_on_after(max(0.0, wait)):
                await self._wait_for_work(fsm)
            # Acks need not wake this task (see `ack`): idle since the latest activity.
            idle_until = self._last_activity + hibernate_after if hibernate_after > 0 else math.inf
            if time.monotonic() >= idle_until and fsm.hibernate():
                self._drop_prefetch()
                self.state = "hibernating"
                self._last_activity = math.inf  # until something happens
            elif self.state == "hibernating" and self._last_activity != math.inf:
                self.state = "subscribed"  # woken by an ack, a consumer or new events

    async def _read(
        self, after: int, limit: int, budget: int | None, nursery: trio.Nursery
    ) -> tuple[list[RecordedEvent], list[int], bool]:
        """Events above ``after`` (at most ``limit``, stopping at the first that reaches
        ``budget`` bytes), their sizes, and whether that reached the head.

        While catching up, the next page is fetched ahead, in the background: the
        database works on it while this page is decoded and delivered (at most half
        of ``max_size`` rows more in memory, and only the bytes this page left of
        ``budget``)."""
        self.reads += 1
        db, config, notifier = self.owner.db, self.owner.config, self.owner.notifier
        stream_id = self._stream_id
        ahead, self._prefetch = self._prefetch, None
        rows: list[Row] | None = None
        generation = notifier.generation(self.stream_uuid)
        if ahead is not None and ahead.after == after:
            await ahead.done.wait()
            if ahead.rows is not None:  # else it failed: read as usual
                rows = ahead.rows
                full = _storage.more_rows(rows, ahead.limit, ahead.budget)
                generation = ahead.generation
                if len(rows) > limit:
                    rows, full = rows[:limit], True
        elif ahead is not None:
            ahead.scope.cancel()  # for a position we no longer read from
        if rows is None:
            if stream_id is None:  # the first read finds the stream's id
                stream_id = await _storage.readable_stream_id(db, self.stream_uuid)
                if stream_id is None:  # no such stream (yet), or deleted: nothing to read
                    notifier.settle(self.stream_uuid, after, generation)
                    return [], [], True
            rows = await _storage.read_rows(db, stream_id, after, limit, budget)
            full = _storage.more_rows(rows, limit, budget)
            if rows:
                self._stream_id = stream_id
        sizes = list(map(_storage.row_bytes, rows))
        left = None if budget is None else budget - sum(sizes)
        if rows and len(rows) >= limit and (left is None or left > 0) and stream_id is not None:
            self._fetch_ahead(nursery, stream_id, _storage.row_event_number(rows[-1]), left)
        if not full:  # at the head: a notification of a version beyond it was stale
            head = _storage.row_event_number(rows[-1]) if rows else after
            notifier.settle(self.stream_uuid, head, generation)
        return _storage.recorded(config, rows), sizes, not full

    def _fetch_ahead(
        self, nursery: trio.Nursery, stream_id: int, after: int, budget: int | None
    ) -> None:
        ahead = _ReadAhead(
            after,
            max(1, (self.options.max_size + 1) // 2),
            budget,
            self.owner.notifier.generation(self.stream_uuid),
        )
        self._prefetch = ahead

        async def fetch() -> None:
            with ahead.scope:
                try:
                    ahead.rows = await _storage.read_rows(
                        self.owner.db, stream_id, ahead.after, ahead.limit, ahead.budget
                    )
                    ahead.bytes = sum(map(_storage.row_bytes, ahead.rows))
                except EventStoreError as exc:
                    logger.debug("subscription %r: read ahead failed: %s", self.name, exc)
                finally:
                    ahead.done.set()

        nursery.start_soon(fetch)

    def _drop_prefetch(self) -> None:
        if self._prefetch is not None:
            self._prefetch.scope.cancel()
            self._prefetch = None

    async def _wait_for_work(self, fsm: SubscriptionFSM[RecordedEvent]) -> None:
        """Until an ack, a consumer change, or a notification / re-sync of the stream
        (the notifier calls `wake`)."""
        if self._behind(fsm):
            return
        await self._wait_wake()
        if self._behind(fsm):
            self._last_activity = time.monotonic()

    def _behind(self, fsm: SubscriptionFSM[RecordedEvent]) -> bool:
        """Whether newer events are known than were read (then the FSM reads again).

        The notification of this store's own append usually arrives before the append
        returns and hands its events over (`Subscriptions.appended`): reading then
        would cost a query per append. So while this store's own appends to the
        stream are in flight, wait for them to finish, and read only if the hand-over
        did not close the gap. Waiting again for newer appends only while hand-overs
        make progress means a gap they cannot close (another node's events) is read
        after one wait."""
        if not fsm.at_head or self.owner.notifier.mark(self.stream_uuid) <= fsm.last_read:
            self._deferred = None
            return False
        own = self.owner
        if self._deferred is not None:
            token, read_before = self._deferred
            if not own.own_appends_done(self.stream_uuid, token):
                return False  # `append_finished` wakes us
            if fsm.last_read == read_before:
                self._deferred = None
                fsm.on_new_events()
                return True
        newest = own.newest_own_append(self.stream_uuid)
        if newest is not None:
            self._deferred = (newest, fsm.last_read)
            return False
        self._deferred = None
        fsm.on_new_events()
        return True

    async def _checkpoint_if_due(self, *, final: bool = False) -> None:
        fsm = self.fsm
        if fsm is None:
            return
        async with self._checkpoint_lock:
            checkpoint = fsm.checkpoint_due(time.monotonic(), final=final)
            if checkpoint is None:
                return
            try:
                await _storage.checkpoint_subscription(
                    self.owner.db, self.stream_uuid, self.name, checkpoint
                )
            except BaseException:
                fsm.on_checkpoint_failed()
                raise
            fsm.on_checkpoint_persisted(checkpoint, time.monotonic())
            self._last_persisted = checkpoint
            self._checkpointed.set()
            self._checkpointed = trio.Event()

    async def _final_checkpoint(self) -> None:
        try:
            await self._checkpoint_if_due(final=True)
        except EventStoreError as exc:
            logger.warning("subscription %r: final checkpoint failed: %s", self.name, exc)

    async def flush(self) -> None:
        """Persist the acknowledged prefix now (a consumer is leaving).

        Raises:
            CheckpointFailedError: it could not be persisted (its cause says why).
        """
        fsm = self.fsm
        try:
            await self._checkpoint_if_due(final=True)
        except EventStoreError as exc:
            raise self._checkpoint_failed(fsm, str(exc)) from exc

    def _checkpoint_failed(
        self, fsm: SubscriptionFSM[RecordedEvent] | None, why: str
    ) -> CheckpointFailedError:
        last_persisted = fsm.last_persisted if fsm is not None else self._last_persisted
        checkpoint = fsm.last_ack if fsm is not None else None
        return CheckpointFailedError(
            f"subscription {self.name!r}: the checkpoint {checkpoint} could not be persisted "
            f"({why}); events after {last_persisted} will be delivered again",
            stream_uuid=self.stream_uuid,
            subscription_name=self.name,
            checkpoint=checkpoint,
            last_persisted=last_persisted,
        )

    def statistics(self) -> SubscriptionStatistics:
        fsm = self.fsm
        ahead = self._prefetch
        last_received = fsm.last_read if fsm else self._last_persisted
        return SubscriptionStatistics(
            state=self.state,
            subscribers=len(self.consumers),
            last_received=last_received,
            last_ack=fsm.last_ack if fsm else self._last_persisted,
            last_persisted=fsm.last_persisted if fsm else self._last_persisted,
            in_flight=sum(len(c.in_flight) for c in fsm.consumers.values()) if fsm else 0,
            pending=len(fsm.pending) if fsm else 0,
            lock_attempts=self.lock_attempts,
            reads=self.reads,
            sessions=self.session,
            buffered_bytes=(fsm.held_bytes if fsm else 0) + (ahead.bytes if ahead else 0),
            head=max(self.owner.notifier.mark(self.stream_uuid), last_received),
        )


def _retry_delay(failures: int, ceiling: float) -> float:
    """The wait after the n-th database error in a row: 0.1 s, doubling, up to
    ``ceiling`` (``subscription_retry_interval``), with jitter."""
    return min(ceiling, 0.1 * 2.0 ** min(failures - 1, 30)) * random.uniform(0.75, 1.0)


class Subscription:
    """One consumer of a persistent subscription: an async iterator of `EventBatch`.

    Ack what you processed with `ack`; the checkpoint advances over the contiguous
    acknowledged prefix. Unacknowledged events are delivered again after a restart or
    takeover (at-least-once).
    """

    def __init__(self, driver: _Driver, consumer: _Consumer) -> None:
        self._driver = driver
        self._consumer = consumer

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> EventBatch:
        while True:
            try:
                batch = await self._consumer.receive.receive()
            except trio.EndOfChannel:
                failure = self._driver.failure
                if failure is not None:
                    raise SubscriptionFailedError(
                        f"subscription {self._driver.name!r} failed: {failure}",
                        stream_uuid=self._driver.stream_uuid,
                        subscription_name=self._driver.name,
                    ) from failure
                raise StopAsyncIteration from None
            if batch.session == self._driver.session and self._driver.fsm is not None:
                mapper = self._driver.options.mapper
                if mapper is None:
                    return batch
                # The mapper runs here, in the consumer's own task.
                return EventBatch([mapper(e) for e in batch.events], batch.events, batch.session)
            # Delivered by a session that has since lost its lock: it comes again.

    async def wait_subscribed(self) -> None:
        """Wait until this store holds the subscription's lock and delivery has begun.

        Raises:
            SubscriptionFailedError: the subscription failed.
        """
        while True:
            if self._driver.subscribed.is_set() and self._driver.failure is None:
                return
            _raise_if_stopped(self._driver)
            async with trio.open_nursery() as nursery:

                async def subscribed() -> None:
                    await self._driver.subscribed.wait()
                    nursery.cancel_scope.cancel()

                async def failed() -> None:
                    await self._driver.done.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(subscribed)
                nursery.start_soon(failed)

    async def wait_acked(self, event_number: int) -> None:
        """Wait until every event up to ``event_number`` has been acknowledged (or
        skipped by the selector).

        Raises:
            SubscriptionFailedError: the subscription failed.
        """
        driver = self._driver
        while driver.last_ack() < event_number:
            _raise_if_stopped(driver)
            await driver._progress.wait()

    async def wait_checkpointed(self, event_number: int) -> None:
        """Wait until the persisted checkpoint has reached ``event_number``.

        Raises:
            SubscriptionFailedError: the subscription failed.
        """
        driver = self._driver
        while driver._last_persisted < event_number:
            _raise_if_stopped(driver)
            await driver._checkpointed.wait()

    def ack(
        self, events_or_event_number: EventBatch | RecordedEvent | Sequence[RecordedEvent] | int
    ) -> None:
        """Acknowledge the given event and every event delivered to this subscriber
        before it (sync, non-blocking).

        Raises:
            UnexpectedAckError: the event is not in flight for this subscriber.
        """
        number = _ack_number(events_or_event_number)
        self._driver.ack(self._consumer, number)

    def statistics(self) -> SubscriptionStatistics:
        return self._driver.statistics()


def _raise_if_stopped(driver: _Driver) -> None:
    failure = driver.failure
    if failure is not None:
        raise SubscriptionFailedError(
            f"subscription {driver.name!r} failed: {type(failure).__name__}: {failure}",
            stream_uuid=driver.stream_uuid,
            subscription_name=driver.name,
        ) from failure
    if driver.done.is_set():
        raise SubscriptionFailedError(
            f"subscription {driver.name!r} has stopped",
            stream_uuid=driver.stream_uuid,
            subscription_name=driver.name,
        )


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


class TransientSubscription:
    """Batches of events appended after subscribing (no checkpoint, no lock)."""

    def __init__(
        self,
        owner: Subscriptions,
        stream_uuid: str,
        position: int,
        selector: Callable[[RecordedEvent], bool] | None,
        mapper: Callable[[RecordedEvent], Any] | None,
    ) -> None:
        self._owner = owner
        self._stream_uuid = stream_uuid
        self.position = position
        self._selector = selector
        self._mapper = mapper
        self._stream_id: int | None = None

    def __aiter__(self) -> TransientSubscription:
        return self

    async def __anext__(self) -> list[Any]:
        owner = self._owner
        while True:
            owner.check_open()
            generation = owner.notifier.generation(self._stream_uuid)
            events, _, self._stream_id = await _storage.read_page(
                owner.db, self._stream_uuid, self.position, 1000, self._stream_id
            )
            if not events:  # a notification of a version beyond this was stale
                owner.notifier.settle(self._stream_uuid, self.position, generation)
            if events:
                self.position = events[-1].event_number
                if self._selector is not None:
                    events = [e for e in events if self._selector(e)]
                if events:
                    return events if self._mapper is None else [self._mapper(e) for e in events]
                continue
            await owner.notifier.wait_beyond(self._stream_uuid, self.position)


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
        self._drivers: dict[tuple[str, str], _Driver] = {}
        #: the store has closed (its block has exited, or is exiting)
        self.closed = False
        #: this store's appends in flight: token -> stream
        self._own_appends: dict[int, str] = {}
        self._last_token = 0

    def check_open(self) -> None:
        """Raise `EventStoreClosedError` once the store has closed."""
        if self.closed:
            raise EventStoreClosedError()

    def close(self) -> None:
        """The store is closing: refuse new work, and wake transient subscriptions
        waiting for events (they then raise `EventStoreClosedError`)."""
        self.closed = True
        self.notifier.wake_all()

    async def transient(
        self,
        stream_uuid: str,
        selector: Callable[[RecordedEvent], bool] | None,
        mapper: Callable[[RecordedEvent], Any] | None,
    ) -> TransientSubscription:
        self.check_open()
        self.notifier.watch(stream_uuid)
        try:
            info = await _storage.stream_info(self.db, stream_uuid)
            position = info.stream_version
        except EventStoreError:
            position = 0
        return TransientSubscription(self, stream_uuid, position, selector, mapper)

    async def join(
        self, stream_uuid: str, name: str, options: SubscriptionOptions
    ) -> tuple[_Driver, _Consumer]:
        self.check_open()
        key = (stream_uuid, name)
        driver = self._drivers.get(key)
        if driver is not None and not driver.consumers and not driver.done.is_set():
            # Its last consumer has left and it is flushing: let it finish first.
            with trio.move_on_after(CLEANUP_TIMEOUT * 2):
                await driver.done.wait()
            driver = self._drivers.get(key)
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
            return driver, driver.add_consumer(options.buffer_size)
        driver = _Driver(self, stream_uuid, name, options)
        self._drivers[key] = driver
        consumer = driver.add_consumer(options.buffer_size)
        await self.nursery.start(driver.run)
        return driver, consumer

    async def leave(self, driver: _Driver, consumer: _Consumer) -> CheckpointFailedError | None:
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
            failure = driver._checkpoint_failed(fsm, f"no answer within {CLEANUP_TIMEOUT:g} s")
        return failure

    def append_started(self, stream_uuid: str) -> int:
        """This store begins an append (pair with `append_finished`)."""
        self._last_token += 1
        self._own_appends[self._last_token] = stream_uuid
        return self._last_token

    def append_finished(self, token: int) -> None:
        """The append ended (committed, refused or cancelled): wake the drivers that
        deferred a read for it (see `_Driver._behind`)."""
        stream_uuid = self._own_appends.pop(token)
        for driver in list(self._drivers.values()):
            if driver._deferred is not None and driver.stream_uuid in (
                stream_uuid,
                ALL_STREAMS,
            ):
                driver.wake()

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
        stream_uuid, events = request.stream_uuid, request.events
        n = len(events)
        for driver in list(self._drivers.values()):
            fsm = driver.fsm
            all_numbers = driver.stream_uuid == ALL_STREAMS
            if fsm is None or not (all_numbers or driver.stream_uuid == stream_uuid):
                continue
            if driver.options.selector is not None or driver.options.partition_by is not None:
                continue  # user code: run it in the driver, never in the appender's task
            first = appended.first_event_number if all_numbers else appended.version - n + 1
            if fsm.last_read != first - 1 or fsm.held + n > fsm.max_size:
                continue
            sizes = [len(e.data) + len(e.metadata) for e in events]
            if fsm.max_bytes is not None and fsm.held_bytes + sum(sizes) > fsm.max_bytes:
                continue  # no room: the driver reads them when there is
            try:
                # Decoded for each driver, as a read would: consumers never share objects.
                recorded = _storage.recorded_from_append(
                    self.config, stream_uuid, appended, events, all_numbers=all_numbers
                )
            except Exception:  # a serializer that cannot decode: the driver reads and says so
                continue
            fsm.on_events(recorded, at_head=fsm.at_head, sizes=sizes)
            driver._deliver()
            driver.wake()

    def active(self) -> list[_Driver]:
        return list(self._drivers.values())
