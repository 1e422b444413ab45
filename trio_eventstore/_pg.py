"""The one asyncio boundary: asyncpg on a trio-asyncio loop, seen from Trio.

Nothing else in the package imports asyncpg or trio_asyncio. The rest of the package
talks to Postgres through three things defined here:

* `Conn`: an asyncio-flavoured view of one connection, used *inside* a unit of work;
* `Database`: the pool, seen from Trio; `Database.transaction(fn)` runs a whole unit
  of work ``fn(conn)`` in one crossing of the Trio/asyncio bridge (a crossing costs
  ~170 µs, so never one per statement or per row);
* `TransactionConnection`: a pooled connection inside a transaction, driven from Trio
  one statement per crossing (`Database.open_transaction`: for code that is not ours,
  such as a projection's handler);
* `open_connection`: one dedicated connection (admin tasks, LISTEN, advisory locks);
  those that live as long as the store keep TCP keepalives on both ends, and reconnect
  after `reconnect_delays`.

Every asyncpg / OS error is translated here, once, into the `EventStoreError`
hierarchy (`translate_error`), with passwords scrubbed from messages.

Cancellation: cancelling the Trio caller cancels the asyncio task once; the task then
rolls back and releases its connection with a bounded deadline (the cleanup cannot
be cancelled again, and a connection whose cleanup fails or times out is terminated,
never returned to the pool in an unknown transaction state). The Trio caller waits
for that cleanup before `trio.Cancelled` propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import random
import re
import socket
import ssl
import time
import types
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, Protocol, TypeVar

import asyncpg
import sniffio
import trio
import trio_asyncio

try:  # the trio-asyncio internals `_run_ready_callbacks_together` relies on
    from trio_asyncio._base import AsyncHandle as _AsyncHandle
except ImportError:  # pragma: no cover - another trio-asyncio: its loop runs as shipped
    _AsyncHandle = None

from . import _sql
from ._config import EventStoreConfig, SessionKeepalive, session_keepalive, tls_files
from ._errors import (
    AccessRejectedError,
    AuthenticationError,
    DatabaseError,
    DatabaseNotFoundError,
    EventStoreClosedError,
    EventStoreError,
    InsufficientPrivilegeError,
    PoolOverloadedError,
    StorageUnavailableError,
    TLSError,
    single_errors,
)

__all__ = [
    "CLEANUP_TIMEOUT",
    "Conn",
    "Connection",
    "Database",
    "Row",
    "TransactionConnection",
    "open_connection",
    "open_database",
    "reconnect_delays",
    "translate_error",
]

T = TypeVar("T")

logger = logging.getLogger("trio_eventstore.pg")

#: Upper bound for rollback / release / close after an error or cancellation.
CLEANUP_TIMEOUT = 5.0

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


class Row(Protocol):
    """A result row: index by position or column name."""

    def __getitem__(self, key: int | str, /) -> Any: ...

    def get(self, key: str, default: Any = None, /) -> Any: ...

    def items(self) -> Iterable[tuple[str, Any]]: ...


# --------------------------------------------------------------------------------------
# error translation


_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57")  # connection, resources, operator intervention

#: The server's message for SQLSTATE 3D000 (a server that translates its messages
#: gets the configured database's name instead).
_MISSING_DATABASE = re.compile(r'database "(.*)" does not exist')

#: The server's messages for a connection that pg_hba.conf refuses (SQLSTATE 28000).
_PG_HBA = re.compile(
    r'(?:no pg_hba\.conf entry|pg_hba\.conf rejects connection) for host "(?P<host>[^"]*)", '
    r'user "(?P<user>[^"]*)", database "(?P<database>[^"]*)"(?:, (?P<enc>[^"]*encryption))?'
)


def translate_error(exc: BaseException, config: EventStoreConfig | None = None) -> EventStoreError:
    """The `EventStoreError` for a driver or OS error (passwords scrubbed)."""
    if isinstance(exc, EventStoreError):
        return exc
    message = str(exc) or type(exc).__name__
    if config is not None:
        message = config.redact(message)
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        hba = _PG_HBA.search(str(exc))
        if hba is not None:
            host, user, database, encryption = hba.group("host", "user", "database", "enc")
            return AccessRejectedError(
                f"the server's pg_hba.conf refused this connection before checking any "
                f"password (host {host!r}, user {user!r}, database {database!r}, "
                f"{encryption}): no line admits this host, user, database and encryption, "
                f"or a reject line matches [{message}]",
                host=host,
                user=user,
                database=database,
                encryption=encryption,
            )
        if "pg_hba.conf" in message:
            return AccessRejectedError(
                f"the server's pg_hba.conf refused this connection: {message}"
            )
    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return AuthenticationError(f"authentication failed: {message}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TLSError(
            f"the server's certificate was not accepted ({exc.verify_message}): it must chain "
            "to ssl_root_cert (sslrootcert) and, under verify-full, name the host connected to"
        )
    if isinstance(exc, ssl.SSLError):
        return TLSError(f"the TLS handshake failed: {message}")
    if isinstance(exc, ConnectionError) and "rejected SSL upgrade" in message:
        return TLSError(
            f"the server does not accept TLS connections, which ssl_mode requires: {message}"
        )
    if isinstance(exc, asyncpg.ClientConfigurationError) and (
        "ssl" in message.lower() or "certificate" in message.lower()
    ):
        return TLSError(message)
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None)
        if sqlstate == "42501":  # insufficient_privilege
            return InsufficientPrivilegeError(
                message,
                detail=getattr(exc, "detail", None),
                role=config.effective_username if config is not None else None,
            )
        if sqlstate is not None and sqlstate[:2] in _UNAVAILABLE_SQLSTATE_CLASSES:
            return StorageUnavailableError(f"database unavailable ({sqlstate}): {message}")
        if sqlstate == "3D000":  # invalid_catalog_name
            named = _MISSING_DATABASE.search(str(exc))
            if named is not None:
                return DatabaseNotFoundError(database=named.group(1))
            return DatabaseNotFoundError(database=config.database_name if config else None)
        return DatabaseError(
            message,
            sqlstate=sqlstate,
            constraint_name=getattr(exc, "constraint_name", None),
            detail=getattr(exc, "detail", None),
        )
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return StorageUnavailableError("the database did not answer in time")
    if isinstance(
        exc, OSError | asyncpg.InterfaceError | asyncpg.InternalClientError | ConnectionError
    ):
        return StorageUnavailableError(f"database connection failed: {message}")
    return DatabaseError(f"{type(exc).__name__}: {message}")


def _is_driver_error(exc: BaseException) -> bool:
    return isinstance(
        exc,
        asyncpg.PostgresError
        | asyncpg.InterfaceError
        | asyncpg.InternalClientError
        | OSError
        | TimeoutError
        | asyncio.TimeoutError,
    )


# --------------------------------------------------------------------------------------
# asyncio side


async def _translated(aw: Awaitable[T], config: EventStoreConfig | None) -> T:
    """``await aw``, with driver and OS errors translated (the only place they are)."""
    try:
        return await aw
    except Exception as exc:
        if _is_driver_error(exc):
            raise translate_error(exc, config) from exc
        raise


class Conn:
    """One connection inside a unit of work. Asyncio-flavoured: use only in `fn` passed
    to `Database.transaction` / `Connection.run`. Errors come out translated."""

    __slots__ = ("_config", "_conn")

    def __init__(self, conn: Any, config: EventStoreConfig | None) -> None:
        self._conn = conn
        self._config = config

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        rows: list[Row] = await _translated(self._conn.fetch(sql, *args), self._config)
        return rows

    async def fetchrow(self, sql: str, *args: object) -> Row | None:
        row: Row | None = await _translated(self._conn.fetchrow(sql, *args), self._config)
        return row

    async def fetchval(self, sql: str, *args: object) -> Any:
        return await _translated(self._conn.fetchval(sql, *args), self._config)

    async def execute(self, sql: str, *args: object) -> str:
        status: str = await _translated(self._conn.execute(sql, *args), self._config)
        return status


async def _bounded_cleanup(aw: Awaitable[object], conn: Any) -> None:
    """Run a cleanup step with a deadline; terminate the connection if it fails."""
    try:
        await asyncio.wait_for(aw, CLEANUP_TIMEOUT)
    except BaseException:
        conn.terminate()


async def _in_transaction(
    conn: Any,
    fn: Callable[[Conn], Awaitable[T]],
    config: EventStoreConfig | None,
    settings: Mapping[str, str],
) -> T:
    tr = conn.transaction()
    await tr.start()
    try:
        for name, value in settings.items():
            await conn.execute("SELECT pg_catalog.set_config($1, $2, true)", name, value)
        result = await fn(Conn(conn, config))
    except BaseException:
        if not conn.is_closed():
            await _bounded_cleanup(tr.rollback(), conn)
        raise
    try:
        await tr.commit()
    except BaseException:
        if not conn.is_closed() and conn.is_in_transaction():
            await _bounded_cleanup(tr.rollback(), conn)
        raise
    return result


class _Admission:
    """DBConnection's queue_target / queue_interval, for `_Pool`.

    A caller normally waits up to ``timeout`` for a connection. When during a whole
    ``queue_interval`` no caller got a connection within ``queue_target``, the pool is
    overloaded, and callers wait at most ``2 * queue_target`` until one is served
    within ``queue_target`` again.
    """

    def __init__(self, config: EventStoreConfig) -> None:
        self.target = config.queue_target
        self.interval = config.queue_interval
        self.default_wait = config.timeout
        self._slow_since: float | None = None

    def max_wait(self) -> float:
        if self._slow_since is not None and time.monotonic() - self._slow_since >= self.interval:
            return 2 * self.target
        return self.default_wait

    def observe(self, waited: float) -> None:
        if waited <= self.target:
            self._slow_since = None
        elif self._slow_since is None:
            self._slow_since = time.monotonic() - waited

    @property
    def overloaded(self) -> bool:
        return self._slow_since is not None and time.monotonic() - self._slow_since >= self.interval


async def _unit_of_work(
    conn: Any,
    fn: Callable[[Conn], Awaitable[T]],
    config: EventStoreConfig,
    transactional: bool,
    settings: Mapping[str, str],
) -> T:
    """(asyncio) Run a unit on one connection. Afterwards the connection is idle and
    outside any transaction, or it has been terminated."""
    try:
        if transactional:
            return await _in_transaction(conn, fn, config, settings)
        return await fn(Conn(conn, config))
    except BaseException as exc:
        # Cancelled or timed out mid-query, or a broken socket: a connection in an
        # unknown state never goes back to the pool. (Errors the server answered, and
        # errors `fn` raised between statements, leave it idle and usable.)
        if isinstance(
            exc,
            asyncio.CancelledError
            | TimeoutError
            | StorageUnavailableError
            | OSError
            | asyncpg.InterfaceError,
        ) or (not conn.is_closed() and conn.is_in_transaction()):
            conn.terminate()
        raise


# --------------------------------------------------------------------------------------
# Trio side


async def _cross(loop: Any, coro: Awaitable[T], config: EventStoreConfig | None) -> T:
    """Run an asyncio coroutine on `loop` from Trio, translating driver errors."""
    result: T = await _translated(loop.run_aio_coroutine(coro), config)
    return result


class _Pool:
    """Connections owned on the Trio side: waiting for one is a Trio wait (cancellable,
    with the admission rules of `_Admission`), and a unit of work costs one bridge
    crossing, without asyncpg's pool bookkeeping on the (costly) asyncio side."""

    def __init__(self, loop: Any, config: EventStoreConfig) -> None:
        self.loop = loop
        self.config = config
        self.admission = _Admission(config)
        self._slots = trio.Semaphore(config.pool_size)
        self._idle: list[Any] = []
        self.size = 0
        self.closed = False

    async def _connect(self) -> Any:
        # No asyncpg command_timeout on pooled connections: `Database` bounds each
        # unit of work on the Trio side (an asyncio timer per statement costs a
        # trip through the trio-asyncio loop each).
        role = f"pool {self.config.schema}"
        return await _cross(
            self.loop, _connect(self.config, None, False, role, command_timeout=None), self.config
        )

    async def acquire(self) -> Any:
        if self.closed:
            raise EventStoreClosedError()
        try:
            # A free connection: no cancel scope and no scheduling pass (the crossing
            # that follows checkpoints anyway).
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._wait_for_slot()
        else:
            self.admission.observe(0.0)
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed():
                return conn
            self.size -= 1
        try:
            conn = await self._connect()
        except BaseException:
            self._slots.release()
            raise
        self.size += 1
        return conn

    async def _wait_for_slot(self) -> None:
        admission = self.admission
        started = time.monotonic()
        deadline = started + admission.max_wait()
        while True:
            # Wait in slices of queue_interval, so that a caller already waiting is
            # refused as soon as the pool counts as overloaded (as DBConnection drops
            # queued requests).
            wait = max(0.0, min(deadline - time.monotonic(), admission.interval))
            with trio.move_on_after(wait):
                await self._slots.acquire()
                break
            now = time.monotonic()
            admission.observe(now - started)
            if now >= deadline or admission.overloaded:
                state = "overloaded " if admission.overloaded else ""
                raise PoolOverloadedError(
                    f"no database connection free within {now - started:.3g} s "
                    f"({state}pool of {self.config.pool_size})"
                )
        admission.observe(time.monotonic() - started)

    def release(self, conn: Any) -> None:
        if conn.is_closed() or self.closed:
            self.size -= 1
            if not conn.is_closed():
                conn.terminate()
        else:
            self._idle.append(conn)
        self._slots.release()

    async def open(self) -> None:
        """Connect the first connection (so that startup errors surface at once)."""
        self.release(await self.acquire())

    async def close(self) -> None:
        self.closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            with trio.CancelScope(shield=True):
                await self.loop.run_aio_coroutine(_close(conn))
            self.size -= 1


