"""The write path's invariants under concurrency, on a real PostgreSQL.

Several stores open on one schema, several Trio tasks per store, appending to a few
streams with every kind of expected version (ints near the stream's version, from what
the tasks last saw or from a fresh `stream_info`), event ids reused across appends and
streams (and within one append), and appends cancelled by short deadlines (0 included).
A reader per store tails ``$all`` meanwhile and records every page it reads. Then every
store is closed and a fresh one reads everything back.

Checked, against what each append was told and what the readers saw:

1. ``$all`` is dense (1..N) and in commit order: every page a reader saw is contiguous
   and equals that slice of the final ``$all`` (no gap was ever seen that was later
   filled); a read that starts after an event was seen, or after its append returned,
   sees it; an append that returned before another began comes first in ``$all``.
2. Each stream's versions are dense (1..v), `stream_info` agrees, and each of its rows
   matches the event's ``$all`` entry; ``$all`` holds each stream in stream order.
3. At most one append succeeds per (stream, int expected version), and at most one
   ``NO_STREAM`` append per stream.
4. An append reported successful is there after the restart, where its expected version
   said, ending at the version it returned.
5. An append reported failed wrote nothing, and its error is a domain error that the
   store's state can justify (a ``DuplicateEventError`` needs an id stored by another
   append; a version error needs a moment when the stream was not as expected).
6. A cancelled append is all there or not there at all.
7. An append's events are consecutive in their stream and in ``$all``, in order.

Every event's data names the append attempt and index that wrote it, so each stored row
is attributed to exactly one attempt, whatever ids were reused.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import random
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence

import attrs
import pytest
import trio
from hypothesis import event as statistic
from hypothesis import given, settings
from hypothesis import strategies as st

import trio_eventstore as es
from trio_eventstore import (
    ANY_VERSION,
    NO_STREAM,
    STREAM_EXISTS,
    EventData,
    EventStore,
    EventStoreConfig,
    ExpectedVersion,
    RecordedEvent,
    admin,
    open_event_store,
)

STREAMS = ("w0", "w1", "w2")
SHARED_IDS = 3  # ids that appends of one example race to write first
CANCEL_AFTER = (0.0, 0.0002, 0.001, 0.003, 0.01)

GROUP_COMMIT = (
    [
        pytest.param(True, id="group-commit"),
        pytest.param(False, id="no-group-commit"),
        # The stores of an example alternate: replica_appends, then without it.
        pytest.param("replica", id="replica-appends-and-not"),
    ]
    if "group_commit" in attrs.fields_dict(EventStoreConfig)
    else [pytest.param(None, id="default")]
)

# The profile's budget of examples, shared by the group-commit variants.
EXAMPLES = max(10, settings().max_examples // len(GROUP_COMMIT))

# -- programs --------------------------------------------------------------------------------


@attrs.frozen
class Expect:
    """How an append picks its expected version: a marker, or (``marker`` None) an int:
    the stream's version plus ``offset``, from `stream_info` when ``read`` (else from the
    newest version any task has been told)."""

    marker: ExpectedVersion | None
    offset: int = 0
    read: bool = False


@attrs.frozen
class Reuse:
    """An id taken from elsewhere: ``shared`` (an id of the example's pool, which
    several appends may race to write), ``earlier`` (an id any earlier attempt used,
    whether it succeeded or not), ``self`` (an id this append already has)."""

    source: str
    index: int


@attrs.frozen
class Op:
    stream: str
    expect: Expect
    count: int
    reuse: Reuse | None
    cancel_after: float | None  # a trio.move_on_after around the append
    pause: float  # a sleep before it


@attrs.frozen
class Program:
    stores: tuple[tuple[tuple[Op, ...], ...], ...]  # per store, per task: its appends
    page_sizes: tuple[int, ...]  # per store: its $all reader's page size


expects = st.one_of(
    st.sampled_from([ANY_VERSION, NO_STREAM, STREAM_EXISTS]).map(Expect),
    st.builds(
        Expect,
        st.none(),
        st.sampled_from([0, 0, 0, -1, 1, 2]),
        st.booleans(),
    ),
)
reuses = st.one_of(
    st.none(),
    st.none(),
    st.builds(Reuse, st.sampled_from(["shared", "earlier", "self"]), st.integers(0, 50)),
)
ops = st.builds(
    Op,
    st.sampled_from(STREAMS),
    expects,
    st.integers(1, 3),
    reuses,
    st.one_of(st.none(), st.none(), st.sampled_from(CANCEL_AFTER)),
    st.sampled_from([0.0, 0.0, 0.0, 0.001, 0.003]),
)
store_tasks = st.lists(st.lists(ops, min_size=1, max_size=5).map(tuple), min_size=1, max_size=4)
programs = st.integers(2, 3).flatmap(
    lambda n: st.builds(
        Program,
        st.lists(store_tasks.map(tuple), min_size=n, max_size=n).map(tuple),
        st.lists(st.integers(1, 7), min_size=n, max_size=n).map(tuple),
    )
)

# -- running ---------------------------------------------------------------------------------

CANCELLED = "cancelled"


@attrs.define
class Attempt:
    """One call of append_to_stream and what it was told."""

    number: int
    store: int
    op: Op
    expected: ExpectedVersion | int
    ids: list[uuid.UUID]
    intra_duplicate: bool
    started: int  # positions in the run's order of starts and ends (one Trio thread)
    ended: int = -1
    outcome: int | BaseException | str | None = None  # new version, error, or CANCELLED

    @property
    def succeeded(self) -> bool:
        return isinstance(self.outcome, int)

    def __repr__(self) -> str:
        return (
            f"<attempt {self.number} store {self.store} {self.op.stream!r} "
            f"expected={self.expected!r} n={len(self.ids)} reuse={self.op.reuse} "
            f"cancel_after={self.op.cancel_after} -> {self.outcome!r} "
            f"[{self.started}..{self.ended}]>"
        )


@attrs.frozen
class PageRead:
    """One read_all_streams_forward(start, count) of a tailing reader."""

    reader: int
    start: int
    count: int
    started: int
    ended: int
    events: tuple[tuple[int, uuid.UUID, str, int], ...]  # (number, id, stream, version)


@attrs.define
class Run:
    attempts: list[Attempt] = attrs.Factory(list)
    pages: list[PageRead] = attrs.Factory(list)
    used_ids: list[uuid.UUID] = attrs.Factory(list)
    shared_ids: list[uuid.UUID] = attrs.Factory(lambda: [uuid.uuid4() for _ in range(SHARED_IDS)])
    latest: dict[str, int] = attrs.Factory(dict)  # newest version an append returned
    clock: Iterator[int] = attrs.Factory(lambda: itertools.count(1))

    def tick(self) -> int:
        return next(self.clock)


async def resolve_expected(store: EventStore, run: Run, op: Op) -> ExpectedVersion | int:
    if op.expect.marker is not None:
        return op.expect.marker
    if op.expect.read:
        try:
            base = (await store.stream_info(op.stream)).stream_version
        except es.StreamNotFoundError:
            base = 0
    else:
        base = run.latest.get(op.stream, 0)
    return max(0, base + op.expect.offset)


def choose_ids(run: Run, op: Op) -> tuple[list[uuid.UUID], bool]:
    ids = [uuid.uuid4() for _ in range(op.count)]
    reuse = op.reuse
    if reuse is None:
        return ids, False
    if reuse.source == "shared":
        ids[-1] = run.shared_ids[reuse.index % len(run.shared_ids)]
    elif reuse.source == "earlier" and run.used_ids:
        ids[-1] = run.used_ids[reuse.index % len(run.used_ids)]
    elif reuse.source == "self" and op.count > 1:
        ids[-1] = ids[reuse.index % (op.count - 1)]
        return ids, True
    return ids, False


async def writer(run: Run, store_index: int, store: EventStore, task_ops: Sequence[Op]) -> None:
    for op in task_ops:
        if op.pause:
            await trio.sleep(op.pause)
        expected = await resolve_expected(store, run, op)
        ids, intra = choose_ids(run, op)
        number = len(run.attempts)
        events = [
            EventData(
                {"w": number, "i": k},
                event_type="Written",
                metadata={"w": number},
                event_id=event_id,
            )
            for k, event_id in enumerate(ids)
        ]
        attempt = Attempt(number, store_index, op, expected, ids, intra, run.tick())
        run.attempts.append(attempt)
        run.used_ids.extend(ids)
        outcome: int | BaseException | str | None = None
        with trio.move_on_after(math.inf if op.cancel_after is None else op.cancel_after) as scope:
            try:
                outcome = await store.append_to_stream(op.stream, expected, events)
            except Exception as exc:  # the checker says which errors are allowed
                outcome = exc
        attempt.ended = run.tick()
        attempt.outcome = CANCELLED if scope.cancelled_caught else outcome
        if isinstance(outcome, int):
            run.latest[op.stream] = max(run.latest.get(op.stream, 0), outcome)
        await trio.lowlevel.checkpoint()


async def tail_reader(
    run: Run, reader: int, store: EventStore, page_size: int, rnd: random.Random, done: trio.Event
) -> None:
    """Tails $all, now and then re-reading from an earlier position."""
    seen = 0  # the highest event number this reader has seen
    while True:
        finished = done.is_set()
        rewind = seen > 0 and rnd.random() < 0.2
        start = rnd.randint(1, seen) if rewind else seen + 1
        started = run.tick()
        page = await store.read_all_streams_forward(start, page_size)
        run.pages.append(
            PageRead(
                reader,
                start,
                page_size,
                started,
                run.tick(),
                tuple((e.event_number, e.event_id, e.stream_uuid, e.stream_version) for e in page),
            )
        )
        if page:
            seen = max(seen, page[-1].event_number)
        elif finished and not rewind:
            return
        await trio.lowlevel.checkpoint()


@attrs.frozen
class Final:
    """What a fresh store reads after every writer's store was closed."""

    everything: list[RecordedEvent]
    streams: dict[str, tuple[int, list[RecordedEvent]] | None]  # (info version, rows)


