"""Group commit: one writer task writes every append queued while its previous batch
was in flight, in one statement and one commit (`_storage.append_batch`).

Each caller still gets its own outcome. A lone append goes out at once (no timer), so
an idle store adds no latency; under load, a batch costs one round trip and one WAL
flush however many callers it serves, and callers wait in the queue (back-pressure)
instead of for a pooled connection.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable

import attrs
import trio

from . import _storage
from ._errors import (
    DuplicateEventError,
    EventStoreClosedError,
    EventStoreError,
    StreamDeletedError,
    StreamNotFoundError,
    WrongExpectedVersionError,
)
from ._pg import Database, waiting_out_overload

__all__ = ["GroupCommitWriter", "WriterStatistics"]

#: A batch holds at most this many appends...
MAX_BATCH_APPENDS = 500
#: ... and about this many bytes (one bigger append goes alone).
MAX_BATCH_BYTES = 8 * 1024 * 1024
#: Batches written at once (each on its own pooled connection; a caller writing its own
#: append while the writer is idle, `GroupCommitWriter._write_now`, takes a place).
MAX_IN_FLIGHT = 2
#: A long queue is shared among the writer's free places (`_share`), in batches of at
#: least this many appends.
MIN_SHARE = 16
#: An append of at least this many events is written alone, in its caller's task, on
#: its own pooled connection (`GroupCommitWriter.write_big`): one commit is little
#: next to its rows, and several such appends are written in parallel...
ALONE_EVENTS = 100
#: ... at most this many at once (the others wait their turn, in their callers' tasks,
#: with nothing sent): one holding the `$all` row, one writing its streams' rows. More
#: only queue for the `$all` row, and their waits go through PostgreSQL's lock manager:
#: 10 writers of 100-event appends ran 24k events/s with ten at once, 29-32k with two
#: (one at once: 17k; 1,000-event appends the same with two as with ten).
MAX_BIG_IN_FLIGHT = 2
#: Scheduler passes a worker gives the callers it just answered before it takes the
#: next batch (trio runs each pass's tasks in a random order: two passes let every one
#: of them run once).
_LET_CALLERS_RUN = 2


@attrs.frozen
class WriterStatistics:
    """The group-commit writer's counters (`EventStoreStatistics.writer`)."""

    #: statements written (each one commit)
    batches: int
    #: appends they carried (committed or refused)
    appends: int
    #: the most appends one batch carried
    largest_batch: int
    #: appends waiting for the writer now
    queued: int
    #: with ``replica_appends``: the writer's own connections open now, beside the
    #: pool's (0 otherwise: it writes on pooled connections)
    connections: int = 0


class _Pending:
    """One caller's append, from the queue to its outcome."""

    __slots__ = ("abandoned", "outcome", "request", "taken", "waiter")

    def __init__(self, request: _storage.AppendRequest) -> None:
        self.request = request
        self.outcome: _storage.Appended | BaseException | None = None
        #: in a batch being written (the caller can no longer take it back)
        self.taken = False
        #: the caller went away (cancelled): drop it unless it is being written
        self.abandoned = False
        #: the caller's task while it waits for the outcome (`wait`)
        self.waiter: trio.lowlevel.Task | None = None

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def finish(self, outcome: _storage.Appended | BaseException) -> None:
        self.outcome = outcome
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            trio.lowlevel.reschedule(waiter)

    async def wait(self) -> None:
        """Until `finish` (a trio.Event's wait, without the event: one per append)."""
        if self.outcome is not None:
            await trio.lowlevel.checkpoint()
            return
        self.waiter = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            # Abandoned now, not when the caller's task next runs: a writer woken in the
            # same scheduling pass may run first, and must not take it.
            self.waiter = None
            self.abandoned = True
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def taken_back(self) -> bool:
        """Put back in the queue (to be retried), so not this batch's to fail."""
        return not self.taken


#: What `_storage.append` raises for an append the database refused (it wrote nothing).
_REFUSALS = (
    WrongExpectedVersionError,
    StreamNotFoundError,
    StreamDeletedError,
    DuplicateEventError,
)


def _closed_error() -> EventStoreClosedError:
    return EventStoreClosedError()


