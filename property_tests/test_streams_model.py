"""Streams against a pure model, on a real PostgreSQL.

* Sequential programs: every outcome (new version or error) and every read equals the
  model's.
* Concurrent programs (several tasks, overlapping streams, every expected-version kind,
  links, soft deletes, and a reader tailing $all): stream versions are dense, successful
  appends landed exactly where their expected version said, failed ones wrote nothing,
  $all is dense and holds each stream's events in stream order, and the tailing reader
  never saw a number before every number below it.
"""

from __future__ import annotations

import uuid
from typing import Any

import attrs
import trio
import trio.lowlevel
from hypothesis import given
from hypothesis import strategies as st

import trio_eventstore as es
from trio_eventstore import (
    ANY_VERSION,
    NO_STREAM,
    STREAM_EXISTS,
    EventData,
    EventStore,
    EventStoreConfig,
    admin,
    open_event_store,
)

STREAMS = ["a", "b", "c"]

# -- programs --------------------------------------------------------------------------------


@attrs.frozen
class Append:
    stream: str
    expected: Any  # ExpectedVersion or int
    count: int
    reuse: int | None  # index of an existing event whose id is reused (a duplicate)


@attrs.frozen
class Link:
    stream: str
    expected: Any
    picks: tuple[int, ...]  # indexes into the events appended so far


@attrs.frozen
class Delete:
    stream: str
    expected: Any


expected_versions = st.one_of(
    st.sampled_from([ANY_VERSION, NO_STREAM, STREAM_EXISTS]), st.integers(0, 4)
)
operations = st.one_of(
    st.builds(
        Append,
        st.sampled_from(STREAMS),
        expected_versions,
        st.integers(1, 3),
        st.one_of(st.none(), st.none(), st.integers(0, 20)),
    ),
    st.builds(
        Link,
        st.sampled_from([*STREAMS, "links"]),
        expected_versions,
        st.lists(st.integers(0, 20), min_size=1, max_size=3, unique=True).map(tuple),
    ),
    st.builds(Delete, st.sampled_from(STREAMS), expected_versions),
)
Op = Append | Link | Delete


# -- the model -------------------------------------------------------------------------------


@attrs.define
class Model:
    streams: dict[str, list[uuid.UUID]] = attrs.Factory(dict)
    deleted: set[str] = attrs.Factory(set)
    all: list[uuid.UUID] = attrs.Factory(list)
    origin: dict[uuid.UUID, tuple[str, int]] = attrs.Factory(dict)

    def check(self, stream: str, expected: Any) -> type[Exception] | None:
        current = self.streams.get(stream)
        if current is None:
            if expected is STREAM_EXISTS:
                return es.StreamNotFoundError
            if isinstance(expected, int) and expected != 0:
                return es.WrongExpectedVersionError
            return None
        if stream in self.deleted:
            return es.StreamDeletedError
        if expected is NO_STREAM and current:
            return es.StreamExistsError
        if isinstance(expected, int) and expected != len(current):
            return es.WrongExpectedVersionError
        return None

    def append(self, stream: str, expected: Any, ids: list[uuid.UUID]) -> int | type[Exception]:
        error = self.check(stream, expected)
        if error is not None:
            return error
        if any(i in self.origin for i in ids):
            return es.DuplicateEventError
        events = self.streams.setdefault(stream, [])
        for i in ids:
            events.append(i)
            self.all.append(i)
            self.origin[i] = (stream, len(events))
        return len(events)

    def link(self, stream: str, expected: Any, ids: list[uuid.UUID]) -> int | type[Exception]:
        error = self.check(stream, expected)
        if error is not None:
            return error
        events = self.streams.setdefault(stream, [])
        if any(i in events for i in ids):
            return es.DuplicateEventError
        events.extend(ids)
        return len(events)

    def delete(self, stream: str, expected: Any) -> int | type[Exception]:
        if stream not in self.streams:
            return es.StreamNotFoundError
        if stream in self.deleted:
            return es.StreamDeletedError
        error = self.check(stream, expected)
        if error is not None:
            return error
        self.deleted.add(stream)
        return len(self.streams[stream])