async def read_back(config: EventStoreConfig) -> Final:
    async with open_event_store(config) as fresh:
        everything = await fresh.read_all_streams_forward(0, 1_000_000)
        streams: dict[str, tuple[int, list[RecordedEvent]] | None] = {}
        for stream in STREAMS:
            try:
                info = await fresh.stream_info(stream)
            except es.StreamNotFoundError:
                streams[stream] = None
                continue
            streams[stream] = (
                info.stream_version,
                await fresh.read_stream_forward(stream, 0, 1_000_000),
            )
    return Final(everything, streams)


async def run_program(
    config: EventStoreConfig, program: Program, rnd: random.Random, replica: bool = False
) -> None:
    await admin.reset(config)
    run = Run()
    async with contextlib.AsyncExitStack() as stack:
        stores = [
            await stack.enter_async_context(
                open_event_store(config.with_changes(replica_appends=replica and k % 2 == 0))
                if replica
                else open_event_store(config)
            )
            for k in range(len(program.stores))
        ]
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            for index, store in enumerate(stores):
                reader_rnd = random.Random(rnd.random())
                nursery.start_soon(
                    tail_reader, run, index, store, program.page_sizes[index], reader_rnd, done
                )
            async with trio.open_nursery() as writers:
                for index, tasks in enumerate(program.stores):
                    for task_ops in tasks:
                        writers.start_soon(writer, run, index, stores[index], task_ops)
            done.set()
    check(run, await read_back(config))


