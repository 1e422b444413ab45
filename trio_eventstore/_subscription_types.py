"""The values of persistent subscriptions: their options (validated before any I/O), the
batches delivered to consumers, and statistics snapshots. Pure: no I/O, no tasks."""

from __future__ import annotations

import datetime
import math
import random
import weakref
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Literal

import attrs

from ._errors import InvalidStartFromError
from ._types import MAX_BIGINT, RecordedEvent, StartFrom

__all__ = [
    "DEFAULT_MAX_BUFFER_BYTES",
    "DEFAULT_RETRY_POLICY",
    "MAX_PARTITION_GROUPS",
    "EventBatch",
    "ParkedEvent",
    "RetryPolicy",
    "SubscriptionOptions",
    "SubscriptionStatistics",
    "is_replay",
    "mark_replay",
]


class EventBatch(list[Any]):
    """A batch delivered to a consumer: the events (or the mapper's values), with the
    recorded events in ``events`` and ``last_event_number`` (so ``ack(batch)`` works
    whatever the mapper returns)."""

    __slots__ = ("consumer", "epoch", "events", "last_event_number", "session")

    def __init__(
        self,
        values: Iterable[Any],
        events: list[RecordedEvent],
        session: int,
        epoch: int = 0,
        consumer: object = None,
    ) -> None:
        super().__init__(values)
        self.events = events
        self.last_event_number = events[-1].event_number
        self.session = session
        #: the consumer's delivery epoch when it was sent (a `nack` makes it stale)
        self.epoch = epoch
        #: the consumer it was sent to (partition groups share an inbox: which group's)
        self.consumer = consumer


#: The events being delivered as replays of parked events (by identity, while they
#: live): a `Projection` applies such an event although its position is past it.
_replays: dict[int, weakref.ref[RecordedEvent]] = {}


def mark_replay(event: RecordedEvent) -> None:
    """``event`` (this object) is delivered as the replay of a parked event."""
    key = id(event)

    def gone(ref: weakref.ref[RecordedEvent]) -> None:
        if _replays.get(key) is ref:
            del _replays[key]

    _replays[key] = weakref.ref(event, gone)


def is_replay(event: RecordedEvent) -> bool:
    """Whether ``event`` (this object) was delivered as the replay of a parked event."""
    ref = _replays.get(id(event))
    return ref is not None and ref() is event


