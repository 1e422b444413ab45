"""Transient subscriptions: no task, no lock, no checkpoint; the consumer's own iteration
reads the events appended after it subscribed, waking on the stream's notifications.

A subscription follows the stream by its name: when the stream is hard-deleted and
created again (a new ``streams`` row, with another id), it goes on with the new stream's
events, from its version 1 (as the Elixir library's subscribers receive them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from . import _storage
from ._errors import StreamNotFoundError
from ._notifications import Notifier
from ._pg import Database
from ._types import RecordedEvent

__all__ = ["TransientHost", "TransientSubscription", "subscribe"]


class TransientHost(Protocol):
    """What a transient subscription needs from the store's `Subscriptions`."""

    db: Database
    notifier: Notifier

    def check_open(self) -> None:
        """Raise `EventStoreClosedError` once the store has closed."""


async def subscribe(
    owner: TransientHost,
    stream_uuid: str,
    selector: Callable[[RecordedEvent], bool] | None,
    mapper: Callable[[RecordedEvent], Any] | None,
) -> TransientSubscription:
    """A transient subscription to the events appended to ``stream_uuid`` from now on."""
    owner.check_open()
    owner.notifier.watch(stream_uuid)
    stream_id: int | None
    try:
        await owner.notifier.ensure_listening()
        info = await _storage.stream_info(owner.db, stream_uuid)
        position, stream_id = info.stream_version, info.stream_id
    except StreamNotFoundError:  # not yet: its first event is new
        position, stream_id = 0, None
    except BaseException:
        owner.notifier.unwatch(stream_uuid)
        raise
    return TransientSubscription(owner, stream_uuid, position, stream_id, selector, mapper)


class TransientSubscription:
    """Batches of events appended after subscribing (no checkpoint, no lock)."""

    def __init__(
        self,
        owner: TransientHost,
        stream_uuid: str,
        position: int,
        stream_id: int | None,
        selector: Callable[[RecordedEvent], bool] | None,
        mapper: Callable[[RecordedEvent], Any] | None,
    ) -> None:
        self._owner = owner
        self._stream_uuid = stream_uuid
        self.position = position
        self._selector = selector
        self._mapper = mapper
        #: the ``streams`` row read (None: the stream does not exist yet, or was deleted)
        self._stream_id = stream_id

    def __aiter__(self) -> TransientSubscription:
        return self

    async def __anext__(self) -> list[Any]:
        owner = self._owner
        notifier = owner.notifier
        while True:
            owner.check_open()
            generation = notifier.generation(self._stream_uuid)
            if self._stream_id is not None and notifier.heard_another_row(
                self._stream_uuid, self._stream_id
            ):
                await self._follow_new_row(generation)
            events, _, self._stream_id = await _storage.read_page(
                owner.db, self._stream_uuid, self.position, 1000, self._stream_id
            )
            if not events:  # a notification of a version beyond this was stale
                notifier.settle(self._stream_uuid, self.position, generation)
            if events:
                self.position = events[-1].event_number
                if self._selector is not None:
                    events = [e for e in events if self._selector(e)]
                if events:
                    return events if self._mapper is None else [self._mapper(e) for e in events]
                continue
            await notifier.wait_beyond(self._stream_uuid, self.position, self._stream_id)

    async def _follow_new_row(self, generation: int) -> None:
        """The stream was heard of as another row than the one read: if the database
        says so too, it was deleted (and created again): read the new row from its
        first event."""
        current = await _storage.readable_stream_id(self._owner.db, self._stream_uuid)
        if current == self._stream_id:  # the row read is newer than what was heard
            assert current is not None
            self._owner.notifier.settle_row(self._stream_uuid, current, generation)
        else:
            self._stream_id, self.position = current, 0