@pytest.mark.parametrize("group_commit", GROUP_COMMIT)
@settings(max_examples=EXAMPLES)
@given(program=programs, rnd=st.randoms(use_true_random=False))
def test_concurrent_appends_keep_the_write_invariants(
    store_config: EventStoreConfig,
    group_commit: bool | str | None,
    program: Program,
    rnd: random.Random,
) -> None:
    config = store_config
    if group_commit is not None:
        config = store_config.with_changes(group_commit=bool(group_commit))
    trio.run(run_program, config, program, rnd, group_commit == "replica")


# -- checking --------------------------------------------------------------------------------

VERSION_ERRORS: dict[type[BaseException], str] = {
    es.WrongExpectedVersionError: "int",
    es.StreamExistsError: "no_stream",
    es.StreamNotFoundError: "stream_exists",
}


def check(run: Run, final: Final) -> None:
    everything = final.everything
    check_all_stream(everything)
    check_streams(everything, final.streams)
    rows = attribute(run, everything)
    layout = check_appends(run, rows)
    check_errors(run, everything, rows, layout)
    check_winners(run, rows)
    check_pages(run, everything, rows)
    check_real_time_order(run, rows)
    for attempt in run.attempts:  # shown by pytest --hypothesis-show-statistics
        outcome = attempt.outcome
        if outcome == CANCELLED:
            statistic("cancelled, " + ("there" if rows.get(attempt.number) else "absent"))
        elif isinstance(outcome, BaseException):
            statistic(type(outcome).__name__)
        else:
            statistic("succeeded")


def check_all_stream(everything: list[RecordedEvent]) -> None:
    numbers = [e.event_number for e in everything]
    assert numbers == list(range(1, len(everything) + 1)), f"$all is not dense: {numbers}"
    assert len({e.event_id for e in everything}) == len(everything), "an event id twice in $all"


