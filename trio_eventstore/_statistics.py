"""`EventStoreStatistics`: a snapshot of the store's figures (pool, connections,
appends, reads, deliveries, each subscription), read by `EventStore.statistics`, the
daemon's ``/metrics`` and ``/health``, and the OpenTelemetry instrumentation."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from ._config import EventStoreConfig
from ._metrics import LAG_BUCKETS, LATENCY_BUCKETS, HistogramSnapshot
from ._pg import Database
from ._subscription_types import SubscriptionStatistics
from ._subscriptions import Subscriptions, subscription_statistics
from ._writer import GroupCommitWriter, WriterStatistics

__all__ = ["EventStoreStatistics", "store_statistics"]


def _empty(bounds: tuple[float, ...]) -> HistogramSnapshot:
    return HistogramSnapshot(bounds, (0,) * (len(bounds) + 1), 0.0, 0)


@attrs.frozen
class EventStoreStatistics:
    """A snapshot of the store's state (`EventStore.statistics`).

    Counters count from the store's opening; ``*_latency`` and ``delivery_lag`` are
    histograms in seconds (`HistogramSnapshot`).
    """

    schema: str
    pool_size: int
    pool_connections: int
    pool_idle: int
    pool_overloaded: bool
    listener_pid: int | None
    listener_reconnects: int
    lock_pid: int | None
    lock_reconnects: int
    subscriptions: int
    #: the group-commit writer's counters (None without group commit)
    writer: WriterStatistics | None = None
    #: pooled connections lent out now, callers waiting for one, callers refused
    #: (`PoolOverloadedError`) so far (the pool's, when shared)
    pool_in_use: int = 0
    pool_waiting: int = 0
    pool_overloads: int = 0
    #: whether the LISTEN and the advisory-lock connections are up
    listener_connected: bool = False
    lock_connected: bool = False
    #: notifications received
    notifications: int = 0
    #: appends committed and their events; refused ones by kind
    #: (``wrong_expected_version``, ``stream_exists``, ``stream_not_found``,
    #: ``stream_deleted``, ``duplicate_event``); ones that failed otherwise
    appends: int = 0
    appended_events: int = 0
    append_conflicts: Mapping[str, int] = attrs.field(factory=dict)
    append_errors: int = 0
    append_latency: HistogramSnapshot = attrs.field(factory=lambda: _empty(LATENCY_BUCKETS))
    #: reads (pages, iterators' included) and the events they returned
    reads: int = 0
    read_events: int = 0
    read_latency: HistogramSnapshot = attrs.field(factory=lambda: _empty(LATENCY_BUCKETS))
    #: an event's ``created_at`` to its delivery, for subscriptions at their stream's head
    delivery_lag: HistogramSnapshot = attrs.field(factory=lambda: _empty(LAG_BUCKETS))
    #: each persistent subscription of this store
    subscription_details: tuple[SubscriptionStatistics, ...] = ()
    #: with ``balance_subscriptions``: this store's member id, and how many stores
    #: (this one included) the last balancing round found running the same set
    balance_member: str | None = None
    balance_members: int = 0


def store_statistics(
    config: EventStoreConfig,
    db: Database,
    subs: Subscriptions,
    writer: GroupCommitWriter | None,
) -> EventStoreStatistics:
    pool = db.pool_statistics()
    metrics = subs.metrics
    drivers = subs.active()
    balancing = config.balance_subscriptions
    return EventStoreStatistics(
        schema=config.schema,
        pool_size=int(pool["max_size"]),
        pool_connections=int(pool["size"]),
        pool_idle=int(pool["idle"]),
        pool_overloaded=bool(pool["overloaded"]),
        listener_pid=subs.notifier.backend_pid if subs.notifier.connected else None,
        listener_reconnects=subs.notifier.reconnects,
        lock_pid=subs.locks.backend_pid,
        lock_reconnects=subs.locks.reconnects,
        subscriptions=len(drivers),
        writer=writer.statistics() if writer is not None else None,
        pool_in_use=int(pool["in_use"]),
        pool_waiting=int(pool["waiting"]),
        pool_overloads=int(pool["overloads"]),
        listener_connected=subs.notifier.connected,
        lock_connected=subs.locks.connected.is_set(),
        notifications=subs.notifier.notifications,
        appends=metrics.appends,
        appended_events=metrics.appended_events,
        append_conflicts=dict(metrics.conflicts),
        append_errors=metrics.append_errors,
        append_latency=metrics.append_latency.snapshot(),
        reads=metrics.reads,
        read_events=metrics.read_events,
        read_latency=metrics.read_latency.snapshot(),
        delivery_lag=metrics.delivery_lag.snapshot(),
        subscription_details=tuple(subscription_statistics(d) for d in drivers),
        balance_member=subs.locks.member if balancing else None,
        balance_members=len(subs.locks.others) + 1 if balancing else 0,
    )
