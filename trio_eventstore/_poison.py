"""Poison events in a persistent subscription's driver: retries of events given back
with ``nack`` (per the subscription's `RetryPolicy`), parking (the events the policy
gave up on, undecodable ones, and with a held partition the later events of a parked
event's partition), and replays of parked events, for the session that holds the lock.

The decisions of what to deliver stay in `SubscriptionFSM`; this keeps the state that
lives outside it (failures per event, retry timers, the park records the holder knows)
and does the I/O (`_parking`) in the driver's task.
"""

from __future__ import annotations

import datetime
import heapq
import logging
import time
import uuid
from collections.abc import Callable, Hashable

import attrs

from . import _parking
from ._fsm import SubscriptionFSM
from ._notifications import Notifier
from ._parking import ParkRecord
from ._pg import Database
from ._subscription_types import SubscriptionOptions
from ._types import RecordedEvent, UndecodedEvent

__all__ = ["ParkingLot", "error_text"]

logger = logging.getLogger("trio_eventstore.subscriptions")


def error_text(error: BaseException | str | None) -> str:
    if error is None:
        return "given back by the consumer (nack)"
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return str(error)


@attrs.define
class _Failure:
    first: float
    failures: int = 0
    error: str = ""


@attrs.define
class _ToPark:
    number: int
    event: RecordedEvent
    error: str
    attempts: int
    key: Hashable
    #: the consumer that gave it back (None: parked without a delivery)
    consumer_id: int | None
    #: of ``attempts``, those before it was replayed (its park record's)
    earlier: int = 0


