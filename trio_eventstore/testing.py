"""Testing consumers of trio-eventstore (extra ``testing``: Hypothesis and pytest).

* Hypothesis strategies: `stream_ids`, `event_data`, `event_streams`, `interleavings`,
  `recorded_histories` and `redeliveries`.
* `check_redelivery`: run a consumer over a history delivered at-least-once (duplicates,
  redelivery after a crash before the ack) and assert the result equals one clean pass.
* `wait_caught_up`: wait (no sleeps, no polling) until a subscription has acknowledged
  everything its stream holds.

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
"""

from __future__ import annotations

import datetime
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import attrs
import trio
from hypothesis import strategies as st

from ._store import EventStore
from ._subscriptions import Subscription
from ._types import ALL_STREAMS, EventData, RecordedEvent

__all__ = [
    "Consumer",
    "Delivery",
    "RedeliveryError",
    "check_redelivery",
    "event_data",
    "event_streams",
    "interleavings",
    "recorded_histories",
    "redeliveries",
    "stream_ids",
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


def event_data(
    *event_classes: type, metadata: st.SearchStrategy[dict[str, Any]] | None = None
) -> st.SearchStrategy[EventData]:
    """`EventData` of instances of the given attrs classes or dataclasses, built from
    their fields (register them with your serializer to read them back as such)."""
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
    return st.builds(
        lambda data, metadata: EventData(data, metadata=metadata),
        st.one_of(*(st.from_type(cls) for cls in event_classes)),
        meta,
    )


def event_streams(
    *event_classes: type, min_size: int = 1, max_size: int = 10
) -> st.SearchStrategy[list[EventData]]:
    """One stream's events (a list of `EventData`)."""
    return st.lists(event_data(*event_classes), min_size=min_size, max_size=max_size)


def interleavings(
    *event_classes: type, streams: int = 3, max_events: int = 20
) -> st.SearchStrategy[list[tuple[str, EventData]]]:
    """Events of several streams in one commit order: (stream_id, event) pairs, each
    stream's events in their own order."""
    if streams < 1:
        raise ValueError("streams: must be >= 1")
    names = [f"stream-{i}" for i in range(streams)]
    return st.lists(
        st.tuples(st.sampled_from(names), event_data(*event_classes)), max_size=max_events
    )


def recorded_histories(
    *event_classes: type, streams: int = 3, max_events: int = 20
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

    return interleavings(*event_classes, streams=streams, max_events=max_events).map(record)


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
    """What `check_redelivery` runs: an object with a ``handle(event)`` method, sync or
    async. A crash builds a new consumer from the factory unless ``state_survives``."""

    def handle(self, event: RecordedEvent) -> Any: ...


class RedeliveryError(AssertionError):
    """The consumer's state after an at-least-once delivery differs from one clean pass."""


async def _call(handle: Callable[[RecordedEvent], Any], event: RecordedEvent) -> None:
    result = handle(event)
    if inspect.isawaitable(result):
        await result


def check_redelivery(
    factory: Callable[[], C],
    history: Sequence[RecordedEvent],
    schedule: Sequence[Delivery],
    *,
    state: Callable[[C], Any],
    state_survives: bool = True,
) -> None:
    """Assert that ``factory()``'s consumer reaches the same ``state(consumer)`` when the
    history is delivered at-least-once following ``schedule`` as after one clean pass.

    ``state_survives``: a crash keeps the consumer's state (a projection whose read
    model lives in a database); False: a crash rebuilds the consumer from ``factory``
    and the history is delivered again from the start (an in-memory projection).

    Raises:
        RedeliveryError: naming the first step after which the states differ.
    """
    clean = factory()

    async def clean_pass() -> None:
        for event in history:
            await _call(clean.handle, event)  # type: ignore[attr-defined]

    trio.run(clean_pass)
    expected = state(clean)
    log: list[str] = []

    async def at_least_once() -> C:
        consumer = factory()
        acked = 0
        for step in schedule:
            if acked >= len(history):
                break
            batch = history[acked : acked + step.count]
            for event in batch:
                await _call(consumer.handle, event)  # type: ignore[attr-defined]
            numbers = f"{batch[0].event_number}..{batch[-1].event_number}"
            if step.outcome == "ack":
                acked += len(batch)
                log.append(f"delivered {numbers}, acked")
            elif step.outcome == "duplicate":
                for event in batch:
                    await _call(consumer.handle, event)  # type: ignore[attr-defined]
                acked += len(batch)
                log.append(f"delivered {numbers} twice (a duplicate), acked")
            else:
                log.append(f"delivered {numbers}, crashed before the ack")
                if not state_survives:
                    consumer = factory()
                    acked = 0
                    log.append("consumer rebuilt; delivery restarts at the origin")
        for event in history[acked:]:
            await _call(consumer.handle, event)  # type: ignore[attr-defined]
        if acked < len(history):
            log.append(f"delivered the rest ({history[acked].event_number}..), acked")
        return consumer

    result = state(trio.run(at_least_once))
    if result != expected:
        steps = "\n  ".join(log) or "(no redelivery)"
        raise RedeliveryError(
            "the consumer is not idempotent under at-least-once delivery:\n  "
            f"{steps}\nclean pass: {expected!r}\nafter redelivery: {result!r}"
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
