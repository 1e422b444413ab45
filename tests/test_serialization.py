"""The JSON serializer, its registry, and plugging in another serializer."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Mapping
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import trio_eventstore as es
from trio_eventstore import (
    NO_STREAM,
    EventData,
    EventStoreConfig,
    JsonSerializer,
    admin,
    open_event_store,
)


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@attrs.frozen
class Inner:
    at: datetime.datetime
    amount: decimal.Decimal


@attrs.frozen
class Outer:
    id: uuid.UUID
    color: Color
    inner: Inner
    items: list[Inner]
    maybe: int | None = None
    tags: tuple[str, ...] = ()


@dataclasses.dataclass
class Plain:
    x: int
    y: str | None = None


def test_round_trip_of_rich_types() -> None:
    serializer = JsonSerializer()
    serializer.register(Outer)
    value = Outer(
        uuid.uuid4(),
        Color.BLUE,
        Inner(
            datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.UTC),
            decimal.Decimal("0.1000"),
        ),
        [Inner(datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC), decimal.Decimal("-3"))],
        tags=("a", "ü"),
    )
    payload = serializer.serialize(value)
    assert b'"blue"' in payload
    assert "ü".encode() in payload
    assert serializer.deserialize(payload, serializer.event_type_of(value)) == value


def test_a_decimal_nan_reads_back_as_nan() -> None:
    """A NaN is not equal to itself, so the check that a registered class's instance reads
    back as itself refused a ``Decimal('NaN')`` field ("would read back as" the same
    value); it is stored, and reads back as NaN (signalling NaN and infinities too)."""
    serializer = JsonSerializer()
    serializer.register(Inner)
    at = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    for text in ("NaN", "-NaN", "sNaN", "Infinity", "-Infinity"):
        value = Inner(at, decimal.Decimal(text))
        back = serializer.deserialize(serializer.serialize(value), serializer.event_type_of(value))
        assert isinstance(back, Inner)
        assert str(back.amount) == str(value.amount)
    serializer.register(Plain)
    with pytest.raises(es.SerializationError, match="would read back"):  # still checked
        serializer.serialize(Plain(x=True))


def test_a_value_that_reads_back_as_another_is_refused() -> None:
    """The NaN allowance (unequal, the same bytes) does not let a value through that
    reads back as a different one: 0.1, a float, in a Decimal field reads back as
    Decimal('0.1'), which is not 0.1. Values equal to what they read back as pass."""
    serializer = JsonSerializer()
    serializer.register(Inner)
    at = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    with pytest.raises(es.SerializationError, match=r"would read back as .*Decimal\('0.1'\)"):
        serializer.serialize(Inner(at, 0.1))  # type: ignore[arg-type]
    for amount in (5, 10.5, decimal.Decimal("0.1")):  # equal to their Decimal
        serializer.serialize(Inner(at, amount))  # type: ignore[arg-type]


def test_a_field_the_converter_cannot_encode_is_named() -> None:
    """Not the hook's own words ('str' object has no attribute 'isoformat', decimal's
    ConversionSyntax): the field, what it holds, and its declared type."""
    serializer = JsonSerializer()
    serializer.register(Inner)
    with pytest.raises(
        es.SerializationError,
        match=r"^cannot serialize Inner: field 'at' holds str 'yesterday', not datetime$",
    ):
        serializer.serialize(Inner("yesterday", decimal.Decimal(1)))  # type: ignore[arg-type]
    at = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    with pytest.raises(es.SerializationError, match=r"expected Decimal @ \$\.amount$") as info:
        serializer.serialize(Inner(at, "abc"))  # type: ignore[arg-type]
    assert "ConversionSyntax" not in str(info.value)


AT = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)


@attrs.frozen
class Stamp:
    at: datetime.datetime


@dataclasses.dataclass
class Stamps:
    first: Stamp
    many: list[Stamp]
    by_key: dict[str, list[Stamp]]
    pair: tuple[int, datetime.datetime] = (0, AT)
    maybe: list[Stamp] | None = None
    either: list[Stamp] | dict[str, Stamp] | None = None
    more: list[Stamps] = dataclasses.field(default_factory=list)


@pytest.mark.parametrize(
    ("wrong", "named"),
    [
        ({"first": Stamp("2020")}, "field 'first.at' holds str '2020', not datetime"),  # type: ignore[arg-type]
        ({"many": [Stamp(AT), Stamp(5)]}, "field 'many[1].at' holds int 5, not datetime"),  # type: ignore[arg-type]
        ({"by_key": {"k": [Stamp(None)]}}, "field \"by_key['k'][0].at\" holds NoneType None"),  # type: ignore[arg-type]
        ({"pair": (1, "noon")}, "field 'pair[1]' holds str 'noon', not datetime"),
        ({"maybe": [Stamp(AT), Stamp(7)]}, "field 'maybe[1].at' holds int 7, not datetime"),  # type: ignore[arg-type]
        # a union of two containers: which one was meant is not guessed
        ({"either": [Stamp(7)]}, "field 'either' holds list [Stamp(at=7)], not list[Stamp] |"),  # type: ignore[arg-type]
    ],
)
def test_a_value_at_fault_inside_nested_records_and_containers_is_named(
    wrong: dict[str, Any], named: str
) -> None:
    """Not the outer field ("field 'first' holds Stamp Stamp(at='2020'), not Stamp"): the
    innermost value the converter cannot encode, with its path."""
    serializer = JsonSerializer()
    serializer.register(Stamps, event_type="Stamps")
    fields: dict[str, Any] = {"first": Stamp(AT), "many": [], "by_key": {}, **wrong}
    with pytest.raises(es.SerializationError) as info:
        serializer.serialize(Stamps(**fields))
    assert named in str(info.value)


def test_a_record_that_holds_itself_is_named_as_a_cycle() -> None:
    serializer = JsonSerializer()
    serializer.register(Stamps, event_type="Stamps")
    looped = Stamps(Stamp(AT), [], {})
    looped.more.append(looped)
    with pytest.raises(
        es.SerializationError, match=r"field 'more\[0\]' holds a Stamps that holds it"
    ):
        serializer.serialize(looped)


async def test_a_registered_class_under_another_registered_name_is_refused(
    initialized: EventStoreConfig,
) -> None:
    """It would be stored, and read back as the other class (same fields): refused
    before anything is written. Its own name, or a plain value under either, is fine."""

    serializer = JsonSerializer()

    @serializer.register(event_type="Deposited")
    @attrs.frozen
    class Deposited:
        account_id: str
        amount: decimal.Decimal

    @serializer.register(event_type="Withdrawn")
    @attrs.frozen
    class Withdrawn:
        account_id: str
        amount: decimal.Decimal

    one = Deposited("a", decimal.Decimal(1))
    async with open_event_store(initialized.with_changes(serializer=serializer)) as store:
        with pytest.raises(es.SerializationError, match="would read back as a Withdrawn"):
            await store.append_to_stream("s", NO_STREAM, [EventData(one, event_type="Withdrawn")])
        assert await store.read_all_streams_forward() == []
        await store.append_to_stream("s", NO_STREAM, [EventData(one, event_type="Deposited")])
        plain = {"account_id": "a", "amount": "2"}
        await store.append_to_stream("s", 1, [EventData(plain, event_type="Withdrawn")])
        back = [e.data for e in await store.read_stream_forward("s")]
    assert back == [one, Withdrawn("a", decimal.Decimal(2))]


def test_event_type_names_and_registry_rules() -> None:
    serializer = JsonSerializer()
    assert serializer.register(Plain) is Plain
    assert serializer.event_type_of(Plain(1)) == f"{__name__}.Plain"

    @serializer.register(event_type="Elixir.App.Thing")
    @attrs.frozen
    class Thing:
        a: int

    assert serializer.event_type_of(Thing(1)) == "Elixir.App.Thing"
    assert serializer.event_class("Elixir.App.Thing") is Thing
    with pytest.raises(ValueError, match="already registered"):
        serializer.register(Plain, event_type="Elixir.App.Thing")
    with pytest.raises(TypeError, match="attrs class or a dataclass"):
        serializer.register(dict)
    with pytest.raises(es.SerializationError, match="event_type"):
        serializer.event_type_of({"plain": "json"})


@pytest.mark.parametrize("module", ["__main__", "__mp_main__"])
def test_a_class_of_a_script_needs_an_explicit_event_type(module: str) -> None:
    """``__main__.X`` is a name no other program (Python or Elixir) can read back."""

    @attrs.frozen
    class Deposited:
        amount: int

    @dataclasses.dataclass
    class Withdrawn:
        amount: int

    Deposited.__module__ = Withdrawn.__module__ = module
    serializer = JsonSerializer()
    with pytest.raises(ValueError, match=r"event_type=") as raised:
        serializer.register(Deposited)
    assert module in str(raised.value)
    with pytest.raises(ValueError, match=r"event_type="):
        serializer.register()(Withdrawn)
    assert serializer.event_class(f"{module}.{Deposited.__qualname__}") is None
    # Nor is an unregistered one named after the script when it is written.
    with pytest.raises(es.SerializationError, match=r"event_type="):
        serializer.event_type_of(Deposited(1))
    assert serializer.register(Deposited, event_type="Elixir.Bank.Deposited") is Deposited
    assert serializer.event_type_of(Deposited(1)) == "Elixir.Bank.Deposited"


def test_a_script_registering_without_an_event_type_stops_at_once() -> None:
    script = textwrap.dedent(
        """
        import attrs
        from trio_eventstore import JsonSerializer

        @JsonSerializer().register
        @attrs.frozen
        class Deposited:
            amount: int
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 1
    assert "ValueError" in result.stderr
    assert "event_type=" in result.stderr