class Database:
    """The store's connection pool, seen from Trio.

    Every method is one crossing of the bridge: a whole unit of work runs on one
    pooled connection on the asyncio side.
    """

    def __init__(self, pool: _Pool, config: EventStoreConfig) -> None:
        self._pool = pool
        self._config = config

    @property
    def config(self) -> EventStoreConfig:
        return self._config

    async def _run(
        self,
        fn: Callable[[Conn], Awaitable[T]],
        transactional: bool,
        settings: Mapping[str, str],
        statements: int,
    ) -> T:
        pool = self._pool
        conn = await pool.acquire()
        try:
            # As asyncpg's command_timeout would: `timeout` per statement of the unit.
            with trio.move_on_after(self._config.timeout * statements):
                return await _cross(
                    pool.loop,
                    _unit_of_work(conn, fn, self._config, transactional, settings),
                    self._config,
                )
            # Cancelled mid-query: `_unit_of_work` has terminated the connection.
            raise StorageUnavailableError("the database did not answer in time")
        finally:
            pool.release(conn)

    async def transaction(
        self,
        fn: Callable[[Conn], Awaitable[T]],
        *,
        settings: Mapping[str, str] | None = None,
        statements: int = 4,
    ) -> T:
        """Run ``await fn(conn)`` in one transaction (asyncio-flavoured `fn`).

        ``settings`` are set with ``set_config(name, value, true)``: they last for this
        transaction only and never stay on a pooled connection. The unit may take
        ``config.timeout`` per statement (``statements``: about how many it runs,
        begin and commit included).
        """
        return await self._run(fn, True, settings or {}, statements)

    async def run(self, fn: Callable[[Conn], Awaitable[T]], *, statements: int = 2) -> T:
        """Run ``await fn(conn)`` on one pooled connection, outside a transaction
        (bounded as `transaction`)."""
        return await self._run(fn, False, {}, statements)

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        async def unit(conn: Conn) -> list[Row]:
            return await conn.fetch(sql, *args)

        return await self.run(unit)

    async def fetchval(self, sql: str, *args: object) -> Any:
        async def unit(conn: Conn) -> Any:
            return await conn.fetchval(sql, *args)

        return await self.run(unit)

    async def execute(self, sql: str, *args: object) -> str:
        async def unit(conn: Conn) -> str:
            return await conn.execute(sql, *args)

        return await self.run(unit)

    @contextlib.asynccontextmanager
    async def open_transaction(self) -> AsyncIterator[TransactionConnection]:
        """A pooled connection inside a transaction, for Trio-side code (one crossing
        per statement): committed when the block exits normally, rolled back (shielded,
        bounded) when it raises or is cancelled.

        The block holds one of the pool's connections until it exits.

        Raises:
            PoolOverloadedError: no connection free in time.
            DatabaseError: the commit failed, or the transaction was aborted by an
                earlier error that the block caught (SQLSTATE 25P02): nothing of it
                was committed.
        """
        pool = self._pool
        conn = await pool.acquire()
        try:
            tx = TransactionConnection(pool.loop, conn, self._config)
            await tx._begin()
            try:
                yield tx
            except BaseException:
                await tx._rollback()
                raise
            await tx._commit()
        finally:
            if not conn.is_closed() and conn.is_in_transaction():
                conn.terminate()  # never back to the pool inside a transaction
            pool.release(conn)

    def pool_statistics(self) -> dict[str, int | bool]:
        pool = self._pool
        return {
            "size": pool.size,
            "idle": len(pool._idle),
            "max_size": pool.config.pool_size,
            "overloaded": pool.admission.overloaded,
        }