# -- running programs ------------------------------------------------------------------------


def new_events(op: Append, known: list[uuid.UUID]) -> list[EventData]:
    events = [EventData({"i": k}, event_type="Tested") for k in range(op.count)]
    if op.reuse is not None and known:
        reused = known[op.reuse % len(known)]
        events[-1] = EventData({"dup": True}, event_type="Tested", event_id=reused)
    return events


async def run_op(store: EventStore, op: Op, known: list[uuid.UUID]) -> tuple[Any, list[uuid.UUID]]:
    """Run one operation; returns (new version or error class, ids it tried to write)."""
    ids: list[uuid.UUID] = []
    try:
        if isinstance(op, Append):
            events = new_events(op, known)
            ids = [e.event_id for e in events]
            return await store.append_to_stream(op.stream, op.expected, events), ids
        if isinstance(op, Link):
            if not known:
                return None, ids
            ids = list(dict.fromkeys(known[p % len(known)] for p in op.picks))
            return await store.link_to_stream(op.stream, op.expected, ids), ids
        await store.delete_stream(op.stream, op.expected)
        return "deleted", ids
    except es.EventStoreError as exc:
        return type(exc), ids


async def fresh_store_run(config: EventStoreConfig, body: Any) -> Any:
    await admin.reset(config)
    async with open_event_store(config) as store:
        return await body(store)


async def read_streams(store: EventStore) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for stream in [*STREAMS, "links"]:
        try:
            result[stream] = [e.event_id for e in await store.read_stream_forward(stream)]
        except (es.StreamNotFoundError, es.StreamDeletedError) as exc:
            result[stream] = type(exc)
    return result


@given(program=st.lists(operations, max_size=12))
def test_sequential_programs_match_the_model(
    store_config: EventStoreConfig, program: list[Op]
) -> None:
    async def body(store: EventStore) -> None:
        model = Model()
        for op in program:
            outcome, ids = await run_op(store, op, model.all)
            expected: object
            if isinstance(op, Append):
                expected = model.append(op.stream, op.expected, ids)
            elif isinstance(op, Link):
                expected = model.link(op.stream, op.expected, ids) if ids else None
            else:
                deleted = model.delete(op.stream, op.expected)
                expected = "deleted" if isinstance(deleted, int) else deleted
            assert outcome == expected, (op, outcome, expected)
        reads = await read_streams(store)
        for stream in [*STREAMS, "links"]:
            if stream not in model.streams:
                assert reads[stream] is es.StreamNotFoundError
            elif stream in model.deleted:
                assert reads[stream] is es.StreamDeletedError
            else:
                assert reads[stream] == model.streams[stream], stream
        everything = await store.read_all_streams_forward(0, 10_000)
        assert [e.event_id for e in everything] == model.all
        assert [e.event_number for e in everything] == list(range(1, len(model.all) + 1))
        for event in everything:
            assert (event.stream_uuid, event.stream_version) == model.origin[event.event_id]

    trio.run(fresh_store_run, store_config, body)


