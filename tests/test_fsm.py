"""The subscription state machine, driven by Hypothesis without a database."""

from __future__ import annotations

from collections.abc import Hashable

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from trio_eventstore import UnexpectedAckError
from trio_eventstore._fsm import SubscriptionFSM


@attrs.frozen
class Ev:
    number: int
    key: str
    wanted: bool = True
    size: int = 0  # bytes, counted against max_bytes


MAX_EVENT_SIZE = 12


def number_of(event: Ev) -> int:
    return event.number


class FSMMachine(RuleBasedStateMachine):
    """Random consumers joining, leaving and crashing, reads, acks and checkpoints."""

    @initialize(
        start=st.integers(0, 5),
        max_size=st.integers(1, 12),
        threshold=st.integers(1, 4),
        partitioned=st.booleans(),
        filtering=st.booleans(),
        max_bytes=st.none() | st.integers(1, 30),
        hold=st.booleans(),
    )
    def setup(
        self,
        start: int,
        max_size: int,
        threshold: int,
        partitioned: bool,
        filtering: bool,
        max_bytes: int | None,
        hold: bool,
    ) -> None:
        self.partitioned = partitioned
        self.hold = hold
        #: consumer -> the event it gave back (nack), until redelivered or parked
        self.waiting: dict[int, int] = {}
        self.parked: set[int] = set()
        self.fsm: SubscriptionFSM[Ev] = SubscriptionFSM(
            last_seen=start,
            number_of=number_of,
            max_size=max_size,
            max_bytes=max_bytes,
            checkpoint_threshold=threshold,
            partition_by=(lambda e: e.key) if partitioned else None,
            selector=(lambda e: e.wanted) if filtering else None,
        )
        self.start = start
        self.head = start  # events 1..head exist in the "store" (numbers with gaps)
        self.store: list[Ev] = []
        self.next_id = 0
        self.delivered: dict[int, list[Ev]] = {}  # consumer -> events received, in order
        #: consumer -> batches taken by the driver, not yet received: (epoch, events)
        self.inbox: dict[int, list[tuple[int, list[Ev]]]] = {}
        self.acked: set[int] = set()
        self.persisted = start
        self.now = 0.0
        self.last_delivered_by_key: dict[Hashable, int] = {}

    # -- the store --------------------------------------------------------------------

    @rule(
        count=st.integers(1, 4),
        gap=st.integers(0, 2),
        keys=st.lists(st.sampled_from("abc"), min_size=4, max_size=4),
        wanted=st.booleans(),
        sizes=st.lists(st.integers(0, MAX_EVENT_SIZE), min_size=4, max_size=4),
    )
    def append(self, count: int, gap: int, keys: list[str], wanted: bool, sizes: list[int]) -> None:
        for i in range(count):
            self.head += 1 + (gap if i == 0 else 0)  # $all may have gaps (hard deletes)
            self.store.append(Ev(self.head, keys[i], wanted or i % 2 == 0, sizes[i]))
        self.fsm.on_new_events()

    def page(self, after: int) -> tuple[list[Ev], bool]:
        """What the store's read returns: events above ``after``, at most `read_limit`
        of them, stopping at the first that reaches `read_budget` bytes; and at_head."""
        limit, budget = self.fsm.read_limit(), self.fsm.read_budget()
        page: list[Ev] = []
        total = 0
        for event in self.store:
            if event.number <= after:
                continue
            if len(page) == limit or (budget is not None and total >= budget):
                return page, False
            page.append(event)
            total += event.size
        return page, len(page) < limit and (budget is None or total < budget)

    @rule()
    def read(self) -> None:
        after = self.fsm.wants_read()
        if after is None:
            return
        page, at_head = self.page(after)
        self.fsm.on_events(page, at_head=at_head, sizes=[e.size for e in page])
        self.collect()

    @rule(overlap=st.integers(1, 3))
    def late_read(self, overlap: int) -> None:
        """A page that starts with events already read (a repeated read): skipped."""
        after = self.fsm.wants_read()
        if after is None:
            return
        page, at_head = self.page(after)
        page = [e for e in self.store if after - overlap < e.number <= after] + page
        self.fsm.on_events(iter(page), at_head=at_head, sizes=[e.size for e in page])
        self.collect()

    # -- consumers ----------------------------------------------------------------------

    @rule(buffer=st.integers(1, 3))
    def join(self, buffer: int) -> None:
        cid = self.next_id
        self.next_id += 1
        self.delivered[cid] = []
        self.inbox[cid] = []
        self.fsm.add_consumer(cid, buffer)
        self.collect()

    @precondition(lambda self: self.fsm.consumers)
    @rule(data=st.data())
    def leave_or_crash(self, data: st.DataObject) -> None:
        cid = data.draw(st.sampled_from(sorted(self.fsm.consumers)))
        self.fsm.remove_consumer(cid)
        del self.inbox[cid]  # its channel closes
        self.collect()

    def received(self, cid: int) -> list[int]:
        """What the consumer has received and holds: the in-flight events not still in
        its channel (in delivery order)."""
        queued = {e.number for _, events in self.inbox[cid] for e in events}
        return [n for n in self.fsm.in_flight_of(cid) if n not in queued]

    def can_ack(self) -> list[int]:
        return sorted(
            c for c, v in self.fsm.consumers.items() if not v.waiting and self.received(c)
        )

    @precondition(lambda self: any(self.inbox.values()))
    @rule(data=st.data())
    def receive(self, data: st.DataObject) -> None:
        """A consumer takes the next batch from its channel, as `Subscription` does:
        one sent before its last nack is stale and dropped; any other is one it can
        acknowledge, event by event."""
        cid = data.draw(st.sampled_from(sorted(c for c, b in self.inbox.items() if b)))
        epoch, events = self.inbox[cid].pop(0)
        if epoch != self.fsm.epoch(cid):
            return
        in_flight = self.fsm.in_flight_of(cid)
        for event in events:
            assert event.number in in_flight, (event, in_flight)
            if self.partitioned:
                assert event.key not in self.fsm.held_keys
        self.delivered[cid].extend(events)

    @precondition(lambda self: self.can_ack())
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        cid = data.draw(st.sampled_from(self.can_ack()))
        numbers = self.received(cid)  # in delivery order
        upto = data.draw(st.sampled_from(numbers))
        self.fsm.ack(cid, upto)
        self.acked.update(numbers[: numbers.index(upto) + 1])
        self.collect()

    @precondition(lambda self: self.can_ack())
    @rule(data=st.data())
    def nack(self, data: st.DataObject) -> None:
        """A consumer gives an event back: those before it count as acknowledged, those
        after it (received or still in its channel) come again, after it."""
        cid = data.draw(st.sampled_from(self.can_ack()))
        numbers = self.fsm.in_flight_of(cid)
        number = data.draw(st.sampled_from(self.received(cid)))
        event = self.fsm.nack(cid, number)
        assert event.number == number
        self.acked.update(numbers[: numbers.index(number)])
        self.waiting[cid] = number
        assert self.fsm.in_flight_of(cid) == [number]
        later = numbers[numbers.index(number) + 1 :]
        assert all(self.fsm.was_given_back(cid, n) for n in later)
        with pytest.raises(UnexpectedAckError):
            self.fsm.ack(cid, number)  # given back: not to be acknowledged
        self.collect()

    @precondition(lambda self: self.waiting)
    @rule(data=st.data(), park=st.booleans())
    def retry_or_park(self, data: st.DataObject, park: bool) -> None:
        """The back-off ends (redelivered) or the policy gave up (parked)."""
        cid = data.draw(st.sampled_from(sorted(self.waiting)))
        number = self.waiting.pop(cid)
        if cid not in self.fsm.consumers:  # it left: the event went back to pending
            assert not self.fsm.redeliver(cid, number)
            return
        if park:
            [(_, key, _)] = self.fsm.consumers[cid].in_flight
            if self.hold and self.partitioned:
                self.fsm.hold(key)
            self.fsm.nack_parked(cid, number)
            self.acked.add(number)
            self.parked.add(number)
        else:
            assert self.fsm.redeliver(cid, number)
            self.collect()
            epoch, events = self.inbox[cid][-1]
            assert epoch == self.fsm.epoch(cid)
            assert events[0].number == number
        self.collect()

    @precondition(lambda self: self.fsm.consumers)
    @rule(data=st.data(), number=st.integers(0, 60))
    def bad_ack(self, data: st.DataObject, number: int) -> None:
        cid = data.draw(st.sampled_from(sorted(self.fsm.consumers)))
        if number in self.fsm.in_flight_of(cid):
            return
        with pytest.raises(UnexpectedAckError):
            self.fsm.ack(cid, number)

    @rule(elapsed=st.floats(0, 2))
    def checkpoint(self, elapsed: float) -> None:
        self.now += elapsed
        wanted = self.fsm.checkpoint_wanted()  # what an ack uses to wake the driver
        due = self.fsm.checkpoint_due(self.now)
        if wanted:
            assert due is not None
        if due is not None:
            assert due > self.persisted
            self.persisted = due
            self.fsm.on_checkpoint_persisted(due, self.now)

    def collect(self) -> None:
        for number, key, _ in self.fsm.take_parks():  # behind a parked event of its key
            assert key in self.fsm.held_keys
            self.fsm.parked(number)
            self.acked.add(number)
            self.parked.add(number)
        for cid, events in self.fsm.take_deliveries().items():
            assert cid in self.fsm.consumers
            self.inbox[cid].append((self.fsm.epoch(cid), events))
            if self.partitioned:
                for event in events:
                    assert event.key not in self.fsm.held_keys  # nothing overtakes
                    # Order within a partition: never below what was delivered before,
                    # except redelivery of events nobody acknowledged.
                    last = self.last_delivered_by_key.get(event.key, -1)
                    assert event.number > last or event.number not in self.acked
                    self.last_delivered_by_key[event.key] = max(last, event.number)

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def buffers_respected(self) -> None:
        for consumer in self.fsm.consumers.values():
            assert len(consumer.in_flight) <= consumer.buffer_size
            if consumer.waiting:  # it gets nothing until its event is retried or parked
                assert len(consumer.in_flight) == 1

    @invariant()
    def one_owner_per_partition(self) -> None:
        if not self.partitioned:
            return
        owners: dict[Hashable, int] = {}
        for consumer in self.fsm.consumers.values():
            for _, key, _ in consumer.in_flight:
                assert owners.setdefault(key, consumer.consumer_id) == consumer.consumer_id

    @invariant()
    def partition_order(self) -> None:
        if not self.partitioned:
            return
        # Everything in flight of a key comes before everything pending of that key.
        for consumer in self.fsm.consumers.values():
            for number, key, _ in consumer.in_flight:
                assert all(n > number for n, k, _ in self.fsm.pending if k == key)

    @invariant()
    def checkpoint_is_an_acknowledged_prefix(self) -> None:
        fsm = self.fsm
        assert fsm.last_persisted <= fsm.last_ack <= fsm.last_read
        assert self.persisted == fsm.last_persisted
        # Every event read at or below last_ack was acknowledged or filtered out.
        for event in self.store:
            if self.start < event.number <= fsm.last_ack and event.wanted:
                # a wanted event at or below the checkpoint was acknowledged
                assert event.number in self.acked or not self.fsm.selector, event
        in_flight = {n for c in fsm.consumers.values() for n, _, _ in c.in_flight}
        assert all(n > fsm.last_ack for n in in_flight)
        assert all(n > fsm.last_ack for n, _, _ in fsm.pending)

    @invariant()
    def acknowledged_count_kept(self) -> None:
        fsm = self.fsm
        assert fsm._n_acked == sum(fsm._unacked.values())
        assert fsm._order == sorted(fsm._unacked)

    @invariant()
    def bytes_held_are_counted_and_bounded(self) -> None:
        fsm = self.fsm
        size = {e.number: e.size for e in self.store}
        assert fsm.held_bytes == sum(size[n] for n in fsm._order)
        if fsm.max_bytes is not None:
            # A page may end with the event that crosses the bound: one event over.
            assert fsm.held_bytes < fsm.max_bytes + MAX_EVENT_SIZE + 1

    @invariant()
    def an_empty_buffer_always_reads(self) -> None:
        """At least one event always fits: a byte bound never stalls delivery."""
        fsm = self.fsm
        if fsm.consumers and not fsm.at_head and fsm.held == 0:
            assert fsm.wants_read() is not None

    @invariant()
    def nothing_lost(self) -> None:
        fsm = self.fsm
        # Every event read and not in the acknowledged prefix is pending, in flight, or
        # filtered/acked and waiting for the prefix to reach it.
        in_flight = {n for c in fsm.consumers.values() for n, _, _ in c.in_flight}
        pending = {n for n, _, _ in fsm.pending}
        assert not in_flight & pending
        for event in self.store:
            if fsm.last_ack < event.number <= fsm.last_read:
                assert (
                    event.number in in_flight
                    or event.number in pending
                    or event.number in self.acked
                    or not event.wanted
                ), event


