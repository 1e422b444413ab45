"""The store's connection pool, seen from Trio: connections owned on the Trio side
(`_Pool`) with DBConnection's admission rules (`_Admission`), places taken ahead for
the next connection (`SlotReservation`, `Database.reserve_slot`), and the store's own
work waiting out an overload (`waiting_out_overload`). `Database` (`_database`) is
its face."""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import trio

from .._config import EventStoreConfig
from .._errors import EventStoreClosedError, PoolOverloadedError, StorageUnavailableError
from ._bridge import _cross
from ._connection import _connect, _settings
from ._units import _close
from ._wire import Target, WireConnection
from ._wire import connect as _wire_connect
from ._wire import target as _wire_target

__all__ = ["SlotReservation", "waiting_out_overload"]

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

    def __init__(self, loop: Any, config: EventStoreConfig, *, replica: bool = False) -> None:
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
        #: connections for appends only, with ``session_replication_role = replica``
        #: (`Database.replica`)
        self.replica = replica
        self._extra = {"session_replication_role": "replica"} if replica else {}
        #: what the pooled connections' application_name says (`_connection._settings`)
        self.role = f"{'appends' if replica else 'pool'} {config.schema}"

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
            _connect(
                self.config, None, False, self.role, command_timeout=None, settings=self._extra
            ),
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
        # Counted from now: another connection made meanwhile makes room for this one.
        self.size += 1
        try:
            conn = await self._connect()
        except BaseException:
            self.size -= 1
            self._slots.release()
            raise
        if self.closed:  # closed while connecting (`close` still closing the idle ones)
            conn.terminate()
            self.size -= 1
            self._slots.release()
            raise EventStoreClosedError()
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
                self.size += 1  # counted from now, as in `acquire`
                try:
                    conn = await self._connect_wire(self._target)
                except BaseException:
                    self.size -= 1
                    raise
                if self.closed:  # closed while connecting: the connection is not its to use
                    conn.close()
                    self.size -= 1
                    raise EventStoreClosedError()
        except BaseException:
            self._slots.release()
            raise
        self._busy_wire.add(conn)
        return conn

    async def _connect_wire(self, target: Target) -> WireConnection:
        timeout = self.config.timeout
        with trio.move_on_after(timeout):
            application_name = _settings(self.role)["application_name"]
            return await _wire_connect(self.config, target, application_name, self._extra)
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