class ParkingLot:
    """Retries, parks and replays of one persistent subscription, in its driver."""

    __slots__ = (
        "_db",
        "_deliver_undecodable",
        "_due",
        "_failures",
        "_hold",
        "_keys",
        "_listening",
        "_name",
        "_policy",
        "_replayed",
        "_stream_uuid",
        "_to_park",
        "check",
        "records",
        "redeliveries",
    )

    def __init__(
        self, db: Database, stream_uuid: str, name: str, options: SubscriptionOptions
    ) -> None:
        self._db = db
        self._stream_uuid = stream_uuid
        self._name = name
        self._policy = options.retry_policy
        self._hold = options.partition_by is not None and options.retry_policy.hold_partition
        self._deliver_undecodable = options.undecodable == "deliver"
        #: park records of this subscription, as the holder knows them, by event id
        self.records: dict[uuid.UUID, ParkRecord] = {}
        self._keys: dict[uuid.UUID, Hashable] = {}
        self._failures: dict[tuple[bool, int], _Failure] = {}
        #: (when, consumer id, event number): redeliveries due
        self._due: list[tuple[float, int, int]] = []
        self._to_park: list[_ToPark] = []
        #: re-read the records (session start, a notification of the parked stream)
        self.check = True
        self.redeliveries = 0
        #: replayed and acknowledged in this session (a read racing with the deletion
        #: of their records must not replay them again)
        self._replayed: set[uuid.UUID] | None = None  # made when first needed
        self._listening: Callable[[], None] | None = None

    @property
    def park_if(self) -> Callable[[RecordedEvent], bool] | None:
        """What the FSM parks as it reads: undecodable events, unless delivered."""
        if self._deliver_undecodable:
            return None
        return _undecodable

    # -- from consumers' tasks (sync) ------------------------------------------------------

    def nack(
        self,
        fsm: SubscriptionFSM[RecordedEvent],
        consumer_id: int,
        number: int,
        retry: bool,
        error: str,
        attempts: int | None = None,
    ) -> None:
        """``attempts``: the failures so far, when the consumer counted them itself."""
        replay = number in fsm.replaying
        event = fsm.nack(consumer_id, number)
        now = time.monotonic()
        failure = self._failures.setdefault((replay, number), _Failure(now))
        failure.failures = attempts if attempts is not None else failure.failures + 1
        failure.error = error
        if retry and not self._policy.exhausted(failure.failures, now - failure.first):
            heapq.heappush(
                self._due, (now + self._policy.delay(failure.failures), consumer_id, number)
            )
            return
        earlier = 0
        if replay and event.event_id in self.records:
            earlier = self.records[event.event_id].attempts
        del self._failures[(replay, number)]
        key = fsm.key_of(event, strict=False)
        total = failure.failures + earlier
        self._to_park.append(_ToPark(number, event, error, total, key, consumer_id, earlier))

    # -- in the driver's task ---------------------------------------------------------------

    def next_due(self) -> float | None:
        """When the next redelivery is due (time.monotonic()), if any."""
        return self._due[0][0] if self._due else None

    def has_work(self, fsm: SubscriptionFSM[RecordedEvent]) -> bool:
        return bool(
            self.check
            or self._to_park
            or fsm.has_parks
            or (self._due and self._due[0][0] <= time.monotonic())
            or fsm.has_replay_acks
        )

    def on_news(self) -> None:
        """The parked stream was notified (or the marks re-synced): re-read the records."""
        self.check = True

    def end_session(self, notifier: Notifier) -> None:
        """Retries and parks in hand are dropped: those events are delivered again."""
        self._due.clear()
        self._to_park.clear()
        self._failures.clear()
        self._replayed = None
        self.records.clear()  # the next session reads them again, for its own FSM
        self._keys.clear()
        self.check = True
        self._listen(notifier, None)

    def _listen(self, notifier: Notifier, wake: Callable[[], None] | None) -> None:
        """Listen to the parked stream while there are records (a replay or discard
        from another node notifies it; the notifier's polls re-read it too)."""
        stream = _parking.parked_stream(self._name)
        if self._listening is not None and (wake is None or not self.records):
            notifier.remove_listener(stream, self._listening)
            self._listening = None
        if wake is not None and self.records and self._listening is None:
            self._listening = wake
            notifier.add_listener(stream, wake)

    async def work(
        self, fsm: SubscriptionFSM[RecordedEvent], notifier: Notifier, wake: Callable[[], None]
    ) -> None:
        """Redeliver what is due, park what is to be parked, forget replayed events
        once acknowledged, and take replay and discard requests."""
        now = time.monotonic()
        while self._due and self._due[0][0] <= now:
            _, consumer_id, number = heapq.heappop(self._due)
            if fsm.redeliver(consumer_id, number):
                self.redeliveries += 1
        await self.park_pending(fsm)
        await self.forget_replayed(fsm)
        if self.check:
            self.check = False
            await self._reload(fsm)
        self._listen(notifier, wake)

    async def park_pending(self, fsm: SubscriptionFSM[RecordedEvent]) -> None:
        """Park what is to be parked: events nacked for good, undecodable ones, and
        those held behind a parked event of their partition (also as a session ends:
        a consumer that nacks and leaves at once had its event parked)."""
        for number, key, event in fsm.take_parks():
            error = event.error if isinstance(event, UndecodedEvent) else ""
            if not error:
                held = self._held_by(key)
                error = f"held behind parked event {held}" if held else "parked"
            attempts = 0
            self._to_park.append(_ToPark(number, event, error, attempts, key, None))
        while self._to_park:
            await self._park(fsm, self._to_park[0])
            del self._to_park[0]

    async def forget_replayed(self, fsm: SubscriptionFSM[RecordedEvent]) -> None:
        """Delete the records of replayed events acknowledged since the last call."""
        acked = fsm.take_replay_acks()
        if acked:
            done = set(acked)
            gone = [r for r in self.records.values() if r.number in done]
            if self._replayed is None:
                self._replayed = set()
            self._replayed.update(r.event_id for r in gone)
            try:
                await _parking.delete_records(self._db, [r.key for r in gone])
            except BaseException:
                fsm.replay_acked_again(acked)  # the next session replays them
                raise
            for record in gone:
                self._forget(fsm, record.event_id)

    def _held_by(self, key: Hashable) -> int | None:
        numbers = [r.number for i, r in self.records.items() if self._keys.get(i) == key]
        return min(numbers) if numbers else None

    async def _park(self, fsm: SubscriptionFSM[RecordedEvent], item: _ToPark) -> None:
        event = item.event
        # Behind a partition being replayed: queued for the replay at once.
        replay = self._hold and any(
            r.replay and self._keys.get(i) == item.key and i != event.event_id
            for i, r in self.records.items()
        )
        record = ParkRecord(
            key=_parking.record_key(self._stream_uuid, self._name, event.event_id),
            event_id=event.event_id,
            number=item.number,
            error=item.error,
            attempts=item.attempts,
            parked_at=datetime.datetime.now(datetime.UTC),
            replay=replay,
        )
        await _parking.write_record(self._db, self._stream_uuid, self._name, event, record)
        # The attempts of this delivery round (what the consumer or daemon counted),
        # and, for a replayed event, those in all (what its park record holds).
        in_all = f" ({item.attempts} in all, with those before its replay)" if item.earlier else ""
        logger.warning(
            "subscription %r: parked event %s (number %d) after %d attempts%s: %s",
            self._name,
            event.event_id,
            item.number,
            item.attempts - item.earlier,
            in_all,
            item.error,
        )
        self.records[event.event_id] = record
        self._keys[event.event_id] = item.key
        if self._replayed is not None:
            self._replayed.discard(event.event_id)
        if self._hold:
            fsm.hold(item.key)
        if item.consumer_id is not None:
            fsm.nack_parked(item.consumer_id, item.number)
        else:
            fsm.parked(item.number)
        if replay:
            fsm.replay([(item.number, event)])

    def _forget(self, fsm: SubscriptionFSM[RecordedEvent], event_id: uuid.UUID) -> None:
        self.records.pop(event_id, None)
        key = self._keys.pop(event_id, None)
        if self._hold and key is not None and key not in self._keys.values():
            fsm.release(key)

    async def _reload(self, fsm: SubscriptionFSM[RecordedEvent]) -> None:
        records = {
            r.event_id: r
            for r in await _parking.load_records(self._db, self._stream_uuid, self._name)
            if self._replayed is None or r.event_id not in self._replayed
        }
        for event_id in [i for i in self.records if i not in records]:
            self._forget(fsm, event_id)  # discarded
        new = [r for i, r in records.items() if i not in self._keys or r.replay]
        events = await _parking.read_parked_events(self._db, new) if new else {}
        replays: list[tuple[int, RecordedEvent]] = []
        stuck: list[str] = []
        for record in new:
            event = events.get(record.event_id)
            if event is None:  # hard-deleted since: nothing to deliver
                continue
            key = fsm.key_of(event, strict=False)
            self._keys[record.event_id] = key
            if self._hold:
                fsm.hold(key)
            if record.replay and record.number not in fsm.replaying:
                if isinstance(event, UndecodedEvent) and not self._deliver_undecodable:
                    stuck.append(record.key)  # still undecodable: it stays parked
                    record.replay = False
                else:
                    replays.append((record.number, event))
        self.records = {i: r for i, r in records.items() if i in self._keys}
        if stuck:
            await _parking.set_state(self._db, stuck, _parking.PARKED, _parking.REPLAY)
        if replays:
            logger.info("subscription %r: replaying %d parked events", self._name, len(replays))
            fsm.replay(replays)


def _undecodable(event: RecordedEvent) -> bool:
    return isinstance(event, UndecodedEvent)
