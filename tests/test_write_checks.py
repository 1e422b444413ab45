"""Never write what cannot be read: appends and snapshots that would store something the
store cannot read back (or that PostgreSQL would refuse) fail with a typed error before
any I/O, and nothing is written."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import decimal
import enum
import random
import string
import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio

import trio_eventstore as es
from trio_eventstore import (
    EventData,
    EventStore,
    EventStoreConfig,
    JsonSerializer,
    SnapshotData,
    admin,
    open_event_store,
)
from trio_eventstore import _storable as storable

MAX_BIGINT = 2**63 - 1


@contextlib.asynccontextmanager
async def open_store(config: EventStoreConfig, **changes: Any) -> AsyncIterator[EventStore]:
    """A store on a fresh schema with some config fields changed."""
    config = config.with_changes(**changes)
    await admin.create(config)
    await admin.init(config)
    try:
        async with open_event_store(config) as store:
            yield store
    finally:
        await admin.drop(config)


async def assert_nothing_written(store: EventStore, *streams: str) -> None:
    for stream in streams:
        with pytest.raises(es.StreamNotFoundError):
            await store.stream_info(stream)
    assert (await store.stream_info("$all")).stream_version == 0


@attrs.frozen
class Opened:
    account: str


@attrs.frozen
class Unregistered:
    account: str


@attrs.frozen
class Typed:
    """Typed fields round-trip through the converter (bytes, datetime, Decimal, UUID...)."""

    blob: bytes
    at: datetime.datetime
    day: datetime.date
    amount: decimal.Decimal
    ref: uuid.UUID
    pair: tuple[int, str]
    tags: frozenset[str]


# -- strict serializers --------------------------------------------------------------------


async def test_a_strict_store_refuses_events_it_could_not_read(config: EventStoreConfig) -> None:
    serializer = JsonSerializer(strict=True)
    serializer.register(Opened, event_type="Opened")
    async with open_store(config, serializer=serializer) as store:
        with pytest.raises(es.UnknownEventTypeError, match="Unregistered"):
            await store.append_to_stream("a", es.ANY_VERSION, [EventData(Unregistered("x"))])
        with pytest.raises(es.UnknownEventTypeError, match="'Nope'"):
            await store.append_to_stream(
                "b", es.ANY_VERSION, [EventData({"account": "x"}, event_type="Nope")]
            )
        # one bad event refuses the whole append
        with pytest.raises(es.UnknownEventTypeError):
            await store.append_to_stream(
                "c",
                es.ANY_VERSION,
                [EventData(Opened("x")), EventData({"account": "y"}, event_type="Nope")],
            )
        await assert_nothing_written(store, "a", "b", "c")

        # plain values under a registered type must fit its class: they are read as one
        with pytest.raises(es.SerializationError, match="does not fit Opened"):
            await store.append_to_stream(
                "d", es.ANY_VERSION, [EventData({"wrong": 1}, event_type="Opened")]
            )
        await assert_nothing_written(store, "d")
        await store.append_to_stream(
            "e", es.ANY_VERSION, [EventData({"account": "z"}, event_type="Opened")]
        )
        [event] = await store.read_stream_forward("e")
        assert event.data == Opened("z")


async def test_a_strict_store_refuses_snapshots_it_could_not_read(
    config: EventStoreConfig,
) -> None:
    serializer = JsonSerializer(strict=True)
    serializer.register(Opened, event_type="Opened")
    async with open_store(config, serializer=serializer) as store:
        with pytest.raises(es.UnknownEventTypeError):
            await store.record_snapshot(
                SnapshotData(source_uuid="s", source_version=1, data=Unregistered("x"))
            )
        with pytest.raises(es.UnknownEventTypeError):
            await store.record_snapshot(
                SnapshotData(source_uuid="s", source_version=1, data={}, source_type="Nope")
            )
        with pytest.raises(es.SnapshotNotFoundError):
            await store.read_snapshot("s")


def test_a_lenient_serializer_checks_plain_values_against_a_registered_class() -> None:
    serializer = JsonSerializer()
    serializer.register(Opened, event_type="Opened")
    serializer.check_readable({"account": "a"}, "Opened")
    serializer.check_readable({"anything": b"goes".decode()}, "NotRegistered")
    with pytest.raises(es.SerializationError, match="does not fit Opened"):
        serializer.check_readable({"nope": 1}, "Opened")
    with pytest.raises(es.SerializationError, match="does not fit Opened"):
        serializer.check_readable([1, 2], "Opened")
    strict = JsonSerializer(strict=True)
    with pytest.raises(es.UnknownEventTypeError):
        strict.event_type_of(Unregistered("a"))
    with pytest.raises(es.UnknownEventTypeError):
        strict.check_readable({}, "NotRegistered")


# -- plain values: exactly what reads back --------------------------------------------------


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int


NOT_JSON = [
    ({"b": b"\x00\x01"}, r"\$\.b", "bytes"),
    ({"at": datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)}, r"\$\.at", "datetime"),
    ({"day": datetime.date(2024, 1, 1)}, r"\$\.day", "date"),
    ({"t": datetime.time(1, 2)}, r"\$\.t", "time"),
    ({"u": uuid.UUID(int=1)}, r"\$\.u", "UUID"),
    ({"d": decimal.Decimal("1.5")}, r"\$\.d", "Decimal"),
    ({"s": {1, 2}}, r"\$\.s", "set"),
    ({"f": frozenset()}, r"\$\.f", "frozenset"),
    ({"pair": (1, 2)}, r"\$\.pair", "tuple"),
    ({"c": Color.RED}, r"\$\.c", "Color"),
    ({"p": Point(1)}, r"\$\.p", "Point"),
    ({1: "int key"}, r"\$", "key 1"),
    ({"nested": [{"ok": 1}, {"deep": [b"x"]}]}, r"\$\.nested\[1\]\.deep\[0\]", "bytes"),
    ({"nan": float("nan")}, r"\$\.nan", "nan"),
    ({"inf": float("inf")}, r"\$\.inf", "inf"),
    ([b"top"], r"\$\[0\]", "bytes"),
    (b"top-level bytes", r"\$", "bytes"),
    (datetime.date(2024, 1, 1), r"\$", "date"),
]


@pytest.mark.parametrize(("value", "path", "kind"), NOT_JSON)
def test_plain_payloads_hold_only_json_values(value: object, path: str, kind: str) -> None:
    serializer = JsonSerializer()
    with pytest.raises(es.SerializationError, match=path) as info:
        serializer.serialize(value)
    assert kind in str(info.value)
    if isinstance(value, dict):
        with pytest.raises(es.SerializationError, match=path.replace(r"\$", r"metadata")):
            serializer.serialize_metadata(value)


def test_plain_json_values_round_trip_exactly() -> None:
    serializer = JsonSerializer()
    value = {
        "s": "zoë \x00 \\u0000",
        "i": -(2**70),
        "f": 2.5,
        "t": True,
        "n": None,
        "l": [1, [2, {"k": []}]],
        "o": {},
    }
    assert serializer.deserialize(serializer.serialize(value), "T") == value
    assert serializer.deserialize_metadata(serializer.serialize_metadata(value)) == value


def test_typed_fields_of_registered_classes_still_round_trip() -> None:
    serializer = JsonSerializer()
    serializer.register(Typed)
    value = Typed(
        blob=b"\x00\xffbytes",
        at=datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.UTC),
        day=datetime.date(2024, 5, 6),
        amount=decimal.Decimal("0.10"),
        ref=uuid.UUID(int=7),
        pair=(1, "a"),
        tags=frozenset({"x", "y"}),
    )
    payload = serializer.serialize(value)
    assert serializer.deserialize(payload, serializer.event_type_of(value)) == value


async def test_an_append_with_a_value_that_does_not_round_trip_writes_nothing(
    store: EventStore,
) -> None:
    with pytest.raises(es.SerializationError, match=r"\$\.blob"):
        await store.append_to_stream(
            "a",
            es.ANY_VERSION,
            [EventData({"ok": 1}, event_type="T"), EventData({"blob": b"x"}, event_type="T")],
        )
    with pytest.raises(es.SerializationError, match=r"metadata\.at"):
        await store.append_to_stream(
            "a",
            es.ANY_VERSION,
            [EventData({}, event_type="T", metadata={"at": datetime.datetime.now(datetime.UTC)})],
        )
    await assert_nothing_written(store, "a")


# -- what PostgreSQL refuses: NUL in jsonb --------------------------------------------------


async def test_nul_characters_are_refused_by_a_jsonb_store_before_any_io(
    config: EventStoreConfig,
) -> None:
    async with open_store(config, column_data_type="jsonb") as store:
        with pytest.raises(es.SerializationError, match=r"NUL.*jsonb") as info:
            await store.append_to_stream(
                "a", es.ANY_VERSION, [EventData({"s": "a\x00b"}, event_type="T")]
            )
        assert not isinstance(info.value, es.EventTooLargeError)
        with pytest.raises(es.SerializationError, match=r"metadata.*NUL"):
            await store.append_to_stream(
                "a", es.ANY_VERSION, [EventData({}, event_type="T", metadata={"k\x00": 1})]
            )
        with pytest.raises(es.SerializationError, match="NUL"):
            await store.record_snapshot(
                SnapshotData(source_uuid="a", source_version=1, data={"s": "\x00"}, source_type="T")
            )
        await assert_nothing_written(store, "a")
        # a backslash followed by "u0000" is no NUL
        text = {"s": "\\u0000 and \\\\u0000", "t": "\\"}
        await store.append_to_stream("b", es.ANY_VERSION, [EventData(text, event_type="T")])
        [event] = await store.read_stream_forward("b")
        assert event.data == text


async def test_a_bytea_store_keeps_nul_characters(store: EventStore) -> None:
    value = {"s": "a\x00b", "k\x00": "\x00"}
    await store.append_to_stream(
        "a", es.ANY_VERSION, [EventData(value, event_type="T", metadata=value)]
    )
    [event] = await store.read_stream_forward("a")
    assert (event.data, event.metadata) == (value, value)
    await store.record_snapshot(
        SnapshotData(source_uuid="a", source_version=1, data=value, source_type="T")
    )
    assert (await store.read_snapshot("a")).data == value


@pytest.mark.parametrize(
    ("escaped", "is_nul"),
    [
        (b'"\\u0000"', True),
        (b'"a\\\\u0000"', False),  # an escaped backslash, then "u0000"
        (b'"a\\\\\\u0000"', True),  # an escaped backslash, then the escape of NUL
        (b'{"\\u0000":1}', True),
        (b'"\\u00001"', True),
        (b'"\\u00010"', False),
        (b'"no escape"', False),
    ],
)
def test_the_nul_escape_is_found_exactly(escaped: bytes, is_nul: bool) -> None:
    from trio_eventstore._storage import EncodedEvent

    check = storable.check_storable
    payload = EncodedEvent(uuid.uuid4(), "T", None, None, escaped, b"null")
    if is_nul:
        with pytest.raises(es.SerializationError, match="NUL"):
            check([payload], "jsonb")
    else:
        check([payload], "jsonb")
    check([payload], "bytea")


# -- what PostgreSQL refuses: numbers beyond bigint -----------------------------------------


async def test_numbers_beyond_postgres_bigint_are_refused_before_any_io(store: EventStore) -> None:
    event = EventData({}, event_type="T")
    for bad in (2**63, 2**70):
        with pytest.raises(ValueError, match="expected_version"):
            await store.append_to_stream("a", bad, [event])
        with pytest.raises(ValueError, match="expected_version"):
            await store.link_to_stream("a", bad, [uuid.uuid4()])
        with pytest.raises(ValueError, match="expected_version"):
            await store.delete_stream("a", bad)
        for read in (store.read_stream_forward, store.read_stream_backward):
            with pytest.raises(ValueError, match="start_version"):
                await read("$all", bad)
            with pytest.raises(ValueError, match="count"):
                await read("$all", 0, bad)
        with pytest.raises(ValueError, match="page_size"):
            await store.paginate_streams(page_size=bad)
        with pytest.raises(ValueError, match="page_number"):
            await store.paginate_streams(page_number=bad)
        with pytest.raises(ValueError, match="read_batch_size"):
            await anext(aiter(store.stream_forward("$all", read_batch_size=bad)))
        with pytest.raises(ValueError, match="source_version"):
            SnapshotData(source_uuid="a", source_version=bad, data={})
        with pytest.raises(ValueError, match="max_size"):
            async with store.subscribe_to_all_streams("sub", max_size=bad):
                pass
    # the offset of a page must fit too
    with pytest.raises(ValueError, match="page"):
        await store.paginate_streams(page_size=2**40, page_number=2**40)
    # start_from=N reads from N + 1
    for start in (MAX_BIGINT, 2**63):
        with pytest.raises(es.InvalidStartFromError):
            async with store.subscribe_to_all_streams("sub", start_from=start):
                pass
    # the largest values are accepted
    assert await store.read_stream_forward("$all", MAX_BIGINT, MAX_BIGINT) == []
    with pytest.raises(es.WrongExpectedVersionError):
        await store.append_to_stream("a", MAX_BIGINT, [event])
    await assert_nothing_written(store, "a")


# -- what PostgreSQL refuses: text that is not valid UTF-8 ----------------------------------


def _is_plain_value_error(exc: BaseException) -> bool:
    return type(exc) is ValueError


async def test_text_that_cannot_be_stored_is_refused_before_any_io(store: EventStore) -> None:
    event = EventData({}, event_type="T")
    for bad in ("s\ud800", "\udfff"):
        with pytest.raises(ValueError, match="stream_uuid") as info:
            await store.append_to_stream(bad, es.ANY_VERSION, [event])
        assert _is_plain_value_error(info.value)
        with pytest.raises(ValueError, match="stream_uuid") as info:
            await store.read_stream_forward(bad)
        assert _is_plain_value_error(info.value)
        with pytest.raises(ValueError, match="subscription_name") as info:
            async with store.subscribe_to_all_streams(bad):
                pass
        assert _is_plain_value_error(info.value)
    for bad in ("T\ud800", "T\x00"):
        with pytest.raises(ValueError, match="event_type") as info:
            EventData({}, event_type=bad)
        assert _is_plain_value_error(info.value)
        with pytest.raises(ValueError, match="source_type"):
            SnapshotData(source_uuid="s", source_version=1, data={}, source_type=bad)
        with pytest.raises(ValueError, match="source_uuid"):
            SnapshotData(source_uuid=bad, source_version=1, data={})
        with pytest.raises(ValueError, match="search"):
            await store.paginate_streams(search=bad)
        with pytest.raises(ValueError, match="event_type"):
            JsonSerializer().register(Opened, event_type=bad)
    with pytest.raises(ValueError, match="schema") as info:
        EventStoreConfig(database="d", schema="s\ud800")
    assert _is_plain_value_error(info.value)
    with pytest.raises(es.SerializationError):
        await store.append_to_stream(
            "a", es.ANY_VERSION, [EventData({"s": "\ud800"}, event_type="T")]
        )
    await assert_nothing_written(store, "a")


# -- sizes ----------------------------------------------------------------------------------


def _incompressible(size: int) -> str:
    """A stream id of ``size`` bytes that PostgreSQL cannot compress into its index."""
    text = random.Random(size).choices(string.ascii_letters + string.digits, k=size)
    return "".join(text)


async def test_a_stream_id_too_long_for_postgres_index_is_refused_before_any_io(
    store: EventStore,
) -> None:
    """PostgreSQL indexes stream ids (`ix_streams_stream_uuid`) in entries of at most
    2704 bytes. A longer id that does not compress was refused by the server (a bare
    `DatabaseError`), failing with it every other append of its group-commit batch."""
    fits, too_long = _incompressible(2692), _incompressible(2693)
    outcomes: dict[str, object] = {}

    async def append(stream: str) -> None:
        try:
            events = [EventData({}, event_type="T")]
            outcomes[stream] = await store.append_to_stream(stream, es.ANY_VERSION, events)
        except Exception as exc:
            outcomes[stream] = exc

    others = [f"other-{n}" for n in range(8)]
    async with trio.open_nursery() as nursery:  # one group-commit batch
        for stream in (*others[:4], too_long, *others[4:]):
            nursery.start_soon(append, stream)
    assert [outcomes[stream] for stream in others] == [1] * 8
    refused = outcomes[too_long]
    assert isinstance(refused, ValueError), refused
    assert _is_plain_value_error(refused)
    assert "stream_uuid" in str(refused)
    assert "2692 bytes" in str(refused)
    big = [EventData({"n": n}, event_type="T") for n in range(150)]  # written alone
    (linked,) = await store.read_stream_forward(others[0])
    with pytest.raises(ValueError, match="stream_uuid"):
        await store.append_to_stream(too_long, es.ANY_VERSION, big)
    with pytest.raises(ValueError, match="stream_uuid"):
        await store.link_to_stream(too_long, es.ANY_VERSION, [linked])
    with pytest.raises(es.StreamNotFoundError):
        await store.stream_info(too_long)
    assert (await store.stream_info("$all")).stream_version == len(others)
    assert await store.append_to_stream(fits, es.NO_STREAM, [EventData({}, event_type="T")]) == 1
    assert (await store.stream_info(fits)).stream_uuid == fits


async def test_an_append_too_large_for_one_message_is_refused(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storable, "MAX_APPEND_BYTES", 10_000)
    big = EventData({"s": "x" * 6_000}, event_type="T")
    with pytest.raises(es.EventTooLargeError, match="append") as info:
        await store.append_to_stream("a", es.ANY_VERSION, [big, big])
    assert isinstance(info.value, es.SerializationError)
    assert not isinstance(info.value, es.StorageUnavailableError)
    with pytest.raises(es.EventTooLargeError):
        await store.append_to_stream(
            "a", es.ANY_VERSION, [EventData({"s": "x" * 11_000}, event_type="T")]
        )
    with pytest.raises(es.EventTooLargeError):
        await store.append_to_stream(
            "a", es.ANY_VERSION, [EventData({}, event_type="T", metadata={"s": "x" * 11_000})]
        )
    with pytest.raises(es.EventTooLargeError):
        await store.record_snapshot(
            SnapshotData(
                source_uuid="a", source_version=1, data={"s": "x" * 11_000}, source_type="T"
            )
        )
    await assert_nothing_written(store, "a")
    await store.append_to_stream("a", es.ANY_VERSION, [big])


async def test_a_jsonb_store_refuses_documents_over_the_jsonb_limit(
    config: EventStoreConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storable, "MAX_JSONB_BYTES", 1_000)
    async with open_store(config, column_data_type="jsonb") as store:
        with pytest.raises(es.EventTooLargeError, match="jsonb"):
            await store.append_to_stream(
                "a", es.ANY_VERSION, [EventData({"s": "x" * 1_000}, event_type="T")]
            )
        with pytest.raises(es.EventTooLargeError, match="metadata"):
            await store.append_to_stream(
                "a", es.ANY_VERSION, [EventData({}, event_type="T", metadata={"s": "x" * 1_000})]
            )
        with pytest.raises(es.EventTooLargeError):
            await store.record_snapshot(
                SnapshotData(
                    source_uuid="a", source_version=1, data={"s": "x" * 1_000}, source_type="T"
                )
            )
        await assert_nothing_written(store, "a")
        await store.append_to_stream(
            "a", es.ANY_VERSION, [EventData({"s": "x" * 900}, event_type="T")]
        )


async def test_the_jsonb_limit_is_postgres_own(config: EventStoreConfig) -> None:
    """A string Postgres would refuse (after receiving 256 MiB) is refused before sending."""
    async with open_store(config, column_data_type="jsonb") as store:
        with pytest.raises(es.EventTooLargeError):
            await store.append_to_stream(
                "a",
                es.ANY_VERSION,
                [EventData("x" * (storable.MAX_JSONB_BYTES + 1), event_type="T")],
            )
        await assert_nothing_written(store, "a")


def test_program_limits_the_server_reports_are_too_large_errors() -> None:
    from trio_eventstore import _appends

    error = es.DatabaseError("total size of jsonb array elements exceeds ...", sqlstate="54000")
    assert isinstance(_appends._translate_write_error(error, "s"), es.EventTooLargeError)


@attrs.frozen
class Counted:
    qty: int


@attrs.define(eq=False)
class NoEquality:
    qty: int


@attrs.frozen
class Flagged:
    on: bool
    price: float
    tags: list[int]


@pytest.mark.parametrize("strict", [False, True])
async def test_a_registered_class_with_a_field_of_another_type_is_refused(
    config: EventStoreConfig, strict: bool
) -> None:
    """cattrs writes a field whatever its value: ``qty="ten"`` in an ``int`` field would be
    stored and then fail every read of the stream and of $all; ``qty=1.7`` would read back
    as 1. Both are refused before any I/O; the stream stays readable."""
    serializer = JsonSerializer(strict=strict)
    serializer.register(Counted, event_type="Counted")
    serializer.register(NoEquality, event_type="NoEquality")
    async with open_store(config, serializer=serializer) as store:
        with pytest.raises(es.SerializationError, match=r"expected int @ \$\.qty"):
            await store.append_to_stream("o", es.ANY_VERSION, [EventData(Counted(qty="ten"))])  # type: ignore[arg-type]
        for wrong in (1.7, "12"):
            with pytest.raises(es.SerializationError, match="would read back as"):
                await store.append_to_stream("o", es.ANY_VERSION, [EventData(Counted(qty=wrong))])  # type: ignore[arg-type]
        await assert_nothing_written(store, "o")
        # A class without value equality is checked by reading it back only.
        await store.append_to_stream("o", es.ANY_VERSION, [EventData(NoEquality(qty=3))])
        await store.append_to_stream("o", es.ANY_VERSION, [EventData(Counted(qty=1))])
        events = await store.read_all_streams_forward()
        assert [e.data for e in events][1] == Counted(qty=1)


async def test_a_bool_must_read_back_as_a_bool(config: EventStoreConfig) -> None:
    """``True`` in an ``int`` field would read back as ``1`` (equal, so equality alone let
    it through), ``1`` in a ``bool`` field as ``True``: refused. An int in a ``float``
    field reads back as the float the field declares: taken."""
    serializer = JsonSerializer()
    serializer.register(Counted, event_type="Counted")
    serializer.register(Flagged, event_type="Flagged")
    async with open_store(config, serializer=serializer) as store:
        for wrong in (
            Counted(qty=True),
            Flagged(on=1, price=1.5, tags=[]),  # type: ignore[arg-type]
            Flagged(on=True, price=1.5, tags=[1, False]),
        ):
            with pytest.raises(es.SerializationError, match="would read back as"):
                await store.append_to_stream("b", es.ANY_VERSION, [EventData(wrong)])
        await assert_nothing_written(store, "b")
        await store.append_to_stream(
            "b", es.ANY_VERSION, [EventData(Flagged(on=False, price=2, tags=[0, 1]))]
        )
        (event,) = await store.read_stream_forward("b")
        assert event.data == Flagged(on=False, price=2.0, tags=[0, 1])
        assert type(event.data.on) is bool
        assert type(event.data.price) is float


class TextSerializer(JsonSerializer):
    """A user's serializer that breaks the protocol for some data: a str, not bytes."""

    def serialize(self, data: object) -> bytes:
        payload = super().serialize(data)
        return payload.decode() if data == {"text": True} else payload  # type: ignore[return-value]