TestFSM = FSMMachine.TestCase
TestFSM.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_final_checkpoint_and_threshold() -> None:
    fsm: SubscriptionFSM[Ev] = SubscriptionFSM(
        last_seen=0, number_of=number_of, checkpoint_threshold=3
    )
    fsm.add_consumer(1, 10)
    fsm.on_events([Ev(1, "a"), Ev(2, "a")], at_head=True)
    assert [e.number for e in fsm.take_deliveries()[1]] == [1, 2]
    fsm.ack(1, 2)
    assert fsm.checkpoint_due(0.0) is None  # 2 < threshold
    assert fsm.checkpoint_due(0.0, final=True) == 2


def test_checkpoint_after_never_stops_reading() -> None:
    fsm: SubscriptionFSM[Ev] = SubscriptionFSM(
        last_seen=0, number_of=number_of, checkpoint_threshold=100, checkpoint_after=1.0, max_size=2
    )
    fsm.add_consumer(1, 2)
    fsm.on_events([Ev(1, "a"), Ev(2, "a")], at_head=False)
    fsm.take_deliveries()
    fsm.ack(1, 1)
    assert fsm.checkpoint_due(0.0) is None
    assert fsm.checkpoint_due(1.5) == 1  # the timer fires mid catch-up ...
    fsm.on_checkpoint_persisted(1, 1.5)
    fsm.ack(1, 2)
    assert fsm.wants_read() == 2  # ... and reading simply goes on after event 2