class TransactionConnection:
    """A connection inside a transaction, for Trio code (`Database.open_transaction`).

    Each call is one round trip; one statement at a time (not from several tasks at
    once). Errors come out as `EventStoreError`s: a statement the server refused
    raises `DatabaseError` (with its ``sqlstate``) and aborts the transaction; a
    statement that takes longer than the store's ``timeout``, or is cancelled, drops
    the connection (`StorageUnavailableError`). Do not end the transaction yourself
    (no COMMIT or ROLLBACK): its owner does.
    """

    __slots__ = ("_config", "_conn", "_ended", "_loop")

    def __init__(self, loop: Any, conn: Any, config: EventStoreConfig) -> None:
        self._loop = loop
        self._conn = conn
        self._config = config
        self._ended = False

    async def execute(self, sql: str, *args: object) -> str:
        """Run a statement; returns its status (``"INSERT 0 1"``)."""
        status: str = await self._call(lambda: self._conn.execute(sql, *args))
        return status

    async def executemany(self, sql: str, args: Iterable[Sequence[object]]) -> None:
        """Run a statement once per argument tuple, in one round trip."""
        rows = [tuple(row) for row in args]
        if rows:
            await self._call(lambda: self._conn.executemany(sql, rows))

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        """The rows of a query."""
        rows: list[Row] = await self._call(lambda: self._conn.fetch(sql, *args))
        return rows

    async def fetchrow(self, sql: str, *args: object) -> Row | None:
        """The first row of a query, or None."""
        row: Row | None = await self._call(lambda: self._conn.fetchrow(sql, *args))
        return row

    async def fetchval(self, sql: str, *args: object) -> Any:
        """The first column of the first row of a query, or None."""
        return await self._call(lambda: self._conn.fetchval(sql, *args))

    async def _call(self, statement: Callable[[], Awaitable[T]]) -> T:
        if self._ended:
            raise RuntimeError("this transaction has ended: use the connection inside its block")
        return await self._run(statement)

    async def _run(self, statement: Callable[[], Awaitable[T]]) -> T:
        with trio.move_on_after(self._config.timeout):
            return await _cross(
                self._loop, _statement(self._conn, statement, self._config), self._config
            )
        # Cancelled mid-statement: `_statement` has terminated the connection.
        raise StorageUnavailableError("the database did not answer in time")

    async def _begin(self) -> None:
        await self._run(lambda: self._conn.execute("BEGIN"))

    async def _rollback(self) -> None:
        """Shielded and bounded; a connection whose rollback fails is terminated."""
        self._ended = True
        conn = self._conn
        if not conn.is_closed():
            with trio.CancelScope(shield=True):
                await self._loop.run_aio_coroutine(_rollback(conn))

    async def _commit(self) -> None:
        self._ended = True
        conn = self._conn
        if conn.is_closed():
            raise StorageUnavailableError("the connection was lost before the commit")
        if not conn.is_in_transaction():
            conn.terminate()  # what the block did outside the transaction is not ours
            raise DatabaseError(
                "the transaction was ended inside its block (COMMIT or ROLLBACK): "
                "leave that to its owner",
                sqlstate="25000",
            )
        status = await self._run(lambda: conn.execute("COMMIT"))
        if status != "COMMIT":  # PostgreSQL answers ROLLBACK to an aborted transaction
            raise DatabaseError(
                "the transaction was rolled back: a statement in it had failed "
                "(and the error was caught inside the block)",
                sqlstate="25P02",
            )


