"""The notifier: LISTEN on the store's channel and keep per-stream high-water marks.

Notifications are hints; whoever waits reads from the database. The notifier task
owns one dedicated connection (`open_listener`: spoken from Trio where it can be;
``session_mode_url`` when set), with TCP keepalives.
When that connection drops it reconnects (after `reconnect_delays`: short at first) and
then re-reads the marks of every watched stream from the database, so nothing committed
while it was deaf is missed (Elixir #205).
A poll of the same marks every ``notification_poll_interval`` wakes readers even where
LISTEN cannot work (PgBouncer in transaction mode).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Protocol

import trio

from . import _sql
from ._config import EventStoreConfig
from ._errors import EventStoreError, StorageUnavailableError
from ._pg import Conn, Database, open_listener, reconnect_delays, waiting_out_overload

__all__ = ["Notifier", "parse_payload", "run_notifier", "wait_any"]

logger = logging.getLogger("trio_eventstore.notifications")


def parse_payload(payload: str) -> tuple[str, int, int, int] | None:
    """``"<stream_uuid>,<stream_id>,<first>,<last>"`` (the stream id may hold commas)."""
    parts = payload.rsplit(",", 3)
    if len(parts) != 4:
        return None
    try:
        return parts[0], int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return None


class _Wakeup:
    __slots__ = ("event", "resynced")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.resynced = False


class Notifier:
    """High-water marks per stream, and a way to wait for them to move."""

    def __init__(self, config: EventStoreConfig, database: Database) -> None:
        self._config = config
        self._db = database
        self._marks: dict[str, int] = {}
        #: per stream, how many notifications and re-syncs have touched its mark
        self._generations: dict[str, int] = {}
        #: per stream, the id of its ``streams`` row as last heard of: a stream deleted
        #: and created again is another row (a reader following the old one reads nothing)
        self._ids: dict[str, int] = {}
        self._watchers: dict[str, int] = {}
        self._listeners: dict[str, list[Callable[[], None]]] = {}
        #: streams kept by `watch` (transient subscriptions), with how many keep each
        self._watched: dict[str, int] = {}
        self._changed = _Wakeup()
        #: set when somebody first follows a stream (a subscription): LISTEN from then on
        self.wanted = trio.Event()
        self.connected = False
        #: LISTEN is live (connected, and wanted)
        self.listening = False
        #: the first LISTEN is live and the marks re-synced, or the attempt ended
        self._first_listen = trio.Event()
        self.backend_pid: int | None = None
        #: how the LISTEN session is spoken: "wire" (from Trio) or "asyncpg"
        self.transport: str | None = None
        self.reconnects = 0
        self.notifications = 0

    # -- readers --------------------------------------------------------------------------

    async def ensure_listening(self) -> None:
        """Ask for LISTEN (the first subscription does) and wait until it is live and the
        marks re-synced: what is committed from then on wakes the readers at once. Does
        not wait while the session is down (readers then rely on the re-sync that
        follows its reconnection, as always), nor longer than ``timeout`` (the re-sync
        waits for a pooled connection: one its caller holds must not block it)."""
        self.wanted.set()
        if self.connected and not self.listening:
            with trio.move_on_after(self._config.timeout):
                await self._first_listen.wait()

    def mark(self, stream_uuid: str) -> int:
        """The highest version known for the stream (0 when none is known)."""
        return self._marks.get(stream_uuid, 0)

    def generation(self, stream_uuid: str) -> int:
        """Take this before reading the stream; pass it to `settle` after."""
        return self._generations.get(stream_uuid, 0)

    def heard_another_row(self, stream_uuid: str, stream_id: int) -> bool:
        """Whether the stream was last heard of as another row than ``stream_id``: it was
        deleted and created again (ask the database; pass what it says to `settle_row`)."""
        heard = self._ids.get(stream_uuid)
        return heard is not None and heard != stream_id

    def settle_row(self, stream_uuid: str, stream_id: int, generation: int) -> None:
        """A read that began at ``generation`` found the stream's row is ``stream_id``
        while another was heard of: what was heard is older unless a notification or
        re-sync came since (a reader found the new row before its notification came)."""
        if self._generations.get(stream_uuid, 0) == generation and self._followed(stream_uuid):
            self._ids[stream_uuid] = stream_id

    def settle(self, stream_uuid: str, head: int, generation: int) -> None:
        """A read of the stream that began at ``generation`` found nothing above
        ``head``: a higher mark is stale unless a notification or re-sync came since
        (a forged or foreign notification, a stream deleted and created again, a store
        reset). Lower it, so that readers wait for news instead of reading again and
        again."""
        if self._generations.get(stream_uuid, 0) == generation and self.mark(stream_uuid) > head:
            self._marks[stream_uuid] = head

    async def wait_beyond(
        self, stream_uuid: str, position: int, stream_id: int | None = None
    ) -> None:
        """Return once the stream's mark is above ``position``, or the marks were
        re-synced or polled (read the database to see what changed), or (given the
        ``stream_id`` of the row read) the stream is heard of as another row."""
        self.wanted.set()
        self._watchers[stream_uuid] = self._watchers.get(stream_uuid, 0) + 1
        self._marks.setdefault(stream_uuid, 0)
        try:
            while self.mark(stream_uuid) <= position and not (
                stream_id is not None and self.heard_another_row(stream_uuid, stream_id)
            ):
                wakeup = self._changed
                await wakeup.event.wait()
                if wakeup.resynced:
                    return
        finally:
            self._watchers[stream_uuid] -= 1
            if not self._watchers[stream_uuid]:
                del self._watchers[stream_uuid]
                self._forget(stream_uuid)

    def add_listener(self, stream_uuid: str, wake: Callable[[], None]) -> None:
        """Call ``wake()`` (sync, must not block) when the stream's mark may have moved."""
        self.wanted.set()
        self._marks.setdefault(stream_uuid, 0)
        self._listeners.setdefault(stream_uuid, []).append(wake)

    def remove_listener(self, stream_uuid: str, wake: Callable[[], None]) -> None:
        listeners = self._listeners.get(stream_uuid, [])
        if wake in listeners:
            listeners.remove(wake)
        if not listeners:
            self._listeners.pop(stream_uuid, None)
            self._forget(stream_uuid)

    def watch(self, stream_uuid: str) -> None:
        """Follow the stream (and keep its mark in re-syncs) until `unwatch`: a
        transient subscription, from before its first read."""
        self.wanted.set()
        self._watched[stream_uuid] = self._watched.get(stream_uuid, 0) + 1
        self._marks.setdefault(stream_uuid, 0)

    def unwatch(self, stream_uuid: str) -> None:
        count = self._watched.get(stream_uuid, 0) - 1
        if count > 0:
            self._watched[stream_uuid] = count
            return
        self._watched.pop(stream_uuid, None)
        self._forget(stream_uuid)

    def _followed(self, stream_uuid: str) -> bool:
        """Whether anyone waits for the stream: only then is its mark kept (a store
        writing to many streams would otherwise keep one for each, for ever)."""
        return (
            stream_uuid == "$all"
            or stream_uuid in self._listeners
            or stream_uuid in self._watchers
            or stream_uuid in self._watched
        )

    def _forget(self, stream_uuid: str) -> None:
        if not self._followed(stream_uuid):
            self._marks.pop(stream_uuid, None)
            self._generations.pop(stream_uuid, None)
            self._ids.pop(stream_uuid, None)

    # -- writers --------------------------------------------------------------------------

    def wake_all(self) -> None:
        """Wake every reader, as a re-sync does (they read the database themselves)."""
        self._wake(resynced=True)

    def _wake(self, *, resynced: bool, stream_uuid: str | None = None) -> None:
        wakeup, self._changed = self._changed, _Wakeup()
        wakeup.resynced = resynced
        wakeup.event.set()
        if stream_uuid is None:
            for listeners in list(self._listeners.values()):
                for wake in list(listeners):
                    wake()
        else:
            for wake in list(self._listeners.get(stream_uuid, ())):
                wake()

    def on_notify(self, _channel: str, payload: str) -> None:
        parsed = parse_payload(payload)
        if parsed is None:
            logger.warning("ignoring a malformed notification payload %r", payload[:200])
            return
        stream_uuid, stream_id, _, last = parsed
        self.notifications += 1
        if not self._followed(stream_uuid):
            return  # nobody here reads it: whoever starts to reads the database first
        self._generations[stream_uuid] = self._generations.get(stream_uuid, 0) + 1
        self._heard(stream_uuid, stream_id, last)
        self._wake(resynced=False, stream_uuid=stream_uuid)

    def _heard(self, stream_uuid: str, stream_id: int, version: int) -> None:
        """The stream's row ``stream_id`` is at ``version``. Another row than the one
        heard of before is the stream created again: its versions start at 1 again."""
        another_row = self._ids.get(stream_uuid, stream_id) != stream_id
        if another_row or version > self._marks.get(stream_uuid, -1):
            self._marks[stream_uuid] = version
        self._ids[stream_uuid] = stream_id

    async def resync(self) -> None:
        """Read the marks of every watched stream (and ``$all``) from the database."""
        names = sorted({"$all", *self._marks, *self._watchers})
        sql = _sql.stream_versions(self._config.schema)
        before = dict(self._generations)

        async def unit(conn: Conn) -> dict[str, tuple[int, int]]:
            return {r[0]: (int(r[1]), int(r[2])) for r in await conn.fetch(sql, names)}

        # Readers holding every pooled connection make it wait (failing here would
        # tear the LISTEN connection down for a busy pool).
        rows = await waiting_out_overload(lambda: self._db.run(unit), first=0.01, ceiling=0.5)
        for name, (stream_id, version) in rows.items():
            if not self._followed(name):
                continue  # forgotten meanwhile
            another_row = self._ids.get(name, stream_id) != stream_id
            if another_row and self._generations.get(name, 0) != before.get(name, 0):
                continue  # heard of as another row during this read: that came later
            if another_row or version > self.mark(name):
                self._generations[name] = self._generations.get(name, 0) + 1
            self._heard(name, stream_id, version)
        self._wake(resynced=True)