def test_catch_up_reads_pages_not_one_event_per_ack() -> None:
    fsm: SubscriptionFSM[Ev] = SubscriptionFSM(last_seen=0, number_of=number_of, max_size=10)
    fsm.add_consumer(1, 1)
    assert (fsm.wants_read(), fsm.read_limit()) == (0, 10)
    fsm.on_events([Ev(n, "a") for n in range(1, 11)], at_head=False)
    for n in range(1, 5):
        [[event]] = fsm.take_deliveries().values()
        fsm.ack(1, event.number)
        assert fsm.wants_read() is None, n  # 6 or more still held
    [[event]] = fsm.take_deliveries().values()
    fsm.ack(1, event.number)
    assert (fsm.wants_read(), fsm.read_limit()) == (10, 5)  # half free: a page of 5


def test_crashed_consumer_events_go_to_the_next_in_order() -> None:
    fsm: SubscriptionFSM[Ev] = SubscriptionFSM(
        last_seen=0, number_of=number_of, partition_by=lambda e: e.key
    )
    fsm.add_consumer(1, 3)
    fsm.add_consumer(2, 3)
    fsm.on_events([Ev(1, "a"), Ev(2, "a"), Ev(3, "b"), Ev(4, "a")], at_head=True)
    first = fsm.take_deliveries()
    a_owner = 1 if any(e.key == "a" for e in first.get(1, [])) else 2
    assert [e.number for e in first[a_owner] if e.key == "a"] == [1, 2, 4]
    fsm.ack(a_owner, 1)
    fsm.remove_consumer(a_owner)  # crashes with 2 and 4 in flight
    other = 3 - a_owner
    redelivered = fsm.take_deliveries()[other]
    assert [e.number for e in redelivered if e.key == "a"] == [2, 4]


