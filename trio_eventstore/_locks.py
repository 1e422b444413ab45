"""The lock keeper: session advisory locks on one dedicated connection.

Subscription locks use the Elixir library's key: (oid of "<schema>".subscriptions,
subscription_id), so Elixir and Python subscribers of one name exclude each other. A
lease is lost the moment its connection drops (Postgres releases session locks then);
its holder must stop delivering at once and try again later.
"""

from __future__ import annotations

import logging

import trio

from . import _sql
from ._config import EventStoreConfig
from ._errors import EventStoreError, StorageUnavailableError
from ._pg import Connection, open_connection

__all__ = ["Lease", "LockKeeper", "lock_key2", "run_lock_keeper"]

logger = logging.getLogger("trio_eventstore.locks")

BACKOFF = (0.05, 2.0, 5.0)
_INT_MAX = 2147483647


def lock_key2(subscription_id: int) -> int:
    """The second lock key of a subscription, as Elixir computes it."""
    return subscription_id % _INT_MAX if subscription_id > _INT_MAX else subscription_id


class Lease:
    """A held advisory lock. ``lost`` is set when it is released or its connection drops."""

    def __init__(self, keeper: LockKeeper, key: tuple[int, int]) -> None:
        self._keeper = keeper
        self.key = key
        self.lost = trio.Event()

    async def release(self) -> None:
        """Release the lock (no-op when already lost)."""
        await self._keeper._release(self)


class LockKeeper:
    def __init__(self, config: EventStoreConfig) -> None:
        self._config = config
        self._conn: Connection | None = None
        self._leases: dict[tuple[int, int], Lease] = {}
        self._lock = trio.Lock()  # one query at a time on the connection
        self.connected = trio.Event()
        self.reconnects = 0

    async def _query(self, conn: Connection, sql: str, *args: object) -> object:
        """One lock query, never cut short by a caller's cancellation (a query cancelled
        mid-flight would leave the shared lock connection busy); bounded by the
        configured timeout, after which the connection is dropped (every lease is then
        lost, and the keeper reconnects)."""
        result: object = None
        async with self._lock:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self._config.timeout) as bound:
                    try:
                        result = await conn.fetchval(sql, *args)
                    except StorageUnavailableError:
                        # E.g. the server killed it and asyncpg has not seen the socket
                        # close yet: drop it now, so that the keeper reconnects at once.
                        conn.terminate()
                        raise
        if bound.cancelled_caught:
            conn.terminate()
            raise StorageUnavailableError("the advisory-lock connection did not answer")
        return result

    async def try_lock(self, key1: int, key2: int) -> Lease | None:
        """Try to take the lock; None when another session holds it.

        Raises:
            StorageUnavailableError: the lock connection is down.
        """
        key = (key1, key2)
        if key in self._leases:
            return None  # held by another subscription of this very store
        conn = self._conn
        if conn is None or conn.is_closed():
            raise StorageUnavailableError("the advisory-lock connection is down")
        if not await self._query(conn, _sql.TRY_LOCK, key1, key2):
            return None
        lease = Lease(self, key)
        self._leases[key] = lease
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
        except trio.Cancelled:  # the caller went away meanwhile: give the lock back
            with trio.CancelScope(shield=True):
                await self._release(lease)
            raise
        return lease

    async def _release(self, lease: Lease) -> None:
        if self._leases.get(lease.key) is not lease:
            lease.lost.set()
            return
        del self._leases[lease.key]
        lease.lost.set()
        conn = self._conn
        if conn is None or conn.is_closed():
            return
        try:
            await self._query(conn, _sql.UNLOCK, *lease.key)
        except EventStoreError as exc:  # the connection is going: Postgres releases it
            logger.info("unlock of %s failed: %s", lease.key, exc)

    def _lose_all(self) -> None:
        for lease in self._leases.values():
            lease.lost.set()
        self._leases.clear()

    @property
    def backend_pid(self) -> int | None:
        return None if self._conn is None else self._conn.backend_pid


async def run_lock_keeper(
    keeper: LockKeeper, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """The store's lock connection: started once connected; reconnects with back-off."""
    delay = BACKOFF[0]
    started = False
    while True:
        try:
            async with open_connection(
                keeper._config, session_mode=True, role=f"locks {keeper._config.schema}"
            ) as conn:
                lost = trio.Event()
                conn.on_termination(lost.set)
                keeper._conn = conn
                keeper.connected.set()
                if not started:
                    started = True
                    task_status.started()
                delay = BACKOFF[0]
                try:
                    await lost.wait()
                finally:
                    keeper._conn = None
                    keeper.connected = trio.Event()
                    keeper._lose_all()
        except EventStoreError as exc:
            if not started:
                raise
            logger.warning("lock connection lost (%s); reconnecting in %.2f s", exc, delay)
        if not started:
            raise StorageUnavailableError("the advisory-lock connection closed during startup")
        keeper.reconnects += 1
        await trio.sleep(delay)
        delay = min(delay * BACKOFF[1], BACKOFF[2])
