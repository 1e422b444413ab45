"""Failover in seconds with the default settings, measured against a real server.

A holder killed with SIGKILL, a holder whose lock connection stops answering, a holder cut
off by the network (a network namespace whose link goes down, where the machine allows
it), and a restarted server: each test prints the time it measured (``pytest -s`` shows
them) and asserts a generous bound (the expected times are about 1-2 s, and about 12 s for
the network cut, which waits for the server to drop the dead session).

The tests run on a throwaway cluster of their own: they stop and restart it, and pause
one of its backends.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from trio_eventstore import (
    ANY_VERSION,
    EventData,
    EventStore,
    EventStoreConfig,
    StorageUnavailableError,
    Subscription,
    admin,
    open_event_store,
)
from trio_eventstore._config import session_keepalive
from trio_eventstore._pg import open_connection
from trio_eventstore._tempcluster import TempCluster, temp_cluster

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD = 60  # a guard against hangs, never a speed assertion
#: Generous bounds for a loaded machine: about 1-2 s is expected (printed).
TAKEOVER_BOUND = 8.0
RESTART_BOUND = 8.0


def report(what: str, seconds: float) -> None:
    print(f"\n{what}: {seconds:.2f} s", flush=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[TempCluster]:
    with temp_cluster() as own:
        yield own


@pytest.fixture
async def config(cluster: TempCluster) -> AsyncIterator[EventStoreConfig]:
    """A fresh schema on the module's cluster, with the default settings."""
    config = EventStoreConfig(url=cluster.url("failover"), schema=f"f_{uuid.uuid4().hex[:10]}")
    await admin.create(config)
    await admin.init(config)
    yield config
    with trio.CancelScope(shield=True), trio.move_on_after(30):
        await admin.drop(config)


async def append(store: EventStore, *numbers: int) -> None:
    await store.append_to_stream(
        "s", ANY_VERSION, [EventData({"n": n}, event_type="Counted") for n in numbers]
    )