def test_reading_pauses_on_bytes_held_and_resumes_at_half() -> None:
    fsm: SubscriptionFSM[Ev] = SubscriptionFSM(
        last_seen=0, number_of=number_of, max_size=1000, max_bytes=100
    )
    fsm.add_consumer(1, 1)
    assert fsm.read_budget() == 100
    events = [Ev(n, "a", size=40) for n in (1, 2, 3)]  # the third crosses the bound
    fsm.on_events(events, at_head=False, sizes=[e.size for e in events])
    assert fsm.held_bytes == 120
    assert fsm.wants_read() is None  # 997 events of room, but no bytes
    [[first]] = fsm.take_deliveries().values()
    fsm.ack(1, first.number)
    assert (fsm.held_bytes, fsm.wants_read()) == (80, None)  # more than half held
    [[second]] = fsm.take_deliveries().values()
    fsm.ack(1, second.number)
    assert (fsm.held_bytes, fsm.wants_read(), fsm.read_budget()) == (40, 3, 60)


def test_one_event_always_fits() -> None:
    fsm: SubscriptionFSM[Ev] = SubscriptionFSM(last_seen=0, number_of=number_of, max_bytes=10)
    fsm.add_consumer(1, 1)
    assert (fsm.wants_read(), fsm.read_budget()) == (0, 10)
    fsm.on_events([Ev(1, "a", size=1000)], at_head=False, sizes=[1000])
    [[event]] = fsm.take_deliveries().values()
    fsm.ack(1, event.number)
    assert (fsm.held_bytes, fsm.wants_read()) == (0, 1)


