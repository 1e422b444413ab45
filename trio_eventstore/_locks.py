"""The lock keeper: session advisory locks on one dedicated connection.

Subscription locks use the Elixir library's key: (oid of "<schema>".subscriptions,
subscription_id), so Elixir and Python subscribers of one name exclude each other. A
lease is lost the moment its connection drops (Postgres releases session locks then);
its holder must stop delivering at once and try again later.

Standbys (subscriptions whose lock another session holds) do not poll one by one: the
keeper tries every lock its store waits for in one query, at once when a new one is
asked for, then every ``subscription_standby_interval``, and at once after a reconnect.
While the store holds leases, that round is also the lock connection's check: a query
that gets no answer within ``subscription_lease_timeout`` drops the connection and every
lease with it, so a holder cut off from the database stops delivering within
``subscription_standby_interval + subscription_lease_timeout``, before the server (told
by TCP keepalives, see `_pg`) drops the silent session and a standby elsewhere can take
the lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from . import _sql
from ._config import EventStoreConfig
from ._errors import EventStoreError, StorageUnavailableError, single_errors
from ._pg import Connection, Row, open_connection, reconnect_delays

__all__ = ["Lease", "LockKeeper", "lock_key2", "run_lock_keeper"]

logger = logging.getLogger("trio_eventstore.locks")

_INT_MAX = 2147483647


def lock_key2(subscription_id: int) -> int:
    """The second lock key of a subscription, as Elixir computes it."""
    return subscription_id % _INT_MAX if subscription_id > _INT_MAX else subscription_id


class Lease:
    """A held advisory lock. ``lost`` is set when it is released or its connection drops;
    ``on_lost`` (sync, must not block), when given, is called then: a holder with no task
    waiting on ``lost`` (a hibernated subscription) hears of it too."""

    __slots__ = ("_keeper", "key", "lost", "on_lost")

    def __init__(self, keeper: LockKeeper, key: tuple[int, int]) -> None:
        self._keeper = keeper
        self.key = key
        self.lost = trio.Event()
        self.on_lost: Callable[[], None] | None = None

    def _lose(self) -> None:
        if self.lost.is_set():
            return
        self.lost.set()
        if self.on_lost is not None:
            self.on_lost()

    async def release(self) -> None:
        """Release the lock (no-op when already lost)."""
        await self._keeper._release(self)


class _Want:
    """A caller of `LockKeeper.acquire`, waiting for its lock."""

    __slots__ = ("granted", "key", "lease", "on_attempt")

    def __init__(self, key: tuple[int, int], on_attempt: Callable[[bool], None] | None) -> None:
        self.key = key
        self.on_attempt = on_attempt
        self.lease: Lease | None = None
        self.granted = trio.Event()


class LockKeeper:
    def __init__(self, config: EventStoreConfig) -> None:
        self._config = config
        self._conn: Connection | None = None
        self._leases: dict[tuple[int, int], Lease] = {}
        self._wants: dict[tuple[int, int], list[_Want]] = {}  # in the order they came
        self._round_due = trio.Event()
        self._lock = trio.Lock()  # one query at a time on the connection
        self.connected = trio.Event()
        self.reconnects = 0
        #: queries that tried the locks of waiting subscriptions (one per round)
        self.rounds = 0

    async def _fetch(self, conn: Connection, sql: str, *args: object) -> list[Row]:
        """One lock query, never cut short by a caller's cancellation (a query cancelled
        mid-flight would leave the shared lock connection busy); bounded by
        ``subscription_lease_timeout``, after which the connection is dropped (every
        lease is then lost at once, and the keeper reconnects)."""
        result: list[Row] = []
        async with self._lock:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self._config.subscription_lease_timeout) as bound:
                    try:
                        result = await conn.fetch(sql, *args)
                    except StorageUnavailableError:
                        # E.g. the server killed it and asyncpg has not seen the socket
                        # close yet: drop it now, so that the keeper reconnects at once.
                        self._drop(conn)
                        raise
        if bound.cancelled_caught:
            self._drop(conn)
            raise StorageUnavailableError("the advisory-lock connection did not answer")
        return result

    def _drop(self, conn: Connection) -> None:
        if self._conn is conn:
            self._lose_all()  # stop the holders now, not once the socket has closed
        conn.terminate()

    async def acquire(
        self, key1: int, key2: int, *, on_attempt: Callable[[bool], None] | None = None
    ) -> Lease:
        """Wait until this store holds the lock (cancel to stop waiting).

        It is tried at once, then with every other lock the store waits for, in one
        query per ``subscription_standby_interval``, and at once after a reconnect.
        ``on_attempt(granted)`` is called (sync) after each attempt.
        """
        key = (key1, key2)
        want = _Want(key, on_attempt)
        self._wants.setdefault(key, []).append(want)
        self._round_due.set()
        try:
            await want.granted.wait()
        except BaseException:
            # Cancelled, maybe just after a round granted it: give the lock back.
            if want.lease is not None:
                with trio.CancelScope(shield=True):
                    await want.lease.release()
            raise
        finally:
            waiting = self._wants[key]
            waiting.remove(want)
            if not waiting:
                del self._wants[key]
        assert want.lease is not None
        return want.lease

    def _next_waiting(self, key: tuple[int, int]) -> _Want | None:
        """The first caller waiting for ``key``, unless this store holds that lock
        already (another of its subscriptions waits for that one to be released)."""
        if key in self._leases:
            return None
        return next((w for w in self._wants.get(key, ()) if not w.granted.is_set()), None)

    async def _round(self, conn: Connection) -> None:
        """Try every lock that callers wait for, in one query; or, with none waiting but
        leases held, check that the connection answers."""
        keys = [key for key in self._wants if self._next_waiting(key) is not None]
        if not keys:
            if self._leases:
                await self._fetch(conn, _sql.PING)
            return
        self.rounds += 1
        rows = await self._fetch(conn, _sql.TRY_LOCKS, [k for k, _ in keys], [k for _, k in keys])
        locked = {(int(row[0]), int(row[1])) for row in rows if row[2]}
        for key in keys:
            want = self._next_waiting(key) if key in locked else None
            if key in locked:
                if want is None:  # its caller went away while the query ran
                    await self._fetch(conn, _sql.UNLOCK, *key)
                    continue
                want.lease = self._leases[key] = Lease(self, key)
                want.granted.set()
            for waiting in self._wants.get(key, ()):
                if waiting.on_attempt is not None:
                    waiting.on_attempt(waiting is want)

    async def _rounds(self, conn: Connection) -> None:
        interval = self._config.subscription_standby_interval
        while True:
            with trio.move_on_after(interval):
                await self._round_due.wait()
            self._round_due = trio.Event()
            await self._round(conn)

    async def _release(self, lease: Lease) -> None:
        if self._leases.get(lease.key) is not lease:
            lease._lose()
            return
        del self._leases[lease.key]
        lease._lose()
        if lease.key in self._wants:
            self._round_due.set()  # another subscription of this store waits for it
        conn = self._conn
        if conn is None or conn.is_closed():
            return
        try:
            await self._fetch(conn, _sql.UNLOCK, *lease.key)
        except EventStoreError as exc:  # the connection is going: Postgres releases it
            logger.info("unlock of %s failed: %s", lease.key, exc)

    def _lose_all(self) -> None:
        leases = list(self._leases.values())
        self._leases.clear()
        for lease in leases:
            lease._lose()

    @property
    def backend_pid(self) -> int | None:
        return None if self._conn is None else self._conn.backend_pid


async def run_lock_keeper(
    keeper: LockKeeper, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """The store's lock connection: started once connected; reconnects with back-off
    (`reconnect_delays`) and then tries the locks its subscriptions wait for at once."""
    config = keeper._config
    delays = reconnect_delays()
    started = False
    while True:
        try:
            async with open_connection(
                config, session_mode=True, role=f"locks {config.schema}", keepalive=True
            ) as conn:
                lost = trio.Event()
                conn.on_termination(lost.set)
                keeper._conn = conn
                keeper.connected.set()
                keeper._round_due.set()
                if not started:
                    started = True
                    task_status.started()
                delays = reconnect_delays()
                try:
                    with single_errors():
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(keeper._rounds, conn)
                            await lost.wait()
                            nursery.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    # The store closes (Cancelled) just as a lock query fails: that
                    # error means nothing any more; only the cancellation goes on.
                    cancelled, rest = group.split(trio.Cancelled)
                    if cancelled is not None and rest is not None:
                        _, other = rest.split(EventStoreError)
                        if other is None:
                            raise cancelled from None
                    raise
                finally:
                    keeper._conn = None
                    keeper.connected = trio.Event()
                    keeper._lose_all()
        except EventStoreError as exc:
            if not started:
                raise
            logger.warning("lock connection lost (%s); reconnecting", exc)
        if not started:
            raise StorageUnavailableError("the advisory-lock connection closed during startup")
        keeper.reconnects += 1
        await trio.sleep(next(delays))
