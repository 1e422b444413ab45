"""The store's connection pool as the rest of the package sees it (`Database`): units
of work in one crossing, hot statements sent straight from Trio (`_wire`), Trio-driven
transactions (`Database.open_transaction`), and pools shared between stores
(`open_database`). The pool itself is `_pool`'s."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import trio

from .._config import EventStoreConfig
from .._errors import (
    DatabaseError,
    DatabaseNotFoundError,
    EventStoreClosedError,
    EventStoreError,
    InsufficientPrivilegeError,
    StorageUnavailableError,
    TLSError,
)
from ._bridge import _asyncio_loop, _cross
from ._pool import SlotReservation, _Pool
from ._transaction import TransactionConnection
from ._translate import translate_error
from ._units import Conn, Row, _unit_of_work
from ._wire import WireConnection
from ._wire_codecs import Shape, Stale, Unsupported

__all__ = ["Database", "TransactionConnection", "open_database"]

T = TypeVar("T")


class Database:
    """The store's connection pool, seen from Trio.

    A unit of work (`transaction`, `run`, `fetch`, ...) is one crossing of the bridge: it
    runs whole on one pooled connection on the asyncio side. The ``*_direct`` statements
    do not cross at all (`_wire`, from Trio); `open_transaction` crosses once per
    statement.
    """

    def __init__(self, pool: _Pool, config: EventStoreConfig) -> None:
        self._pool = pool
        self._config = config
        #: `fetchrow_direct`: off once `_wire` cannot connect as asyncpg would; the
        #: shapes of the statements it ran; the statements it cannot run
        self._wire_off = False
        self._shapes: dict[str, Shape] = {}
        #: `watch_statements` runs (in the store's nursery)
        self._watched = False
        self._not_direct: set[str] = set()

    @property
    def config(self) -> EventStoreConfig:
        return self._config

    @property
    def replica(self) -> bool:
        """Whether its connections run with ``session_replication_role = replica``
        (``open_database(replica=True)``): no trigger fires on them, so statements that
        write stream rows send the notifications themselves."""
        return self._pool.replica

    async def reserve_slot(self) -> SlotReservation:
        """Wait for a pooled connection's place (as any statement does: it may raise
        `PoolOverloadedError`) and keep it for the next statement this task sends, which
        then does not wait. `SlotReservation.release` gives it back if none did. For
        work that must not be committed to until a connection is free (the group-commit
        writer takes appends from its queue only then)."""
        return await self._pool.reserve()

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

    async def fetchrow_direct(self, sql: str, *args: object, statements: int = 1) -> Row | None:
        """As ``run`` of ``conn.fetchrow(sql, *args)``, but sent straight from Trio
        (`_wire`: no bridge crossing), for the hot statements. Falls back to asyncpg
        when `_wire` cannot (an authentication method, a type, a TLS mode it does not
        speak). Cancelled or timed out mid-statement, the connection is closed (the
        statement may still commit, as with asyncpg)."""
        rows = await self.fetchmany_direct(sql, (args,), statements=statements)
        return rows[0] if rows else None

    async def fetch_direct(self, sql: str, *args: object, statements: int = 1) -> Sequence[Row]:
        """As ``run`` of ``conn.fetch(sql, *args)``, sent as `fetchrow_direct` is."""
        return await self.fetchmany_direct(sql, (args,), statements=statements)

    async def fetchmany_direct(
        self, sql: str, args: Sequence[Sequence[object]], *, statements: int = 1
    ) -> Sequence[Row]:
        """As ``run`` of ``conn.fetchmany(sql, args)`` (each argument sequence executed,
        all before one Sync: one round trip, one implicit transaction), sent as
        `fetchrow_direct` is."""
        if self._wire_off or sql in self._not_direct:
            return await self._fetchmany(sql, args, statements)
        pool = self._pool
        try:
            conn = await pool.acquire_wire()
        except Unsupported:
            self._wire_off = True
            return await self._fetchmany(sql, args, statements)
        # Failed or cancelled mid-statement, the connection is left busy: `release_wire`
        # closes it.
        timeout = self._config.timeout * statements
        rows: Sequence[Row] | None = None
        try:
            if self._watched:  # `watch_statements` times it out: no cancel scope to pay
                conn.deadline = trio.current_time() + timeout
                rows = await self._exchange(conn, sql, args)
                conn.deadline = None
            else:
                with trio.move_on_after(timeout) as scope:
                    rows = await self._exchange(conn, sql, args)
                if scope.cancelled_caught:
                    raise StorageUnavailableError("the database did not answer in time")
        finally:
            pool.release_wire(conn)
        if rows is None:
            return await self._fetchmany(sql, args, statements)
        return rows

    async def watch_statements(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Time out the statements sent straight from Trio (`fetchmany_direct`) while it
        runs, by closing the connection of one past its deadline: one task in the
        store's nursery instead of a cancel scope per statement (trio's cost ~4% of a
        lone append). It looks every quarter of ``timeout`` (at most every second), so
        such a statement fails within ``timeout`` plus that."""
        interval = min(1.0, self._config.timeout / 4)
        self._watched = True
        try:
            task_status.started()
            while True:
                await trio.sleep(interval)
                now = trio.current_time()
                for conn in list(self._pool.busy_wire()):
                    if conn.deadline is not None and conn.deadline <= now:
                        conn.timed_out = True
                        conn.close()  # its task, waiting for the answer, is woken
        finally:
            self._watched = False

    async def _exchange(
        self, conn: WireConnection, sql: str, args: Sequence[Sequence[object]]
    ) -> Sequence[Row] | None:
        """`_direct`, its failures translated; None when `_wire` cannot send ``sql``."""
        try:
            return await self._direct(conn, sql, args)
        except Unsupported:
            self._not_direct.add(sql)
            return None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if conn.timed_out:
                raise StorageUnavailableError("the database did not answer in time") from exc
            if self._pool.closed:
                raise EventStoreClosedError(
                    "the event store closed while a statement was in flight "
                    "(an append may have been committed)"
                ) from exc
            raise translate_error(exc, self._config) from exc

    async def _direct(
        self, conn: WireConnection, sql: str, args: Sequence[Sequence[object]]
    ) -> Sequence[Row]:
        for attempt in range(2):
            shape = self._shapes.get(sql)
            if shape is None:
                shape = self._shapes[sql] = await conn.describe(sql)
            try:
                rows: Sequence[Row] = await conn.fetch(sql, shape, args)
            except (DatabaseError, Stale) as exc:
                # The prepared statement is gone or changed (a schema change, a proxy's
                # DISCARD): describe and prepare it again, once (as asyncpg does).
                stale = isinstance(exc, Stale) or exc.sqlstate in ("0A000", "26000")
                if attempt or not stale:
                    raise
                conn.forget(sql)
                self._shapes.pop(sql, None)
                continue
            return rows
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fetchmany(
        self, sql: str, args: Sequence[Sequence[object]], statements: int
    ) -> list[Row]:
        async def unit(conn: Conn) -> list[Row]:
            if len(args) == 1:
                return await conn.fetch(sql, *args[0])
            return await conn.fetchmany(sql, args)

        return await self.run(unit, statements=statements)

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
            "in_use": pool.config.pool_size - pool._slots.value,
            "waiting": pool.waiting,
            "overloads": pool.overloads,
        }


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
        config.queue_target,  # the admission rules are the pool's
        config.queue_interval,
    )


@contextlib.asynccontextmanager
async def open_database(
    config: EventStoreConfig, *, replica: bool = False
) -> AsyncIterator[Database]:
    """Open the pool (or join the shared pool named by ``shared_connection_pool``).

    ``replica``: a pool of its own (never shared), whose connections run with
    ``session_replication_role = replica`` (`Database.replica`).

    Raises:
        StorageUnavailableError: the server cannot be reached in ``config.timeout``.
        AuthenticationError: the server rejected the credentials.
        AccessRejectedError: the server's pg_hba.conf admits no such connection.
        TLSError: TLS could not be set up as ``ssl_mode`` requires.
        InsufficientPrivilegeError: the role may not connect to the database (CONNECT).
        DatabaseNotFoundError: the database does not exist.
    """
    name = None if replica else config.shared_connection_pool
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
        pool = _Pool(loop, config, replica=replica)
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