async def run_notifier(
    notifier: Notifier, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """The store's notification task: reports started once its session is connected;
    LISTENs (and re-syncs the marks) once somebody follows a stream (`Notifier.wanted`:
    a store that only writes never LISTENs, and costs the server nothing per append);
    reconnects with back-off for as long as the store is open."""
    try:
        await _notify_forever(notifier, task_status)
    finally:
        notifier.connected = notifier.listening = False
        notifier._first_listen.set()  # nobody waits for a store that has closed


async def _notify_forever(notifier: Notifier, task_status: trio.TaskStatus[None]) -> None:
    config = notifier._config
    poll = config.notification_poll_interval
    delays = reconnect_delays()
    started = False
    while True:
        try:
            async with open_listener(
                config, notifier.on_notify, role=f"listener {config.schema}"
            ) as listener:
                lost = listener.lost
                notifier.connected = True
                notifier.backend_pid = listener.backend_pid
                notifier.transport = listener.transport
                if not started:
                    started = True
                    task_status.started()
                delays = reconnect_delays()
                await wait_any(notifier.wanted, lost)
                if not lost.is_set():
                    await listener.listen()
                    notifier.listening = True
                    await notifier.resync()  # what was committed while we were not listening
                    notifier._first_listen.set()
                    if notifier.reconnects:
                        logger.info("notifier reconnected; marks re-synced")
                while not lost.is_set():
                    with trio.move_on_after(poll if poll > 0 else math.inf):
                        await lost.wait()
                    if not lost.is_set():
                        await notifier.resync()  # the safety net
        except EventStoreError as exc:
            if not started:
                raise
            logger.warning("notifier connection lost (%s); reconnecting", exc)
        notifier.connected = notifier.listening = False
        notifier._first_listen.set()  # nobody waits for a session that is down
        if not started:
            raise StorageUnavailableError("the notification connection closed during startup")
        notifier.reconnects += 1
        notifier._wake(resynced=True)  # readers re-read the database themselves
        await trio.sleep(next(delays))


class _Waitable(Protocol):
    async def wait(self) -> None: ...


async def wait_any(*events: _Waitable) -> None:
    """Wait until the ``wait()`` of one of ``events`` returns (a `trio.Event` or an
    `_inbox.Signal`)."""
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(event: _Waitable = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)
