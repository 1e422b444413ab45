"""The Prometheus text exposition format (version 0.0.4), written from a statistics
snapshot (`EventStoreStatistics`, and the daemon's subscribers): the daemon's
``/metrics``. No client library: the format is lines of ``name{labels} value``."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._metrics import ROLES, HistogramSnapshot
from ._statistics import EventStoreStatistics

__all__ = ["CONTENT_TYPE", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = Mapping[str, str]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self._declared: set[str] = set()

    def declare(self, name: str, kind: str, help_text: str) -> None:
        if name in self._declared:
            return
        self._declared.add(name)
        help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: Labels, value: float) -> None:
        if labels:
            inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{inner}}} {_number(value)}")
        else:
            self.lines.append(f"{name} {_number(value)}")

    def one(self, name: str, kind: str, help_text: str, labels: Labels, value: float) -> None:
        self.declare(name, kind, help_text)
        self.sample(name, labels, value)

    def histogram(
        self, name: str, help_text: str, labels: Labels, histogram: HistogramSnapshot
    ) -> None:
        self.declare(name, "histogram", help_text)
        for bound, count in histogram.cumulative():
            self.sample(f"{name}_bucket", {**labels, "le": _number(bound)}, count)
        self.sample(f"{name}_sum", labels, histogram.total)
        self.sample(f"{name}_count", labels, histogram.count)


def render_metrics(
    stats: EventStoreStatistics, subscribers: Sequence[Mapping[str, Any]] = ()
) -> str:
    """The exposition of ``stats`` (and of the daemon's ``subscribers``, as
    `SubscriberStatistics.as_dict` gives them). Every series carries ``schema``."""
    out = _Writer()
    base = {"schema": stats.schema}
    counters: Iterable[tuple[str, str, float]] = (
        ("eventstore_appends_total", "Appends committed.", stats.appends),
        ("eventstore_appended_events_total", "Events appended.", stats.appended_events),
        ("eventstore_append_errors_total", "Appends failed (not refused).", stats.append_errors),
        ("eventstore_reads_total", "Reads (pages of events).", stats.reads),
        ("eventstore_read_events_total", "Events read.", stats.read_events),
        ("eventstore_notifications_total", "Notifications received.", stats.notifications),
        ("eventstore_pool_overloads_total", "Callers refused a connection.", stats.pool_overloads),
        (
            "eventstore_listener_reconnects_total",
            "LISTEN connection reconnects.",
            stats.listener_reconnects,
        ),
        ("eventstore_lock_reconnects_total", "Lock connection reconnects.", stats.lock_reconnects),
    )
    for name, help_text, value in counters:
        out.one(name, "counter", help_text, base, value)
    out.declare("eventstore_append_conflicts_total", "counter", "Appends refused, by kind.")
    for kind, count in sorted(stats.append_conflicts.items()):
        out.sample("eventstore_append_conflicts_total", {**base, "kind": kind}, count)
    gauges: Iterable[tuple[str, str, float]] = (
        ("eventstore_pool_size", "Connections the pool may open.", stats.pool_size),
        ("eventstore_pool_connections", "Pooled connections open.", stats.pool_connections),
        ("eventstore_pool_in_use", "Pooled connections lent out.", stats.pool_in_use),
        ("eventstore_pool_waiting", "Callers waiting for a connection.", stats.pool_waiting),
        ("eventstore_listener_connected", "LISTEN connection up (1).", stats.listener_connected),
        ("eventstore_lock_connected", "Lock connection up (1).", stats.lock_connected),
        ("eventstore_subscriptions", "Persistent subscriptions active.", stats.subscriptions),
    )
    for name, help_text, value in gauges:
        out.one(name, "gauge", help_text, base, value)
    if stats.writer is not None:
        writer = stats.writer
        out.one(
            "eventstore_writer_batches_total", "counter", "Group commits.", base, writer.batches
        )
        out.one("eventstore_writer_queued", "gauge", "Appends queued.", base, writer.queued)
        out.one(
            "eventstore_writer_connections",
            "gauge",
            "The writer's own connections open (replica_appends), beside the pool's.",
            base,
            writer.connections,
        )
    out.histogram(
        "eventstore_append_duration_seconds",
        "Appends, from the call to the commit.",
        base,
        stats.append_latency,
    )
    out.histogram(
        "eventstore_read_duration_seconds", "Reads of one page.", base, stats.read_latency
    )
    out.histogram(
        "eventstore_delivery_lag_seconds",
        "An event's created_at to its delivery, at the head of its stream.",
        base,
        stats.delivery_lag,
    )
    _subscriptions(out, stats, base)
    _subscribers(out, subscribers, base)
    return "\n".join(out.lines) + "\n"


def _subscriptions(out: _Writer, stats: EventStoreStatistics, base: Labels) -> None:
    series: tuple[tuple[str, str, str, str], ...] = (
        ("eventstore_subscription_lag_events", "gauge", "Events not acknowledged.", "lag"),
        (
            "eventstore_subscription_lag_seconds",
            "gauge",
            "Age of the oldest event held unacknowledged.",
            "lag_seconds",
        ),
        ("eventstore_subscription_in_flight", "gauge", "Events delivered, unacked.", "in_flight"),
        ("eventstore_subscription_head", "gauge", "The stream's known head.", "head"),
        ("eventstore_subscription_last_ack", "gauge", "Last acknowledged event.", "last_ack"),
        ("eventstore_subscription_checkpoint", "gauge", "Persisted checkpoint.", "last_persisted"),
        ("eventstore_subscription_delivered_total", "counter", "Events delivered.", "delivered"),
        (
            "eventstore_subscription_redeliveries_total",
            "counter",
            "Events delivered again.",
            "redeliveries",
        ),
        ("eventstore_subscription_parked_total", "counter", "Events parked.", "parked"),
    )
    details = stats.subscription_details
    for name, kind, help_text, field in series:
        out.declare(name, kind, help_text)
        for sub in details:
            labels = {**base, "subscription": sub.name, "stream": sub.stream_uuid}
            out.sample(name, labels, getattr(sub, field))
    out.declare(
        "eventstore_subscription_checkpoint_age_seconds",
        "gauge",
        "Since the checkpoint was last read or persisted (holders only).",
    )
    for sub in details:
        if sub.checkpoint_age is not None:
            labels = {**base, "subscription": sub.name, "stream": sub.stream_uuid}
            out.sample("eventstore_subscription_checkpoint_age_seconds", labels, sub.checkpoint_age)
    out.declare(
        "eventstore_subscription_role", "gauge", "1 for the subscription's role, 0 for the others."
    )
    for sub in details:
        for role in ROLES:
            labels = {**base, "subscription": sub.name, "stream": sub.stream_uuid, "role": role}
            out.sample("eventstore_subscription_role", labels, int(sub.role == role))


def _subscribers(out: _Writer, subscribers: Sequence[Mapping[str, Any]], base: Labels) -> None:
    if not subscribers:
        return
    for name, help_text, field in (
        ("eventstore_subscriber_handled_total", "Events handled.", "handled"),
        ("eventstore_subscriber_errors_total", "Handler errors.", "errors"),
    ):
        out.declare(name, "counter", help_text)
        for sub in subscribers:
            labels = {**base, "subscription": str(sub["name"]), "stream": str(sub["stream_uuid"])}
            out.sample(name, labels, int(sub[field]))
    out.declare("eventstore_subscriber_state", "gauge", "1 for the subscriber's daemon state.")
    for sub in subscribers:
        labels = {
            **base,
            "subscription": str(sub["name"]),
            "stream": str(sub["stream_uuid"]),
            "state": str(sub["state"]),
        }
        out.sample("eventstore_subscriber_state", labels, 1)