def check_streams(
    everything: list[RecordedEvent], streams: dict[str, tuple[int, list[RecordedEvent]] | None]
) -> None:
    by_id = {e.event_id: e for e in everything}
    for stream in STREAMS:
        own = [e for e in everything if e.stream_uuid == stream]
        read = streams[stream]
        if read is None:
            assert not own, f"{stream}: events in $all but no stream"
            continue
        version, rows = read
        assert own, f"{stream}: a stream (version {version}) without events"
        # $all holds the stream in stream order, and the stream is dense.
        assert [e.stream_version for e in own] == list(range(1, len(own) + 1)), (
            f"{stream}: $all order is not stream order, or versions are not dense: "
            f"{[(e.event_number, e.stream_version) for e in own]}"
        )
        assert version == len(own), f"{stream}: stream_info says {version}, has {len(own)}"
        assert [e.event_number for e in rows] == list(range(1, version + 1)), stream
        assert [e.event_id for e in rows] == [e.event_id for e in own], stream
        for row in rows:
            entry = by_id[row.event_id]
            assert (row.stream_uuid, row.stream_version) == (stream, row.event_number), row
            assert attrs.evolve(row, event_number=entry.event_number) == entry, (row, entry)


def attribute(run: Run, everything: list[RecordedEvent]) -> dict[int, list[RecordedEvent]]:
    """The stored events of each attempt (in $all order), from the data that names it."""
    rows: dict[int, list[RecordedEvent]] = defaultdict(list)
    for event in everything:
        data = event.data
        assert isinstance(data, dict), event
        attempt = run.attempts[data["w"]]
        assert event.event_id == attempt.ids[data["i"]], (event, attempt)
        assert event.stream_uuid == attempt.op.stream, (event, attempt)
        assert event.event_type == "Written", event
        assert event.metadata == {"w": attempt.number}, event
        rows[attempt.number].append(event)
    return rows


def check_appends(run: Run, rows: dict[int, list[RecordedEvent]]) -> dict[str, list[Attempt]]:
    """Each attempt is all there (consecutive, in order) or absent, as its outcome
    allows; returns the attempts that are there, per stream, in version order."""
    layout: dict[str, list[Attempt]] = defaultdict(list)
    for attempt in run.attempts:
        mine = rows.get(attempt.number, [])
        if attempt.succeeded:
            assert mine, f"reported successful, not there after a restart: {attempt}"
        elif attempt.outcome != CANCELLED:
            assert not mine, f"reported failed, wrote {len(mine)} event(s): {attempt}"
        if not mine:
            continue
        n = len(attempt.ids)
        assert [e.data["i"] for e in mine] == list(range(n)), (  # type: ignore[index]
            f"partly written or out of order: {attempt}: {[(e.event_number, e.data) for e in mine]}"
        )
        first = mine[0]
        assert [e.stream_version for e in mine] == list(
            range(first.stream_version, first.stream_version + n)
        ), f"not consecutive in its stream: {attempt}"
        assert [e.event_number for e in mine] == list(
            range(first.event_number, first.event_number + n)
        ), f"not consecutive in $all: {attempt}"
        last_version = mine[-1].stream_version
        if attempt.succeeded:
            assert attempt.outcome == last_version, f"returned version is not where: {attempt}"
        expected = attempt.expected
        where = f"not where its expected version says, at {first.stream_version}: {attempt}"
        if isinstance(expected, int):
            assert first.stream_version == expected + 1, where
        elif expected is NO_STREAM:
            assert first.stream_version == 1, where
        elif expected is STREAM_EXISTS:
            assert first.stream_version > 1, where
        layout[attempt.op.stream].append(attempt)
    for attempts in layout.values():
        attempts.sort(key=lambda a: rows[a.number][0].stream_version)
    return layout


def version_throughout(attempt: Attempt, writers: list[Attempt]) -> int | None:
    """The stream's version during the whole of ``attempt``, when that is certain:
    the write that reached it returned before the attempt began, and the next one
    began after it ended. (A cancelled write may commit any time after it began.)"""
    version = 0
    for k in range(len(writers) + 1):
        began_before = k == 0 or (
            writers[k - 1].succeeded and writers[k - 1].ended < attempt.started
        )
        ended_after = k == len(writers) or writers[k].started > attempt.ended
        if began_before and ended_after:
            return version
        if k < len(writers):
            version += len(writers[k].ids)
    return None