def test_unknown_types_and_bad_data() -> None:
    lenient, strict = JsonSerializer(), JsonSerializer(strict=True)
    assert lenient.deserialize(b'{"a": [1, 2.5, null]}', "Nope") == {"a": [1, 2.5, None]}
    with pytest.raises(es.UnknownEventTypeError):
        strict.deserialize(b"{}", "Nope")
    lenient.register(Plain)
    # In words, where it failed (not "While structuring Plain (1 sub-exception)").
    with pytest.raises(
        es.SerializationError, match=r"does not fit .*: required field missing @ \$\.x$"
    ):
        lenient.deserialize(b'{"y": "no x"}', lenient.event_type_of(Plain(1)))
    with pytest.raises(
        es.SerializationError, match=r"would not read back: required field missing @ \$\.x$"
    ):
        lenient.check_readable({"y": "no x"}, lenient.event_type_of(Plain(1)))
    with pytest.raises(es.SerializationError, match="not JSON"):
        lenient.deserialize(b"{", "Nope")
    with pytest.raises(es.SerializationError):
        lenient.serialize({"nan": float("nan")})
    assert lenient.serialize_metadata(None) == b"null"
    assert lenient.deserialize_metadata(b"null") is None
    assert lenient.deserialize_metadata(None) is None


@attrs.frozen
class Typed:
    at: datetime.datetime
    color: Color
    inner: Inner
    pair: tuple[int, int] = (0, 0)


