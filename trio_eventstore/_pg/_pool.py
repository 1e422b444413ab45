"""The store's connection pool, seen from Trio: connections owned on the Trio side
(`_Pool`) with DBConnection's admission rules (`_Admission`), units of work in one
crossing (`Database`), Trio-driven transactions (`Database.open_transaction`), and
pools shared between stores (`open_database`)."""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import trio

from .._config import EventStoreConfig
from .._errors import (
    DatabaseError,
    DatabaseNotFoundError,
    EventStoreClosedError,
    EventStoreError,
    InsufficientPrivilegeError,
    PoolOverloadedError,
    StorageUnavailableError,
    TLSError,
)
from ._bridge import _asyncio_loop, _cross
from ._connection import _connect, _settings
from ._transaction import TransactionConnection
from ._translate import translate_error
from ._units import Conn, Row, _close, _unit_of_work
from ._wire import Target, WireConnection
from ._wire import connect as _wire_connect
from ._wire import target as _wire_target
from ._wire_codecs import Shape, Stale, Unsupported

__all__ = ["Database", "SlotReservation", "TransactionConnection", "open_database"]

T = TypeVar("T")


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


async def waiting_out_overload(
    call: Callable[[], Awaitable[T]], *, first: float = 0.005, ceiling: float = 0.1
) -> T:
    """``await call()``, again after a pause (``first``, doubling up to ``ceiling``)
    each time it fails with `PoolOverloadedError`: for the store's own work (its writer,
    its listener), which waits for a connection (back-pressure; callers own their
    timeouts) instead of failing because readers hold them all."""
    pause = first
    while True:
        try:
            return await call()
        except PoolOverloadedError:
            await trio.sleep(pause)
            pause = min(2 * pause, ceiling)


class SlotReservation:
    """A pooled connection's place, taken ahead by a task (`Database.reserve_slot`) for
    the next connection it acquires, which then does not wait."""

    __slots__ = ("_pool", "held")

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        #: not yet taken by a connection (nor released)
        self.held = True

    def take(self, pool: _Pool) -> bool:
        """Whether this is ``pool``'s place, still held: then it is the caller's now."""
        if self._pool is not pool or not self.held:
            return False
        self.held = False
        return True

    def release(self) -> None:
        """Give the place back, unless a connection took it (then its release does)."""
        if self.held:
            self.held = False
            self._pool._slots.release()
        if _RESERVED.get() is self:
            _RESERVED.set(None)


#: The place the current task reserved (`Database.reserve_slot`), if any.
_RESERVED: contextvars.ContextVar[SlotReservation | None] = contextvars.ContextVar(
    "trio_eventstore_reserved_slot", default=None
)


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
        #: callers waiting for a connection now; callers refused (`PoolOverloadedError`)
        self.waiting = 0
        self.overloads = 0
        #: `_wire` connections (`Database.fetchrow_direct`): idle, and in use
        self._idle_wire: list[WireConnection] = []
        self._busy_wire: set[WireConnection] = set()
        self._target: Target | None = None
        #: what the pooled connections' application_name says (`_connection._settings`)
        self.role = f"pool {config.schema}"

    def _make_room(self, wire: bool) -> None:
        """Before a new connection of one kind: close an idle one of the other kind if
        the pool is full (so that the pool never holds more than ``pool_size``)."""
        if self.size < self.config.pool_size:
            return
        if wire and self._idle:
            self._idle.pop(0).terminate()
            self.size -= 1
        elif not wire and self._idle_wire:
            self._idle_wire.pop(0).close()
            self.size -= 1

    async def _connect(self) -> Any:
        # No asyncpg command_timeout on pooled connections: `Database` bounds each
        # unit of work on the Trio side (an asyncio timer per statement costs a
        # trip through the trio-asyncio loop each).
        return await _cross(
            self.loop,
            _connect(self.config, None, False, self.role, command_timeout=None),
            self.config,
        )

    async def acquire(self) -> Any:
        if self.closed:
            raise EventStoreClosedError()
        await self._take_slot()
        self._still_open()
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed():
                return conn
            self.size -= 1
        self._make_room(wire=False)
        try:
            conn = await self._connect()
        except BaseException:
            self._slots.release()
            raise
        self.size += 1
        return conn

    async def acquire_wire(self) -> WireConnection:
        """A `_wire` connection, under the same slots and admission as the others.

        Raises:
            Unsupported: the target needs what `_wire` does not speak.
        """
        if self.closed:
            raise EventStoreClosedError()
        if self._target is None:
            self._target = _wire_target(self.config)
        await self._take_slot()
        self._still_open()
        try:
            while self._idle_wire:
                conn = self._idle_wire.pop()
                if conn.idle_and_open():
                    break
                conn.close()
                self.size -= 1
            else:
                self._make_room(wire=True)
                conn = await self._connect_wire(self._target)
                if self.closed:  # closed while connecting: the connection is not its to use
                    conn.close()
                    raise EventStoreClosedError()
                self.size += 1
        except BaseException:
            self._slots.release()
            raise
        self._busy_wire.add(conn)
        return conn

    async def _connect_wire(self, target: Target) -> WireConnection:
        timeout = self.config.timeout
        with trio.move_on_after(timeout):
            application_name = _settings(self.role)["application_name"]
            return await _wire_connect(self.config, target, application_name)
        raise StorageUnavailableError(f"could not connect to the database within {timeout:g} s")

    def busy_wire(self) -> Iterable[WireConnection]:
        """The `_wire` connections in use."""
        return self._busy_wire

    def release_wire(self, conn: WireConnection) -> None:
        """Back to the idle ones; closed if it is mid-exchange (cancelled) or the pool
        is closing."""
        self._busy_wire.discard(conn)
        if conn.busy or conn.closed or self.closed:
            conn.close()
            self.size -= 1
        else:
            self._idle_wire.append(conn)
        self._slots.release()

    async def reserve(self) -> SlotReservation:
        """Take a place now, for the next connection this task acquires."""
        if self.closed:
            raise EventStoreClosedError()
        await self._take_slot()
        self._still_open()
        reservation = SlotReservation(self)
        _RESERVED.set(reservation)
        return reservation

    def _still_open(self) -> None:
        """After waiting for a slot: raise `EventStoreClosedError` (giving the slot back)
        if the pool closed meanwhile. A caller waiting when the store closed gets the
        slot a closing connection frees, and must not open a new connection with it
        and write after the store's block has exited."""
        if self.closed:
            self._slots.release()
            raise EventStoreClosedError()

    async def _take_slot(self) -> None:
        reserved = _RESERVED.get()
        if reserved is not None and reserved.take(self):
            _RESERVED.set(None)
            return
        try:
            # A free connection: no cancel scope and no scheduling pass (the I/O that
            # follows checkpoints anyway).
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            self.waiting += 1
            try:
                await self._wait_for_slot()
            finally:
                self.waiting -= 1
        else:
            self.admission.observe(0.0)

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
                self.overloads += 1
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
        # `_wire` statements in flight fail at once (`Database.fetchrow_direct`).
        for wire in [*self._idle_wire, *self._busy_wire]:
            wire.close()
        self.size -= len(self._idle_wire)
        self._idle_wire = []
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
