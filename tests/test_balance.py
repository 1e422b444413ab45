"""Work spread across processes: balanced holding (``balance_subscriptions``) and partition
groups (``partition_groups``), against a real server, with nodes in other processes
(`tests/balance_node.py`) where it matters. Each test prints the times it measured
(``pytest -s`` shows them) and asserts generous bounds."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trio_eventstore import (
    ANY_VERSION,
    EventData,
    EventStore,
    EventStoreConfig,
    Subscription,
    open_event_store,
)
from trio_eventstore._balance import (
    excess,
    fair_share,
    group_name,
    group_of,
    split_group_name,
    surplus,
)
from trio_eventstore._storage import subscription_checkpoint

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD = 60  # a guard against hangs, never a speed assertion
#: Generous bounds for a loaded machine (about 2-3 s is expected: printed).
SETTLE_BOUND = 20.0
TAKEOVER_BOUND = 10.0


def report(what: str, seconds: float) -> None:
    print(f"\n{what}: {seconds:.2f} s", flush=True)


class Node:
    """A balancing store in another process (`tests/balance_node.py`), its output."""

    def __init__(self, process: trio.Process, changed: Callable[[], None]) -> None:
        self.process = process
        self.lines: list[str] = []
        self.holding: list[str] = []
        #: (subscription, stream, n) per event received, in order
        self.got: list[tuple[str, str, int]] = []
        self._changed = changed

    async def read(self) -> None:
        assert self.process.stdout is not None
        pending = b""
        async for chunk in self.process.stdout:
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                line = raw.decode()
                self.lines.append(line)
                if line.startswith("holding"):
                    self.holding = line.split()[1:]
                elif line.startswith("got "):
                    _, name, _, stream, n = line.split()
                    self.got.append((name, stream, int(n)))
            self._changed()
        self._changed()

    @property
    def alive(self) -> bool:
        return self.process.returncode is None and self.process.poll() is None


class Cluster:
    """Balancing nodes on one store, and a way to wait until their output says so."""

    def __init__(self, config: EventStoreConfig, nursery: trio.Nursery) -> None:
        self.config = config
        self.nursery = nursery
        self.nodes: list[Node] = []
        self._event = trio.Event()

    def _changed(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def start(self, *args: int) -> Node:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_")}
        env.update(
            EVENTSTORE_URL=self.config.url or "",
            EVENTSTORE_SCHEMA=self.config.schema,
            PYTHONPATH=str(ROOT),
        )
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tests.balance_node", *map(str, args)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        node = Node(process, self._changed)
        self.nodes.append(node)
        self.nursery.start_soon(node.read)
        await self.until(lambda: "ready" in node.lines)
        return node

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._event.wait()

    async def settled(self, condition: Callable[[], bool], *, stable: float = 1.5) -> float:
        """Wait until ``condition`` holds and has held for ``stable`` seconds; returns
        when it began to hold."""
        while True:
            await self.until(condition)
            since = time.monotonic()
            with trio.move_on_after(stable):
                await self.until(lambda: not condition())
                continue
            return since

    def counts(self) -> list[int]:
        return [len(node.holding) for node in self.nodes if node.alive]


@contextlib.asynccontextmanager
async def cluster_of(config: EventStoreConfig) -> AsyncIterator[Cluster]:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(config, nursery)
        try:
            yield cluster
        finally:
            with trio.CancelScope(shield=True):
                for node in cluster.nodes:
                    if node.process.returncode is None:
                        node.process.kill()
                    await node.process.wait()
            nursery.cancel_scope.cancel()


def balanced(cluster: Cluster, total: int, members: int) -> Callable[[], bool]:
    def check() -> bool:
        counts = cluster.counts()
        return len(counts) == members and sum(counts) == total and max(counts) - min(counts) <= 1

    return check


async def append(store: EventStore, stream: str, n: int) -> None:
    await store.append_to_stream(stream, ANY_VERSION, [EventData({"n": n}, event_type="Counted")])


# -- pure parts ------------------------------------------------------------------------------


def test_the_group_of_a_key_is_the_same_in_every_process() -> None:
    """Not Python's salted hash(): another interpreter computes the same groups."""
    keys = ["account-1", "account-2", "ünïcode", 42, ("a", 1)]
    here = [group_of(key, 8) for key in keys]
    code = (
        f"from trio_eventstore._balance import group_of;print([group_of(k, 8) for k in {keys!r}])"
    )
    there = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert there.strip() == str(here)
    assert group_name("orders", 3, 8) == "orders#g3/8"


@given(st.text(), st.integers(1, 1024), st.data())
def test_a_group_row_name_is_read_back(name: str, groups: int, data: st.DataObject) -> None:
    group = data.draw(st.integers(0, groups - 1))
    assert split_group_name(group_name(name, group, groups)) == (name, group, groups)