async def _rollback(conn: Any) -> None:
    await _bounded_cleanup(conn.execute("ROLLBACK"), conn)


async def _statement(
    conn: Any, statement: Callable[[], Awaitable[T]], config: EventStoreConfig | None
) -> T:
    """(asyncio) One statement of a `TransactionConnection`. Cancelled or timed out
    mid-query, or a broken socket: the connection is in an unknown state, terminate it."""
    try:
        return await _translated(statement(), config)
    except BaseException as exc:
        if isinstance(
            exc,
            asyncio.CancelledError
            | TimeoutError
            | StorageUnavailableError
            | OSError
            | asyncpg.InterfaceError,
        ):
            conn.terminate()
        raise


def _log_asyncio_error(_loop: Any, context: dict[str, Any]) -> None:
    exception = context.get("exception")
    level = logging.DEBUG if isinstance(exception, ConnectionError | OSError) else logging.WARNING
    logger.log(
        level, "asyncio reported: %s", context.get("message", "an error"), exc_info=exception
    )


@contextlib.asynccontextmanager
async def _asyncio_loop() -> AsyncIterator[Any]:
    """The trio-asyncio loop of the calling context, or a new one for this block."""
    loop = trio_asyncio.current_loop.get()
    if loop is not None and not loop.is_closed():
        yield loop
        return
    with single_errors():
        async with trio_asyncio.open_loop() as new_loop:
            # trio-asyncio's default handler re-raises every error asyncio reports into
            # the loop's nursery, so a future asyncpg abandons when a connection drops
            # ("unexpected connection_lost() call") would take the whole store down.
            # Connection loss is handled where it matters (units of work, the notifier,
            # the lock keeper): here it is only logged.
            new_loop.set_exception_handler(_log_asyncio_error)
            _run_ready_callbacks_together(new_loop)
            yield new_loop


