"""Dedicated connections, seen from Trio (`open_connection`, `Connection`): admin
tasks, LISTEN and advisory locks. Connecting (`_connect`, shared with the pool):
application_name, TLS file checks, and TCP keepalives on both ends of the sessions
that live as long as the store; the reconnect back-off of those sessions."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

import asyncpg
import trio

from .. import _sql
from .._config import EventStoreConfig, SessionKeepalive, session_keepalive
from .._errors import TLSError
from .._urls import tls_files
from ._bridge import AtOnce, _asyncio_loop, _cross
from ._units import Conn, Row, _close, _in_transaction

__all__ = ["Connection", "open_connection", "reconnect_delays"]

T = TypeVar("T")

logger = logging.getLogger("trio_eventstore.pg")


#: Reconnect back-off of the dedicated connections (seconds): the first delay, the
#: factor, the ceiling during the first `RECONNECT_FAST_FOR` seconds of an outage, and
#: the ceiling after that.
RECONNECT_BACKOFF = (0.05, 2.0, 1.0, 5.0)
RECONNECT_FAST_FOR = 30.0


def reconnect_delays() -> Iterator[float]:
    """Delays between the attempts to reconnect a dedicated connection (LISTEN, locks):
    short at first, so that a restarted server is found within about a second; at most
    every 5 s once the outage has lasted `RECONNECT_FAST_FOR`. With jitter, so that the
    nodes of a cluster do not reconnect in step."""
    first, factor, fast_ceiling, slow_ceiling = RECONNECT_BACKOFF
    started = time.monotonic()
    delay = first
    while True:
        fast = time.monotonic() - started < RECONNECT_FAST_FOR
        yield min(delay, fast_ceiling if fast else slow_ceiling) * random.uniform(0.5, 1.0)
        delay = min(delay * factor, slow_ceiling)


class Connection:
    """One dedicated connection, seen from Trio (admin tasks, LISTEN, advisory locks)."""

    def __init__(self, loop: Any, conn: Any, config: EventStoreConfig) -> None:
        self._loop = loop
        self._conn = conn
        self._config = config

    async def run(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``await fn(conn)`` in one crossing (asyncio-flavoured `fn`)."""

        async def unit() -> T:
            return await fn(Conn(self._conn, self._config))

        return await _cross(self._loop, unit(), self._config)

    async def transaction(
        self, fn: Callable[[Conn], Awaitable[T]], *, settings: Mapping[str, str] | None = None
    ) -> T:
        return await _cross(
            self._loop, _in_transaction(self._conn, fn, self._config, settings or {}), self._config
        )

    async def execute(self, sql: str, *args: object) -> str:
        async def unit(conn: Conn) -> str:
            return await conn.execute(sql, *args)

        return await self.run(unit)

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        async def unit(conn: Conn) -> list[Row]:
            return await conn.fetch(sql, *args)

        return await self.run(unit)

    async def fetchval(self, sql: str, *args: object) -> Any:
        async def unit(conn: Conn) -> Any:
            return await conn.fetchval(sql, *args)

        return await self.run(unit)

    async def listen(self, channel: str, callback: Callable[[str, str], None]) -> None:
        """LISTEN on ``channel``; ``callback(channel, payload)`` runs for each
        notification, in the Trio thread (it must not block)."""

        def on_notify(_conn: Any, _pid: int, chan: str, payload: str) -> None:
            callback(chan, payload)

        await _cross(self._loop, self._conn.add_listener(channel, AtOnce(on_notify)), self._config)

    def on_termination(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (in the Trio thread, must not block) once the connection
        is lost or closed."""

        def on_close(_conn: Any) -> None:
            callback()

        self._conn.add_termination_listener(on_close)

    @property
    def backend_pid(self) -> int | None:
        """The server process; None once the connection has ended (statistics ask for it
        at any time, also while the connection is being lost)."""
        if self._conn.is_closed():
            return None
        try:
            pid: int = self._conn.get_server_pid()
        except AttributeError:  # asyncpg drops its protocol object as the connection ends
            return None
        return pid

    def is_closed(self) -> bool:
        closed: bool = self._conn.is_closed()
        return closed

    def terminate(self) -> None:
        """Drop the connection at once (no round trip)."""
        self._conn.terminate()


def _settings(role: str) -> dict[str, str]:
    """Session settings: an application_name that tells operators which connection
    of which store this is (pg_stat_activity)."""
    return {"application_name": f"trio-eventstore {role}"[:63]}


async def _connect(
    config: EventStoreConfig,
    database: str | None,
    session_mode: bool,
    role: str,
    *,
    command_timeout: float | None,
    keepalive: bool = False,
    settings: Mapping[str, str] | None = None,
) -> Any:
    params = config.connect_params(database=database, session_mode=session_mode)
    _check_tls_files(params.get("dsn"))
    conn = await asyncpg.connect(
        **params,
        timeout=config.timeout,
        command_timeout=command_timeout,
        statement_cache_size=config.statement_cache_size,
        server_settings={**_settings(role), **(settings or {})},
    )
    if keepalive:
        try:
            await _keep_alive(conn, session_keepalive(config))
        except BaseException:
            conn.terminate()
            raise
    return conn


_TCP_OPTIONS = (
    ("TCP_KEEPIDLE", "idle"),
    ("TCP_KEEPINTVL", "interval"),
    ("TCP_KEEPCNT", "count"),
    ("TCP_USER_TIMEOUT", "user_timeout_ms"),
)


async def _keep_alive(conn: Any, keepalive: SessionKeepalive) -> None:
    """TCP keepalives on both ends of a session that lives long: the server drops the
    session (and so releases its advisory locks) once the client has been unreachable
    for ``idle + count * interval`` seconds, instead of after hours with the system's
    defaults; the client's socket notices a server gone silent alike.

    The server's side is set with ``set_config`` rather than startup parameters, which
    PgBouncer refuses; on a Unix socket the server ignores them."""
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        keep_socket_alive(sock, keepalive)
    settings = server_keepalive_settings(keepalive)
    try:
        await conn.fetchval(_sql.SET_SESSION_SETTINGS, list(settings), list(settings.values()))
    except asyncpg.PostgresError as exc:  # e.g. a proxy that refuses them: not fatal
        logger.warning("TCP keepalive settings not applied: %s", exc)


def keep_socket_alive(sock: Any, keepalive: SessionKeepalive) -> None:
    """The client's side of `_keep_alive` (TCP sockets only)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)] + [
        (socket.IPPROTO_TCP, getattr(socket, name), getattr(keepalive, field))
        for name, field in _TCP_OPTIONS
        if hasattr(socket, name)
    ]
    for level, option, value in options:
        try:
            sock.setsockopt(level, option, value)
        except OSError as exc:  # pragma: no cover - a platform without the option
            logger.debug("socket option %s not set: %s", option, exc)


