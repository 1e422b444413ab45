"""The store's LISTEN session (`open_listener`): spoken from Trio (`_wire`) where it can
be, so that the notifications every append produces (two: its stream and ``$all``) cost
a read in a Trio task rather than a turn of the asyncio loop and asyncpg's dispatch
(measured: 18% of the throughput of 50 writers on two cores); through asyncpg where
`_wire` cannot connect (`Unsupported`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import trio

from .. import _sql
from .._config import EventStoreConfig, session_keepalive
from .._errors import DatabaseError, EventStoreError, StorageUnavailableError, single_errors
from ._connection import (
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
    """A live LISTEN session."""

    def __init__(self, backend_pid: int | None, transport: str) -> None:
        #: the server process of the session
        self.backend_pid = backend_pid
        #: set once the session is lost (the server or the network ended it)
        self.lost = trio.Event()
        #: ``"wire"`` or ``"asyncpg"``
        self.transport = transport


@contextlib.asynccontextmanager
async def open_listener(
    config: EventStoreConfig, callback: Callable[[str, str], None], *, role: str
) -> AsyncIterator[Listener]:
    """LISTEN on the store's channel (``config.session_mode_url`` when set, with TCP
    keepalives on both ends, as `open_connection` ``keepalive=True``);
    ``callback(channel, payload)`` runs in the Trio thread for each notification (it
    must not block). Yields once LISTEN is live; `Listener.lost` tells when the
    session ends.

    Raises:
        EventStoreError: as `open_connection` (cannot connect, rejected, timed out).
    """
    conn = await _connect(config, role)
    if conn is None:
        async with open_connection(config, session_mode=True, role=role, keepalive=True) as c:
            listener = Listener(c.backend_pid, "asyncpg")
            c.on_termination(listener.lost.set)
            await c.listen(_sql.notification_channel(config.schema), callback)
            yield listener
        return
    try:
        listener = Listener(conn.backend_pid, "wire")
        # An error of the caller's block is its own, not wrapped in an ExceptionGroup.
        with single_errors():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_read, conn, callback, listener)
                try:
                    yield listener
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        conn.close()


async def _connect(config: EventStoreConfig, role: str) -> WireConnection | None:
    """A `_wire` connection listening on the store's channel; None where `_wire` cannot
    connect (then asyncpg does)."""
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
                    _sql.SET_SESSION_SETTINGS, shape, [list(settings), list(settings.values())]
                )
            except DatabaseError as exc:  # e.g. a proxy that refuses them: not fatal
                logger.warning("TCP keepalive settings not applied: %s", exc)
            await conn.simple_query(_sql.listen(config.schema))
        except (OSError, trio.BrokenResourceError) as exc:
            conn.close()
            raise translate_error(exc, config) from exc
        except BaseException:
            conn.close()
            raise
        return conn
    raise StorageUnavailableError(f"could not connect to the database within {timeout:g} s")


async def _read(
    conn: WireConnection, callback: Callable[[str, str], None], listener: Listener
) -> None:
    """Hand every notification to ``callback`` until the session ends (one that
    raises is logged: the session goes on)."""

    def deliver(channel: str, payload: str) -> None:
        try:
            callback(channel, payload)
        except Exception:
            logger.exception("a notification callback failed")

    try:
        await conn.notifications(deliver)
    except (EventStoreError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        logger.debug("LISTEN session ended: %r", exc)
    finally:
        conn.close()
        listener.lost.set()