class GroupCommitWriter:
    """The store's writer. `append` is called by any task; `run` is the writer task,
    started in the store's nursery."""

    def __init__(
        self,
        db: Database,
        on_written: Callable[[_storage.AppendRequest, _storage.Appended], None],
    ) -> None:
        self._db = db
        self._on_written = on_written
        self._queue: deque[_Pending] = deque()
        self._idle = trio.lowlevel.ParkingLot()
        self._closed = False
        self._streams_in_flight: set[str] = set()
        self._ids_in_flight: set[object] = set()
        #: batches being written (by the workers, or by a caller: `_write_now`)
        self._writing = 0
        #: places for big appends (`write_big`)
        self._big = trio.CapacityLimiter(MAX_BIG_IN_FLIGHT)
        self._batches = 0
        self._appends = 0
        self._largest = 0

    def statistics(self) -> WriterStatistics:
        return WriterStatistics(
            batches=self._batches,
            appends=self._appends,
            largest_batch=self._largest,
            queued=sum(not p.abandoned for p in self._queue),
            connections=int(self._db.pool_statistics()["size"]) if self._db.replica else 0,
        )

    async def append(self, request: _storage.AppendRequest) -> _storage.Appended:
        """Queue ``request`` and wait for its outcome.

        Cancelled before its batch starts, it is dropped and writes nothing; cancelled
        after, it may commit (its caller will not know: retry with the same event ids,
        `DuplicateEventError` then means it is there)."""
        if self._closed:
            raise _closed_error()
        if not self._writing and not self._queue:
            return await self._write_now(request)
        pending = _Pending(request)
        self._queue.append(pending)
        self._idle.unpark()
        try:
            await pending.wait()
        except BaseException:
            pending.abandoned = True
            raise
        outcome = pending.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None
        return outcome

    async def _write_now(self, request: _storage.AppendRequest) -> _storage.Appended:
        """An append made while the writer is idle (nothing queued, no batch in flight):
        written at once in the calling task, a batch of one without the hand-off to a
        worker and back. Appends made meanwhile queue up behind it, as behind a batch;
        any to its stream wait for it."""
        stream, ids = request.stream_uuid, {e.event_id for e in request.events}
        self._writing += 1
        self._streams_in_flight.add(stream)
        self._ids_in_flight |= ids
        try:
            appended = await self._write_alone(request)
        except _REFUSALS:
            self._count(1)  # a batch of one, refused
            raise
        else:
            self._count(1)
            return appended
        finally:
            self._writing -= 1
            self._streams_in_flight.discard(stream)
            self._ids_in_flight -= ids
            if self._queue:
                self._idle.unpark()  # what waited for it may go now

    async def write_big(self, request: _storage.AppendRequest) -> _storage.Appended:
        """Write a big append (`ALONE_EVENTS`) in the calling task, outside the batches:
        in parallel with other big ones (`MAX_BIG_IN_FLIGHT` at once), waiting out an
        overloaded pool as batches do. Cancelled while waiting for its turn, it writes
        nothing; in flight, it may commit (as any append)."""
        async with self._big:
            # Alone (no other append in flight here): in one statement, see `_storage`.
            alone = self._big.borrowed_tokens == 1 and not self._writing and not self._queue
            return await self._write_alone(request, contended=not alone)

    async def _write_alone(
        self, request: _storage.AppendRequest, *, contended: bool = True
    ) -> _storage.Appended:
        if self._closed:
            raise _closed_error()
        appended = await waiting_out_overload(
            lambda: _storage.append(self._db, request, contended=contended)
        )
        self._on_written(request, appended)
        return appended

    def _count(self, appends: int) -> None:
        """One statement written, carrying ``appends`` (committed or refused)."""
        self._batches += 1
        self._appends += appends
        self._largest = max(self._largest, appends)

    def _take(self, limit: int = MAX_BATCH_APPENDS) -> list[_Pending]:
        """The next batch, in queue order: at most one append per stream, and none to
        a stream a batch in flight writes to (later appends to a stream wait, so each
        is checked against the ones before it, in order), and no event id twice."""
        batch: list[_Pending] = []
        streams = set(self._streams_in_flight)
        ids: set[object] = set(self._ids_in_flight)
        size = 0
        left: deque[_Pending] = deque()
        queue = self._queue
        while queue:
            pending = queue.popleft()
            if pending.abandoned:
                continue
            request = pending.request
            event_ids = [e.event_id for e in request.events]
            if (
                len(batch) >= limit
                or (batch and size + request.size > MAX_BATCH_BYTES)
                or request.stream_uuid in streams
                or not ids.isdisjoint(event_ids)
            ):
                streams.add(request.stream_uuid)  # keeps later appends to it in order
                left.append(pending)
                continue
            streams.add(request.stream_uuid)
            ids.update(event_ids)
            size += request.size
            pending.taken = True
            batch.append(pending)
        self._queue = left
        return batch

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer: `MAX_IN_FLIGHT` worker tasks that write batches until cancelled
        (the store closes). Each takes what is queued when it is free, so a batch
        does its stream locks and event inserts while the one before it waits for its
        commit to be flushed (the `$all` row lock orders their commits)."""
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(MAX_IN_FLIGHT):
                    nursery.start_soon(self._worker)
                task_status.started()
        finally:
            self._closed = True
            for pending in self._queue:
                pending.finish(_closed_error())
            self._queue.clear()

    async def _worker(self) -> None:
        while True:
            if not self._queue or self._writing >= MAX_IN_FLIGHT:
                await self._idle.park()
                continue
            # A pooled connection first, then the appends: until the batch is taken its
            # appends stay queued, and one whose caller is cancelled meanwhile is dropped
            # (nothing of it was sent).
            try:
                reservation = await waiting_out_overload(self._db.reserve_slot)
            except Exception as exc:  # the pool closed under the store: the appends fail
                for pending in self._queue:
                    pending.finish(_own_copy(exc))
                self._queue.clear()
                continue
            try:
                free = MAX_IN_FLIGHT - self._writing
                batch = self._take(_share(len(self._queue), free)) if free > 0 else []
                if batch:
                    await self._write_taken(batch)
            finally:
                reservation.release()
            if not batch:  # nothing queued any more, all of it waits for batches in
                # flight, or a caller writing its own (`_write_now`) holds the last place
                await self._idle.park()
                continue
            # Let the callers just answered run first: one that appends again joins the
            # next batch instead of waiting for the one after it (no timer: a batch
            # goes out as soon as they have run).
            for _ in range(_LET_CALLERS_RUN):
                await trio.lowlevel.checkpoint()
            if self._queue:
                self._idle.unpark()  # what this batch held back may go now, in parallel

    async def _write_taken(self, batch: list[_Pending]) -> None:
        requests = [p.request for p in batch]
        streams = {r.stream_uuid for r in requests}
        ids = {e.event_id for r in requests for e in r.events}
        self._streams_in_flight |= streams
        self._ids_in_flight |= ids
        self._writing += 1
        try:
            await self._write(batch)
        finally:
            self._writing -= 1
            self._streams_in_flight -= streams
            self._ids_in_flight -= ids
            for pending in batch:
                if not pending.finished and not pending.taken_back():
                    pending.finish(
                        EventStoreClosedError(
                            "the event store closed while the append was being "
                            "written; it may have been committed"
                        )
                    )

    async def _write(self, batch: list[_Pending]) -> None:
        requests = [p.request for p in batch]
        try:
            # Readers holding every pooled connection make appends wait, not fail.
            outcomes = await waiting_out_overload(lambda: _storage.append_batch(self._db, requests))
        except Exception as exc:
            for pending in batch:
                pending.finish(_own_copy(exc))
            return
        self._count(len(batch))
        retry: list[_Pending] = []
        for pending, outcome in zip(batch, outcomes, strict=True):
            if outcome is None:
                # The stream was created concurrently: nothing written, go again first.
                pending.taken = False
                retry.append(pending)
            elif isinstance(outcome, EventStoreError):
                pending.finish(outcome)
            else:
                self._on_written(pending.request, outcome)
                pending.finish(outcome)
        self._queue.extendleft(reversed(retry))


def _share(queued: int, free: int) -> int:
    """How many of ``queued`` appends one of ``free`` places takes: an equal share, so
    that under load the batches follow each other through the `$all` lock (one doing its
    inserts while the one before it commits) instead of one batch carrying every caller
    while the database waits for them between batches; at least `MIN_SHARE`."""
    return min(MAX_BATCH_APPENDS, max(MIN_SHARE, -(-queued // free)))


def _own_copy(exc: Exception) -> Exception:
    """A copy of an error that fails a whole batch, one per caller (an exception
    object raised in several tasks would share its traceback)."""
    try:
        clone = copy.copy(exc)
    except Exception:
        return exc
    clone.__cause__ = exc
    return clone