def _run_ready_callbacks_together(loop: Any) -> None:
    """Make a trio-asyncio loop run every ready asyncio callback in one pass, and
    cheaply.

    As shipped, trio-asyncio runs one callback per Trio scheduling pass, each behind a
    fresh cancel scope, and checks every ``call_soon`` callback with `inspect`
    (asyncio's debug-style ``_check_callback``): about 18 passes for one query. asyncio
    itself runs all ready callbacks in one iteration; `_main_loop_one_batched` does
    that, and `_call_soon` skips the check (the callbacks are asyncpg's and asyncio's
    own). (Waiting for the first callback without the shipped ``move_on_after`` was
    tried: deliveries then stalled now and then.) Needs the loop internals of
    trio-asyncio 0.15-0.16 (pinned in pyproject); without them, nothing changes.
    """
    if _AsyncHandle is not None and all(
        hasattr(loop, name)
        for name in ("_main_loop_one", "_q_recv", "_timers", "_nursery", "_queue_handle")
    ):
        loop._main_loop_one = types.MethodType(_main_loop_one_batched, loop)
        loop.call_soon = types.MethodType(_call_soon, loop)


def _call_soon(self: Any, callback: Any, *args: Any, context: Any = None) -> Any:
    """trio-asyncio's ``call_soon`` without asyncio's callback check."""
    self._check_closed()
    return self._queue_handle(asyncio.Handle(callback, args, self, context=context))