@pytest.mark.xfail(
    strict=True,
    reason=(
        "a serializer's payload that is not bytes is not refused before I/O: its append "
        "is batched, the batch's Bind fails to encode (TypeError), and `_writer._write` "
        "fails every append of the batch with it"
    ),
)
async def test_a_payload_that_is_not_bytes_fails_its_own_append_only(
    initialized: EventStoreConfig,
) -> None:
    """``pool_size=1``: a lone append holds the only connection (a table lock holds it
    up) while two appends queue: one whose serializer returned a str, one good. The bad
    one fails with `SerializationError`; the good one, batched with it, is written."""
    from trio_eventstore._pg import open_connection

    config = initialized.with_changes(pool_size=1, serializer=TextSerializer())
    outcomes: dict[str, object] = {}
    async with open_event_store(config) as store, open_connection(config) as blocker:
        await blocker.execute("BEGIN")
        await blocker.execute(f'LOCK TABLE "{config.schema}".streams IN EXCLUSIVE MODE')

        async def append(stream: str, data: dict[str, bool]) -> None:
            try:
                await store.append_to_stream(
                    stream, es.ANY_VERSION, [EventData(data, event_type="T")]
                )
                outcomes[stream] = "written"
            except Exception as exc:
                outcomes[stream] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(append, "first", {})
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(append, "good", {})
            nursery.start_soon(append, "bad", {"text": True})
            await trio.testing.wait_all_tasks_blocked()
            await blocker.execute("ROLLBACK")
    assert isinstance(outcomes["bad"], es.SerializationError), outcomes
    assert outcomes["good"] == "written", outcomes