@pytest.mark.parametrize(
    "name", ["orders", "orders#archive", "orders#g", "orders#g1", "orders#g1/1", "orders#g01/2",
             "orders#g0/02", "orders#g0/2x", "orders#g-1/2", "orders#g٣/8"],
)  # fmt: skip
def test_only_names_group_name_makes_are_groups(name: str) -> None:
    assert split_group_name(name) is None


def test_the_surplus_handed_over_is_chosen_the_same_way_each_time() -> None:
    held = [(1, k) for k in range(12)]
    first = surplus(held, "aaaa0000", ["bbbb1111", "cccc2222"], 8)
    assert first == surplus(list(reversed(held)), "aaaa0000", ["cccc2222", "bbbb1111"], 8)
    assert len(set(first)) == 8
    assert fair_share(12, 3) == 4
    assert fair_share(13, 3) == 5
    assert excess(12, 12, [0, 0]) == 8  # beyond the fair share
    assert excess(4, 12, [4, 4]) == 0
    assert excess(6, 16, [6, 4]) == 1  # 6/6/4: one of the sixes gives one up
    assert excess(6, 16, [5, 5]) == 0  # 6/5/5 stays


# -- in one process ----------------------------------------------------------------------------


async def test_a_subscription_is_handed_over_only_after_its_checkpoint_was_flushed(
    initialized: EventStoreConfig,
) -> None:
    """A holder asked to hand a subscription over persists its acknowledged prefix first,
    even below ``checkpoint_threshold``; the next holder resumes right after it."""
    config = initialized.with_changes(balance_subscriptions=True)
    names = ["a", "b"]
    with trio.fail_after(HANG_GUARD):
        async with (
            open_event_store(config) as store_a,
            contextlib.AsyncExitStack() as stack,
        ):
            subs_a = {
                name: await stack.enter_async_context(
                    store_a.subscribe_to_all_streams(
                        name, buffer_size=10, checkpoint_threshold=1000
                    )
                )
                for name in names
            }
            for n in range(1, 6):
                await append(store_a, "s", n)
            for sub in subs_a.values():
                async for batch in sub:
                    sub.ack(batch)
                    if batch.last_event_number == 5:
                        break
            assert all(sub.statistics().last_persisted == 0 for sub in subs_a.values())
            store_b = await stack.enter_async_context(open_event_store(config))
            subs_b = {
                name: await stack.enter_async_context(
                    store_b.subscribe_to_all_streams(
                        name, buffer_size=10, checkpoint_threshold=1000
                    )
                )
                for name in names
            }
            started = time.monotonic()

            def holders(subs: dict[str, Subscription]) -> list[str]:
                return [n for n, s in subs.items() if s.statistics().role == "holder"]

            while len(holders(subs_a)) != 1 or len(holders(subs_b)) != 1:  # noqa: ASYNC110
                await trio.sleep(0.02)
            report("a joining store took its share after", time.monotonic() - started)
            (moved,) = holders(subs_b)
            # Flushed by the former holder before it let go.
            assert await subscription_checkpoint(store_b._db, "$all", moved) == 5
            await append(store_a, "s", 6)
            async for batch in subs_b[moved]:
                assert [e.event_number for e in batch.events] == [6]
                subs_b[moved].ack(batch)
                break


# -- across processes -----------------------------------------------------------------------


async def test_three_processes_hold_a_third_each_and_take_over_when_one_leaves(
    initialized: EventStoreConfig,
) -> None:
    with trio.fail_after(HANG_GUARD * 2):
        async with cluster_of(initialized) as cluster:
            for _ in range(3):
                await cluster.start(12)
            with trio.fail_after(SETTLE_BOUND):
                await cluster.settled(balanced(cluster, 12, 3))
            spread = cluster.counts()
            killed = time.monotonic()
            cluster.nodes[0].process.kill()
            with trio.fail_after(TAKEOVER_BOUND):
                took = await cluster.settled(balanced(cluster, 12, 2)) - killed
            after_kill = cluster.counts()
            stopping = time.monotonic()
            cluster.nodes[1].process.send_signal(signal.SIGTERM)
            with trio.fail_after(TAKEOVER_BOUND):
                await cluster.until(lambda: "bye" in cluster.nodes[1].lines)
                await cluster.until(lambda: len(cluster.nodes[2].holding) == 12)
            took_over = time.monotonic() - stopping
    print(f"\nspread of 12 subscriptions over 3 processes: {spread}; after kill -9: {after_kill}")
    report("the others took the killed process's share after", took)
    report("the last one took the stopped process's share after", took_over)
    assert sorted(spread) == [4, 4, 4]
    assert sorted(after_kill) == [6, 6]


