"""Options are typed keyword arguments, so that a type checker (and the runtime) catches a
misspelt one: `subscribe_to_all_streams` and the daemon's `SubscriberSpec`."""

from __future__ import annotations

import inspect

import attrs
import pytest

import trio_eventstore as es


def _subscription_options() -> dict[str, inspect.Parameter]:
    params = inspect.signature(es.EventStore.subscribe_to_stream).parameters
    return {n: p for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def test_subscribe_to_all_streams_takes_the_options_of_subscribe_to_stream() -> None:
    stream = inspect.signature(es.EventStore.subscribe_to_stream).parameters
    every = inspect.signature(es.EventStore.subscribe_to_all_streams).parameters
    assert list(every.values()) == [p for n, p in stream.items() if n != "stream_uuid"]
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in every.values())


def test_subscriber_spec_has_typed_subscription_options() -> None:
    fields = attrs.fields_dict(es.SubscriberSpec)
    assert "options" not in fields  # no free dict
    for name, param in _subscription_options().items():
        if name == "mapper":  # handlers take RecordedEvents
            continue
        assert name in fields, name
        assert fields[name].default == param.default, name
    spec = es.SubscriberSpec(name="n", handler=print, buffer_size=3, checkpoint_after=1.0)
    assert (spec.buffer_size, spec.checkpoint_after) == (3, 1.0)


def test_subscriber_spec_refuses_unknown_and_bad_options() -> None:
    with pytest.raises(TypeError, match="buffer_sise"):
        es.SubscriberSpec(name="n", handler=print, buffer_sise=3)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="buffer_size"):
        es.SubscriberSpec(name="n", handler=print, buffer_size=0)
    with pytest.raises(es.InvalidStartFromError):
        es.SubscriberSpec(name="n", handler=print, start_from=-1)
    with pytest.raises(ValueError, match="partition_by"):
        es.SubscriberSpec(name="n", handler=print, partition_by=lambda e: e.stream_uuid)