def _run_handle(self: Any, handle: Any) -> bool:
    """Run a plain asyncio callback; False for a Trio task to start (the caller
    awaits it, as shipped)."""
    if isinstance(handle, _AsyncHandle):
        return False
    if not handle._cancelled:
        previous, sniffio.thread_local.name = sniffio.thread_local.name, "asyncio"
        try:
            handle._run()
        finally:
            sniffio.thread_local.name = previous
    return True


async def _main_loop_one_batched(self: Any, no_wait: bool = False) -> None:
    await type(self)._main_loop_one(self, no_wait)  # one callback, as shipped
    receive = self._q_recv
    for _ in range(_BATCH):  # then what else is ready, without a Trio checkpoint each
        if self._timers and self._timers[0]._when <= self.time():
            return  # a timer is due: the shipped path orders it
        try:
            handle = receive.receive_nowait()
        except trio.WouldBlock:
            return
        if isinstance(handle, asyncio.TimerHandle):
            heapq.heappush(self._timers, handle)
        elif not _run_handle(self, handle):  # a Trio task to start: as shipped
            handle._context.run(self._nursery.start_soon, handle._run, name=handle._callback)
            await handle._started.wait()
            return


#: Ready callbacks run in one pass at most (then Trio's other tasks get their turn).
_BATCH = 64


class _SharedPool:
    def __init__(self, database: Database, key: tuple[object, ...]) -> None:
        self.database = database
        self.key = key
        self.users = 0
        self.idle = trio.Event()


