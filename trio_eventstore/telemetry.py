"""OpenTelemetry metrics and traces for a store (extra: ``otel``).

``instrument(store)`` reports the store's own figures (`EventStore.statistics`) through
observable instruments, read when the SDK collects, so appends and reads only bump plain
integers; the three histograms (append and read durations, commit-to-delivery lag) and
the spans (one per append, per read, per delivered batch) are recorded as they happen.
Importing ``trio_eventstore`` never imports ``opentelemetry``: only this module does.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace
from opentelemetry.metrics import CallbackOptions, Observation

from ._metrics import ROLES, Histogram
from ._statistics import EventStoreStatistics
from ._store import EventStore
from ._subscription_types import SubscriptionStatistics

__all__ = ["instrument"]

_SCOPE = "trio_eventstore"

_Attrs = Mapping[str, str | int | bool]


class _Span:
    __slots__ = ("_span",)

    def __init__(self, span: otel_trace.Span) -> None:
        self._span = span

    def end(self, error: BaseException | None = None) -> None:
        if error is not None:
            if isinstance(error, Exception):
                self._span.record_exception(error)
                self._span.set_status(otel_trace.StatusCode.ERROR, type(error).__name__)
            else:  # cancelled: not a failure of the operation
                self._span.set_attribute("eventstore.cancelled", True)
        self._span.end()


class _Tracing:
    """`trio_eventstore._metrics.Tracing` over an OpenTelemetry tracer."""

    def __init__(self, tracer: otel_trace.Tracer) -> None:
        self._tracer = tracer

    def start_span(self, name: str, attributes: _Attrs) -> _Span:
        return _Span(self._tracer.start_span(name, attributes=attributes))


class _Source:
    """The store's statistics, read once per collection (the callbacks of one
    collection share a snapshot), nothing once the store has closed or is gone."""

    def __init__(self, store: EventStore) -> None:
        self._store = weakref.ref(store)
        self._snapshot: EventStoreStatistics | None = None
        self._taken = -1.0

    def get(self) -> EventStoreStatistics | None:
        store = self._store()
        if store is None or store._subscriptions.closed:
            return None
        now = time.monotonic()
        if self._snapshot is None or now - self._taken > 0.1:
            self._snapshot = store.statistics()
            self._taken = now
        return self._snapshot


def instrument(
    store: EventStore,
    *,
    meter_provider: otel_metrics.MeterProvider | None = None,
    tracer_provider: otel_trace.TracerProvider | None = None,
    metrics: bool = True,
    tracing: bool = True,
) -> None:
    """Report ``store``'s metrics and traces through OpenTelemetry until it closes.

    Args:
        meter_provider: where the instruments go (None: the global provider).
        tracer_provider: where the spans go (None: the global provider).
        metrics, tracing: turn either off.

    Every instrument is named ``eventstore.*`` and carries ``eventstore.schema``; the
    subscription ones also ``eventstore.subscription`` and ``eventstore.stream``.
    Instrumenting a store again replaces its histograms' and spans' targets.
    """
    if not isinstance(store, EventStore):
        raise TypeError(f"store: expected an EventStore, got {type(store).__name__}")
    for name, provider_value, method in (
        ("meter_provider", meter_provider, "get_meter"),
        ("tracer_provider", tracer_provider, "get_tracer"),
    ):
        if provider_value is not None and not callable(getattr(provider_value, method, None)):
            kind = "a MeterProvider" if method == "get_meter" else "a TracerProvider"
            raise TypeError(f"{name}: expected {kind} or None, got {type(provider_value).__name__}")
    for name, flag in (("metrics", metrics), ("tracing", tracing)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    store_metrics = store._subscriptions.metrics
    if tracing:
        provider = tracer_provider or otel_trace.get_tracer_provider()
        store_metrics.tracing = _Tracing(provider.get_tracer(_SCOPE))
    if metrics:
        meter = (meter_provider or otel_metrics.get_meter_provider()).get_meter(_SCOPE)
        _register(meter, _Source(store), store.config.schema)
        base = {"eventstore.schema": store.config.schema}
        _mirror(
            store_metrics.append_latency,
            meter,
            "eventstore.append.duration",
            base,
            "Appends, from the call to its commit (committed ones)",
        )
        _mirror(
            store_metrics.read_latency,
            meter,
            "eventstore.read.duration",
            base,
            "Reads of one page of events",
        )
        _mirror(
            store_metrics.delivery_lag,
            meter,
            "eventstore.delivery.lag",
            base,
            "An event's created_at to its delivery, at the head of its stream",
        )


def _mirror(
    histogram: Histogram,
    meter: otel_metrics.Meter,
    name: str,
    attributes: _Attrs,
    description: str,
) -> None:
    otel_histogram = meter.create_histogram(
        name,
        unit="s",
        description=description,
        explicit_bucket_boundaries_advisory=list(histogram.bounds),
    )
    record = otel_histogram.record
    histogram.mirror = lambda value: record(value, attributes)


def _register(meter: otel_metrics.Meter, source: _Source, schema: str) -> None:
    base = {"eventstore.schema": schema}

    def store_figure(
        read: Callable[[EventStoreStatistics], Iterable[tuple[float, _Attrs]]],
    ) -> Callable[[CallbackOptions], Iterator[Observation]]:
        def callback(_options: CallbackOptions) -> Iterator[Observation]:
            stats = source.get()
            if stats is None:
                return
            for value, extra in read(stats):
                yield Observation(value, {**base, **extra})

        return callback

    def subscription_figure(
        read: Callable[[SubscriptionStatistics], Iterable[tuple[float, _Attrs]]],
    ) -> Callable[[CallbackOptions], Iterator[Observation]]:
        def per_subscription(stats: EventStoreStatistics) -> Iterator[tuple[float, _Attrs]]:
            for sub in stats.subscription_details:
                labels = {"eventstore.subscription": sub.name, "eventstore.stream": sub.stream_uuid}
                for value, extra in read(sub):
                    yield value, {**labels, **extra}

        return store_figure(per_subscription)

    def one(value: float) -> list[tuple[float, _Attrs]]:
        return [(value, {})]

    counters: dict[
        str, tuple[str, Callable[[EventStoreStatistics], Iterable[tuple[float, _Attrs]]]]
    ] = {
        "eventstore.appends": ("Appends committed", lambda s: one(s.appends)),
        "eventstore.appended_events": ("Events appended", lambda s: one(s.appended_events)),
        "eventstore.append.conflicts": (
            "Appends refused, by kind",
            lambda s: [(n, {"kind": kind}) for kind, n in s.append_conflicts.items()],
        ),
        "eventstore.append.errors": ("Appends failed otherwise", lambda s: one(s.append_errors)),
        "eventstore.reads": ("Reads (pages)", lambda s: one(s.reads)),
        "eventstore.read.events": ("Events read", lambda s: one(s.read_events)),
        "eventstore.pool.overloads": (
            "Callers refused a pooled connection",
            lambda s: one(s.pool_overloads),
        ),
        "eventstore.notifications": ("Notifications received", lambda s: one(s.notifications)),
        "eventstore.writer.batches": (
            "Group commits (statements the group-commit writer wrote)",
            lambda s: one(s.writer.batches) if s.writer is not None else [],
        ),
    }
    for name, (description, read) in counters.items():
        meter.create_observable_counter(name, [store_figure(read)], description=description)
    subscription_counters: dict[
        str, tuple[str, Callable[[SubscriptionStatistics], Iterable[tuple[float, _Attrs]]]]
    ] = {
        "eventstore.subscription.delivered": ("Events delivered", lambda s: one(s.delivered)),
        "eventstore.subscription.redeliveries": (
            "Events delivered again",
            lambda s: one(s.redeliveries),
        ),
        "eventstore.subscription.parked": ("Events parked", lambda s: one(s.parked)),
    }
    for name, (description, sread) in subscription_counters.items():
        meter.create_observable_counter(name, [subscription_figure(sread)], description=description)
    gauges: dict[
        str, tuple[str, str, Callable[[EventStoreStatistics], Iterable[tuple[float, _Attrs]]]]
    ] = {
        "eventstore.pool.size": ("", "Pool size", lambda s: one(s.pool_size)),
        "eventstore.pool.connections": (
            "",
            "Open pooled connections",
            lambda s: one(s.pool_connections),
        ),
        "eventstore.pool.in_use": ("", "Pooled connections lent out", lambda s: one(s.pool_in_use)),
        "eventstore.pool.waiting": (
            "",
            "Callers waiting for a connection",
            lambda s: one(s.pool_waiting),
        ),
        "eventstore.listener.connected": (
            "",
            "The LISTEN connection is up (1) or not (0)",
            lambda s: one(int(s.listener_connected)),
        ),
        "eventstore.lock.connected": (
            "",
            "The advisory-lock connection is up (1) or not (0)",
            lambda s: one(int(s.lock_connected)),
        ),
        "eventstore.writer.queued": (
            "",
            "Appends waiting for the group-commit writer",
            lambda s: one(s.writer.queued) if s.writer is not None else [],
        ),
        "eventstore.writer.connections": (
            "",
            "The writer's own connections open (replica_appends), beside the pool's",
            lambda s: one(s.writer.connections) if s.writer is not None else [],
        ),
    }
    for name, (unit, description, read) in gauges.items():
        meter.create_observable_gauge(
            name, [store_figure(read)], unit=unit, description=description
        )
    subscription_gauges: dict[
        str, tuple[str, str, Callable[[SubscriptionStatistics], Iterable[tuple[float, _Attrs]]]]
    ] = {
        "eventstore.subscription.lag": ("", "Events not yet acknowledged", lambda s: one(s.lag)),
        "eventstore.subscription.lag_seconds": (
            "s",
            "Age of the oldest event held unacknowledged",
            lambda s: one(s.lag_seconds),
        ),
        "eventstore.subscription.in_flight": (
            "",
            "Events delivered, not acknowledged",
            lambda s: one(s.in_flight),
        ),
        "eventstore.subscription.checkpoint_age": (
            "s",
            "Since the checkpoint was last read or persisted",
            lambda s: [] if s.checkpoint_age is None else one(s.checkpoint_age),
        ),
        "eventstore.subscription.role": (
            "",
            "1 for the subscription's role in this store, 0 for the others",
            lambda s: [(int(s.role == role), {"role": role}) for role in ROLES],
        ),
    }
    for name, (unit, description, sread) in subscription_gauges.items():
        meter.create_observable_gauge(
            name, [subscription_figure(sread)], unit=unit, description=description
        )
