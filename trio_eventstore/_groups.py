"""Partition groups: one persistent subscription with ``partition_by`` split into a fixed
number of groups (``partition_groups``), so that it can run on several processes.

Each group is a subscription of its own, in the existing ``subscriptions`` table: its row
(named ``<name>#g<group>/<groups>``, `group_name`), its advisory lock and its checkpoint.
A group delivers the events whose partition key hashes to it (`group_of`, the same hash in
every process) and skips the others (they count as acknowledged for its checkpoint). The
groups are held, stood by for and spread over stores like any subscriptions (see
``balance_subscriptions``), so one key's events are delivered by one store at a time, in
order; a group moves only after its holder flushed its checkpoint, and its new holder
delivers again from that checkpoint.

In a store, a consumer joins the driver of every group; the batches of all of them reach
it through one inbox (`GroupedSubscription`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import attrs
import trio

from . import _subscription_rows
from ._balance import group_name, group_of
from ._driver import Driver
from ._errors import CheckpointFailedError, UnexpectedAckError
from ._inbox import Consumer, Inbox
from ._subscription_types import EventBatch, SubscriptionOptions, SubscriptionStatistics
from ._subscriptions import (
    Subscription,
    Subscriptions,
    _raise_if_stopped,
    is_current,
    iteration_ended,
    subscription_statistics,
)
from ._types import RecordedEvent, StartFrom

__all__ = ["GroupedSubscription", "join_groups"]

#: How often `GroupedSubscription.wait_subscribed` looks at its groups' states.
_POLL = 0.02


@attrs.frozen
class _InGroup:
    """The selector of one group: the events whose key hashes to it (and, of those, the
    ones the subscription's own selector takes)."""

    partition_by: Callable[[RecordedEvent], Hashable]
    group: int
    groups: int
    selector: Callable[[RecordedEvent], bool] | None

    def __call__(self, event: RecordedEvent) -> bool:
        if group_of(self.partition_by(event), self.groups) != self.group:
            return False
        return self.selector is None or self.selector(event)


async def join_groups(
    subscriptions: Subscriptions, stream_uuid: str, name: str, options: SubscriptionOptions
) -> GroupedSubscription:
    """Join every partition group of ``name`` in this store, as one consumer.

    The groups' rows that do not exist yet are created first, in one transaction
    (`_subscription_rows.seed_groups`): where the groups of another number of groups
    were (at the lowest of their checkpoints, whose rows go), else at ``start_from``.
    """
    groups, partition_by = options.partition_groups, options.partition_by
    assert groups is not None
    assert partition_by is not None
    lowest = await _subscription_rows.seed_groups(
        subscriptions.db, stream_uuid, name, groups, options.start_from
    )
    # Should a row be deleted meanwhile, its group starts with the others again.
    start_from = lowest if options.start_from is StartFrom.CURRENT else options.start_from
    inbox = Inbox()  # every group's batches, for the one consumer task
    parts: list[tuple[Driver, Consumer]] = []
    try:
        for group in range(groups):
            group_options = attrs.evolve(
                options,
                start_from=start_from,
                selector=_InGroup(partition_by, group, groups, options.selector),
            )
            parts.append(
                await subscriptions.join(
                    stream_uuid,
                    group_name(name, group, groups),
                    group_options,
                    inbox=inbox,
                )
            )
    except BaseException:
        with trio.CancelScope(shield=True):
            await _leave(subscriptions, parts)
        raise
    return GroupedSubscription(parts, inbox, partition_by, groups, name)


async def _leave(
    subscriptions: Subscriptions, parts: Sequence[tuple[Driver, Consumer]]
) -> CheckpointFailedError | None:
    """Leave every group at once (each flushes its checkpoint, shielded and bounded)."""
    failures: list[CheckpointFailedError] = []

    async def leave(driver: Driver, consumer: Consumer) -> None:
        failure = await subscriptions.leave(driver, consumer)
        if failure is not None:
            failures.append(failure)

    async with trio.open_nursery() as nursery:
        for driver, consumer in parts:
            nursery.start_soon(leave, driver, consumer)
    return failures[0] if failures else None


class GroupedSubscription(Subscription):
    """A consumer of a subscription split into partition groups: the batches of every
    group this store holds, each batch from one group (so one key's events come in
    order, in one batch or in later batches)."""

    def __init__(
        self,
        parts: list[tuple[Driver, Consumer]],
        inbox: Inbox,
        partition_by: Callable[[RecordedEvent], Hashable],
        groups: int,
        name: str,
    ) -> None:
        super().__init__(*parts[0])
        self._name = name
        self._parts = parts
        self._inbox = inbox
        self._partition_by = partition_by
        self._groups = groups

    def _part_of_batch(self, batch: EventBatch) -> tuple[Driver, Consumer]:
        """The group that sent ``batch`` (each batch says to which consumer)."""
        for part in self._parts:
            if part[1] is batch.consumer:
                return part
        return self._part_of(batch.events[-1])

    def _in_flight_at(self, number: int) -> tuple[Driver, Consumer] | None:
        """The group that has event ``number`` in flight for its consumer, if any."""
        for driver, consumer in self._parts:
            fsm = driver.fsm
            if fsm is not None and fsm.is_in_flight(consumer.consumer_id, number):
                return driver, consumer
        return None

    def _part_of(self, event: RecordedEvent) -> tuple[Driver, Consumer]:
        """The group that delivered ``event``: the one that has it in flight, or gave it
        back (a replay whose key the key function can no longer compute, or now puts
        elsewhere, is still its group's), else the one its key names."""
        number = event.event_number
        holder = self._in_flight_at(number)
        if holder is not None:
            return holder
        for driver, consumer in self._parts:
            fsm = driver.fsm
            if fsm is not None and fsm.was_given_back(consumer.consumer_id, number):
                return driver, consumer
        try:
            return self._parts[group_of(self._partition_by(event), self._groups)]
        except Exception:  # the key cannot say: an ack of it is found stale there or not
            return self._parts[0]

    async def _next_batch(self) -> EventBatch:
        while True:
            try:
                batch = await self._inbox.receive()
            except trio.EndOfChannel:
                for driver, _ in self._parts:
                    if driver.failure is not None:
                        _raise_if_stopped(driver)
                raise iteration_ended(self._parts[0][0]) from None
            driver, consumer = self._part_of_batch(batch)
            if is_current(driver, consumer, batch):
                consumer.received(batch)
                mapper = driver.options.mapper
                if mapper is None:
                    return batch
                return EventBatch(
                    [mapper(e) for e in batch.events],
                    batch.events,
                    batch.session,
                    batch.epoch,
                    batch.consumer,
                )
            # Delivered by a session that has since ended (lost or handed over), or
            # before a nack of this consumer.

    async def wait_subscribed(self) -> None:
        """Wait until every group is either held by this store (delivering) or stands
        by (another store holds it).

        Raises:
            SubscriptionFailedError: a group failed.
        """
        while True:
            for driver, _ in self._parts:
                _raise_if_stopped(driver)
            if all(
                (d.subscribed.is_set() and d.fsm is not None) or d.state == "waiting_for_lock"
                for d, _ in self._parts
            ):
                return
            await trio.sleep(_POLL)

    async def wait_acked(self, event_number: int) -> None:
        """Wait until every group has acknowledged (or skipped) every event up to
        ``event_number`` (groups held elsewhere count once their holder persisted it).

        Raises:
            SubscriptionFailedError: a group failed.
        """
        for driver, _ in self._parts:
            while driver.last_ack() < event_number:
                _raise_if_stopped(driver)
                with trio.move_on_after(_POLL * 10):
                    await driver.progress.wait()

    async def wait_checkpointed(self, event_number: int) -> None:
        """Wait until every group held here has persisted its checkpoint at or beyond
        ``event_number``.

        Raises:
            SubscriptionFailedError: a group failed.
        """
        for driver, _ in self._parts:
            while driver.fsm is not None and driver.last_persisted < event_number:
                _raise_if_stopped(driver)
                with trio.move_on_after(_POLL * 10):
                    await driver.checkpointed.wait()

    def ack(
        self, events_or_event_number: EventBatch | RecordedEvent | Sequence[RecordedEvent] | int
    ) -> None:
        """Acknowledge the given event and every event its group delivered to this
        consumer before it (sync, non-blocking). A batch comes from one group.

        Raises:
            UnexpectedAckError: the event is not in flight for this consumer.
        """
        super().ack(events_or_event_number)

    def _target(self, value: object, number: int) -> tuple[Driver, Consumer] | None:
        """The group that delivered ``value``: by its partition key, or (an event
        number) the group that has it in flight."""
        if isinstance(value, EventBatch):
            return self._part_of_batch(value)
        if isinstance(value, RecordedEvent):
            return self._part_of(value)
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            return self._part_of(max(value, key=lambda e: e.event_number))
        holder = self._in_flight_at(number)
        if holder is not None:
            return holder
        for driver, consumer in self._parts:
            fsm = driver.fsm
            if number <= consumer.stale_up_to or (
                fsm is not None and fsm.was_given_back(consumer.consumer_id, number)
            ):
                return None  # delivered by a session that has ended, or given back
        raise UnexpectedAckError(event_number=number)

    def statistics(self) -> SubscriptionStatistics:
        """The groups' figures together: counts summed, positions the lowest; the state
        of the most advanced group (``subscribed`` when this store holds any)."""
        each = self.group_statistics()
        held = [s for s in each if s.role in ("holder", "hibernated")]
        first = (held or each)[0]
        total = {
            name: sum(getattr(s, name) for s in each)
            for name in (
                "subscribers",
                "in_flight",
                "pending",
                "lock_attempts",
                "sessions",
                "reads",
                "buffered_bytes",
                "delivered",
                "redeliveries",
                "parked",
            )
        }
        return attrs.evolve(
            first,
            name=self._name,
            group=None,
            last_received=min(s.last_received for s in each),
            last_ack=min(s.last_ack for s in each),
            last_persisted=min(s.last_persisted for s in each),
            head=max(s.head for s in each),
            lag=max(s.lag for s in each),
            lag_seconds=max(s.lag_seconds for s in each),
            **total,
        )

    def group_statistics(self) -> list[SubscriptionStatistics]:
        """Each group's statistics, by group number."""
        return [subscription_statistics(driver) for driver, _ in self._parts]

    async def _leave(self, subscriptions: Subscriptions) -> CheckpointFailedError | None:
        return await _leave(subscriptions, self._parts)
