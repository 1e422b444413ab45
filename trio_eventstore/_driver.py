"""The driver of one persistent subscription of this store, per (stream, name): one task,
owned by the store's nursery, carrying out `SubscriptionFSM`'s decisions.

This module owns the task: sessions, the lease, reads, retries and hibernation. What
needs no task (delivering to consumers, their acks and nacks, this store's appends handed
over, checkpoints) is the driver's base, `Delivery` (`_delivery`).

The driver creates (or finds) the subscription row, takes the Elixir advisory lock on the
store's lock connection, then runs a *session*: read (`PageReader`), deliver, take acks,
persist checkpoints, and take this store's own appends handed over without a read. The
session ends at once when the lease is lost; the driver then waits for the lock again as
a standby (the lock keeper tries all of a store's standbys in one query every
``subscription_standby_interval``). After a database error it retries with back-off up
to ``subscription_retry_interval``, or at once when the lock connection reconnects.
Consumers are the callers' own tasks (`Subscription`), reading batches from their
`Consumer` inbox.

A session idle for ``subscription_hibernate_after`` hibernates: the FSM drops what it
read ahead, and once nothing is due (no checkpoint timer, no retry) the task *ends*,
keeping the session (lease, FSM, notifier listener) in the driver. Whatever needs it
again starts the task again in the store's nursery: a notification of a version beyond
what it read (the listener checks that without a task), this store's own append handed
over, a consumer joining or leaving, the lease lost or asked for (`Lease.on_stop`), the parked
stream notified, or the store closing. So thousands of hibernated subscriptions cost no
task, no cancel scope and no timer each: only this object and a few small ones.
"""

from __future__ import annotations

import logging
import math
import operator
import random
import time
from collections.abc import Callable
from typing import Protocol

import trio

from . import _storage
from ._delivery import Delivery, DeliveryHost
from ._errors import (
    CheckpointFailedError,
    PoolOverloadedError,
    StorageUnavailableError,
    single_errors,
)
from ._fsm import SubscriptionFSM
from ._inbox import Consumer, Signal
from ._locks import Lease, LockKeeper, lock_key2
from ._notifications import Notifier
from ._pg import CLEANUP_TIMEOUT
from ._readahead import PageReader
from ._subscription_types import SubscriptionOptions, SubscriptionStatistics
from ._types import ALL_STREAMS, RecordedEvent

__all__ = ["Driver", "DriverHost"]

logger = logging.getLogger("trio_eventstore.subscriptions")


class DriverHost(DeliveryHost, Protocol):
    """What a driver needs from the registry that runs it (`Subscriptions`)."""

    notifier: Notifier
    #: the store's nursery: a hibernated driver's task is started again in it
    nursery: trio.Nursery
    #: the store is closing (hibernated drivers then start their task, to end it)
    closed: bool
    #: sessions being opened at once (their first queries): thousands of subscriptions
    #: starting together take turns instead of overloading the pool and the event loop
    opening: trio.Semaphore
    locks: LockKeeper
    lock_key1: int

    def discard(self, driver: Driver) -> None:
        """The driver has stopped: forget it (a later join starts a new one)."""

    def newest_own_append(self, stream_uuid: str) -> int | None:
        """The newest of this store's appends in flight that writes to ``stream_uuid``."""

    def own_appends_done(self, stream_uuid: str, up_to: int) -> bool:
        """Whether this store's appends to ``stream_uuid`` up to ``up_to`` have ended."""


_event_number: Callable[[RecordedEvent], int] = operator.attrgetter("event_number")


