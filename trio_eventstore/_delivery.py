"""The delivery side of a persistent subscription's driver: `Delivery`, the base of
`Driver` (`_driver`, which adds the task: the lease, sessions, reads, hibernation).

It owns the subscription's consumers and the `SubscriptionFSM` of the session in hand,
and carries out the FSM's decisions that need no read: batches sent to the consumers'
inboxes (`_deliver`), acks and nacks from the consumers' tasks, this store's own appends
handed over without a read (`hand_over`), and checkpoints written when due, or at once
when a consumer leaves (`flush`). All of it is sync, run in the caller's task, except
the checkpoint writes; whatever needs the task next (a read, a checkpoint timer) calls
`wake`.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import trio

from . import _storage
from ._config import EventStoreConfig
from ._errors import CheckpointFailedError, EventStoreError, UnexpectedAckError
from ._fsm import SubscriptionFSM
from ._inbox import Consumer, Inbox, Signal
from ._metrics import StoreMetrics
from ._pg import Database
from ._poison import ParkingLot, error_text
from ._subscription_types import EventBatch, SubscriptionOptions, mark_replay
from ._types import ALL_STREAMS, RecordedEvent

__all__ = ["Delivery", "DeliveryHost"]

logger = logging.getLogger("trio_eventstore.subscriptions")


class DeliveryHost(Protocol):
    """What a subscription's delivery needs from the registry that runs it
    (`Subscriptions`)."""

    config: EventStoreConfig
    db: Database
    #: the store's counters (commit-to-delivery lag)
    metrics: StoreMetrics


class Delivery:
    """One persistent subscription of this store as its consumers and this store's
    appenders see it: its consumers, the FSM of the session in hand, its checkpoints."""

    __slots__ = (
        "_checkpoint_lock",
        "_delivered_high",
        "_last_activity",
        "_next_consumer",
        "checkpoint_time",
        "checkpointed",
        "consumers",
        "delivered",
        "fsm",
        "last_persisted",
        "name",
        "options",
        "owner",
        "poison",
        "progress",
        "redeliveries",
        "session",
        "stream_uuid",
    )

    def __init__(
        self, owner: DeliveryHost, stream_uuid: str, name: str, options: SubscriptionOptions
    ) -> None:
        self.owner = owner
        self.stream_uuid = stream_uuid
        self.name = name
        self.options = options
        self.consumers: dict[int, Consumer] = {}
        #: the FSM of the session in hand (None between sessions), and the session's
        #: number (its batches carry it)
        self.fsm: SubscriptionFSM[RecordedEvent] | None = None
        self.session = 0
        #: the persisted checkpoint, as this store last read or wrote it
        self.last_persisted = 0
        self.checkpointed = Signal()  # pulsed after every checkpoint write
        self.progress = Signal()  # pulsed whenever last_ack advances
        self._checkpoint_lock: trio.Lock | None = None  # while a checkpoint is written
        #: figures for `statistics` (metrics): events delivered, and delivered again
        #: (at or below the highest number this store delivered before; retries after
        #: a `nack` are counted by `poison`)
        self.delivered = 0
        self.redeliveries = 0
        self._delivered_high = -1
        #: time.monotonic() when the checkpoint was last read or persisted by a session
        self.checkpoint_time: float | None = None
        #: time.monotonic() of the latest activity (events, acks, consumers joining):
        #: the session hibernates once idle long enough; inf while it hibernates
        self._last_activity = time.monotonic()
        self._next_consumer = 0
        #: retries of events given back (`nack`), parked events and their replays
        self.poison = ParkingLot(owner.db, stream_uuid, name, options)

    def wake(self) -> None:
        """Something may need the task (a read, a checkpoint, a timer): `Driver.wake`."""
        raise NotImplementedError

    # -- consumer side (sync, called from consumers' tasks) ------------------------------

    def add_consumer(self, buffer_size: int, inbox: Inbox | None = None) -> Consumer:
        """A new consumer; its batches go to ``inbox`` when given (partition groups
        share one), else to an inbox of its own."""
        self._next_consumer += 1
        consumer = Consumer(self._next_consumer, buffer_size, (inbox or Inbox()).attach())
        self.consumers[consumer.consumer_id] = consumer
        self._last_activity = time.monotonic()
        if self.fsm is not None:
            self.fsm.add_consumer(consumer.consumer_id, buffer_size)
            self._deliver()
        self.wake()
        return consumer

    def remove_consumer(self, consumer: Consumer) -> None:
        self.consumers.pop(consumer.consumer_id, None)
        if self.fsm is not None:
            self.fsm.remove_consumer(consumer.consumer_id)
            self._deliver()
        consumer.close()
        self.wake()

    def ack(self, consumer: Consumer, event_number: int) -> None:
        fsm = self.fsm
        cid = consumer.consumer_id
        if fsm is not None and fsm.is_in_flight(cid, event_number):
            if not self._received(fsm, consumer, event_number):
                return  # of a batch an ended session or a nack left behind: it comes again
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
                or fsm.has_replay_acks
                or (fsm.checkpoint_after > 0 and before <= fsm.last_persisted < fsm.last_ack)
            ):
                self.wake()
            return
        if _stale(fsm, consumer, event_number):
            return  # it will come again
        raise UnexpectedAckError(event_number=event_number)

    def nack(
        self,
        consumer: Consumer,
        event_number: int,
        retry: bool,
        error: BaseException | str | None,
        *,
        attempts: int | None = None,
    ) -> None:
        fsm = self.fsm
        cid = consumer.consumer_id
        if fsm is not None and fsm.is_in_flight(cid, event_number):
            if not self._received(fsm, consumer, event_number):
                return  # of a batch an ended session or a nack left behind: it comes again
            self.poison.nack(fsm, cid, event_number, retry, error_text(error), attempts)
            self._last_activity = time.monotonic()
            self._deliver()
            self._signal_progress()  # the events before it count as acknowledged
            self.wake()
            return
        if _stale(fsm, consumer, event_number):
            return  # it will come again
        raise UnexpectedAckError(event_number=event_number)

    def _received(
        self, fsm: SubscriptionFSM[RecordedEvent], consumer: Consumer, event_number: int
    ) -> bool:
        """Whether the consumer's subscriber was handed event ``event_number`` by this
        session since its last nack. An event in flight that it was not handed yet is
        one it was handed before (by a session that ended, or before a nack): that ack
        (or nack) is of the earlier delivery, and must not count for this one, which
        waits in its inbox (acknowledging it would checkpoint past events nobody
        processed)."""
        return (
            consumer.received_in == (self.session, fsm.epoch(consumer.consumer_id))
            and event_number <= consumer.received_high
        )

    def parked_changed(self) -> None:
        """This store replayed or discarded parked events of this subscription."""
        self.poison.on_news()
        self.wake()

    def _on_parked_news(self) -> None:
        self.poison.on_news()
        self.wake()

    # -- this store's own appends (sync, called from appenders' tasks) --------------------

    def hand_over(self, request: _storage.AppendRequest, appended: _storage.Appended) -> None:
        """This store just committed ``request``: take its events without a read if
        everything before them has been read and they fit (else it reads them when
        notified, as usual)."""
        stream_uuid, events = request.stream_uuid, request.events
        n = len(events)
        fsm = self.fsm
        all_numbers = self.stream_uuid == ALL_STREAMS
        if fsm is None or not (all_numbers or self.stream_uuid == stream_uuid):
            return
        if self.options.selector is not None or self.options.partition_by is not None:
            return  # user code: run it in the driver, never in the appender's task
        first = appended.first_event_number if all_numbers else appended.version - n + 1
        if fsm.last_read != first - 1 or fsm.held + n > fsm.max_size:
            return
        sizes = [len(e.data) + len(e.metadata) for e in events]
        if fsm.max_bytes is not None and fsm.held_bytes + sum(sizes) > fsm.max_bytes:
            return  # no room: the driver reads them when there is
        try:
            # Decoded for each driver, as a read would: consumers never share objects.
            recorded = _storage.recorded_from_append(
                self.owner.config, stream_uuid, appended, events, all_numbers=all_numbers
            )
        except Exception:  # a serializer that cannot decode: the driver reads and says so
            return
        fsm.on_events(recorded, at_head=fsm.at_head, sizes=sizes)
        self._last_activity = time.monotonic()
        self._deliver()
        self.wake()

    # -- delivering -----------------------------------------------------------------------

    def _signal_progress(self) -> None:
        self.progress.pulse()

    def last_ack(self) -> int:
        return self.fsm.last_ack if self.fsm is not None else self.last_persisted

    def _deliver(self) -> None:
        fsm = self.fsm
        if fsm is None:
            return
        for consumer_id, events in fsm.take_deliveries().items():
            consumer = self.consumers.get(consumer_id)
            if consumer is None:
                continue
            consumer.delivered_high = max(consumer.delivered_high, events[-1].event_number)
            if fsm.replaying:
                for event in events:
                    if event.event_number in fsm.replaying:
                        mark_replay(event)
            epoch = fsm.epoch(consumer_id)
            consumer.send(EventBatch(events, events, self.session, epoch, consumer))
            self._count_delivery(events, fsm.at_head)

    def _count_delivery(self, events: list[RecordedEvent], at_head: bool) -> None:
        """Metrics: delivered, redelivered, and (at the head) commit-to-delivery lag."""
        self.delivered += len(events)
        high = self._delivered_high
        if events[0].event_number <= high:
            self.redeliveries += sum(1 for e in events if e.event_number <= high)
        self._delivered_high = max(high, events[-1].event_number)
        if at_head:
            lag = time.time() - events[-1].created_at.timestamp()
            self.owner.metrics.delivery_lag.observe(max(0.0, lag))

    # -- checkpoints ----------------------------------------------------------------------

    async def _checkpoint_if_due(
        self, *, final: bool = False, fsm: SubscriptionFSM[RecordedEvent] | None = None
    ) -> None:
        fsm = fsm or self.fsm
        if fsm is None:
            return
        lock = self._checkpoint_lock
        if lock is None:
            if fsm.persisting is None and fsm.last_ack <= fsm.last_persisted:
                # The usual case: nothing to write (`checkpoint_due` would say so),
                # and no write under way; no lock needed (it exists only while used).
                await trio.lowlevel.checkpoint()
                return
            lock = self._checkpoint_lock = trio.Lock()
        try:
            async with lock:
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
                self.checkpoint_time = time.monotonic()
                self.last_persisted = checkpoint
                self.checkpointed.pulse()
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._checkpoint_lock = None

    async def _final_checkpoint(self, fsm: SubscriptionFSM[RecordedEvent] | None) -> None:
        try:
            fsm = fsm or self.fsm
            if fsm is not None:
                try:
                    await self.poison.park_pending(fsm)
                except EventStoreError as exc:  # not parked: delivered again, never lost
                    logger.warning("subscription %r: parking at the end failed: %s", self.name, exc)
                await self.poison.forget_replayed(fsm)
            await self._checkpoint_if_due(final=True, fsm=fsm)
        except EventStoreError as exc:
            logger.warning("subscription %r: final checkpoint failed: %s", self.name, exc)

    async def flush(self) -> None:
        """Persist the acknowledged prefix now (a consumer is leaving).

        Raises:
            CheckpointFailedError: it could not be persisted (its cause says why).
        """
        fsm = self.fsm
        try:
            if fsm is not None:
                await self.poison.forget_replayed(fsm)
            await self._checkpoint_if_due(final=True)
        except EventStoreError as exc:
            raise self.checkpoint_failed(fsm, str(exc)) from exc

    def checkpoint_failed(
        self, fsm: SubscriptionFSM[RecordedEvent] | None, why: str
    ) -> CheckpointFailedError:
        last_persisted = fsm.last_persisted if fsm is not None else self.last_persisted
        checkpoint = fsm.last_ack if fsm is not None else None
        return CheckpointFailedError(
            f"subscription {self.name!r}: the checkpoint {checkpoint} could not be persisted "
            f"({why}); events after {last_persisted} will be delivered again",
            stream_uuid=self.stream_uuid,
            subscription_name=self.name,
            checkpoint=checkpoint,
            last_persisted=last_persisted,
        )


def _stale(fsm: SubscriptionFSM[RecordedEvent] | None, consumer: Consumer, number: int) -> bool:
    """Whether an ack (or nack) of ``number``, not in flight for ``consumer``, is of an
    event that comes again: delivered by a session that lost its lock, or given back
    with an event the consumer nacked."""
    if fsm is None:
        return number <= max(consumer.stale_up_to, consumer.delivered_high)
    return number <= consumer.stale_up_to or fsm.was_given_back(consumer.consumer_id, number)
