"""Metrics and traces: the store's own figures (`EventStore.statistics`), and the same
through OpenTelemetry (`trio_eventstore.telemetry`, read with the SDK's in-memory reader
and span exporter); without instrumentation nothing of OpenTelemetry is imported."""

from __future__ import annotations

import contextlib
import sys
import textwrap
from typing import Any

import pytest
import trio
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import trio_eventstore as es
from trio_eventstore import ANY_VERSION, NO_STREAM, EventData, EventStore, EventStoreConfig
from trio_eventstore.telemetry import instrument

HANG_GUARD = 60


def ev(n: int) -> EventData:
    return EventData({"n": n}, event_type="Counted")


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Metric name -> its data points, as collected now."""
    data = reader.get_metrics_data()
    assert data is not None
    out: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


def value(found: dict[str, list[Any]], name: str, **attributes: str) -> Any:
    matching = [
        p for p in found[name] if all(p.attributes.get(k) == v for k, v in attributes.items())
    ]
    assert len(matching) == 1, (name, attributes, found.get(name))
    return matching[0]


async def exercise(store: EventStore) -> None:
    """3 appends (4 events), 1 refused, 1 read, 3 events delivered and 2 acknowledged."""
    await store.append_to_stream("a", NO_STREAM, [ev(1), ev(2)])
    await store.append_to_stream("b", NO_STREAM, [ev(3)])
    with contextlib.suppress(es.StreamExistsError):
        await store.append_to_stream("a", NO_STREAM, [ev(4)])
    await store.append_to_stream("b", 1, [ev(5)])
    assert len(await store.read_stream_forward("a")) == 2


async def test_statistics_count_appends_reads_and_deliveries(store: EventStore) -> None:
    with trio.fail_after(HANG_GUARD):
        await exercise(store)
        async with store.subscribe_to_all_streams("metrics", buffer_size=10) as sub:
            async for batch in sub:
                sub.ack(batch.events[1])  # 2 of 4 acknowledged
                break
            stats = store.statistics()
            [detail] = stats.subscription_details
    assert (stats.appends, stats.appended_events) == (3, 4)
    assert stats.append_conflicts == {"stream_exists": 1}
    assert stats.append_errors == 0
    assert stats.append_latency.count == 3
    assert stats.append_latency.cumulative()[-1] == (float("inf"), 3)
    assert stats.reads >= 1
    assert stats.read_events >= 2
    assert stats.listener_connected
    assert stats.lock_connected
    assert stats.pool_in_use == 0
    assert stats.pool_waiting == 0
    assert stats.pool_overloads == 0
    assert (detail.name, detail.stream_uuid, detail.role) == ("metrics", "$all", "holder")
    assert detail.head == 4
    assert detail.last_ack == 2
    assert detail.lag == 2
    assert detail.delivered == 4
    assert detail.redeliveries == 0
    assert detail.parked == 0
    assert detail.in_flight == 2
    assert detail.lag_seconds > 0
    assert detail.checkpoint_age is not None
    assert detail.checkpoint_age >= 0


async def test_opentelemetry_metrics_and_spans(store: EventStore) -> None:
    reader = InMemoryMetricReader()
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    instrument(
        store,
        meter_provider=MeterProvider(metric_readers=[reader]),
        tracer_provider=tracer_provider,
    )
    schema = store.config.schema
    with trio.fail_after(HANG_GUARD):
        await exercise(store)
        async with store.subscribe_to_all_streams("metrics", buffer_size=10) as sub:
            async for batch in sub:
                sub.ack(batch.events[1])
                break
            found = points(reader)
            # A live event: appended while the subscription is at the head.
            await store.append_to_stream("c", ANY_VERSION, [ev(6)])
            async for batch in sub:
                sub.ack(batch)
                break
    assert value(found, "eventstore.appends").value == 3
    assert value(found, "eventstore.appends").attributes["eventstore.schema"] == schema
    assert value(found, "eventstore.appended_events").value == 4
    assert value(found, "eventstore.append.conflicts", kind="stream_exists").value == 1
    assert value(found, "eventstore.reads").value >= 1
    assert value(found, "eventstore.read.events").value >= 2
    duration = value(found, "eventstore.append.duration")
    assert duration.count == 3
    assert duration.sum > 0
    assert value(found, "eventstore.pool.in_use").value == 0
    assert value(found, "eventstore.pool.waiting").value == 0
    assert value(found, "eventstore.pool.overloads").value == 0
    assert value(found, "eventstore.listener.connected").value == 1
    assert value(found, "eventstore.writer.batches").value >= 1
    assert value(found, "eventstore.writer.queued").value == 0
    assert value(found, "eventstore.writer.connections").value == 0  # pooled ones
    sub_labels = {"eventstore.subscription": "metrics", "eventstore.stream": "$all"}

    def sub_value(name: str, **extra: str) -> Any:
        [point] = [
            p
            for p in found[name]
            if all(p.attributes.get(k) == v for k, v in {**sub_labels, **extra}.items())
        ]
        return point.value

    assert sub_value("eventstore.subscription.lag") == 2
    assert sub_value("eventstore.subscription.in_flight") == 2
    assert sub_value("eventstore.subscription.lag_seconds") > 0
    assert sub_value("eventstore.subscription.delivered") == 4
    assert sub_value("eventstore.subscription.redeliveries") == 0
    assert sub_value("eventstore.subscription.parked") == 0
    assert sub_value("eventstore.subscription.checkpoint_age") >= 0
    assert sub_value("eventstore.subscription.role", role="holder") == 1
    assert sub_value("eventstore.subscription.role", role="standby") == 0
    lag = value(points(reader), "eventstore.delivery.lag")
    assert lag.count >= 1
    names = [s.name for s in spans.get_finished_spans()]
    assert names.count("eventstore.append") == 5  # the refused one too
    assert names.count("eventstore.read") >= 1
    assert names.count("eventstore.subscription.batch") == 2
    [refused] = [
        s
        for s in spans.get_finished_spans()
        if s.name == "eventstore.append" and not s.status.is_ok
    ]
    assert refused.attributes is not None
    assert refused.attributes["eventstore.stream"] == "a"


async def test_the_store_imports_nothing_of_opentelemetry_unless_instrumented(
    initialized: EventStoreConfig,
) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        import trio
        import trio_eventstore as es

        async def main():
            config = es.EventStoreConfig(url={initialized.url!r}, schema={initialized.schema!r})
            async with es.open_event_store(config) as store:
                await store.append_to_stream("s", es.ANY_VERSION, [es.EventData(1, event_type="N")])
                await store.read_stream_forward("s")
                async with store.subscribe_to_all_streams("p") as sub:
                    async for batch in sub:
                        sub.ack(batch)
                        break
                print(store.statistics().appends)
                assert not [m for m in sys.modules if m.startswith("opentelemetry")]
                from opentelemetry.sdk.metrics import MeterProvider
                from opentelemetry.sdk.metrics.export import InMemoryMetricReader
                from trio_eventstore.telemetry import instrument
                reader = InMemoryMetricReader()
                instrument(store, meter_provider=MeterProvider(metric_readers=[reader]))
                await store.append_to_stream("s", es.ANY_VERSION, [es.EventData(2, event_type="N")])
                data = reader.get_metrics_data()
                names = {{m.name for r in data.resource_metrics for s in r.scope_metrics
                         for m in s.metrics}}
                assert "eventstore.appends" in names, names

        trio.run(main)
        """
    )
    with trio.fail_after(HANG_GUARD):
        result = await trio.run_process(
            [sys.executable, "-c", script], capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == "1"


async def test_roles_and_redeliveries(store: EventStore) -> None:
    """A second store on the same subscription stands by; events a competing consumer
    left unacknowledged go to another and count as delivered again."""
    await store.append_to_stream("s", ANY_VERSION, [ev(1), ev(2), ev(3)])
    options: dict[str, Any] = {"concurrency_limit": 2, "buffer_size": 3}
    with trio.fail_after(HANG_GUARD):
        joined_a = store.subscribe_to_all_streams("roles", **options)
        a = await joined_a.__aenter__()
        got: list[int] = []
        while len(got) < 3:
            got.extend(e.event_number for e in (await a.__anext__()).events)
        async with (
            es.open_event_store(store.config) as other,
            other.subscribe_to_all_streams("roles", **options),
        ):
            while True:  # a snapshot: look again until the lock attempt has been made
                [standby] = other.statistics().subscription_details
                if standby.role == "standby":
                    break
                await trio.sleep(0.02)
        async with store.subscribe_to_all_streams("roles", **options) as b:
            await joined_a.__aexit__(None, None, None)  # leaves 1..3 unacknowledged
            again = (await b.__anext__()).events
            [holder] = store.statistics().subscription_details
    assert got == [1, 2, 3]
    assert [e.event_number for e in again] == [1, 2, 3]
    assert (holder.role, holder.delivered, holder.redeliveries) == ("holder", 6, 3)
    assert (standby.role, standby.in_flight, standby.checkpoint_age) == ("standby", 0, None)


async def test_instrument_checks_its_arguments_before_changing_anything(store: EventStore) -> None:
    for kwargs, name in (
        ({"meter_provider": "nope"}, "meter_provider"),
        ({"tracer_provider": 3}, "tracer_provider"),
        ({"meter_provider": TracerProvider()}, "meter_provider"),
        ({"metrics": "yes"}, "metrics"),
    ):
        with pytest.raises(TypeError, match=name):
            instrument(store, **kwargs)
    assert store._subscriptions.metrics.tracing is None  # nothing was set up