def server_keepalive_settings(keepalive: SessionKeepalive) -> dict[str, str]:
    """The server's side of `_keep_alive`: settings for `_sql.SET_SESSION_SETTINGS`."""
    return {
        "tcp_keepalives_idle": str(keepalive.idle),
        "tcp_keepalives_interval": str(keepalive.interval),
        "tcp_keepalives_count": str(keepalive.count),
        "tcp_user_timeout": str(keepalive.user_timeout_ms),
    }


def _check_tls_files(dsn: str | None) -> None:
    """Raise `TLSError` naming the parameter when a certificate or key file cannot be
    read (the driver would report a bare OS error, as for an unreachable server)."""
    for param, path in tls_files(dsn):
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            reason = "is not a readable file" if os.path.exists(path) else "does not exist"
            field = {"sslrootcert": "ssl_root_cert", "sslcert": "ssl_cert", "sslkey": "ssl_key"}
            raise TLSError(f"{field[param]} ({param}) {path!r} {reason}")


@contextlib.asynccontextmanager
async def open_connection(
    config: EventStoreConfig,
    *,
    database: str | None = None,
    session_mode: bool = False,
    role: str = "admin",
    keepalive: bool = False,
) -> AsyncIterator[Connection]:
    """One dedicated connection to ``database`` (default: the store's database).

    ``session_mode`` uses ``config.session_mode_url`` when it is set; ``role`` names
    the connection in ``application_name``; ``keepalive`` sets TCP keepalives on both
    ends (`session_keepalive`), for the sessions that live as long as the store.
    """
    async with _asyncio_loop() as loop:
        conn = await _cross(
            loop,
            _connect(
                config,
                database,
                session_mode,
                role,
                command_timeout=config.timeout,
                keepalive=keepalive,
            ),
            config,
        )
        try:
            yield Connection(loop, conn, config)
        finally:
            with trio.CancelScope(shield=True):
                await loop.run_aio_coroutine(_close(conn))
