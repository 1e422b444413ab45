"""Testing consumers of trio-eventstore (extra ``testing``: Hypothesis and pytest).

* Hypothesis strategies: `stream_ids`, `event_data`, `event_streams`, `interleavings`,
  `recorded_histories`, `redeliveries` and `money_decimals` (what ``Decimal`` fields get by
  default: finite, two places; pass ``decimals=st.decimals()`` for NaN and infinities).
* `check_redelivery_async` (in an async test) and `check_redelivery` (in a sync one): run a
  consumer over a history delivered at-least-once (duplicates, redelivery after a crash
  before the ack) and assert the result equals one clean pass.
* `open_fresh_event_store`: a store on a new schema, dropped on exit (one per Hypothesis
  example; the pytest fixture ``fresh_event_store`` makes them in the test database).
* `wait_caught_up`: wait (no sleeps, no polling) until a subscription has acknowledged
  everything its stream holds.
* `temporary_postgres`: a throwaway PostgreSQL server for tests and demos.

The pytest fixtures (a throwaway Postgres, a fresh store per test) are in
`trio_eventstore.pytest_plugin`, registered with pytest when the package is installed.

A complete example test::

    import attrs
    from hypothesis import given
    from trio_eventstore import JsonSerializer
    from trio_eventstore.testing import check_redelivery, recorded_histories, redeliveries

    serializer = JsonSerializer()

    @serializer.register
    @attrs.frozen
    class Deposited:
        account_id: str
        amount: int

    class Balances:                       # the consumer under test
        def __init__(self):
            self.balances = {}
            self.seen = set()
        async def handle(self, event):
            if event.event_id in self.seen:   # remove this line and the test fails
                return
            self.seen.add(event.event_id)
            d = event.data
            self.balances[d.account_id] = self.balances.get(d.account_id, 0) + d.amount

    @given(history=recorded_histories(Deposited), schedule=redeliveries())
    def test_balances_survive_redelivery(history, schedule):
        check_redelivery(Balances, history, schedule, state=lambda p: p.balances)

A consumer whose read model lives in a database is checked from an async test, against a
fresh store per example (``factory`` and ``state`` may be async)::

    @given(history=recorded_histories(Deposited), schedule=redeliveries())
    async def test_projection_survives_redelivery(fresh_event_store, history, schedule):
        async with fresh_event_store() as store:
            await check_redelivery_async(
                lambda: Projection(store, prefix=uuid.uuid4().hex),  # a read model per pass
                history, schedule, state=Projection.read_balances,
            )
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import attrs
import trio

try:
    from hypothesis import strategies as st
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the installation
    raise ModuleNotFoundError(
        f"trio_eventstore.testing needs the testing extra ({exc.name} is missing): "
        "pip install 'trio-eventstore[testing]'",
        name=exc.name,
    ) from exc

from ._store import EventStore
from ._subscriptions import Subscription
from ._tempcluster import PostgresNotFoundError
from ._throwaway import open_fresh_event_store, temporary_postgres
from ._types import ALL_STREAMS, EventData, RecordedEvent

__all__ = [
    "Consumer",
    "Delivery",
    "PostgresNotFoundError",
    "RedeliveryError",
    "check_redelivery",
    "check_redelivery_async",
    "event_data",
    "event_streams",
    "interleavings",
    "money_decimals",
    "open_fresh_event_store",
    "recorded_histories",
    "redeliveries",
    "stream_ids",
    "temporary_postgres",
    "wait_caught_up",
]

C = TypeVar("C")


# -- strategies -------------------------------------------------------------------------------


def stream_ids(*, prefix: str = "", max_size: int = 40) -> st.SearchStrategy[str]:
    """Valid stream ids: non-empty, no NUL, never ``"$all"``; commas and any unicode
    included (stream ids travel in NOTIFY payloads)."""
    if max_size < 1:
        raise ValueError("max_size: must be >= 1")
    body = st.text(
        alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
        min_size=1,
        max_size=max_size,
    )
    return body.map(lambda s: prefix + s).filter(lambda s: s != ALL_STREAMS)


def money_decimals(
    *, places: int = 2, max_value: decimal.Decimal | int = 10**12
) -> st.SearchStrategy[decimal.Decimal]:
    """Finite decimals with exactly ``places`` decimal places, at most ``max_value`` in
    absolute value: amounts of money (what ``Decimal`` fields get by default)."""
    if isinstance(places, bool) or not isinstance(places, int) or places < 0:
        raise ValueError(f"places: expected an int >= 0, got {places!r}")
    return st.decimals(
        min_value=-max_value,
        max_value=max_value,
        places=places,
        allow_nan=False,
        allow_infinity=False,
    )


#: What the store cannot hold of what Hypothesis makes for these types by default
#: (NaN, infinities: JSON has no such numbers), so fields of them get a strategy of
#: ours: ``decimals`` (`event_data`), or finite floats.
_OURS = (decimal.Decimal, float)
_FINITE_FLOATS = st.floats(allow_nan=False, allow_infinity=False)


def _mentions(tp: object) -> bool:
    """Whether ``tp`` is, or holds (in fields, lists, optionals...), one of `_OURS`."""
    if any(tp is ours for ours in _OURS):
        return True
    supertype = getattr(tp, "__supertype__", None)  # a NewType
    if supertype is not None:
        return _mentions(supertype)
    if isinstance(tp, type) and _is_record(tp):
        hints = _hints(tp)
        return hints is not None and any(_mentions(h) for h in hints.values())
    return any(_mentions(arg) for arg in typing.get_args(tp))


def _is_record(cls: type) -> bool:
    return attrs.has(cls) or dataclasses.is_dataclass(cls)


def _hints(cls: type) -> dict[str, Any] | None:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # annotations that cannot be resolved here: Hypothesis infers them
        return None


def _strategy_for(tp: Any, decimals: st.SearchStrategy[decimal.Decimal]) -> st.SearchStrategy[Any]:
    """Hypothesis' strategy for ``tp``, with ``decimals`` for every Decimal in it and
    finite floats for every float."""
    if tp is decimal.Decimal:
        return decimals
    if tp is float:
        return _FINITE_FLOATS
    if not _mentions(tp):
        return st.from_type(tp)
    supertype = getattr(tp, "__supertype__", None)  # a NewType: its values are the type's
    if supertype is not None:
        return _strategy_for(supertype, decimals)
    if isinstance(tp, type) and _is_record(tp):
        return _records(tp, decimals)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    inner = [_strategy_for(arg, decimals) for arg in args if arg is not Ellipsis]
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*inner)
    if origin in (list, Sequence, typing.Sequence):
        return st.lists(inner[0], max_size=5)
    if origin in (set, frozenset):
        return st.sets(inner[0], max_size=5).map(origin)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(inner[0], max_size=5).map(tuple)
        return st.tuples(*inner)
    if origin in (dict, Mapping, typing.Mapping):
        return st.dictionaries(inner[0], inner[1], max_size=5)
    return st.from_type(tp)


def _records(cls: type, decimals: st.SearchStrategy[decimal.Decimal]) -> st.SearchStrategy[Any]:
    """Instances of an attrs class or dataclass, with ``decimals`` for its Decimals and
    finite floats for its floats."""
    hints = _hints(cls)
    if hints is None or not _mentions(cls):
        return st.from_type(cls)
    if attrs.has(cls):
        names = [a.alias or a.name for a in attrs.fields(cls) if a.init]
        types_of = {a.alias or a.name: hints.get(a.name) for a in attrs.fields(cls) if a.init}
    else:
        fields = [f for f in dataclasses.fields(cls) if f.init]
        names = [f.name for f in fields]
        types_of = {f.name: hints.get(f.name) for f in fields}
    overrides = {
        name: _strategy_for(types_of[name], decimals)
        for name in names
        if types_of[name] is not None and _mentions(types_of[name])
    }
    return st.builds(cls, **overrides)


def event_data(
    *event_classes: type,
    metadata: st.SearchStrategy[dict[str, Any]] | None = None,
    decimals: st.SearchStrategy[decimal.Decimal] | None = None,
) -> st.SearchStrategy[EventData]:
    """`EventData` of instances of the given attrs classes or dataclasses, built from
    their fields (register them with your serializer to read them back as such).

    ``decimals``: what ``Decimal`` fields (also inside lists, optionals, nested classes)
    get; default `money_decimals()` (finite, two places). ``st.decimals()`` adds NaN,
    sNaN and infinities."""
    if not event_classes:
        raise ValueError("event_data: give at least one event class")
    for cls in event_classes:
        if not (attrs.has(cls) or hasattr(cls, "__dataclass_fields__")):
            raise TypeError(f"event_data: {cls!r} is not an attrs class or a dataclass")
    meta = (
        metadata
        if metadata is not None
        else st.none()
        | st.fixed_dictionaries(
            {}, optional={"user": st.text(max_size=10), "source": st.just("test")}
        )
    )
    money = money_decimals() if decimals is None else decimals
    return st.builds(
        lambda data, metadata: EventData(data, metadata=metadata),
        st.one_of(*(_records(cls, money) for cls in event_classes)),
        meta,
    )


def event_streams(
    *event_classes: type,
    min_size: int = 1,
    max_size: int = 10,
    decimals: st.SearchStrategy[decimal.Decimal] | None = None,
) -> st.SearchStrategy[list[EventData]]:
    """One stream's events (a list of `EventData`)."""
    return st.lists(
        event_data(*event_classes, decimals=decimals), min_size=min_size, max_size=max_size
    )


