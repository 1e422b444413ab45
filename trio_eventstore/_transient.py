"""Transient subscriptions: no task, no lock, no checkpoint; the consumer's own iteration
reads the events appended after it subscribed, waking on the stream's notifications."""

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
    try:
        await owner.notifier.ensure_listening()
        info = await _storage.stream_info(owner.db, stream_uuid)
        position = info.stream_version
    except StreamNotFoundError:  # not yet: its first event is new
        position = 0
    except BaseException:
        owner.notifier.unwatch(stream_uuid)
        raise
    return TransientSubscription(owner, stream_uuid, position, selector, mapper)


class TransientSubscription:
    """Batches of events appended after subscribing (no checkpoint, no lock)."""

    def __init__(
        self,
        owner: TransientHost,
        stream_uuid: str,
        position: int,
        selector: Callable[[RecordedEvent], bool] | None,
        mapper: Callable[[RecordedEvent], Any] | None,
    ) -> None:
        self._owner = owner
        self._stream_uuid = stream_uuid
        self.position = position
        self._selector = selector
        self._mapper = mapper
        self._stream_id: int | None = None

    def __aiter__(self) -> TransientSubscription:
        return self

    async def __anext__(self) -> list[Any]:
        owner = self._owner
        while True:
            owner.check_open()
            generation = owner.notifier.generation(self._stream_uuid)
            events, _, self._stream_id = await _storage.read_page(
                owner.db, self._stream_uuid, self.position, 1000, self._stream_id
            )
            if not events:  # a notification of a version beyond this was stale
                owner.notifier.settle(self._stream_uuid, self.position, generation)
            if events:
                self.position = events[-1].event_number
                if self._selector is not None:
                    events = [e for e in events if self._selector(e)]
                if events:
                    return events if self._mapper is None else [self._mapper(e) for e in events]
                continue
            await owner.notifier.wait_beyond(self._stream_uuid, self.position)