def test_a_nack_makes_what_was_sent_to_the_consumer_after_it_stale() -> None:
    """Events after the nacked one, already taken for the consumer (in its channel) or
    not yet, never reach it before the nacked one comes again; acks of them are stale."""
    fsm: SubscriptionFSM[Ev] = SubscriptionFSM(last_seen=0, number_of=number_of)
    fsm.add_consumer(1, 2)
    fsm.on_events([Ev(n, "a") for n in range(1, 6)], at_head=True)
    before = fsm.epoch(1)
    assert [e.number for e in fsm.take_deliveries()[1]] == [1, 2]
    fsm.ack(1, 1)
    assert [e.number for e in fsm.take_deliveries()[1]] == [3]  # queued in its channel
    fsm.ack(1, 2)  # the consumer is still at event 2: event 4 is decided, not taken
    fsm.nack(1, 3)
    assert fsm.epoch(1) != before  # the batch [3] (and [4], had it been taken) is stale
    assert fsm.take_deliveries() == {}
    assert not fsm.was_given_back(1, 3)  # the nacked one: not in flight, not stale
    fsm2: SubscriptionFSM[Ev] = SubscriptionFSM(last_seen=0, number_of=number_of)
    fsm2.add_consumer(1, 3)
    fsm2.on_events([Ev(n, "a") for n in range(1, 4)], at_head=True)
    fsm2.take_deliveries()
    fsm2.nack(1, 1)
    assert fsm2.was_given_back(1, 2)
    assert fsm2.was_given_back(1, 3)
    assert fsm2.redeliver(1, 1)
    epoch = fsm2.epoch(1)
    assert [e.number for e in fsm2.take_deliveries()[1]] == [1, 2, 3]
    assert fsm2.epoch(1) == epoch  # the redelivery belongs to the new epoch
