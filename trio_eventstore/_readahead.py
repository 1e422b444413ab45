"""Reading one persistent subscription's stream in pages, for its driver: the stream's id
once it exists (one statement per page then), and, while catching up, the next page
fetched ahead in the background while the current one is decoded and delivered."""

from __future__ import annotations

import logging

import attrs
import trio

from . import _parking, _storage
from ._config import EventStoreConfig
from ._errors import EventStoreError
from ._notifications import Notifier
from ._pg import Database, Row
from ._types import RecordedEvent

__all__ = ["PageReader"]

logger = logging.getLogger("trio_eventstore.subscriptions")


@attrs.define(eq=False)
class _ReadAhead:
    """The next page, fetched while the current one is decoded and delivered."""

    after: int
    limit: int
    budget: int | None
    #: the notifier's generation of the stream before the read (`Notifier.settle`)
    generation: int
    rows: list[Row] | None = None
    bytes: int = 0
    done: trio.Event = attrs.Factory(trio.Event)
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)


class PageReader:
    """The reads of one subscription (``name``) of ``stream_uuid``: pages of events,
    with the next one fetched ahead (at most half of ``max_size`` rows)."""

    __slots__ = (
        "_config",
        "_db",
        "_max_size",
        "_name",
        "_notifier",
        "_prefetch",
        "_stream_id",
        "_stream_uuid",
        "reads",
    )

    def __init__(
        self,
        db: Database,
        config: EventStoreConfig,
        notifier: Notifier,
        stream_uuid: str,
        name: str,
        max_size: int,
    ) -> None:
        self._db = db
        self._config = config
        self._notifier = notifier
        self._stream_uuid = stream_uuid
        self._name = name
        self._max_size = max_size
        #: pages read (a page fetched ahead counts once, when it is taken)
        self.reads = 0
        self._stream_id: int | None = None  # known once the stream exists
        self._prefetch: _ReadAhead | None = None

    @property
    def read_ahead_bytes(self) -> int:
        """The bytes of event data and metadata of the page fetched ahead, if any."""
        ahead = self._prefetch
        return ahead.bytes if ahead else 0

    async def read(
        self, after: int, limit: int, budget: int | None, nursery: trio.Nursery
    ) -> tuple[list[RecordedEvent], list[int], bool]:
        """Events above ``after`` (at most ``limit``, stopping at the first that reaches
        ``budget`` bytes), their sizes, and whether that reached the head.

        While catching up, the next page is fetched ahead, in the background (in
        ``nursery``): the database works on it while this page is decoded and delivered
        (at most half of ``max_size`` rows more in memory, and only the bytes this page
        left of ``budget``)."""
        self.reads += 1
        db, config, notifier = self._db, self._config, self._notifier
        stream_id = self._stream_id
        if stream_id is not None and notifier.heard_another_row(self._stream_uuid, stream_id):
            stream_id = await self._follow_new_row(stream_id)
        ahead, self._prefetch = self._prefetch, None
        rows: list[Row] | None = None
        generation = notifier.generation(self._stream_uuid)
        if ahead is not None and ahead.after == after:
            await ahead.done.wait()
            if ahead.rows is not None:  # else it failed: read as usual
                rows = ahead.rows
                full = _storage.more_rows(rows, ahead.limit, ahead.budget)
                generation = ahead.generation
                if len(rows) > limit:
                    rows, full = rows[:limit], True
        elif ahead is not None:
            ahead.scope.cancel()  # for a position we no longer read from
        if rows is None:
            if stream_id is None:  # the first read finds the stream's id
                stream_id = await _storage.readable_stream_id(db, self._stream_uuid)
                if stream_id is None:  # no such stream (yet), or deleted: nothing to read
                    notifier.settle(self._stream_uuid, after, generation)
                    return [], [], True
            rows = await _storage.read_rows(db, stream_id, after, limit, budget)
            full = _storage.more_rows(rows, limit, budget)
            if rows:
                self._stream_id = stream_id
        sizes = list(map(_storage.row_bytes, rows))
        left = None if budget is None else budget - sum(sizes)
        if rows and len(rows) >= limit and (left is None or left > 0) and stream_id is not None:
            self._fetch_ahead(nursery, stream_id, _storage.row_event_number(rows[-1]), left)
        if not full:  # at the head: a notification of a version beyond it was stale
            head = _storage.row_event_number(rows[-1]) if rows else after
            notifier.settle(self._stream_uuid, head, generation)
        return _parking.decode_rows(config, rows), sizes, not full

    async def _follow_new_row(self, stream_id: int) -> int | None:
        """The stream was heard of as another row than ``stream_id``, the one read: if
        the database says so too, it was deleted (and created again): read the new row,
        above the same position (the checkpoint is a version, whichever the row)."""
        generation = self._notifier.generation(self._stream_uuid)
        current = await _storage.readable_stream_id(self._db, self._stream_uuid)
        if current == stream_id:  # the row read is newer than what was heard
            self._notifier.settle_row(self._stream_uuid, stream_id, generation)
        else:
            self.cancel_read_ahead()
            self._stream_id = current
        return current

    def _fetch_ahead(
        self, nursery: trio.Nursery, stream_id: int, after: int, budget: int | None
    ) -> None:
        ahead = _ReadAhead(
            after,
            max(1, (self._max_size + 1) // 2),
            budget,
            self._notifier.generation(self._stream_uuid),
        )
        self._prefetch = ahead

        async def fetch() -> None:
            with ahead.scope:
                try:
                    ahead.rows = await _storage.read_rows(
                        self._db, stream_id, ahead.after, ahead.limit, ahead.budget
                    )
                    ahead.bytes = sum(map(_storage.row_bytes, ahead.rows))
                except EventStoreError as exc:
                    logger.debug("subscription %r: read ahead failed: %s", self._name, exc)
                finally:
                    ahead.done.set()

        nursery.start_soon(fetch)

    def cancel_read_ahead(self) -> None:
        """Stop fetching ahead and drop that page (the subscription hibernates)."""
        if self._prefetch is not None:
            self._prefetch.scope.cancel()
            self._prefetch = None

    def forget_read_ahead(self) -> None:
        """Drop the page fetched ahead: the session (and the nursery it ran in) ended."""
        self._prefetch = None
