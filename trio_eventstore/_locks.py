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

With ``balance_subscriptions``, the round also reads which other stores run the same set of
subscriptions (`_balance`: their lock connections' application_name in
``pg_stat_activity``), tries only locks that no session holds and only up to the store's
fair share, and asks the holders of a surplus that has lasted a whole
``subscription_standby_interval`` to hand it over (`Lease.stop`): the holder stops
delivering, flushes its checkpoint, then releases the lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from . import _balance, _sql
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
    ``stop`` when its holder must stop delivering: lost, or asked to hand it over (then
    the holder flushes its checkpoint and releases it). ``on_stop`` (sync, must not
    block), when given, is called then: a holder with no task waiting on ``stop`` (a
    hibernated subscription) hears of it too."""

    __slots__ = ("_keeper", "handing_over", "key", "lost", "on_stop", "stop")

    def __init__(self, keeper: LockKeeper, key: tuple[int, int]) -> None:
        self._keeper = keeper
        self.key = key
        self.lost = trio.Event()
        self.stop = trio.Event()
        #: the keeper asked for it back (balancing)
        self.handing_over = False
        self.on_stop: Callable[[], None] | None = None

    def _lose(self) -> None:
        if self.lost.is_set():
            return
        self.lost.set()
        self._stop()

    def _hand_over(self) -> None:
        self.handing_over = True
        self._stop()

    def _stop(self) -> None:
        if self.stop.is_set():
            return
        self.stop.set()
        if self.on_stop is not None:
            self.on_stop()

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
        #: balancing: this store's member id, the other members last seen, the
        #: application_name set on the connection, since when the store holds more than
        #: its share, and how many leases it has asked its holders to hand over
        self.member = _balance.new_member_id()
        self.others: list[str] = []
        #: the locks each other member held when last seen
        self._others_hold: list[int] = []
        self._announced: str | None = None
        self._surplus_since: float | None = None
        self.handovers = 0
        #: the locks the store runs (held or wanted), with when each was last seen so: a
        #: lock handed over is wanted again only once its holder has flushed and asked
        #: again; it stays in the set meanwhile, so that the set stays the same
        self._known: dict[tuple[int, int], float] = {}
        #: locks this store handed over, and when: it does not take them back for a
        #: while (the store that should have them takes them in its next round)
        self._handed_over: dict[tuple[int, int], float] = {}

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
        if self._config.balance_subscriptions:
            await self._balance_round(conn)
            return
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

    async def _grant(self, conn: Connection, key: tuple[int, int]) -> _Want | None:
        """The lock ``key`` was just taken: hand it to its first waiting caller (or give
        it back when that caller went away while the query ran)."""
        want = self._next_waiting(key)
        if want is None:
            await self._fetch(conn, _sql.UNLOCK, *key)
            return None
        want.lease = self._leases[key] = Lease(self, key)
        want.granted.set()
        return want

    async def _balance_round(self, conn: Connection) -> None:
        """A balancing round, in one query: try free locks up to the fair share, read
        the other members; then ask for a surplus that has lasted back."""
        now = time.monotonic()
        for key in (*self._leases, *self._wants):
            self._known[key] = now
        grace = 2 * self._config.subscription_standby_interval + 1.0
        self._known = {key: seen for key, seen in self._known.items() if now - seen < grace}
        self._handed_over = {k: t for k, t in self._handed_over.items() if now - t < grace}
        everything = set(self._known)
        if not everything:
            return
        fingerprint = _balance.set_fingerprint(everything)
        name = _balance.application_name(fingerprint, self.member, self._config.schema)
        pattern = _balance.member_pattern(fingerprint)
        if name != self._announced:
            # The set changed (or the connection is new): say so, and read who runs
            # the same set before taking anything (two more round trips, only then).
            await self._fetch(conn, _sql.SET_APPLICATION_NAME, name)
            self._announced = name
            self._read_members(await self._fetch(conn, _sql.BALANCE_ROUND, [], [], 0, pattern))
        share = _balance.fair_share(len(everything), len(self.others) + 1)
        waiting = [key for key in self._wants if self._next_waiting(key) is not None]
        limit = max(0, share - len(self._leases))
        candidates = [key for key in waiting if key not in self._handed_over]
        tries = _balance.preferred(candidates, self.member, len(candidates)) if limit else []
        if tries:
            self.rounds += 1
        rows = await self._fetch(
            conn,
            _sql.BALANCE_ROUND,
            [k for k, _ in tries],
            [k for _, k in tries],
            limit,
            pattern,
        )
        granted: dict[tuple[int, int], _Want | None] = {}
        for row in rows:
            if row[3] is None and row[2]:
                key = (int(row[0]), int(row[1]))
                granted[key] = await self._grant(conn, key)
        self._read_members(rows)
        for key in waiting:
            for waiting_want in self._wants.get(key, ()):
                if waiting_want.on_attempt is not None:
                    waiting_want.on_attempt(waiting_want is granted.get(key))
        self._ask_for_surplus(len(everything))

    def _read_members(self, rows: list[Row]) -> None:
        """The other members in a balancing round's rows, and what each holds."""
        members: dict[str, int] = {}
        for row in rows:
            member = None if row[3] is None else _balance.member_of(str(row[3]))
            if member is not None and member != self.member:
                members[member] = int(row[4] or 0)
        self.others = sorted(members)
        self._others_hold = list(members.values())

    def _ask_for_surplus(self, total: int) -> None:
        """Ask the holders of the leases beyond the fair share to hand them over, once
        the surplus has lasted a whole ``subscription_standby_interval`` (a store that
        is joining, leaving or reconnecting does not make the others shuffle)."""
        kept = [key for key, lease in self._leases.items() if not lease.handing_over]
        excess = _balance.excess(len(kept), total, self._others_hold)
        now = time.monotonic()
        if excess <= 0:
            self._surplus_since = None
            return
        if self._surplus_since is None:
            self._surplus_since = now
        if now - self._surplus_since < self._config.subscription_standby_interval:
            return
        self._surplus_since = None
        for key in _balance.surplus(kept, self.member, self.others, excess):
            logger.info("handing over the subscription lock %s (balancing)", key)
            self.handovers += 1
            self._handed_over[key] = now
            self._leases[key]._hand_over()

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
        unlocked = False
        try:
            rows = await self._fetch(conn, _sql.UNLOCK, *lease.key)
            unlocked = bool(rows and rows[0][0])
        except EventStoreError as exc:  # the connection is going: Postgres releases it
            logger.info("unlock of %s failed: %s", lease.key, exc)
        finally:
            if not unlocked and self._conn is conn and not conn.is_closed():
                # Cut short (cancelled while waiting for the connection), refused, or
                # not held: the server may still hold it for this session, where no
                # other store can take it and this one, not knowing, would take it
                # again on top. Only ending the session surely releases it (and this
                # store's other locks: their holders stop, and take them again).
                logger.warning(
                    "the advisory lock %s could not be released; dropping the lock "
                    "connection to release it",
                    lease.key,
                )
                self._drop(conn)

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
                    keeper._announced = None
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
