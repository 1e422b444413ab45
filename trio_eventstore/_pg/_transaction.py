"""A transaction driven from Trio (`TransactionConnection`, for
`Database.open_transaction`): one crossing per statement, its end left to its owner."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import trio

from .._config import EventStoreConfig
from .._errors import DatabaseError, StorageUnavailableError
from ._bridge import _cross
from ._units import Row, _rollback, _statement

__all__ = ["TransactionConnection"]

T = TypeVar("T")


class TransactionConnection:
    """A connection inside a transaction, for Trio code (`Database.open_transaction`).

    Each call is one round trip; one statement at a time (not from several tasks at
    once). Errors come out as `EventStoreError`s: a statement the server refused
    raises `DatabaseError` (with its ``sqlstate``) and aborts the transaction; a
    statement that takes longer than the store's ``timeout``, or is cancelled, is
    cancelled on the server and drops the connection (`StorageUnavailableError`). Do
    not end the transaction yourself
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