def interleavings(
    *event_classes: type,
    streams: int = 3,
    max_events: int = 20,
    decimals: st.SearchStrategy[decimal.Decimal] | None = None,
) -> st.SearchStrategy[list[tuple[str, EventData]]]:
    """Events of several streams in one commit order: (stream_id, event) pairs, each
    stream's events in their own order."""
    if streams < 1:
        raise ValueError("streams: must be >= 1")
    names = [f"stream-{i}" for i in range(streams)]
    return st.lists(
        st.tuples(st.sampled_from(names), event_data(*event_classes, decimals=decimals)),
        max_size=max_events,
    )


def recorded_histories(
    *event_classes: type,
    streams: int = 3,
    max_events: int = 20,
    decimals: st.SearchStrategy[decimal.Decimal] | None = None,
) -> st.SearchStrategy[list[RecordedEvent]]:
    """A `$all` history as a subscription delivers it: `RecordedEvent`s numbered 1..N,
    with per-stream versions, built in memory (no database)."""

    def record(pairs: list[tuple[str, EventData]]) -> list[RecordedEvent]:
        versions: dict[str, int] = {}
        at = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
        history = []
        for number, (stream, event) in enumerate(pairs, start=1):
            versions[stream] = versions.get(stream, 0) + 1
            history.append(
                RecordedEvent(
                    event_number=number,
                    event_id=event.event_id,
                    stream_uuid=stream,
                    stream_version=versions[stream],
                    event_type=event.event_type or type(event.data).__qualname__,
                    data=event.data,
                    metadata=event.metadata,
                    causation_id=event.causation_id,
                    correlation_id=event.correlation_id,
                    created_at=at + datetime.timedelta(milliseconds=number),
                )
            )
        return history

    return interleavings(
        *event_classes, streams=streams, max_events=max_events, decimals=decimals
    ).map(record)