class Driver(Delivery):
    """One persistent subscription of this store: its `Delivery`, and its task (none
    while it hibernates), which takes the lock, reads and runs sessions."""

    __slots__ = (
        "_deferred",
        "_lease",
        "_opening",
        "_reader",
        "_running",
        "_session_scope",
        "_waiting",
        "_wake_event",
        "_woken",
        "closing_failure",
        "done",
        "failure",
        "lock_attempts",
        "state",
        "subscribed",
    )

    owner: DriverHost  # more than `Delivery` needs

    def __init__(
        self, owner: DriverHost, stream_uuid: str, name: str, options: SubscriptionOptions
    ) -> None:
        super().__init__(owner, stream_uuid, name, options)
        self.state = "starting"
        self.subscribed = Signal()
        self.failure: BaseException | None = None
        self.done = Signal()
        self.lock_attempts = 0
        #: a wake-up came (consumed by `_wait_wake`); the Event the task waits on, if it does
        self._woken = False
        self._wake_event: trio.Event | None = None
        #: the task runs, or is about to (`Subscriptions.join` starts it); False while
        #: it hibernates (`wake` starts it again)
        self._running = True
        #: the lease of the session in hand (kept while hibernating), and its cancel scope
        self._lease: Lease | None = None
        self._session_scope: trio.CancelScope | None = None
        #: it holds one of the store's `DriverHost.opening` slots
        self._opening = False
        self._reader = PageReader(
            owner.db, owner.config, owner.notifier, stream_uuid, name, options.max_size
        )
        #: waiting for this store's own appends up to a token, and last_read then
        #: (see `_behind`)
        self._deferred: tuple[int, int] | None = None
        #: while waiting for the lock or to retry: cancelled when the last consumer leaves
        self._waiting: trio.CancelScope | None = None
        #: the store closed with acknowledgements it could not persist: the blocks of
        #: the consumers still in it raise this when they exit
        self.closing_failure: CheckpointFailedError | None = None

    # -- waking (sync, called from consumers', appenders' and the notifier's tasks) ------

    def wake(self) -> None:
        """Something may need the task: wake it, or start it again if it hibernates."""
        self._woken = True
        event = self._wake_event
        if event is not None:
            event.set()
        elif not self._running and not self.done.is_set():
            self._running = True
            try:
                self.owner.nursery.start_soon(self.run)
            except RuntimeError:  # the store's nursery has closed: nothing runs any more
                self._running = False
                self._stopped()

    def _notified(self) -> None:
        """The notifier's listener: the stream's mark may have moved (or the marks were
        re-synced, or the store closes). A hibernated driver starts its task only when
        that gives it something to do."""
        fsm = self.fsm
        if (
            self._running
            or fsm is None
            or not fsm.at_head
            or self.owner.closed
            or self.owner.notifier.mark(self.stream_uuid) > fsm.last_read
        ):
            self.wake()

    def _lease_stopped(self) -> None:
        """The lease is lost, or asked for (balancing): end the session (a hibernated
        one too)."""
        scope = self._session_scope
        if scope is not None:
            scope.cancel()
        self.wake()

    def remove_consumer(self, consumer: Consumer) -> None:
        super().remove_consumer(consumer)
        if not self.consumers and self._waiting is not None:
            self._waiting.cancel()  # waiting for the lock or to retry: nobody needs it

    def own_append_finished(self, stream_uuid: str) -> None:
        """One of this store's appends to ``stream_uuid`` ended (committed, refused or
        cancelled): wake the task if it deferred a read for it (see `_behind`)."""
        if self._deferred is not None and self.stream_uuid in (stream_uuid, ALL_STREAMS):
            self.wake()

    # -- the task -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The driver's task: sessions, and waits between them. It ends when the last
        consumer has left, or keeps the session and ends when it hibernates (`wake`
        starts it again)."""
        self._running = True
        task_status.started()
        config = self.owner.config
        failures = 0
        keep_session = False
        try:
            while self.consumers:
                retry_after, early = 0.0, False
                try:
                    if await self._one_session():
                        if self._woken or self._lease is None or self._lease.stop.is_set():
                            continue  # woken meanwhile: go on with the session
                        keep_session = True
                        self._running = False
                        return
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
                consumer.close(failed=True)
        finally:
            if not keep_session:
                try:
                    if self._lease is not None:  # started again with no consumer left
                        await self._close_session()
                finally:
                    self._running = False
                    self._stopped()

    def _stopped(self) -> None:
        self.state = "stopped" if self.failure is None else "failed"
        self.owner.discard(self)
        for consumer in list(self.consumers.values()):
            consumer.close()  # the store is closing: iteration ends
        self.done.set()
        self._signal_progress()  # waiters see that it stopped
        self.checkpointed.set()

    async def _wait_wake(self) -> None:
        # Consume the wakeup after waiting: a wake() that came while we were busy is
        # not lost (the loop then re-checks its state and may find nothing to do).
        if not self._woken:
            self._wake_event = event = trio.Event()
            try:
                await event.wait()
            finally:
                self._wake_event = None
        self._woken = False

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

    # -- sessions -------------------------------------------------------------------------

    async def _one_session(self) -> bool:
        """Run a session: take the lock first, unless a hibernated one is resumed.
        Returns True when it hibernates (the session is kept; the task may end)."""
        if self._lease is None and not await self._open_session():
            return False
        lease, fsm = self._lease, self.fsm
        assert lease is not None
        assert fsm is not None
        hibernating = False
        scope = trio.CancelScope()
        try:
            with scope, single_errors():
                self._session_scope = scope
                if lease.stop.is_set():  # lost, or asked for (balancing)
                    scope.cancel()
                async with trio.open_nursery() as nursery:  # for reads ahead
                    hibernating = await self._session_loop(fsm, nursery)
                    nursery.cancel_scope.cancel()
        finally:
            if self._session_scope is scope:
                self._session_scope = None
            if not hibernating:
                await self._close_session()
        return hibernating

    async def _open_session(self) -> bool:
        """Take the lock and begin a session (False: every consumer has left, or the
        row was deleted and created again meanwhile)."""
        owner = self.owner
        self.state = "subscribing"
        async with owner.opening:
            subscription_id, last_seen = await _storage.create_subscription(
                owner.db, self.stream_uuid, self.name, self.options.start_from
            )
        self.last_persisted = last_seen  # what the holder has persisted so far
        lease = await self._wait_for_lock(subscription_id)
        if lease is None:
            return False  # every consumer has left
        self._lease = lease
        try:
            # Until its first read (or wait): see `DriverHost.opening`.
            await owner.opening.acquire()
            self._opening = True
            # Read the checkpoint again now that the lock is ours: a previous holder may
            # have moved it after we read it (or deleted the row: then lock the new one).
            locked_id, last_seen = await _storage.create_subscription(
                owner.db, self.stream_uuid, self.name, self.options.start_from
            )
        except BaseException:
            await self._close_session()
            raise
        if locked_id != subscription_id:
            await self._close_session()
            return False
        self._begin_session(lease, last_seen)
        return True

    async def _close_session(self) -> None:
        """End the session in hand: stop delivering, persist what is acknowledged
        (unless the lease is lost: another holder may have moved on; when it is handed
        over, balancing, it is persisted first) and release the lock (shielded,
        bounded)."""
        self._opened()
        lease, self._lease = self._lease, None
        if lease is None:
            return
        lease.on_stop = None
        fsm = self.fsm
        if fsm is not None:
            self._reader.forget_read_ahead()
            self.owner.notifier.remove_listener(self.stream_uuid, self._notified)
        lost = lease.lost.is_set()
        self._end_session()
        try:
            with trio.CancelScope(shield=True):
                try:
                    if not lost:
                        with trio.move_on_after(CLEANUP_TIMEOUT):
                            await self._final_checkpoint(fsm)  # parks what is due first
                finally:
                    # Always, however the checkpoint went: a lock left held would keep
                    # every store from the subscription. Bounded by the lock keeper (its
                    # queries by ``subscription_lease_timeout``; one cut short drops the
                    # lock connection, which releases the lock).
                    await lease.release()
        finally:
            if fsm is not None:
                self.poison.end_session(self.owner.notifier)
        if lost:
            self.state = "disconnected"
        if self.owner.closed and fsm is not None:
            if fsm.last_ack <= fsm.last_persisted:
                self.closing_failure = None  # the final checkpoint got it after all
            elif self.closing_failure is None:
                self.closing_failure = self.checkpoint_failed(
                    fsm, "the store closed before it was persisted"
                )

    async def flush_at_close(self) -> None:
        """The store is closing: persist the acknowledged prefix while this store still
        holds the lock (its lock connection closes with it). A failure is kept for the
        consumers still in the subscription's block (`closing_failure`)."""
        lease, fsm = self._lease, self.fsm
        if lease is None or fsm is None or lease.lost.is_set():
            return
        try:
            await self.flush()
        except CheckpointFailedError as exc:
            self.closing_failure = exc
        except Exception as exc:  # never in place of what is leaving the store's block
            logger.exception("subscription %r: persisting acks at close failed", self.name)
            self.closing_failure = self.checkpoint_failed(fsm, f"{type(exc).__name__}: {exc}")

    def unpersisted(self) -> bool:
        """Whether acknowledgements of the session in hand wait to be persisted."""
        fsm = self.fsm
        return fsm is not None and fsm.last_ack > fsm.last_persisted

    def _end_session(self) -> None:
        fsm = self.fsm
        self.fsm = None
        if self.subscribed.is_set():
            # Clear it only once it has fired: callers of wait_subscribed() still
            # wait for it, whatever happened before a session began.
            self.subscribed.clear()
        for consumer in self.consumers.values():
            consumer.stale_up_to = max(consumer.stale_up_to, consumer.delivered_high)
        if fsm is not None:
            self.last_persisted = fsm.last_persisted

    def _opened(self) -> None:
        """The session has begun its work (or ended): give back its opening slot."""
        if self._opening:
            self._opening = False
            self.owner.opening.release()

    def _begin_session(self, lease: Lease, last_seen: int) -> None:
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
            park_if=self.poison.park_if,
        )
        self.last_persisted = last_seen
        for consumer in self.consumers.values():
            fsm.add_consumer(consumer.consumer_id, consumer.buffer_size)
        self.fsm = fsm
        self._deferred = None
        self.checkpoint_time = time.monotonic()
        self.state = "catching_up"
        self.subscribed.set()
        self._signal_progress()  # waiters see the stored checkpoint (it may be enough)
        owner.notifier.add_listener(self.stream_uuid, self._notified)
        lease.on_stop = self._lease_stopped

    async def _session_loop(
        self, fsm: SubscriptionFSM[RecordedEvent], nursery: trio.Nursery
    ) -> bool:
        """Until every consumer has left (False), or it hibernates with nothing due
        (True: the task may end, keeping the session)."""
        owner = self.owner
        hibernate_after = owner.config.subscription_hibernate_after
        while self.consumers:
            if self.poison.has_work(fsm):
                await self.poison.work(fsm, owner.notifier, self._on_parked_news)
                self._signal_progress()  # an event parked counts as acknowledged
                self._deliver()
                await self._checkpoint_if_due()
                continue
            after = fsm.wants_read()
            if after is not None:
                events, sizes, at_head = await self._reader.read(
                    after, fsm.read_limit(), fsm.read_budget(), nursery
                )
                self._opened()
                fsm.on_events(events, at_head=at_head, sizes=sizes)
                if events:
                    self._last_activity = time.monotonic()
                    self._signal_progress()  # filtered events count as acknowledged
                self._deliver()
                self.state = "subscribed" if fsm.at_head else "catching_up"
                await self._checkpoint_if_due()
                continue
            await self._checkpoint_if_due()
            deadline = min(
                fsm.next_checkpoint_deadline() or math.inf, self.poison.next_due() or math.inf
            )
            idle_until = self._last_activity + hibernate_after if hibernate_after > 0 else math.inf
            # FSM times are time.monotonic(); Trio's clock has another origin.
            wait = min(deadline, idle_until) - time.monotonic()
            # Hibernating with no timer due: end the task rather than wait (see `wake`).
            may_end = (
                self.state == "hibernating"
                and self._last_activity == math.inf
                and deadline == math.inf
                and not fsm.held
            )
            self._opened()
            with trio.move_on_after(max(0.0, wait)):
                if await self._wait_for_work(fsm, may_end=may_end):
                    return True
            # Acks need not wake this task (see `ack`): idle since the latest activity.
            idle_until = self._last_activity + hibernate_after if hibernate_after > 0 else math.inf
            if time.monotonic() >= idle_until and fsm.hibernate():
                self._reader.cancel_read_ahead()
                self.state = "hibernating"
                self._last_activity = math.inf  # until something happens
            elif self.state == "hibernating" and self._last_activity != math.inf:
                self.state = "subscribed"  # woken by an ack, a consumer or new events
        return False

    async def _wait_for_work(self, fsm: SubscriptionFSM[RecordedEvent], *, may_end: bool) -> bool:
        """Until an ack, a consumer change, or a notification / re-sync of the stream
        (the notifier calls `wake`). ``may_end``: return True at once instead of
        waiting when nothing is to be done (the task ends; `wake` starts it again)."""
        if self._behind(fsm):
            return False
        if may_end and not self._woken and self._deferred is None:
            return True
        await self._wait_wake()
        if self._behind(fsm):
            self._last_activity = time.monotonic()
        return False

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

    def statistics(self) -> SubscriptionStatistics:
        fsm = self.fsm
        last_received = fsm.last_read if fsm else self.last_persisted
        return SubscriptionStatistics(
            state=self.state,
            subscribers=len(self.consumers),
            last_received=last_received,
            last_ack=fsm.last_ack if fsm else self.last_persisted,
            last_persisted=fsm.last_persisted if fsm else self.last_persisted,
            in_flight=sum(len(c.in_flight) for c in fsm.consumers.values()) if fsm else 0,
            pending=len(fsm.pending) if fsm else 0,
            lock_attempts=self.lock_attempts,
            reads=self._reader.reads,
            sessions=self.session,
            buffered_bytes=(fsm.held_bytes if fsm else 0) + self._reader.read_ahead_bytes,
            head=max(self.owner.notifier.mark(self.stream_uuid), last_received),
            parked=len(self.poison.records) if fsm else 0,
            redeliveries=self.poison.redeliveries,
        )


def _retry_delay(failures: int, ceiling: float) -> float:
    """The wait after the n-th database error in a row: 0.1 s, doubling, up to
    ``ceiling`` (``subscription_retry_interval``), with jitter."""
    return min(ceiling, 0.1 * 2.0 ** min(failures - 1, 30)) * random.uniform(0.75, 1.0)