@attrs.frozen
class Timed:
    at: datetime.time


def _typed(**changes: Any) -> Typed:
    good = Typed(
        at=datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC),
        color=Color.RED,
        inner=Inner(datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC), decimal.Decimal(1)),
    )
    return attrs.evolve(good, **changes)


WRONG_FIELDS = [
    pytest.param({"at": "2024-01-02"}, id="str-in-datetime"),
    pytest.param({"color": "red"}, id="str-in-enum"),
    pytest.param({"inner": {"at": "2024-01-02", "amount": "1"}}, id="dict-in-class"),
    pytest.param({"pair": [1]}, id="short-list-in-tuple"),
]


@pytest.mark.parametrize("changes", WRONG_FIELDS)
async def test_a_wrong_field_value_is_a_serialization_error(
    config: EventStoreConfig, changes: dict[str, Any]
) -> None:
    """cattrs's hooks fail on a field of the wrong type with whatever the value raises
    (``AttributeError: 'str' object has no attribute 'isoformat'``, ``IndexError``): the
    append raises `SerializationError`, before any I/O, as for any other bad data."""
    serializer = JsonSerializer()
    serializer.register(Typed, event_type="Typed")
    with pytest.raises(es.SerializationError):
        serializer.serialize(_typed(**changes))
    store_config = config.with_changes(serializer=serializer)
    await admin.create(store_config)
    await admin.init(store_config)
    try:
        async with open_event_store(store_config) as store:
            with pytest.raises(es.SerializationError):
                await store.append_to_stream("w", es.ANY_VERSION, [EventData(_typed(**changes))])
            assert (await store.stream_info("$all")).stream_version == 0
    finally:
        await admin.drop(store_config)


def test_stored_data_its_class_cannot_read_is_a_serialization_error() -> None:
    """Data another program stored under a type registered to a class cattrs has no hook
    for (a ``datetime.time`` field) reads as `SerializationError`, not as cattrs's own
    error."""
    serializer = JsonSerializer()
    serializer.register(Timed, event_type="Timed")
    with pytest.raises(es.SerializationError, match="does not fit"):
        serializer.deserialize(b'{"at":"01:00:00"}', "Timed")


@attrs.frozen
class Keyed:
    pair: tuple[int, int] = (0, 0)
    flags: dict[int, bool] = attrs.field(factory=dict)
    counts: dict[int, int] = attrs.field(factory=dict)
    spans: tuple[tuple[int, bool], ...] = ()