def check_errors(
    run: Run,
    everything: list[RecordedEvent],
    rows: dict[int, list[RecordedEvent]],
    layout: dict[str, list[Attempt]],
) -> None:
    """Every failure is a domain error that the store's history can justify."""
    writer_of = {e.event_id: e.data["w"] for e in everything}  # type: ignore[index]
    for attempt in run.attempts:
        error = attempt.outcome
        if not isinstance(error, BaseException):
            continue
        writers = layout.get(attempt.op.stream, [])
        expected = attempt.expected
        if isinstance(error, es.DuplicateEventError):
            stored_elsewhere = any(
                writer_of.get(i, attempt.number) != attempt.number for i in attempt.ids
            )
            assert attempt.intra_duplicate or stored_elsewhere, (
                f"DuplicateEventError, but no id of it is stored by another append: {attempt}"
            )
            continue
        if type(error) is ValueError:  # validation may refuse an id given twice
            assert attempt.intra_duplicate, attempt
            continue
        kind = VERSION_ERRORS.get(type(error))
        assert kind is not None, f"not a domain error of an append: {error!r}: {attempt}"
        if kind == "int":
            assert isinstance(expected, int), attempt
            assert version_throughout(attempt, writers) != expected, (
                f"wrong expected version, but the stream was at {expected} throughout: {attempt}"
            )
        elif kind == "no_stream":
            assert expected is NO_STREAM, attempt
            # (writers[0] created the stream: it can have committed only after it began)
            created = writers[0].started if writers else math.inf
            assert created < attempt.ended, (
                f"StreamExistsError, but the stream did not exist yet: {attempt}"
            )
        else:
            assert expected is STREAM_EXISTS, attempt
            assert not (writers and writers[0].succeeded and writers[0].ended < attempt.started), (
                f"StreamNotFoundError, but the stream existed before: {attempt}"
            )


def check_winners(run: Run, rows: dict[int, list[RecordedEvent]]) -> None:
    """Of the appends (successful or cancelled) that are there, at most one per
    (stream, int expected version), and one NO_STREAM per stream."""
    winners: dict[tuple[str, object], list[Attempt]] = defaultdict(list)
    for attempt in run.attempts:
        if rows.get(attempt.number) and (
            isinstance(attempt.expected, int) or attempt.expected is NO_STREAM
        ):
            winners[attempt.op.stream, attempt.expected].append(attempt)
    for key, attempts in winners.items():
        assert len(attempts) == 1, f"several winners for {key}: {attempts}"


def check_pages(
    run: Run, everything: list[RecordedEvent], rows: dict[int, list[RecordedEvent]]
) -> None:
    """What the tailing readers saw is the final $all, with no gap ever seen, and no
    read misses an event that was seen, or whose append had returned, before it began."""
    for page in run.pages:
        numbers = [n for n, _, _, _ in page.events]
        assert numbers == list(range(page.start, page.start + len(numbers))), (
            f"reader {page.reader} saw a gap: read from {page.start}: {numbers}"
        )
        for number, event_id, stream, version in page.events:
            assert number <= len(everything), f"reader {page.reader} saw #{number}, now gone"
            final = everything[number - 1]
            assert (final.event_id, final.stream_uuid, final.stream_version) == (
                event_id,
                stream,
                version,
            ), f"reader {page.reader} saw #{number} as {event_id} {stream}@{version}, now {final}"
    # (time, highest event number known to be committed by then)
    facts = [(p.ended, p.events[-1][0]) for p in run.pages if p.events]
    facts += [(a.ended, rows[a.number][-1].event_number) for a in run.attempts if a.succeeded]
    facts.sort()
    times = [t for t, _ in facts]
    highest = list(itertools.accumulate((n for _, n in facts), max))
    for page in run.pages:
        known = bisect.bisect_left(times, page.started)
        if not known:
            continue
        must_reach = min(highest[known - 1], page.start + page.count - 1)
        reached = page.events[-1][0] if page.events else page.start - 1
        assert reached >= must_reach, (
            f"reader {page.reader} read from {page.start} up to {reached}, but "
            f"#{highest[known - 1]} was committed before the read began"
        )


def check_real_time_order(run: Run, rows: dict[int, list[RecordedEvent]]) -> None:
    """An append that returned before another began comes before it in $all."""
    present = sorted((a for a in run.attempts if rows.get(a.number)), key=lambda a: a.started)
    for a in present:
        if not a.succeeded:
            continue
        last = rows[a.number][-1].event_number
        for b in present:
            if b.started > a.ended:
                assert rows[b.number][0].event_number > last, (
                    f"{b} began after {a} returned, but is before it in $all"
                )