async def test_a_joining_process_takes_its_share_without_losing_events(
    initialized: EventStoreConfig,
) -> None:
    """Events appended all along: each subscription gets every event, each node in order;
    only the batch in hand when a subscription moved (at most ``buffer_size`` events) is
    delivered again, never what was acknowledged and flushed before the move."""
    count = 4
    appended = 0
    with trio.fail_after(HANG_GUARD * 2):
        async with (
            open_event_store(initialized) as store,
            cluster_of(initialized) as cluster,
            trio.open_nursery() as nursery,
        ):
            stop, stopped = trio.Event(), trio.Event()

            async def keep_appending() -> None:
                nonlocal appended
                while not stop.is_set():
                    await append(store, f"s{(appended + 1) % 5}", appended + 1)
                    appended += 1
                    await trio.sleep(0.01)
                stopped.set()

            first = await cluster.start(count)
            nursery.start_soon(keep_appending)
            await cluster.until(lambda: len(first.holding) == count)
            await cluster.until(lambda: len(first.got) > 50)
            joined = time.monotonic()
            await cluster.start(count)
            with trio.fail_after(SETTLE_BOUND):
                took = await cluster.settled(balanced(cluster, count, 2)) - joined
            spread = cluster.counts()
            stop.set()
            await stopped.wait()
            total = appended

            def complete() -> bool:
                got = {(name, n) for node in cluster.nodes for name, _, n in node.got}
                return len(got) >= count * total

            with trio.fail_after(HANG_GUARD / 2):
                await cluster.until(complete)
    report("a joining process took its share after", took)
    assert spread == [2, 2]
    a, b = cluster.nodes
    for name in (f"p{i}" for i in range(count)):
        seen = [[n for sub, _, n in node.got if sub == name] for node in (a, b)]
        assert set(seen[0]) | set(seen[1]) == set(range(1, total + 1))  # none lost
        for numbers in seen:
            assert numbers == sorted(numbers)  # in order
        again = set(seen[0]) & set(seen[1])
        assert again <= set(seen[0][-10:])  # only the batch in hand when it moved


async def test_partition_groups_spread_over_two_processes_and_keep_each_key_in_order(
    initialized: EventStoreConfig,
) -> None:
    """One subscription, 8 groups by stream: they spread 4/4 when a second process joins;
    across the move each key's events come in the order appended, each one at least once."""
    keys = [f"k{i}" for i in range(16)]
    appended: dict[str, int] = defaultdict(int)
    with trio.fail_after(HANG_GUARD * 2):
        async with (
            open_event_store(initialized) as store,
            cluster_of(initialized) as cluster,
            trio.open_nursery() as nursery,
        ):
            stop, stopped = trio.Event(), trio.Event()

            async def keep_appending() -> None:
                while not stop.is_set():
                    for key in keys:
                        await append(store, key, appended[key])
                        appended[key] += 1
                    await trio.sleep(0.02)
                stopped.set()

            first = await cluster.start(0, 8)
            await cluster.until(lambda: len(first.holding) == 8)
            nursery.start_soon(keep_appending)
            await cluster.until(lambda: len(first.got) > 100)
            joined = time.monotonic()
            second = await cluster.start(0, 8)
            with trio.fail_after(SETTLE_BOUND):
                took = await cluster.settled(balanced(cluster, 8, 2)) - joined
            await cluster.until(lambda: len(second.got) > 50)
            stop.set()
            await stopped.wait()
            expected = {(key, n) for key in keys for n in range(appended[key])}

            def complete() -> bool:
                return {(k, n) for node in cluster.nodes for _, k, n in node.got} >= expected

            with trio.fail_after(HANG_GUARD / 2):
                await cluster.until(complete)
            holding = [node.holding for node in cluster.nodes]
    report("a joining process took its partition groups after", took)
    print(f"groups held: {holding}")
    assert sorted(map(len, holding)) == [4, 4]
    assert sorted(holding[0] + holding[1]) == sorted(group_name("g", i, 8) for i in range(8))
    moved = 0
    for key in keys:
        runs = [[n for _, k, n in node.got if k == key] for node in cluster.nodes]
        for run in runs:  # each node: a run of consecutive events, in order
            assert run == list(range(run[0], run[0] + len(run))) if run else True
        if runs[0] and runs[1]:
            moved += 1
            assert runs[1][0] <= runs[0][-1] + 1  # the new holder resumed without a gap
    assert moved > 0


@pytest.mark.parametrize("groups", [0, -1, 1025])
async def test_partition_groups_is_checked_before_any_io(store: EventStore, groups: int) -> None:
    with pytest.raises(ValueError, match="partition_groups"):
        store.subscribe_to_all_streams(
            "g", partition_by=lambda e: e.stream_uuid, partition_groups=groups
        )
    with pytest.raises(ValueError, match="partition_groups: only with partition_by"):
        store.subscribe_to_all_streams("g", partition_groups=2)