@pytest.mark.parametrize(
    "wrong",
    [
        pytest.param(Keyed(pair=(True, 1)), id="bool-in-tuple"),
        pytest.param(Keyed(flags={1: 1}), id="int-in-bool-under-int-key"),  # type: ignore[dict-item]
        pytest.param(Keyed(counts={1: True}), id="bool-in-int-under-int-key"),
        pytest.param(Keyed(spans=((1, 1),)), id="int-in-bool-in-nested-tuple"),  # type: ignore[arg-type]
    ],
)
def test_a_bool_must_read_back_as_a_bool_in_tuples_and_under_keys_of_any_type(
    wrong: Keyed,
) -> None:
    """A bool where an int is declared reads back as ``1`` (and ``1`` where a bool is, as
    ``True``): refused wherever it is, also in a ``tuple`` field (which cattrs writes
    from a tuple) and in a dict with keys that JSON writes as strings."""
    serializer = JsonSerializer()
    serializer.register(Keyed, event_type="Keyed")
    with pytest.raises(es.SerializationError, match="would read back as"):
        serializer.serialize(wrong)
    right = Keyed(pair=(1, 2), flags={1: True, 2: False}, counts={3: 0}, spans=((4, True),))
    assert serializer.deserialize(serializer.serialize(right), "Keyed") == right


@attrs.frozen
class Measured:
    count: int = 0
    ratio: float = 0.0
    counts: dict[str, int] = attrs.field(factory=dict)


@pytest.mark.parametrize(
    "wrong",
    [
        pytest.param(Measured(count=5.0), id="float-in-int"),  # type: ignore[arg-type]
        pytest.param(Measured(count=1e20), id="big-float-in-int"),  # type: ignore[arg-type]
        pytest.param(Measured(counts={"a": 2.0}), id="float-in-int-under-a-key"),  # type: ignore[dict-item]
    ],
)
def test_a_float_in_an_int_field_is_refused(wrong: Measured) -> None:
    """``5.0`` in an ``int`` field read back as ``5``, another type (``True`` there was
    already refused); an int in a ``float`` field reads back as a float, which typing
    allows, and is taken."""
    serializer = JsonSerializer()
    serializer.register(Measured, event_type="Measured")
    with pytest.raises(es.SerializationError, match="would read back as"):
        serializer.serialize(wrong)
    right = Measured(count=5, ratio=2, counts={"a": 2})
    assert serializer.deserialize(serializer.serialize(right), "Measured") == right


@attrs.frozen
class Nested:
    value: Any


def test_nesting_too_deep_for_a_registered_class_is_a_serialization_error() -> None:
    """However deep, and wherever the stack's limit falls (a few frames more or less),
    serializing a registered class's instance either works or raises
    `SerializationError`, never the `RecursionError` of its read-back check."""
    serializer = JsonSerializer()
    serializer.register(Nested, event_type="Nested")

    def refused(depth: int, frames: int) -> bool:
        if frames:
            return refused(depth, frames - 1)
        value: list[Any] = []
        for _ in range(depth):
            value = [value]
        try:
            serializer.serialize(Nested(value))
        except es.SerializationError:
            return True
        return False

    for frames in range(8):
        depth = 1
        while not refused(depth, frames):
            depth += 1


class ReprSerializer:
    """A user's own format: not JSON at all (fine for a bytea store)."""

    def event_type_of(self, data: object) -> str:
        return type(data).__name__

    def serialize(self, data: object) -> bytes:
        return b"REPR:" + repr(data).encode()

    def deserialize(self, payload: bytes, event_type: str) -> object:
        return ("decoded", event_type, payload.decode())

    def serialize_metadata(self, metadata: Mapping[str, Any] | None) -> bytes:
        return b"null"

    def deserialize_metadata(self, payload: bytes | None) -> Mapping[str, Any] | None:
        return None


async def test_custom_serializer_plugs_in(config: EventStoreConfig) -> None:
    custom = config.with_changes(serializer=ReprSerializer())
    await admin.create(custom)
    await admin.init(custom)
    try:
        async with open_event_store(custom) as store:
            await store.append_to_stream("s", es.NO_STREAM, [EventData(42)])
            [event] = await store.read_stream_forward("s")
        assert event.data == ("decoded", "int", "REPR:42")
    finally:
        await admin.drop(custom)


def test_config_rejects_non_serializers() -> None:
    with pytest.raises(TypeError, match="serializer"):
        EventStoreConfig(database="d", serializer=object())  # type: ignore[arg-type]


