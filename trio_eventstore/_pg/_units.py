"""The asyncio side of a unit of work on one asyncpg connection: the `Conn` view that
units are written against, transactions whose rollback is bounded, and the rule that
a connection left in an unknown state (cancelled or timed out mid-query, broken
socket) is terminated rather than reused."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import asyncpg

from .._config import EventStoreConfig
from .._errors import StorageUnavailableError
from ._translate import _translated

__all__ = ["CLEANUP_TIMEOUT", "Conn", "Row"]

T = TypeVar("T")


#: Upper bound for rollback / release / close after an error or cancellation.
CLEANUP_TIMEOUT = 5.0
#: Seconds a statement cut short waits for its cancel request to reach the server.
CANCEL_REQUEST_TIMEOUT = 2.0


class Row(Protocol):
    """A result row: index by position or column name."""

    def __getitem__(self, key: int | str, /) -> Any: ...

    def get(self, key: str, default: Any = None, /) -> Any: ...

    def items(self) -> Iterable[tuple[str, Any]]: ...


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

    async def fetchmany(self, sql: str, args: Iterable[Sequence[object]]) -> list[Row]:
        """``sql`` once per argument sequence, in ONE round trip and one transaction
        (all executions sent before one Sync: outside a transaction, they commit or roll
        back together); the rows of all of them, in order."""
        rows: list[Row] = await _translated(self._conn.fetchmany(sql, args), self._config)
        return rows

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
        if isinstance(exc, asyncio.CancelledError | TimeoutError):
            try:
                await _cancel_request_sent(conn)
            finally:
                conn.terminate()
        elif isinstance(exc, StorageUnavailableError | OSError | asyncpg.InterfaceError):
            conn.terminate()
        raise


async def _cancel_request_sent(conn: Any) -> None:
    """(asyncio) Wait, at most `CANCEL_REQUEST_TIMEOUT`, for the cancel request asyncpg
    sends the server for a query cut short (a task of its own, which terminating the
    connection at once cancels unsent: the server then runs the statement to its end,
    holding its transaction's locks all along)."""
    await asyncio.sleep(0)  # asyncpg starts it from the cancelled query's callback
    pending = [t for t in getattr(conn, "_cancellations", ()) if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=CANCEL_REQUEST_TIMEOUT)


async def _close(conn: Any) -> None:
    try:
        await asyncio.wait_for(conn.close(), CLEANUP_TIMEOUT)
    except BaseException:
        conn.terminate()