@attrs.frozen
class Delivery:
    """One step of an at-least-once delivery: hand ``count`` events to the consumer
    from the current position, then either ack them, or crash before the ack (the next
    session starts again after the last ack), or deliver them again (a duplicate)."""

    count: int
    outcome: str  # "ack" | "crash" | "duplicate"

    def __str__(self) -> str:
        return f"{self.count} event(s) then {self.outcome}"


def redeliveries(*, max_steps: int = 12) -> st.SearchStrategy[list[Delivery]]:
    """Schedules of at-least-once delivery (the history is always delivered in full at
    the end, as a real subscription would)."""
    return st.lists(
        st.builds(Delivery, st.integers(1, 5), st.sampled_from(["ack", "crash", "duplicate"])),
        max_size=max_steps,
    )


# -- the redelivery check ---------------------------------------------------------------------


class Consumer(Protocol):
    """What the redelivery check runs: an object with a ``handle(event)`` method, sync
    or async. A crash builds a new consumer from the factory unless ``state_survives``."""

    def handle(self, event: RecordedEvent) -> Any: ...


class RedeliveryError(AssertionError):
    """The consumer's state after an at-least-once delivery differs from one clean pass."""


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def check_redelivery_async(
    factory: Callable[[], Any],
    history: Sequence[RecordedEvent],
    schedule: Sequence[Delivery],
    *,
    state: Callable[[Any], Any],
    state_survives: bool = True,
) -> None:
    """Assert that ``factory()``'s consumer reaches the same ``state(consumer)`` when the
    history is delivered at-least-once following ``schedule`` as after one clean pass.
    For async tests: the consumer may use the test's store or database.

    ``factory()`` makes a consumer (it may be async), once for the clean pass and once
    for the at-least-once pass: give each its own read model (a fresh table, a key
    prefix). ``state(consumer)`` reads what the consumer built (it may be async, e.g.
    query the read model). ``state_survives``: a crash keeps the consumer and its state (a
    projection whose read model lives in a database); False: a crash rebuilds the
    consumer from ``factory`` and the history is delivered again from the start (an
    in-memory projection).

    Raises:
        RedeliveryError: naming the steps of the delivery that broke it.
    """
    if not isinstance(state_survives, bool):
        raise TypeError(f"state_survives: expected a bool, got {type(state_survives).__name__}")
    clean = await _maybe_await(factory())
    for event in history:
        await _maybe_await(clean.handle(event))
    expected = await _maybe_await(state(clean))
    log: list[str] = []
    consumer = await _maybe_await(factory())
    acked = 0
    for step in schedule:
        if acked >= len(history):
            break
        batch = history[acked : acked + step.count]
        for event in batch:
            await _maybe_await(consumer.handle(event))
        numbers = f"{batch[0].event_number}..{batch[-1].event_number}"
        if step.outcome == "ack":
            acked += len(batch)
            log.append(f"delivered {numbers}, acked")
        elif step.outcome == "duplicate":
            for event in batch:
                await _maybe_await(consumer.handle(event))
            acked += len(batch)
            log.append(f"delivered {numbers} twice (a duplicate), acked")
        else:
            log.append(f"delivered {numbers}, crashed before the ack")
            if not state_survives:
                consumer = await _maybe_await(factory())
                acked = 0
                log.append("consumer rebuilt; delivery restarts at the origin")
    for event in history[acked:]:
        await _maybe_await(consumer.handle(event))
    if acked < len(history):
        log.append(f"delivered the rest ({history[acked].event_number}..), acked")
    result = await _maybe_await(state(consumer))
    if result != expected:
        steps = "\n  ".join(log) or "(no redelivery)"
        raise RedeliveryError(
            "the consumer is not idempotent under at-least-once delivery:\n  "
            f"{steps}\nclean pass: {expected!r}\nafter redelivery: {result!r}"
        )