async def test_jsonb_store_holds_queryable_json(config: EventStoreConfig) -> None:
    from trio_eventstore._pg import open_connection
    from trio_eventstore._sql import quote_ident

    jsonb = config.with_changes(column_data_type="jsonb")
    await admin.create(jsonb)
    await admin.init(jsonb)
    try:
        async with open_event_store(jsonb) as store:
            await store.append_to_stream(
                "s",
                es.NO_STREAM,
                [EventData({"amount": 7, "who": "zoë"}, event_type="T", metadata={"k": 1})],
            )
        async with open_connection(jsonb) as conn:
            row = await conn.fetch(
                f"SELECT data->>'who' AS who, (data->>'amount')::int AS amount, "
                f"metadata->'k' AS k FROM {quote_ident(jsonb.schema)}.events"
            )
        assert (row[0]["who"], row[0]["amount"], row[0]["k"]) == ("zoë", 7, "1")
    finally:
        await admin.drop(jsonb)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"a": 1}', {"a": 1}),
        (b' {"padded": true} ', {"padded": True}),
        (b'{"big": 123456789012345678901234567890}', {"big": 123456789012345678901234567890}),
        (b'"\\u00fc"', "\u00fc"),
        (b"null", None),
    ],
)
def test_json_decoding_with_and_without_the_fast_extra(payload: bytes, expected: object) -> None:
    from trio_eventstore import _json

    assert _json._loads(payload) == expected
    assert _json._stdlib_loads(payload) == expected


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"])),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(_JSON)
def test_plain_values_encode_as_the_standard_library_does(value: object) -> None:
    """With the `fast` extra, plain values are encoded by orjson: the same JSON text as
    the standard library's (floats may be spelled otherwise, as the same number), and
    what orjson refuses (integers beyond 64 bits) goes to the standard library."""
    from trio_eventstore import _json

    fast = _json._dumps_plain(value)
    assert json.loads(fast) == json.loads(_json._dumps(value))
    if not any(isinstance(x, float) for x in _leaves(value)):
        assert fast == _json._dumps(value)


def _leaves(value: object) -> list[object]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    if isinstance(value, list):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def test_plain_values_orjson_refuses_are_encoded_or_refused_as_before() -> None:
    from trio_eventstore import _json

    deep: object = 1
    for _ in range(300):  # orjson stops at 254 levels
        deep = [deep]
    assert _json._dumps_plain(deep) == b"[" * 300 + b"1" + b"]" * 300
    assert _json._dumps_plain({"n": 2**70}) == b'{"n":1180591620717411303424}'
    surrogate = r"^\$\.s: a str holding a lone surrogate \('\\ud800'\), which UTF-8 cannot"
    with pytest.raises(es.SerializationError, match=surrogate):
        JsonSerializer().serialize({"s": "\ud800"})
    with pytest.raises(es.SerializationError, match=r"^metadata\.m\[1\]: an int too long"):
        JsonSerializer().serialize_metadata({"m": [1, 10**5000]})


def test_json_decoding_rejects_garbage() -> None:
    from trio_eventstore import _json

    for bad in (b"{", b'{"a": 1} x', b""):
        with pytest.raises(ValueError, match=r"\w"):  # json's or orjson's own message
            _json._loads(bad)


def test_a_page_decodes_as_each_payload_alone() -> None:
    """`deserialize_many` (one pass for a read page) equals `deserialize` of each, also
    when one payload holds a number beyond 64 bits, NaN, or is not JSON at all."""
    serializer = JsonSerializer()
    plain = [b'{"a": 1}', b"[1, 2.5]", b'"\\u00fc"', b"null"]
    pages = [
        plain,
        [*plain, b'{"big": 123456789012345678901234567890}'],
        [b"12345678901234567890", b"-9223372036854775809", b"1e5"],
        [*plain, b'{"x": NaN}'],
    ]
    for page in pages:
        types = ["T"] * len(page)
        expected = [serializer.deserialize(p, "T") for p in page]
        got = serializer.deserialize_many(page, types)
        assert repr(got) == repr(expected)  # NaN != NaN, but reprs match
        assert [type(v) for v in got] == [type(v) for v in expected]
    with pytest.raises(es.SerializationError, match="is not JSON"):
        serializer.deserialize_many([b'{"a": 1}', b"{"], ["T", "T"])
    metadata = [None, b"null", b'{"k": 1}', b'{"big": 123456789012345678901234567890}']
    assert serializer.deserialize_metadata_many(metadata) == [
        serializer.deserialize_metadata(m) for m in metadata
    ]
    assert serializer.deserialize_metadata_many([b"7", None]) == [{"value": 7}, None]