def _seconds(name: str, value: object, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number of seconds, got {type(value).__name__}")
    if not (0 < value < math.inf if positive else 0 <= value < math.inf):
        bound = ">" if positive else ">="
        raise ValueError(f"{name}: must be a finite number of seconds {bound} 0")


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How a persistent subscription retries an event its consumer gave back with
    `Subscription.nack` (and how a daemon handler retries), before parking it.

    Args:
        max_attempts: deliveries of one event at most; after that many failures it is
            parked (1: park at the first failure).
        backoff: the wait before the first redelivery (seconds); doubling after each
            failure, up to ``max_backoff``.
        max_backoff: the longest wait between two deliveries (seconds).
        jitter: a fraction in [0, 1): each wait is shortened by up to this fraction, at
            random (so that many subscribers do not retry in step).
        deadline: park once this many seconds have passed since the event's first
            failure, whatever the attempts (None: attempts only).
        hold_partition: with ``partition_by``, once an event is parked, the later events
            of its partition are parked behind it (in order) until it is replayed or
            discarded, so none overtakes it; False: they are delivered (the parked event
            is skipped in its partition's order).
    """

    max_attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    jitter: float = 0.2
    deadline: float | None = None
    hold_partition: bool = True

    def __attrs_post_init__(self) -> None:
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int):
            raise TypeError(f"max_attempts: expected an int, got {type(attempts).__name__}")
        if not 1 <= attempts <= 1_000_000:
            raise ValueError(f"max_attempts: must be >= 1 and <= 1000000, got {attempts}")
        _seconds("backoff", self.backoff, positive=False)
        _seconds("max_backoff", self.max_backoff, positive=False)
        if self.max_backoff < self.backoff:
            raise ValueError("max_backoff: must be >= backoff")
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, (int, float)):
            raise TypeError("jitter: expected a number")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter: must be >= 0 and < 1, got {self.jitter}")
        if self.deadline is not None:
            _seconds("deadline", self.deadline, positive=True)
        if not isinstance(self.hold_partition, bool):
            raise TypeError("hold_partition: expected a bool")

    def delay(self, failures: int) -> float:
        """The wait before the next delivery after ``failures`` failures (>= 1)."""
        base = min(self.max_backoff, self.backoff * 2.0 ** min(max(failures, 1) - 1, 60))
        return base * (1.0 - random.uniform(0.0, self.jitter)) if self.jitter else base

    def exhausted(self, failures: int, failing_for: float) -> bool:
        """Whether an event that failed ``failures`` times, the first ``failing_for``
        seconds ago, is to be parked now."""
        if failures >= self.max_attempts:
            return True
        return self.deadline is not None and failing_for >= self.deadline


#: The retry policy of a subscription (and daemon handler) that does not give one:
#: 5 deliveries, waiting 0.5 s, 1 s, 2 s, 4 s (less up to 20 % jitter), then park.
DEFAULT_RETRY_POLICY = RetryPolicy()


@attrs.frozen
class ParkedEvent:
    """An event a persistent subscription has set aside (`EventStore.parked_events`).

    Attributes:
        event: the event as the subscription delivers it (``event_number`` is its
            position in the subscription's stream); an `UndecodedEvent` when it cannot
            be decoded.
        error: why it was parked (the last error, or why it could not be decoded).
        attempts: failed deliveries before it was parked (0: never delivered).
        parked_at: when it was (last) parked, UTC.
        replay_requested: a replay of it was asked for and has not finished yet.
    """

    event: RecordedEvent
    error: str
    attempts: int
    parked_at: datetime.datetime
    replay_requested: bool = False


#: The most partition groups a subscription may be split into.
MAX_PARTITION_GROUPS = 1024

#: ``max_buffer_bytes`` by default: 64 MiB of event data read ahead per subscription.
DEFAULT_MAX_BUFFER_BYTES = 64 * 2**20


@attrs.frozen(kw_only=True)
class SubscriptionOptions:
    """Options of a persistent subscription (validated before any I/O)."""

    start_from: StartFrom | int = StartFrom.ORIGIN
    concurrency_limit: int | None = None
    partition_by: Callable[[RecordedEvent], Hashable] | None = None
    partition_groups: int | None = None
    buffer_size: int = 1
    max_size: int = 1000
    max_buffer_bytes: int | None = DEFAULT_MAX_BUFFER_BYTES
    checkpoint_threshold: int = 1
    checkpoint_after: float = 0.0
    selector: Callable[[RecordedEvent], bool] | None = None
    mapper: Callable[[RecordedEvent], Any] | None = None
    retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY
    undecodable: Literal["park", "deliver"] = "park"

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.retry_policy, RetryPolicy):
            raise TypeError(
                f"retry_policy: expected a RetryPolicy, got {type(self.retry_policy).__name__}"
            )
        if self.undecodable not in ("park", "deliver"):
            raise ValueError(f"undecodable: expected 'park' or 'deliver', got {self.undecodable!r}")
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
        groups = self.partition_groups
        if groups is not None:
            if isinstance(groups, bool) or not isinstance(groups, int):
                raise TypeError(f"partition_groups: expected an int, got {type(groups).__name__}")
            if not 1 <= groups <= MAX_PARTITION_GROUPS:
                raise ValueError(
                    f"partition_groups: must be between 1 and {MAX_PARTITION_GROUPS}, got {groups}"
                )
            if self.partition_by is None:
                raise ValueError("partition_groups: only with partition_by")
        elif self.partition_by is not None and self.concurrency_limit is None:
            raise ValueError(
                "partition_by: only with concurrency_limit (competing consumers) or "
                "partition_groups"
            )


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
    #: the subscription's stream (``"$all"``) and name
    stream_uuid: str = ""
    name: str = ""
    #: ``holder`` (delivering), ``hibernated`` (holding, idle, buffers dropped),
    #: ``standby`` (another session holds it), ``starting``, ``disconnected``,
    #: ``stopped`` or ``failed``
    role: str = "starting"
    #: events in the stream not yet acknowledged (``head - last_ack``)
    lag: int = 0
    #: age (now - created_at) of the oldest event read and not yet acknowledged; 0 when
    #: none is held
    lag_seconds: float = 0.0
    #: seconds since this store last read or persisted the checkpoint (None: no session)
    checkpoint_age: float | None = None
    #: events delivered to consumers, and those among them delivered again (after a
    #: lost lock, a restart of the session, a consumer that left without acknowledging,
    #: a ``nack`` retry)
    delivered: int = 0
    redeliveries: int = 0
    #: events parked and not yet replayed or discarded, as this store's holder knows
    #: them (0 while it does not hold the subscription)
    parked: int = 0
    #: with ``partition_groups``: the number of groups, and which one this is (None in
    #: the figures of all the groups together, `Subscription.statistics`)
    groups: int | None = None
    group: int | None = None
    #: with ``balance_subscriptions``: this store's member id among the stores that
    #: share the subscriptions out (the ``<member>`` of its lock connection's name)
    balance_member: str | None = None