class Node:
    """A store in another process (`tests/failover_node.py`), its output line by line."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[tuple[float, str]] = []  # (time.monotonic() when read, line)
        self._changed = trio.Event()

    async def read(self) -> None:
        assert self.process.stdout is not None
        pending = b""
        async for chunk in self.process.stdout:
            *lines, pending = (pending + chunk).split(b"\n")
            now = time.monotonic()
            self.lines += [(now, line.decode()) for line in lines]
            self._changed.set()
            self._changed = trio.Event()
        self._changed.set()

    async def wait_for(self, text: str, *, after: float = 0.0) -> float:
        """When the first line holding ``text`` read after ``after`` was read."""
        while True:
            for when, line in self.lines:
                if when >= after and text in line:
                    return when
            if self.process.returncode is not None or self.process.poll() is not None:
                raise AssertionError(f"the node exited: {[line for _, line in self.lines]}")
            await self._changed.wait()

    def kill(self) -> float:
        self.process.kill()
        return time.monotonic()


@contextlib.asynccontextmanager
async def node(
    config: EventStoreConfig, count: int, *, prefix: tuple[str, ...] = ()
) -> AsyncIterator[Node]:
    """A node process holding subscriptions ``p0`` .. ``p<count-1>`` of $all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_")}
    env.update(
        EVENTSTORE_URL=config.url or "",
        EVENTSTORE_SCHEMA=config.schema,
        PYTHONPATH=str(ROOT),
    )
    process = await trio.lowlevel.open_process(
        [*prefix, sys.executable, "-m", "tests.failover_node", str(count)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    the_node = Node(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(the_node.read)
            with trio.fail_after(HANG_GUARD):
                await the_node.wait_for("held")
            yield the_node
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()


async def standing_by(*subs: Subscription) -> None:
    """Until each subscription has tried its lock and found it held elsewhere."""
    while any(sub.statistics().state != "waiting_for_lock" for sub in subs):  # noqa: ASYNC110
        await trio.sleep(0.02)


async def received(sub: Subscription, number: int) -> list[int]:
    """Consume (and ack) until event ``number`` has come."""
    got: list[int] = []
    async for batch in sub:
        got += [e.event_number for e in batch.events]
        sub.ack(batch)
        if number in got:
            return got
    raise AssertionError(f"the subscription ended before event {number}: {got}")


async def test_kill_9_of_the_holder_process_a_standby_takes_over_within_seconds(
    config: EventStoreConfig,
) -> None:
    with trio.fail_after(HANG_GUARD):
        async with (
            node(config, 1) as holder,
            open_event_store(config) as store,
            store.subscribe_to_all_streams("p0", buffer_size=10) as sub,
        ):
            await append(store, 1)
            await holder.wait_for("got p0 1")
            await standing_by(sub)
            killed = holder.kill()
            await sub.wait_subscribed()
            took = time.monotonic() - killed
            await append(store, 2)
            got = await received(sub, 2)
    report("takeover after kill -9 of the holder (defaults)", took)
    assert set(got) <= {1, 2}  # resumes at the checkpoint (1 again if not yet persisted)
    assert took < TAKEOVER_BOUND


async def test_fifty_standbys_try_their_locks_in_one_query_and_take_over_in_one_go(
    config: EventStoreConfig,
) -> None:
    count = 50
    with trio.fail_after(HANG_GUARD * 2):
        async with (
            node(config, count) as holder,
            open_event_store(config) as store,
            contextlib.AsyncExitStack() as stack,
        ):
            subs = [
                await stack.enter_async_context(store.subscribe_to_all_streams(f"p{i}"))
                for i in range(count)
            ]
            await standing_by(*subs)
            keeper = store._subscriptions.locks
            before = keeper.rounds
            await trio.sleep(3.0)
            standby_rounds = keeper.rounds - before
            before = keeper.rounds
            killed = holder.kill()
            for sub in subs:
                await sub.wait_subscribed()
            took = time.monotonic() - killed
            takeover_rounds = keeper.rounds - before
            attempts = [sub.statistics().lock_attempts for sub in subs]
    report(f"takeover of {count} subscriptions after kill -9 (defaults)", took)
    print(f"lock queries: {standby_rounds} in 3 s standing by, {takeover_rounds} to take over")
    # One query per interval (1 s) for all 50, not one per subscription.
    assert standby_rounds <= 4
    assert takeover_rounds <= 3
    assert min(attempts) >= 3
    assert took < TAKEOVER_BOUND


async def test_a_holder_whose_lock_connection_stops_answering_stops_delivering(
    config: EventStoreConfig,
) -> None:
    """The holder's lock session is paused (SIGSTOP on its server process: the socket
    stays open, nothing answers); the holder stops delivering within
    ``subscription_standby_interval + subscription_lease_timeout``. While paused the
    server process keeps the lock, so nobody else delivers; once it runs again it finds
    its client gone and exits, and delivery resumes within about a second."""
    deliveries: list[tuple[str, int, float]] = []  # (who, event number, when)
    delivered = trio.Event()  # replaced after every delivery

    async def consume(who: str, sub: Subscription) -> None:
        nonlocal delivered
        async for batch in sub:
            now = time.monotonic()
            deliveries.extend((who, e.event_number, now) for e in batch.events)
            sub.ack(batch)
            delivered.set()
            delivered = trio.Event()

    bound = config.subscription_standby_interval + config.subscription_lease_timeout
    with trio.fail_after(HANG_GUARD):
        async with (
            open_event_store(config) as store_a,
            open_event_store(config) as store_b,
            store_a.subscribe_to_all_streams("p", buffer_size=10) as sub_a,
            contextlib.AsyncExitStack() as stack,
            trio.open_nursery() as nursery,
        ):
            await sub_a.wait_subscribed()
            sub_b = await stack.enter_async_context(
                store_b.subscribe_to_all_streams("p", buffer_size=10)
            )
            await standing_by(sub_b)
            nursery.start_soon(consume, "a", sub_a)
            nursery.start_soon(consume, "b", sub_b)

            async def keep_appending() -> None:
                for n in range(1, 10_000):
                    await append(store_b, n)
                    await trio.sleep(0.1)

            nursery.start_soon(keep_appending)
            pid = store_a.statistics().lock_pid
            assert pid is not None
            while not deliveries:
                await delivered.wait()
            os.kill(pid, signal.SIGSTOP)
            paused = time.monotonic()
            try:
                while sub_a.statistics().state in ("subscribed", "catching_up"):  # noqa: ASYNC110
                    await trio.sleep(0.02)
                stopped = time.monotonic()
                await trio.sleep(1.0)  # nothing is delivered while the lock is in limbo
                in_limbo = [d for d in deliveries if d[2] > stopped]
            finally:
                os.kill(pid, signal.SIGCONT)
            resumed_from = time.monotonic()
            while not any(when > resumed_from for _, _, when in deliveries):
                await delivered.wait()
            resumed = time.monotonic() - resumed_from
            nursery.cancel_scope.cancel()
    report("a paused lock session: the holder stopped after", stopped - paused)
    report("after the paused session ended, delivery resumed within", resumed)
    assert stopped - paused < bound + 3.0
    assert in_limbo == []
    assert resumed < TAKEOVER_BOUND


async def test_delivery_resumes_within_seconds_after_a_postgres_restart(
    cluster: TempCluster, config: EventStoreConfig
) -> None:
    with trio.fail_after(HANG_GUARD * 2):
        async with (
            open_event_store(config) as store,
            store.subscribe_to_all_streams("p", buffer_size=10) as sub,
        ):
            await append(store, 1)
            await received(sub, 1)
            stopping = time.monotonic()
            await trio.to_thread.run_sync(cluster.stop, "fast")
            await trio.to_thread.run_sync(cluster.start)
            up = time.monotonic()
            while True:  # the first appends may meet the restart's broken connections
                try:
                    await append(store, 2)
                    break
                except StorageUnavailableError:
                    await trio.sleep(0.05)
            appended = time.monotonic() - up
            await received(sub, 2)
            resumed = time.monotonic() - up
    report("server down (pg_ctl stop -m fast, start)", up - stopping)
    report("an append succeeded again after", appended)
    report("delivery resumed after the restart (defaults)", resumed)
    assert resumed < RESTART_BOUND


async def test_lock_and_listen_sessions_keep_tcp_keepalives_on_both_ends(
    config: EventStoreConfig,
) -> None:
    """The server drops a silent session (and releases its locks) after these, not after
    the system's default of about two hours."""
    keepalive = session_keepalive(config)
    assert (keepalive.idle, keepalive.interval, keepalive.count) == (6, 1, 5)
    async with open_connection(config, keepalive=True) as conn:
        settings = await conn.fetch(
            "SELECT name, setting FROM pg_catalog.pg_settings WHERE name LIKE 'tcp_%'"
        )
        sock = conn._conn._transport.get_extra_info("socket")
        client = {
            "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "user_timeout": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        }
    assert {row["name"]: row["setting"] for row in settings} == {
        "tcp_keepalives_idle": "6",
        "tcp_keepalives_interval": "1",
        "tcp_keepalives_count": "5",
        "tcp_user_timeout": "11000",
    }
    assert client == {"keepalive": 1, "idle": 6, "user_timeout": 11000}


# -- a real network cut ------------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def network_namespace() -> Iterator[tuple[str, str, str, str]]:
    """A network namespace joined to this one by a veth pair: (namespace, its side of
    the link, the address on this side, the address on its side). Needs root and
    iproute2 (skipped otherwise)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("a network namespace needs root and iproute2")
    tag = uuid.uuid4().hex[:6]
    namespace, here, there = f"tes-{tag}", f"te{tag}h", f"te{tag}n"
    used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    subnet = next(
        f"10.213.{n}" for n in random.sample(range(256), 256) if f"10.213.{n}." not in used
    )
    try:
        _ip("netns", "add", namespace)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot create a network namespace: {exc}")
    try:
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", there, "netns", namespace)
        _ip("addr", "add", f"{subnet}.1/30", "dev", here)
        _ip("link", "set", here, "up")
        _ip("netns", "exec", namespace, "ip", "addr", "add", f"{subnet}.2/30", "dev", there)
        _ip("netns", "exec", namespace, "ip", "link", "set", there, "up")
        yield namespace, there, f"{subnet}.1", f"{subnet}.2"
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)


async def test_a_holder_cut_off_by_the_network_stops_before_a_standby_takes_over(
    network_namespace: tuple[str, str, str, str],
) -> None:
    """The holder runs in a network namespace whose link then goes down: packets are
    dropped, nothing is refused. The holder stops delivering within
    ``subscription_standby_interval + subscription_lease_timeout``; the server drops its
    silent lock session (TCP keepalives) later than that, and the standby then takes over.
    """
    namespace, link, host_address, node_address = network_namespace
    with temp_cluster() as own:
        own.listen_addresses = f"127.0.0.1,{host_address}"
        with (own.datadir / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {node_address}/32 scram-sha-256\n")
        await trio.to_thread.run_sync(own.stop, "fast")
        await trio.to_thread.run_sync(own.start)
        config = EventStoreConfig(url=own.url("cut"), schema="cut")
        await admin.create(config)
        await admin.init(config)
        remote = config.with_changes(url=own.url("cut").replace("127.0.0.1", host_address))
        with trio.fail_after(HANG_GUARD):
            async with (
                node(remote, 1, prefix=("ip", "netns", "exec", namespace)) as holder,
                open_event_store(config) as store,
                store.subscribe_to_all_streams("p0", buffer_size=10) as sub,
            ):
                await standing_by(sub)
                await trio.to_thread.run_sync(
                    _ip, "netns", "exec", namespace, "ip", "link", "set", link, "down"
                )
                cut = time.monotonic()
                stopped = await holder.wait_for("state p0", after=cut) - cut
                await sub.wait_subscribed()
                took = time.monotonic() - cut
                await append(store, 1)
                await received(sub, 1)
    report("network cut: the holder stopped delivering after", stopped)
    report("network cut: the standby took over after (defaults)", took)
    bound = config.subscription_standby_interval + config.subscription_lease_timeout
    assert stopped < bound + 3.0
    assert stopped < took  # never two holders at once
    assert took < 30.0
