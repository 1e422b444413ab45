"""The values of persistent subscriptions: their options (validated before any I/O), the
batches delivered to consumers, and statistics snapshots. Pure: no I/O, no tasks."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import attrs

from ._errors import InvalidStartFromError
from ._types import MAX_BIGINT, RecordedEvent, StartFrom

__all__ = [
    "DEFAULT_MAX_BUFFER_BYTES",
    "MAX_PARTITION_GROUPS",
    "EventBatch",
    "SubscriptionOptions",
    "SubscriptionStatistics",
]


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
    #: lost lock, a restart of the session, a consumer that left without acknowledging)
    delivered: int = 0
    redeliveries: int = 0
    #: events set aside after failing (parked)
    parked: int = 0