def check_redelivery(
    factory: Callable[[], C],
    history: Sequence[RecordedEvent],
    schedule: Sequence[Delivery],
    *,
    state: Callable[[C], Any],
    state_survives: bool = True,
) -> None:
    """`check_redelivery_async` for a sync test (it runs its own Trio loop): for a
    consumer that needs nothing from the test's own loop (an in-memory projection).

    Raises:
        RedeliveryError: naming the steps of the delivery that broke it.
        RuntimeError: called inside a Trio run (an async test): await
            `check_redelivery_async` there.
    """
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "check_redelivery: called inside a Trio run (an async test); "
            "use `await check_redelivery_async(...)` there"
        )
    trio.run(
        functools.partial(
            check_redelivery_async,
            factory,
            history,
            schedule,
            state=state,
            state_survives=state_survives,
        )
    )


# -- waiting for a subscription ------------------------------------------------------------------


async def wait_caught_up(store: EventStore, subscription: Subscription) -> None:
    """Wait until ``subscription`` has acknowledged everything its stream holds now.

    No sleeps, no polling: it waits on the subscription's own acknowledgements.
    """
    stream = subscription._driver.stream_uuid
    try:
        head = (await store.stream_info(stream)).stream_version
    except LookupError:
        return
    await subscription.wait_acked(head)
