"""Bad input from users: the right error class, and a message that says what to do."""

from __future__ import annotations

import enum
import subprocess
import sys

import pytest

import trio_eventstore as es
from trio_eventstore import ANY_VERSION, EventData


class Colour(enum.StrEnum):
    RED = "red"


def test_an_empty_event_type_is_a_value_error_a_wrong_type_a_type_error() -> None:
    with pytest.raises(ValueError, match="event_type: must not be empty"):
        EventData({"a": 1}, event_type="")
    with pytest.raises(TypeError, match="event_type: expected a non-empty str or None, got int"):
        EventData({"a": 1}, event_type=5)  # type: ignore[arg-type]


async def test_plain_values_that_are_not_json_are_named_in_plain_words(
    event_store: es.EventStore,
) -> None:
    cases = {
        # An enum member (a str enum's too) reads back as its value.
        "$.colour: a Colour value is not JSON (an enum member would read back as its value)": {
            "colour": Colour.RED
        },
        "$.x: an object value is not JSON": {"x": object()},
        "$.x: an ellipsis value is not JSON": {"x": ...},
    }
    for message, data in cases.items():
        with pytest.raises(es.SerializationError) as info:
            await event_store.append_to_stream(
                "plain", ANY_VERSION, [EventData(data, event_type="Plain")]
            )
        assert str(info.value).startswith(message), str(info.value)
    with pytest.raises(es.StreamNotFoundError):
        await event_store.read_stream_forward("plain")  # nothing was written


def test_the_testing_module_without_its_extra_says_which_extra() -> None:
    script = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "try:\n"
        "    import trio_eventstore.testing\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(exc.name); print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    name, message = result.stdout.splitlines()
    assert name == "hypothesis"
    assert "pip install 'trio-eventstore[testing]'" in message


async def test_events_must_be_a_sequence_and_the_message_says_so(
    event_store: es.EventStore,
) -> None:
    events = (EventData({"n": n}, event_type="N") for n in range(2))
    with pytest.raises(TypeError, match=r"^events: expected a list \(or another sequence\), got"):
        await event_store.append_to_stream("s", ANY_VERSION, events)  # type: ignore[arg-type]
    as_tuple = (EventData({"n": 1}, event_type="N"),)
    assert await event_store.append_to_stream("s", ANY_VERSION, as_tuple) == 1


async def test_a_long_stream_id_is_cut_in_messages_not_in_attributes(
    event_store: es.EventStore,
) -> None:
    long_id = "x" * 2000
    with pytest.raises(es.StreamNotFoundError) as info:
        await event_store.read_stream_forward(long_id)
    message = str(info.value)
    assert message == f"stream {'x' * 200!r}... (2000 characters) does not exist"
    assert info.value.stream_uuid == long_id
    await event_store.append_to_stream(long_id, es.NO_STREAM, [EventData({}, event_type="T")])
    with pytest.raises(es.StreamExistsError, match=r"\.\.\. \(2000 characters\) already exists"):
        await event_store.append_to_stream(long_id, es.NO_STREAM, [EventData({}, event_type="T")])
    short = es.StreamNotFoundError(stream_uuid="orders-1")
    assert str(short) == "stream 'orders-1' does not exist"