_SHARED: dict[tuple[object, str], _SharedPool] = {}


def _shared_key(config: EventStoreConfig) -> tuple[object, ...]:
    params = config.connect_params()
    return (
        tuple(sorted((k, repr(v)) for k, v in params.items())),
        config.pool_size,
        config.timeout,
    )


@contextlib.asynccontextmanager
async def open_database(config: EventStoreConfig) -> AsyncIterator[Database]:
    """Open the pool (or join the shared pool named by ``shared_connection_pool``).

    Raises:
        StorageUnavailableError: the server cannot be reached in ``config.timeout``.
        AuthenticationError: the server rejected the credentials.
        AccessRejectedError: the server's pg_hba.conf admits no such connection.
        TLSError: TLS could not be set up as ``ssl_mode`` requires.
        InsufficientPrivilegeError: the role may not connect to the database (CONNECT).
        DatabaseNotFoundError: the database does not exist.
    """
    name = config.shared_connection_pool
    if name is not None:
        registry_key = (trio.lowlevel.current_root_task(), name)
        shared = _SHARED.get(registry_key)
        if shared is not None:
            if shared.key != _shared_key(config):
                raise ValueError(
                    f"shared_connection_pool: pool {name!r} is already open with other "
                    "connection settings"
                )
            shared.users += 1
            try:
                yield Database(shared.database._pool, config)
            finally:
                shared.users -= 1
                if shared.users == 0:
                    shared.idle.set()
            return

    async with _asyncio_loop() as loop:
        pool = _Pool(loop, config)
        try:
            try:
                await pool.open()
            except (
                StorageUnavailableError,
                DatabaseNotFoundError,
                TLSError,
                InsufficientPrivilegeError,
            ):
                raise
            except EventStoreError as exc:
                raise StorageUnavailableError(f"cannot open the connection pool: {exc}") from exc
            database = Database(pool, config)
            if name is None:
                yield database
                return
            shared = _SharedPool(database, _shared_key(config))
            shared.users = 1
            _SHARED[registry_key] = shared
            try:
                yield database
            finally:
                shared.users -= 1
                if shared.users == 0:
                    shared.idle.set()
                # The pool lives on the loop this block owns: it stays open until
                # every store sharing it has closed.
                with trio.CancelScope(shield=True):
                    await shared.idle.wait()
                del _SHARED[registry_key]
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await pool.close()


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

        await _cross(self._loop, self._conn.add_listener(channel, on_notify), self._config)

    def on_termination(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (in the Trio thread, must not block) once the connection
        is lost or closed."""

        def on_close(_conn: Any) -> None:
            callback()

        self._conn.add_termination_listener(on_close)

    @property
    def backend_pid(self) -> int:
        pid: int = self._conn.get_server_pid()
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
) -> Any:
    params = config.connect_params(database=database, session_mode=session_mode)
    _check_tls_files(params.get("dsn"))
    conn = await asyncpg.connect(
        **params,
        timeout=config.timeout,
        command_timeout=command_timeout,
        statement_cache_size=config.statement_cache_size,
        server_settings=_settings(role),
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
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
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
    settings = {
        "tcp_keepalives_idle": str(keepalive.idle),
        "tcp_keepalives_interval": str(keepalive.interval),
        "tcp_keepalives_count": str(keepalive.count),
        "tcp_user_timeout": str(keepalive.user_timeout_ms),
    }
    try:
        await conn.fetchval(_sql.SET_SESSION_SETTINGS, list(settings), list(settings.values()))
    except asyncpg.PostgresError as exc:  # e.g. a proxy that refuses them: not fatal
        logger.warning("TCP keepalive settings not applied: %s", exc)


def _check_tls_files(dsn: str | None) -> None:
    """Raise `TLSError` naming the parameter when a certificate or key file cannot be
    read (the driver would report a bare OS error, as for an unreachable server)."""
    for param, path in tls_files(dsn):
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            reason = "is not a readable file" if os.path.exists(path) else "does not exist"
            field = {"sslrootcert": "ssl_root_cert", "sslcert": "ssl_cert", "sslkey": "ssl_key"}
            raise TLSError(f"{field[param]} ({param}) {path!r} {reason}")


async def _close(conn: Any) -> None:
    try:
        await asyncio.wait_for(conn.close(), CLEANUP_TIMEOUT)
    except BaseException:
        conn.terminate()


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
