"""The store's notification session (`open_listener`): spoken from Trio (`_wire`) where
it can be, so that the notifications every append produces (two: its stream and
``$all``) cost a read in a Trio task rather than a turn of the asyncio loop and
asyncpg's dispatch (measured: 18% of the throughput of 50 writers on two cores);
through asyncpg where `_wire` cannot connect (`Unsupported`).

The session connects at once and LISTENs when told (`Listener.listen`): a store that
only writes keeps it idle, and neither it nor the server does any work for the
notifications of its appends."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import trio

from .. import _sql
from .._config import EventStoreConfig, session_keepalive
from .._errors import DatabaseError, EventStoreError, StorageUnavailableError, single_errors
from ._connection import (
    Connection,
    _settings,
    keep_socket_alive,
    open_connection,
    server_keepalive_settings,
)
from ._translate import translate_error
from ._wire import WireConnection
from ._wire import connect as _wire_connect
from ._wire import target as _wire_target
from ._wire_codecs import Unsupported

__all__ = ["Listener", "open_listener"]

logger = logging.getLogger("trio_eventstore.pg")


class Listener:
    """A live notification session (see `open_listener`)."""

    def __init__(
        self,
        config: EventStoreConfig,
        callback: Callable[[str, str], None],
        backend_pid: int | None,
        *,
        wire: WireConnection | None = None,
        connection: Connection | None = None,
    ) -> None:
        self._config = config
        self._callback = callback
        self._wire = wire
        self._connection = connection
        #: the server process of the session
        self.backend_pid = backend_pid
        #: set once the session is lost (the server or the network ended it)
        self.lost = trio.Event()
        #: ``"wire"`` or ``"asyncpg"``
        self.transport = "wire" if wire is not None else "asyncpg"
        #: the answer to the LISTEN in flight (set by the reader: `_replied`)
        self._reply = trio.Event()
        self._reply_error: EventStoreError | None = None

    async def listen(self) -> None:
        """LISTEN on the store's channel; returns once the server has done it (then
        ``callback`` is called for every notification committed after).

        Raises:
            EventStoreError: the server refused, or the session was lost, or it did not
                answer within ``config.timeout``.
        """
        config = self._config
        with trio.move_on_after(config.timeout):
            if self._connection is not None:
                channel = _sql.notification_channel(config.schema)
                await self._connection.listen(channel, self._callback)
                return
            assert self._wire is not None
            self._reply = trio.Event()
            try:
                await self._wire.send_query(_sql.listen(config.schema))
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise translate_error(exc, config) from exc
            await self._reply.wait()
            if self._reply_error is not None:
                raise self._reply_error
            return
        raise StorageUnavailableError(f"LISTEN not answered within {config.timeout:g} s")

    def _replied(self, error: EventStoreError | None) -> None:
        self._reply_error = error
        self._reply.set()


@contextlib.asynccontextmanager
async def open_listener(
    config: EventStoreConfig, callback: Callable[[str, str], None], *, role: str
) -> AsyncIterator[Listener]:
    """A session for the store's notifications (``config.session_mode_url`` when set,
    with TCP keepalives on both ends, as `open_connection` ``keepalive=True``), not yet
    listening: `Listener.listen` starts it. ``callback(channel, payload)`` then runs in
    the Trio thread for each notification (it must not block; one that raises is
    logged). `Listener.lost` tells when the session ends.

    Raises:
        EventStoreError: as `open_connection` (cannot connect, rejected, timed out).
    """
    deliver = _logging_errors(callback)
    conn = await _connect(config, role)
    if conn is None:
        async with open_connection(config, session_mode=True, role=role, keepalive=True) as c:
            listener = Listener(config, deliver, c.backend_pid, connection=c)
            c.on_termination(listener.lost.set)
            yield listener
        return
    try:
        listener = Listener(config, deliver, conn.backend_pid, wire=conn)
        # The block's own error reaches the caller as itself, not in a group.
        with single_errors():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_read, conn, listener)
                try:
                    yield listener
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        conn.close()


def _logging_errors(callback: Callable[[str, str], None]) -> Callable[[str, str], None]:
    def deliver(channel: str, payload: str) -> None:
        try:
            callback(channel, payload)
        except Exception:
            logger.exception("a notification callback failed")

    return deliver


async def _connect(config: EventStoreConfig, role: str) -> WireConnection | None:
    """A `_wire` connection for the notifications, keepalives set; None where `_wire`
    cannot connect (then asyncpg does)."""
    try:
        where = _wire_target(config, session_mode=True)
    except Unsupported:
        return None
    timeout = config.timeout
    with trio.move_on_after(timeout):
        try:
            conn = await _wire_connect(config, where, _settings(role)["application_name"])
        except Unsupported:
            return None
        try:
            keepalive = session_keepalive(config)
            keep_socket_alive(conn.raw_socket, keepalive)
            settings = server_keepalive_settings(keepalive)
            shape = await conn.describe(_sql.SET_SESSION_SETTINGS)
            try:
                await conn.fetch(
                    _sql.SET_SESSION_SETTINGS, shape, [(list(settings), list(settings.values()))]
                )
            except DatabaseError as exc:  # e.g. a proxy that refuses them: not fatal
                logger.warning("TCP keepalive settings not applied: %s", exc)
        except (OSError, trio.BrokenResourceError) as exc:
            conn.close()
            raise translate_error(exc, config) from exc
        except BaseException:
            conn.close()
            raise
        return conn
    raise StorageUnavailableError(f"could not connect to the database within {timeout:g} s")


async def _read(conn: WireConnection, listener: Listener) -> None:
    """Read the session until it ends: notifications to the callback, the answer to
    a LISTEN to `Listener.listen`."""
    try:
        await conn.notifications(listener._callback, listener._replied)
    except (EventStoreError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        logger.debug("notification session ended: %r", exc)
    finally:
        conn.close()
        listener.lost.set()
        listener._replied(StorageUnavailableError("the notification session was lost"))
