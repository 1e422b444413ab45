"""Who gets which event: the consumers of a persistent subscription and the dispatch
of events to them, sans I/O (the base of `_fsm.SubscriptionFSM`).

Events of one partition go to one consumer at a time, in order; unpartitioned events go
round-robin to whoever has room. Replayed events are delivered first, outside the
checkpoint's order; a held partition's later events go to be parked instead of
delivered; events a consumer had in flight when it left go back to the front of their
partition (Elixir #321).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Hashable, Iterable
from operator import itemgetter
from typing import Any, Generic, TypeVar

import attrs

from ._types import UndecodedEvent

__all__ = ["UNPARTITIONED", "Consumer", "Dispatcher"]

E = TypeVar("E")

#: Marker key for "no partitioning": such events may go to any consumer.
UNPARTITIONED = object()

_event = itemgetter(2)


@attrs.define(eq=False)
class Consumer(Generic[E]):
    """One competing consumer of a subscription."""

    consumer_id: int
    buffer_size: int
    # (event_number, partition key, event), in delivery order
    in_flight: list[tuple[int, Hashable, E]] = attrs.Factory(list)
    #: it gave back its first in-flight event (`SubscriptionFSM.nack`): nothing more
    #: until that one is redelivered or parked
    waiting: bool = False
    #: bumped by each `SubscriptionFSM.nack`: deliveries made before it are stale
    epoch: int = 0
    #: the events its last nack gave back with the nacked one (acks of them are stale)
    given_back: frozenset[int] = frozenset()

    @property
    def capacity(self) -> int:
        return 0 if self.waiting else self.buffer_size - len(self.in_flight)

    def owns(self, key: Hashable) -> bool:
        return any(k == key for _, k, _ in self.in_flight)


class Dispatcher(Generic[E]):
    """The consumers, the events read and not yet delivered, and who gets which.

    Args:
        partition_by: key of an event; events of one key go to one consumer at a time,
            in order. None: any consumer.
    """

    __slots__ = (
        "_outbox",
        "_round_robin",
        "_to_park",
        "consumers",
        "held_keys",
        "parking",
        "partition_by",
        "pending",
        "replay_pending",
        "replaying",
    )

    def __init__(self, *, partition_by: Callable[[E], Hashable] | None) -> None:
        self.partition_by = partition_by
        self.consumers: dict[int, Consumer[E]] = {}
        #: read, not yet delivered: (event_number, key, event), sorted by number
        self.pending: list[tuple[int, Hashable, E]] = []
        #: deliveries decided but not yet handed over by the driver
        self._outbox: dict[int, list[E]] = {}
        self._round_robin = 0
        #: partitions whose events are parked instead of delivered (a parked event holds
        #: its partition until it is replayed or discarded)
        self.held_keys: set[Hashable] = set()
        #: events to park, not yet taken by the driver; and all those being parked
        self._to_park: list[tuple[int, Hashable, E]] = []
        self.parking: set[int] = set()
        #: replayed events (numbers at or below the checkpoint) to deliver first; and
        #: those in flight
        self.replay_pending: list[tuple[int, Hashable, E]] = []
        self.replaying: set[int] = set()

    # -- questions the driver asks ------------------------------------------------------

    def take_deliveries(self) -> dict[int, list[E]]:
        """Deliveries decided since the last call: consumer id -> events, in order."""
        out, self._outbox = self._outbox, {}
        return out

    def epoch(self, consumer_id: int) -> int:
        """The consumer's delivery epoch (-1: no such consumer). A `nack` starts a new
        one: what was delivered to the consumer before it and not yet taken by the
        consumer (queued in its channel) is stale, and must never reach it."""
        consumer = self.consumers.get(consumer_id)
        return -1 if consumer is None else consumer.epoch

    def was_given_back(self, consumer_id: int, event_number: int) -> bool:
        """Whether the consumer's last `nack` gave ``event_number`` back with the nacked
        event (and it is not in flight for it again): an ack of it is stale."""
        consumer = self.consumers.get(consumer_id)
        return consumer is not None and event_number in consumer.given_back

    def in_flight_of(self, consumer_id: int) -> list[int]:
        return [n for n, _, _ in self.consumers[consumer_id].in_flight]

    def is_in_flight(self, consumer_id: int, event_number: int) -> bool:
        return self._position(consumer_id, event_number) is not None

    @property
    def has_parks(self) -> bool:
        """Whether `take_parks` has events."""
        return bool(self._to_park)

    def take_parks(self) -> list[tuple[int, Hashable, E]]:
        """Events to park decided since the last call: (number, partition key, event)."""
        out, self._to_park = self._to_park, []
        return out

    # -- inputs ---------------------------------------------------------------------------

    def add_consumer(self, consumer_id: int, buffer_size: int) -> None:
        if consumer_id in self.consumers:
            raise ValueError(f"consumer {consumer_id} is already subscribed")
        if buffer_size < 1:
            raise ValueError("buffer_size: must be >= 1")
        self.consumers[consumer_id] = Consumer(consumer_id, buffer_size)
        self._dispatch()

    def remove_consumer(self, consumer_id: int) -> None:
        """A consumer left or crashed: its unacknowledged events go back to the front."""
        consumer = self.consumers.pop(consumer_id, None)
        self._outbox.pop(consumer_id, None)
        if consumer is None:
            return
        self._give_back(consumer.in_flight)
        self._dispatch()

    def key_of(self, event: E, *, strict: bool = True) -> Hashable:
        """The partition of ``event``. A key function that raises fails the subscription
        (as a selector that raises does): going on without the key would break the
        partition's order. Only an event that could not be decoded (delivered or parked
        as `UndecodedEvent`) has no partition when the key function cannot read it, and,
        not ``strict``, a parked or replayed one (already out of order; one parked by an
        older version, whose key function it may have failed, must not stop the
        subscription at every start)."""
        if self.partition_by is None:
            return UNPARTITIONED
        try:
            return self.partition_by(event)
        except Exception:
            if not strict or isinstance(event, UndecodedEvent):
                return UNPARTITIONED
            raise

    def hold(self, key: Hashable) -> None:
        """Park the later events of partition ``key`` instead of delivering them."""
        if key is not UNPARTITIONED:
            self.held_keys.add(key)
            self._dispatch()

    def release(self, key: Hashable) -> None:
        self.held_keys.discard(key)
        self._dispatch()

    # -- internals ------------------------------------------------------------------------

    def _position(self, consumer_id: int, event_number: int) -> int | None:
        """Where ``event_number`` is in the consumer's in-flight list (None: not there)."""
        consumer = self.consumers.get(consumer_id)
        if consumer is None or not consumer.in_flight:
            return None
        in_flight = consumer.in_flight
        if in_flight[-1][0] == event_number:  # the usual ack: a whole batch
            return len(in_flight) - 1
        for index, (number, _, _) in enumerate(in_flight):
            if number == event_number:
                return index
        return None

    def _give_back(self, items: Iterable[tuple[int, Hashable, E]]) -> None:
        for item in items:
            lane = self.replay_pending if item[0] in self.replaying else self.pending
            bisect.insort(lane, item, key=lambda it: it[0])

    def _dispatch(self) -> None:
        if self.replay_pending and self.consumers:
            self._dispatch_lane(self.replay_pending, replays=True)
        if not self.pending or not self.consumers:
            return
        consumers = list(self.consumers.values())
        if self.partition_by is None and len(consumers) == 1 and not self.replay_pending:
            # The common case, one consumer and no partitions: hand over a slice.
            consumer = consumers[0]
            take = min(consumer.capacity, len(self.pending))
            if take > 0:
                items = self.pending[:take]
                del self.pending[:take]
                consumer.in_flight.extend(items)
                self._outbox.setdefault(consumer.consumer_id, []).extend(map(_event, items))
            return
        self._dispatch_lane(self.pending, replays=False)

    def _dispatch_lane(self, lane: list[tuple[int, Hashable, E]], *, replays: bool) -> None:
        consumers = list(self.consumers.values())
        held = self.held_keys if not replays else ()
        free = sum(max(0, c.capacity) for c in consumers)
        if free == 0 and not held:
            return
        blocked: set[Any] = set()
        if not replays:  # a partition with replays to deliver waits for them
            blocked.update(key for _, key, _ in self.replay_pending)
        remaining: list[tuple[int, Hashable, E]] = []
        for index, item in enumerate(lane):
            _, key, event = item
            if held and key in held:
                self._to_park.append(item)  # behind its partition's parked event
                self.parking.add(item[0])
                continue
            if free == 0:  # nobody can take more: keep the rest as it is
                remaining.extend(i for i in lane[index:] if not (held and i[1] in held))
                for later in lane[index:]:
                    if held and later[1] in held:
                        self._to_park.append(later)
                        self.parking.add(later[0])
                break
            if key is not UNPARTITIONED and key in blocked:
                remaining.append(item)
                continue
            target = self._choose(consumers, key)
            if target is None:
                if key is not UNPARTITIONED:
                    blocked.add(key)
                remaining.append(item)
                continue
            target.in_flight.append(item)
            free -= 1
            self._outbox.setdefault(target.consumer_id, []).append(event)
        lane[:] = remaining

    def _choose(self, consumers: list[Consumer[E]], key: Hashable) -> Consumer[E] | None:
        if key is not UNPARTITIONED:
            for consumer in consumers:
                if consumer.owns(key):
                    return consumer if consumer.capacity > 0 else None
        count = len(consumers)
        for offset in range(count):
            consumer = consumers[(self._round_robin + offset) % count]
            if consumer.capacity > 0:
                self._round_robin = (self._round_robin + offset + 1) % count
                return consumer
        return None
