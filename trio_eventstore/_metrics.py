"""The store's own figures: plain counters and fixed-bucket histograms that the hot paths
bump (no I/O, no locks, no imports of any telemetry library), read by
`EventStore.statistics`, the daemon's ``/metrics`` and the optional OpenTelemetry
instrumentation (`trio_eventstore.telemetry`), which may hook a `Tracing` in.
Pure: no I/O, no tasks."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from typing import Protocol

import attrs

__all__ = [
    "CONFLICT_KINDS",
    "LATENCY_BUCKETS",
    "LAG_BUCKETS",
    "ROLES",
    "Histogram",
    "HistogramSnapshot",
    "StoreMetrics",
    "Tracing",
    "TracingSpan",
]

#: Upper bounds (seconds) of the append and read latency buckets.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Upper bounds (seconds) of the commit-to-delivery lag buckets.
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Every role a persistent subscription reports (its statistics' ``role``).
ROLES = ("holder", "hibernated", "standby", "starting", "disconnected", "stopped", "failed")

#: Refused appends by error class -> the ``kind`` label of the conflict counter.
CONFLICT_KINDS = {
    "WrongExpectedVersionError": "wrong_expected_version",
    "StreamExistsError": "stream_exists",
    "StreamNotFoundError": "stream_not_found",
    "StreamDeletedError": "stream_deleted",
    "DuplicateEventError": "duplicate_event",
}


@attrs.frozen
class HistogramSnapshot:
    """A histogram's state: ``counts[i]`` observations were <= ``bounds[i]`` (and above
    the bound before); ``counts[-1]`` were above the last bound."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float
    count: int

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) per bucket, ``inf`` last (Prometheus's
        ``le`` buckets)."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class Histogram:
    """Fixed buckets, bumped in place; ``mirror`` (set by the OpenTelemetry
    instrumentation) is called with each observation too."""

    __slots__ = ("_counts", "bounds", "count", "mirror", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0
        self.mirror: Callable[[float], None] | None = None

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1
        if self.mirror is not None:
            self.mirror(value)

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(self._counts), self.total, self.count)


class TracingSpan(Protocol):
    """A span started by `Tracing.start_span`."""

    def end(self, error: BaseException | None = None) -> None:
        """End it; ``error``: the operation failed with it."""


class Tracing(Protocol):
    """What the store calls to trace its operations (when instrumented)."""

    def start_span(self, name: str, attributes: Mapping[str, str | int | bool]) -> TracingSpan:
        """Start a span (a child of the caller's current span, if any)."""


class StoreMetrics:
    """The store's counters, shared by the facade, the writer's hand-over path and the
    subscription drivers. Only plain attribute bumps on the hot paths."""

    __slots__ = (
        "append_errors",
        "append_latency",
        "appended_events",
        "appends",
        "conflicts",
        "delivery_lag",
        "read_events",
        "read_latency",
        "reads",
        "tracing",
    )

    def __init__(self) -> None:
        #: appends that committed, and their events
        self.appends = 0
        self.appended_events = 0
        #: appends refused, by kind (`CONFLICT_KINDS`)
        self.conflicts: dict[str, int] = {}
        #: appends that failed otherwise (the database unavailable, bad data ...)
        self.append_errors = 0
        #: reads (pages) and the events they returned
        self.reads = 0
        self.read_events = 0
        self.append_latency = Histogram(LATENCY_BUCKETS)
        self.read_latency = Histogram(LATENCY_BUCKETS)
        #: an event's created_at to its delivery to a consumer of a subscription at
        #: the head of its stream (catching up is not lag)
        self.delivery_lag = Histogram(LAG_BUCKETS)
        #: set by `trio_eventstore.telemetry.instrument`
        self.tracing: Tracing | None = None

    def append_failed(self, exc: BaseException) -> None:
        kind = CONFLICT_KINDS.get(type(exc).__name__)
        if kind is None:
            for cls in type(exc).__mro__:
                kind = CONFLICT_KINDS.get(cls.__name__)
                if kind is not None:
                    break
        if kind is None:
            self.append_errors += 1
        else:
            self.conflicts[kind] = self.conflicts.get(kind, 0) + 1