@given(
    tasks=st.lists(st.lists(operations, min_size=1, max_size=6), min_size=2, max_size=4),
    seed_events=st.integers(0, 3),
)
def test_concurrent_programs_keep_the_invariants(
    store_config: EventStoreConfig, tasks: list[list[Op]], seed_events: int
) -> None:
    async def body(store: EventStore) -> None:
        known: list[uuid.UUID] = []
        if seed_events:
            seed = [EventData({"seed": k}, event_type="Tested") for k in range(seed_events)]
            await store.append_to_stream("seed", NO_STREAM, seed)
            known.extend(e.event_id for e in seed)
        # (operation, outcome, ids it wrote or tried to, ids that were new)
        results: list[tuple[Op, Any, list[uuid.UUID], list[uuid.UUID]]] = []
        seen: list[int] = []
        done = trio.Event()

        async def worker(ops: list[Op]) -> None:
            for op in ops:
                before = set(known)
                outcome, ids = await run_op(store, op, list(known))
                results.append((op, outcome, ids, [i for i in ids if i not in before]))
                if isinstance(op, Append) and isinstance(outcome, int):
                    known.extend(ids)
                await trio.lowlevel.checkpoint()

        async def tail_reader() -> None:
            # Reads $all from just past what it has seen; every page must continue
            # exactly where the last one ended.
            while True:
                finished = done.is_set()
                page = await store.read_all_streams_forward(len(seen) + 1, 50)
                for event in page:
                    assert event.event_number == len(seen) + 1, (seen[-3:], event.event_number)
                    seen.append(event.event_number)
                if finished and not page:
                    return
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(tail_reader)
            async with trio.open_nursery() as workers:
                for ops in tasks:
                    workers.start_soon(worker, ops)
            done.set()

        everything = await store.read_all_streams_forward(0, 10_000)
        numbers = [e.event_number for e in everything]
        assert numbers == list(range(1, len(everything) + 1))  # dense
        assert seen == numbers  # the tail reader saw all, in order, no gap
        in_all = {e.event_id: e for e in everything}
        assert len(in_all) == len(everything)

        streams: dict[str, list[uuid.UUID]] = {}
        for stream in [*STREAMS, "links", "seed"]:
            try:
                info = await store.stream_info(stream)
            except es.StreamNotFoundError:
                continue
            rows = await store.read_stream_forward(stream) if info.deleted_at is None else []
            if info.deleted_at is None:
                assert [e.event_number for e in rows] == list(range(1, info.stream_version + 1))
                streams[stream] = [e.event_id for e in rows]
        # Each stream's own events appear in $all in stream order.
        for stream, ids in streams.items():
            own = [i for i in ids if in_all[i].stream_uuid == stream]
            positions = [in_all[i].event_number for i in own]
            assert positions == sorted(positions)

        allowed = (
            es.WrongExpectedVersionError,
            es.StreamNotFoundError,
            es.StreamDeletedError,
            es.DuplicateEventError,
        )
        for op, outcome, ids, fresh in results:
            # Every outcome is a result or a domain error, never a leaked database error.
            assert (
                outcome is None
                or outcome == "deleted"
                or isinstance(outcome, int)
                or (isinstance(outcome, type) and issubclass(outcome, allowed))
            ), (op, outcome)
            if outcome is es.DuplicateEventError and isinstance(op, Append):
                assert len(fresh) < len(ids), (op, "duplicate without a reused id")
            if isinstance(op, Append):
                if isinstance(outcome, int):
                    assert all(i in in_all for i in ids)
                    versions = [in_all[i].stream_version for i in ids]
                    assert versions == list(range(outcome - len(ids) + 1, outcome + 1))
                    if isinstance(op.expected, int):
                        assert outcome == op.expected + len(ids)
                    if op.expected is NO_STREAM:
                        assert versions[0] == 1
                    if op.expected is STREAM_EXISTS:
                        assert versions[0] > 1
                else:  # a failed append wrote nothing
                    assert not any(i in in_all for i in fresh), (op, outcome)
            elif isinstance(op, Link) and isinstance(outcome, int) and op.stream in streams:
                linked = streams[op.stream]
                assert linked[outcome - len(ids) : outcome] == ids
                if isinstance(op.expected, int):
                    assert outcome == op.expected + len(ids)

        # Optimistic concurrency: of the successful writes with the same int expected
        # version on one stream, at most one exists.
        winners: dict[tuple[str, int], int] = {}
        for op, outcome, _, _ in results:
            if (
                isinstance(op, Append | Link)
                and isinstance(op.expected, int)
                and isinstance(outcome, int)
            ):
                key = (op.stream, op.expected)
                winners[key] = winners.get(key, 0) + 1
        assert all(count == 1 for count in winners.values()), winners

    trio.run(fresh_store_run, store_config, body)
