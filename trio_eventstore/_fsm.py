"""The persistent-subscription state machine, sans I/O.

It decides what to read, which consumer gets which event (its base: `_fsm_dispatch`),
what is acknowledged and what checkpoint to persist; the driver (`_driver`: its task
reads; `_delivery`: it delivers and writes checkpoints) only carries out its decisions
and feeds results back. A Hypothesis stateful test drives it without a database.

Ports ``EventStore.Subscriptions.SubscriptionFsm`` with these differences:

* a checkpoint is only ever the end of the contiguous acknowledged prefix of the
  events read (in ``$all`` event numbers may have gaps after hard deletes);
* ``checkpoint_after`` only schedules checkpoint writes, it never ends a catch-up
  (Elixir #325);
* events a consumer had in flight when it left or crashed go back to the front of
  their partition, so the next consumer of that partition gets them first, in order
  (Elixir #321);
* poison events: a consumer may give an event back (`nack`): events delivered to it
  before that one count as acknowledged, those after it go back to be delivered again,
  and the consumer gets nothing more until the driver redelivers the event (after a
  back-off) or parks it. Events to park (undecodable ones, or with a held partition
  the later events of a parked event's partition) stay unacknowledged until the driver
  has stored their park record; replayed events are delivered first, outside the
  checkpoint's order.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from itertools import repeat
from operator import itemgetter
from typing import TypeVar

from ._errors import UnexpectedAckError
from ._fsm_dispatch import UNPARTITIONED, Consumer, Dispatcher

__all__ = ["SubscriptionFSM"]

E = TypeVar("E")

_first = itemgetter(0)


class SubscriptionFSM(Dispatcher[E]):
    """Decides delivery and checkpoints for one persistent subscription.

    Args:
        last_seen: the persisted checkpoint (deliver events numbered above it).
        max_size: events held (pending + in flight) at most before reading pauses.
        max_bytes: bytes of events held (as ``on_events`` sizes them) at most before
            reading pauses (None: no bound). A read never waits for room for one event:
            the FSM may hold this plus one event.
        checkpoint_threshold: persist once this many events are acknowledged.
        checkpoint_after: also persist acknowledged events at least this often (seconds;
            0: only by threshold and on exit).
        number_of: the event number of an event.
        partition_by: key of an event; events of one key go to one consumer at a time,
            in order. None: any consumer.
        selector: events it rejects are not delivered and count as acknowledged.
        park_if: events it accepts are not delivered: they go to `take_parks` (and count
            as acknowledged once the driver calls `parked`).
    """

    # An idle subscription keeps its FSM: slots spare it an instance dict (~1.5 KiB).
    __slots__ = (
        "_acked_at_checkpoint",
        "_acked_at_write",
        "_acked_total",
        "_bytes_refill_at",
        "_last_checkpoint_time",
        "_n_acked",
        "_order",
        "_refill_at",
        "_replay_acked",
        "_sizes",
        "_unacked",
        "at_head",
        "checkpoint_after",
        "checkpoint_threshold",
        "held_bytes",
        "last_ack",
        "last_persisted",
        "last_read",
        "max_bytes",
        "max_size",
        "number_of",
        "park_if",
        "persisting",
        "selector",
    )

    def __init__(
        self,
        *,
        last_seen: int,
        number_of: Callable[[E], int],
        max_size: int = 1000,
        max_bytes: int | None = None,
        checkpoint_threshold: int = 1,
        checkpoint_after: float = 0.0,
        partition_by: Callable[[E], Hashable] | None = None,
        selector: Callable[[E], bool] | None = None,
        park_if: Callable[[E], bool] | None = None,
    ) -> None:
        super().__init__(partition_by=partition_by)
        self.number_of = number_of
        self.max_size = max_size
        self._refill_at = (max_size + 1) // 2  # free room that makes a read worth it
        self.max_bytes = max_bytes
        #: read again only while at most this many bytes are held (half of max_bytes)
        self._bytes_refill_at = math.inf if max_bytes is None else max_bytes // 2
        #: bytes of the events held (those counted by `held`)
        self.held_bytes = 0
        self.checkpoint_threshold = checkpoint_threshold
        self.checkpoint_after = checkpoint_after
        self.selector = selector
        #: highest event number read from the store
        self.last_read = last_seen
        #: end of the contiguous acknowledged prefix
        self.last_ack = last_seen
        #: what the store holds
        self.last_persisted = last_seen
        #: a write of this checkpoint is under way
        self.persisting: int | None = None
        #: read and not yet in the acknowledged prefix: event_number -> acknowledged?
        self._unacked: dict[int, bool] = {}
        self._order: list[int] = []  # the keys of _unacked, ascending
        self._sizes: list[int] = []  # the size of each event of _order, in that order
        self._n_acked = 0  # how many values of _unacked are True
        #: reading reached the head of the stream and nothing newer is known
        self.at_head = False
        self._last_checkpoint_time: float | None = None
        #: events that have entered the acknowledged prefix, ever; and that count when
        #: the last checkpoint write was decided
        self._acked_total = 0
        self._acked_at_checkpoint = 0
        self._acked_at_write = 0
        self.park_if = park_if
        #: replayed events acknowledged, not yet taken by the driver
        self._replay_acked: list[int] = []

    # -- questions the driver asks ------------------------------------------------------

    @property
    def held(self) -> int:
        """Events read and not yet acknowledged."""
        return len(self._order)

    def wants_read(self) -> int | None:
        """The number to read from (exclusive: events above it), or None: not now.

        Reading resumes once half of ``max_size`` (and half of ``max_bytes``) is free
        again, so a catch-up reads pages, never one event per acknowledgement."""
        if (
            self.at_head
            or not self.consumers
            or self.max_size - self.held < self._refill_at
            or self.held_bytes > self._bytes_refill_at
        ):
            return None
        return self.last_read

    def read_limit(self) -> int:
        return max(1, self.max_size - self.held)

    def read_budget(self) -> int | None:
        """Bytes a read may bring (None: no bound). A page stops at the first event
        that reaches it, so it always holds at least one event."""
        if self.max_bytes is None:
            return None
        return max(1, self.max_bytes - self.held_bytes)

    def checkpoint_due(self, now: float, *, final: bool = False) -> int | None:
        """The checkpoint to persist now, or None."""
        if self.persisting is not None or self.last_ack <= self.last_persisted:
            return None
        if self._last_checkpoint_time is None:
            self._last_checkpoint_time = now
        pending = self._acked_total - self._acked_at_checkpoint
        if (
            final
            or pending >= self.checkpoint_threshold
            or (
                self.checkpoint_after > 0
                and now - self._last_checkpoint_time >= self.checkpoint_after
            )
        ):
            self.persisting = self.last_ack
            self._acked_at_write = self._acked_total
            return self.last_ack
        return None

    def checkpoint_wanted(self) -> bool:
        """Whether `checkpoint_due` would say yes by ``checkpoint_threshold`` alone."""
        return (
            self.persisting is None
            and self.last_ack > self.last_persisted
            and self._acked_total - self._acked_at_checkpoint >= self.checkpoint_threshold
        )

    def next_checkpoint_deadline(self) -> float | None:
        """When `checkpoint_due` may next say yes because of ``checkpoint_after``."""
        if self.checkpoint_after <= 0 or self.last_ack <= self.last_persisted:
            return None
        if self._last_checkpoint_time is None:
            return None
        return self._last_checkpoint_time + self.checkpoint_after

    # -- inputs ---------------------------------------------------------------------------

    def on_events(
        self, events: Iterable[E], *, at_head: bool, sizes: Sequence[int] | None = None
    ) -> None:
        """Events read from the store, in order, all above `last_read`. ``at_head``: the
        read returned fewer than asked (nothing newer is known). ``sizes``: the bytes
        of each event (counted against ``max_bytes``; None: 0 each)."""
        number_of, selector, partition_by = self.number_of, self.selector, self.partition_by
        unacked, order, pending = self._unacked, self._order, self.pending
        events = events if isinstance(events, list) else list(events)
        if sizes is not None and len(sizes) != len(events):
            raise ValueError("sizes: one per event")
        park_if = self.park_if
        if (
            selector is None
            and partition_by is None
            and events
            and (park_if is None or not any(map(park_if, events)))
        ):
            # The common case, in bulk: no user code per event.
            numbers = list(map(number_of, events))
            if numbers[0] > self.last_read and all(map(int.__lt__, numbers, numbers[1:])):
                self.last_read = numbers[-1]
                order.extend(numbers)
                if sizes is None:
                    self._sizes.extend(repeat(0, len(numbers)))
                else:
                    self._sizes.extend(sizes)
                    self.held_bytes += sum(sizes)
                unacked.update(zip(numbers, repeat(False)))
                pending.extend(zip(numbers, repeat(UNPARTITIONED), events))
                self.at_head = at_head
                self._dispatch()
                return
        for index, event in enumerate(events):
            number = number_of(event)
            if number <= self.last_read:
                continue  # already read (a late or repeated read)
            self.last_read = number
            order.append(number)
            size = 0 if sizes is None else sizes[index]
            self._sizes.append(size)
            self.held_bytes += size
            if selector is not None and not selector(event):
                unacked[number] = True  # filtered: counts as acknowledged
                self._n_acked += 1
                continue
            unacked[number] = False
            key = UNPARTITIONED if partition_by is None else self.key_of(event)
            if park_if is not None and park_if(event):
                self._to_park.append((number, key, event))
                self.parking.add(number)
                continue
            pending.append((number, key, event))
        self.at_head = at_head
        self._advance_ack()
        self._dispatch()

    def on_new_events(self) -> None:
        """The store has events beyond what was read (a notification or a poll)."""
        self.at_head = False

    def ack(self, consumer_id: int, event_number: int) -> None:
        """The consumer acknowledges ``event_number`` and every event it was given
        before it (in delivery order: after a redelivery, numbers need not ascend).

        Raises:
            UnexpectedAckError: ``event_number`` is not in flight for this consumer.
        """
        position = self._position(consumer_id, event_number)
        if position is None:
            raise UnexpectedAckError(event_number=event_number)
        consumer = self.consumers[consumer_id]
        if consumer.waiting and position == 0:
            raise UnexpectedAckError(event_number=event_number)  # given back: not acked
        self._ack_first(consumer, position + 1)
        self._advance_ack()
        self._dispatch()

    def _ack_first(self, consumer: Consumer[E], count: int) -> None:
        """The first ``count`` in-flight events of ``consumer`` are acknowledged."""
        in_flight = consumer.in_flight
        unacked = self._unacked
        if self.replaying:
            replays = 0
            for number, _, _ in in_flight[:count]:
                if number in self.replaying:
                    self.replaying.discard(number)
                    self._replay_acked.append(number)
                    replays += 1
                else:
                    unacked[number] = True
            count_live = count - replays
        else:
            for number, _, _ in in_flight[:count]:
                unacked[number] = True  # in-flight events are never acknowledged yet
            count_live = count
        del in_flight[:count]
        self._n_acked += count_live

    def nack(self, consumer_id: int, event_number: int) -> E:
        """The consumer gives ``event_number`` back: the events it was given before it
        count as acknowledged, those after it go back to be delivered again (after it),
        and it gets nothing more until `redeliver` or `nack_parked`. Returns the event.

        Deliveries to it not yet taken are dropped, and a new `epoch` begins: those
        taken but not yet received by the consumer are stale (the driver drops them).

        Raises:
            UnexpectedAckError: ``event_number`` is not in flight for this consumer.
        """
        position = self._position(consumer_id, event_number)
        consumer = self.consumers.get(consumer_id)
        if position is None or consumer is None or (consumer.waiting and position == 0):
            raise UnexpectedAckError(event_number=event_number)
        self._ack_first(consumer, position)
        item, *later = consumer.in_flight
        consumer.in_flight = [item]
        consumer.waiting = True
        consumer.epoch += 1
        consumer.given_back = frozenset(number for number, _, _ in later)
        self._outbox.pop(consumer_id, None)
        self._give_back(later)
        self._advance_ack()
        self._dispatch()
        return item[2]

    def redeliver(self, consumer_id: int, event_number: int) -> bool:
        """Deliver the event given back by `nack` again (False: its consumer has left
        since, and the event went back to be delivered to another)."""
        consumer = self.consumers.get(consumer_id)
        if consumer is None or not consumer.waiting or consumer.in_flight[0][0] != event_number:
            return False
        consumer.waiting = False
        self._outbox.setdefault(consumer_id, []).append(consumer.in_flight[0][2])
        self._dispatch()
        return True

    def nack_parked(self, consumer_id: int, event_number: int) -> None:
        """The event given back by `nack` is parked: it counts as acknowledged (a
        replayed one is only forgotten: the driver keeps its record)."""
        consumer = self.consumers.get(consumer_id)
        if consumer is not None and consumer.waiting and consumer.in_flight[0][0] == event_number:
            consumer.waiting = False
            if event_number in self.replaying:
                self.replaying.discard(event_number)
                del consumer.in_flight[0]
            else:
                self._ack_first(consumer, 1)
        else:  # its consumer left: the event went back to pending
            self._drop_pending(event_number)
        self._advance_ack()
        self._dispatch()

    def _drop_pending(self, event_number: int) -> None:
        for lane in (self.pending, self.replay_pending):
            for index, item in enumerate(lane):
                if item[0] == event_number:
                    del lane[index]
                    if event_number in self.replaying:
                        self.replaying.discard(event_number)
                    elif event_number in self._unacked:
                        self._unacked[event_number] = True
                        self._n_acked += 1
                    return

    def parked(self, event_number: int) -> None:
        """An event of `take_parks` is parked: it counts as acknowledged."""
        if event_number in self.parking:
            self.parking.discard(event_number)
            if event_number in self._unacked:
                self._unacked[event_number] = True
                self._n_acked += 1
            self._advance_ack()
            self._dispatch()

    def replay(self, items: Iterable[tuple[int, E]]) -> None:
        """Deliver these parked events again (numbers at or below `last_ack`), first."""
        for number, event in items:
            if (
                number in self.replaying
                or number in self._replay_acked  # acknowledged: its record goes soon
                or number > self.last_read  # not read yet: it comes in order
                or self._unacked.get(number) is False  # delivered in order right now
            ):
                continue
            self.replaying.add(number)
            bisect.insort(
                self.replay_pending,
                (number, self.key_of(event, strict=False), event),
                key=_first,
            )
        self._dispatch()

    @property
    def has_replay_acks(self) -> bool:
        return bool(self._replay_acked)

    def replay_acked_again(self, numbers: list[int]) -> None:
        """`take_replay_acks` gave these, which could not be handled: keep them."""
        self._replay_acked[:0] = numbers

    def take_replay_acks(self) -> list[int]:
        """Replayed events acknowledged since the last call."""
        out, self._replay_acked = self._replay_acked, []
        return out

    def on_checkpoint_persisted(self, checkpoint: int, now: float) -> None:
        self.last_persisted = max(self.last_persisted, checkpoint)
        self.persisting = None
        self._acked_at_checkpoint = self._acked_at_write
        self._last_checkpoint_time = now

    def on_checkpoint_failed(self) -> None:
        self.persisting = None

    def hibernate(self) -> bool:
        """Drop read-ahead that no consumer holds (it is read again later). Returns
        False (and does nothing) while events are in flight or pending acks."""
        if (
            any(c.in_flight for c in self.consumers.values())
            or self._order
            or self.replay_pending
            or self.replaying
        ):
            return False
        self.pending.clear()
        self._unacked.clear()
        self._order.clear()
        self._sizes.clear()
        self.held_bytes = 0
        self._n_acked = 0
        return True

    # -- internals ------------------------------------------------------------------------

    def _advance_ack(self) -> None:
        order, unacked = self._order, self._unacked
        count = len(order)
        if count and self._n_acked == count:  # all acknowledged: no scan
            i = count
        else:
            i = 0
            while i < count and unacked[order[i]]:
                i += 1
        if i:
            self._n_acked -= i
            self.last_ack = order[i - 1]
            if i == count:
                unacked.clear()
                order.clear()
                self._sizes.clear()
                self.held_bytes = 0
            else:
                for number in order[:i]:
                    del unacked[number]
                del order[:i]
                self.held_bytes -= sum(self._sizes[:i])
                del self._sizes[:i]
            self._acked_total += i
