"""The fault run: a throwaway cluster of its own, `tests.faultproxy` in front of it, writers
(two stores in this process, and a writer process) and subscriber processes working
through the proxy, and a seeded scheduler that injects one fault at a time for
``duration`` seconds. Then it quiesces (faults lifted, writers stopped, subscribers given
time to catch up, then stopped with SIGTERM) and hands the database and the logs to
`tests.faultrun.checker`.

The seed decides the schedule (which fault, where, when, how long) and the writers'
choices; timing decides the rest, so a seed repeats a run's faults, not its every outcome.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import random
import signal
import sys
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import trio

from trio_eventstore import EventStore, EventStoreConfig, admin, open_event_store
from trio_eventstore._tempcluster import TempCluster, temp_cluster

from ..faultproxy import (
    LISTEN,
    LOCK,
    POOL,
    Blackhole,
    Cut,
    Delay,
    Drop,
    FaultProxy,
    HalfClose,
    open_fault_proxy,
)
from ..faultproxy import Fault as ProxyFault
from . import checker
from .records import COMPETING, SINGLE, SUBSCRIPTIONS, JsonLines, now
from .writer import write

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = "faultrun"
#: writer tasks per store (two stores here, one in the writer process)
WRITER_TASKS = 3
#: the in-process stores' pool (small, so that holding it is cheap)
POOL_SIZE = 4
#: subscriber processes: role -> subscription (two processes share ``single``: one holds
#: it, the other stands by)
SUBSCRIBERS = {"single-a": SINGLE, "single-b": SINGLE, "competing": COMPETING}
#: fault kinds and their weights
KINDS = {
    "proxy": 10,
    "pg_restart_fast": 1,
    "pg_restart_immediate": 1,
    "sigkill": 2,
    "sigterm": 2,
    "pool_exhaustion": 1,
}
#: how long subscribers get to catch up at the end (a hang guard)
CATCH_UP_GUARD = 120.0


@attrs.define
class InjectedFault:
    kind: str  # e.g. "blackhole pool", "pg_restart_fast", "sigkill single-a"
    start: float
    end: float


class Child:
    """A supervised child process: restarted whenever it exits, until `stop`."""

    def __init__(self, role: str, argv: list[str], folder: Path) -> None:
        self.role = role
        self.argv = argv
        self.folder = folder
        self.process: trio.Process | None = None
        self.stopping = False
        self.signalled = False
        #: exits the harness did not cause: return codes
        self.unexpected: list[int] = []
        self.starts = 0
        self.running = trio.Event()

    async def supervise(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_")}
        env["PYTHONPATH"] = str(ROOT)
        while not self.stopping:
            with (self.folder / f"{self.role}.err").open("ab") as err:
                process = await trio.lowlevel.open_process(
                    self.argv, env=env, cwd=ROOT, stdout=err, stderr=err
                )
            self.process = process
            self.starts += 1
            self.running.set()
            if self.stopping:  # stopped while starting
                self.signalled = True
                process.send_signal(signal.SIGTERM)
            try:
                code = await process.wait()
            finally:
                if process.returncode is None:  # the run itself was cancelled
                    process.kill()
                    with trio.CancelScope(shield=True):
                        await process.wait()
            self.running = trio.Event()
            if not self.signalled:
                self.unexpected.append(code)
            self.signalled = False
            if not self.stopping:
                await trio.sleep(0.3)

    async def send(self, sig: signal.Signals) -> bool:
        """Send ``sig`` and wait for the exit (SIGKILL after 20 s); False if not running."""
        process = self.process
        if process is None or process.returncode is not None:
            return False
        self.signalled = True
        process.send_signal(sig)
        with trio.move_on_after(20):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        return True

    async def stop(self) -> None:
        """SIGTERM, and no more restarts."""
        self.stopping = True
        await self.send(signal.SIGTERM)


class Run:
    """One fault run (see the module docstring)."""

    def __init__(self, cluster: TempCluster, proxy: FaultProxy, folder: Path, seed: int) -> None:
        self.cluster = cluster
        self.proxy = proxy
        self.folder = folder
        self.seed = seed
        self.rng = random.Random(seed)
        direct = cluster.url("faultrun")
        self.direct = EventStoreConfig(url=direct, schema=SCHEMA, timeout=10.0)
        self.proxied_url = proxy.url_for(direct)
        self.store_config = EventStoreConfig(
            url=self.proxied_url, schema=SCHEMA, timeout=3.0, pool_size=POOL_SIZE
        )
        self.faults: list[InjectedFault] = []
        self.stores: dict[str, EventStore] = {}
        #: in-process stores: opening failures and errors that closed an open store
        self.store_errors: collections.Counter[str] = collections.Counter()
        self.children: dict[str, Child] = {}

    def child(self, role: str, module: str, *args: str) -> Child:
        argv = [sys.executable, "-m", module, str(self.folder), self.proxied_url, SCHEMA, *args]
        self.children[role] = Child(role, argv, self.folder)
        return self.children[role]

    # -- writers in this process ---------------------------------------------------------

    async def store_instance(self, name: str, log: JsonLines) -> None:
        """A store of this process with its writer tasks, reopened whenever it fails."""
        incarnation = 0
        while True:
            incarnation += 1
            opened = False
            try:
                async with open_event_store(self.store_config) as store:
                    opened = True
                    self.stores[name] = store
                    async with trio.open_nursery() as writers:
                        for i in range(WRITER_TASKS):
                            writer = f"{name}{incarnation}-{i}"
                            rng = random.Random(f"{self.seed}-{writer}")
                            writers.start_soon(write, store, writer, rng, log)
            except Exception as exc:
                logging.getLogger("trio_eventstore.faultrun").exception("store %s", name)
                phase = "closed an open store" if opened else "opening"
                self.store_errors[f"{phase}: {type(exc).__name__}"] += 1
            finally:
                self.stores.pop(name, None)
            await trio.sleep(0.3)

    # -- the scheduler --------------------------------------------------------------------

    async def schedule(self, duration: float) -> None:
        """Inject one fault at a time, at random moments, for ``duration`` seconds."""
        deadline = trio.current_time() + duration
        kinds, weights = zip(*KINDS.items(), strict=True)
        while trio.current_time() < deadline:
            await trio.sleep(self.rng.uniform(0.3, 2.5))
            if trio.current_time() >= deadline:
                break
            kind = self.rng.choices(kinds, weights)[0]
            start = now()
            label = await self.inject(kind)
            if label:
                self.faults.append(InjectedFault(label, start, now()))

    async def inject(self, kind: str) -> str:
        rng = self.rng
        if kind == "proxy":
            cls = rng.choice((POOL, LISTEN, LOCK))
            faults: list[ProxyFault] = [
                Delay(round(rng.uniform(0.05, 0.8), 2)),
                Drop(rng.choice(("to_server", "to_client", "both"))),
                Cut(),
                HalfClose(rng.choice(("to_server", "to_client"))),
                Blackhole(),
            ]
            fault = rng.choice(faults)
            self.proxy.set(cls, fault)
            if not isinstance(fault, Cut):
                await trio.sleep(rng.uniform(0.5, 4.0))
            self.proxy.clear(cls)
            return f"{fault.kind} {cls}"
        if kind.startswith("pg_restart"):
            mode = kind.rpartition("_")[2]
            down = rng.uniform(0.2, 2.0)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.cluster.stop, mode)
                await trio.sleep(down)
                await trio.to_thread.run_sync(self.cluster.start)
            return kind
        if kind in ("sigkill", "sigterm"):
            role = rng.choice(sorted(self.children))
            sig = signal.SIGKILL if kind == "sigkill" else signal.SIGTERM
            if await self.children[role].send(sig):
                return f"{kind} {role}"
            return ""
        assert kind == "pool_exhaustion"
        name = rng.choice(("A", "B"))
        store = self.stores.get(name)
        if store is None:
            return ""
        await hold_pool(store, rng.uniform(0.5, 4.0))
        return f"pool_exhaustion {name}"

    # -- the end --------------------------------------------------------------------------

    async def wait_ready(self) -> None:
        """Until every subscriber process has joined its subscription (a hang guard)."""
        ready: set[str] = set()
        offsets: dict[Path, int] = collections.defaultdict(int)
        with trio.move_on_after(CATCH_UP_GUARD):
            while ready < set(SUBSCRIBERS):
                for path in self.folder.glob("deliveries-*.jsonl"):
                    ready.update(r["role"] for r in _read_new(path, offsets) if r["k"] == "ready")
                await trio.sleep(0.1)

    async def wait_checkpointed(self, head: int) -> None:
        """Until every subscription's persisted checkpoint is ``head`` (or the guard
        expires). A holder whose lock connection a fault left dead loses its lock only
        when a query on it times out, possibly after its consumers saw the last events:
        it then stands by, takes the lock again, is handed those events again and
        checkpoints them. Stopping it before that would stop it behind the head."""
        with trio.move_on_after(CATCH_UP_GUARD):
            while True:
                persisted = await checker.checkpoints(self.direct)
                if all(persisted.get(sub, 0) >= head for sub in SUBSCRIPTIONS):
                    return
                await trio.sleep(0.5)

    async def wait_caught_up(self, head: int) -> None:
        """Until every subscription's log holds events 1..head (or the guard expires)."""
        seen: dict[str, set[int]] = {sub: set() for sub in SUBSCRIPTIONS}
        offsets: dict[Path, int] = collections.defaultdict(int)
        with trio.move_on_after(CATCH_UP_GUARD):
            while any(len(seen[sub]) < head for sub in SUBSCRIPTIONS):
                for path in self.folder.glob("deliveries-*.jsonl"):
                    for record in _read_new(path, offsets):
                        if record["k"] == "d" and record["n"] <= head:
                            seen[record["sub"]].add(record["n"])
                await trio.sleep(0.5)


def _read_new(path: Path, offsets: dict[Path, int]) -> list[dict[str, Any]]:
    with path.open("rb") as file:
        file.seek(offsets[path])
        data = file.read()
    complete = data[: data.rfind(b"\n") + 1]
    offsets[path] += len(complete)
    return [json.loads(line) for line in complete.splitlines()]


async def hold_pool(store: EventStore, seconds: float) -> None:
    """Hold every connection of ``store``'s pool in an open transaction for ``seconds``."""

    async def hold() -> None:
        with contextlib.suppress(Exception):
            async with store._db.open_transaction():
                await trio.sleep(seconds)

    async with trio.open_nursery() as nursery:
        for _ in range(POOL_SIZE):
            nursery.start_soon(hold)


async def _run(cluster: TempCluster, folder: Path, duration: float, seed: int) -> checker.Report:
    parts = urllib.parse.urlsplit(cluster.url())
    assert parts.hostname is not None
    assert parts.port is not None
    async with open_fault_proxy(parts.hostname, parts.port) as proxy:
        run = Run(cluster, proxy, folder, seed)
        await admin.create(run.direct)
        await admin.init(run.direct)
        log = JsonLines(folder / "appends-local.jsonl")
        async with trio.open_nursery() as nursery:
            writer = run.child("writer", "tests.faultrun.writer", str(seed), str(WRITER_TASKS))
            for role, subscription in SUBSCRIBERS.items():
                run.child(role, "tests.faultrun.subscriber", role, subscription)
            for child in run.children.values():
                nursery.start_soon(child.supervise)
            await run.wait_ready()
            async with trio.open_nursery() as stores:
                stores.start_soon(run.store_instance, "A", log)
                stores.start_soon(run.store_instance, "B", log)
                await run.schedule(duration)
                proxy.clear()
                stores.cancel_scope.cancel()
            await writer.stop()
            # An append held up by a fault may still commit after its writer has gone:
            # wait until the head stays put.
            head = await checker.head(run.direct)
            while True:
                await run.wait_caught_up(head)
                await run.wait_checkpointed(head)
                latest = await checker.head(run.direct)
                if latest == head:
                    break
                head = latest
            async with trio.open_nursery() as stopping:
                for role in SUBSCRIBERS:
                    stopping.start_soon(run.children[role].stop)
        log.close()
    return await checker.check(
        run.direct,
        folder,
        seed=seed,
        duration=duration,
        faults=[(f.kind, f.start, f.end) for f in run.faults],
        connection_faults=dict(proxy.injected),
        store_errors=dict(run.store_errors),
        exits={role: list(child.unexpected) for role, child in run.children.items()},
    )


@contextlib.contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    """The store's log records (reconnects...) go to ``path``, not to the terminal."""
    logger = logging.getLogger("trio_eventstore")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        handler.close()


def fault_run(duration: float, seed: int, folder: Path | None = None) -> checker.Report:
    """One fault run of ``duration`` seconds of faults (then quiescing and the checks),
    on a throwaway cluster of its own; the logs go to ``folder`` (a temporary one by
    default). Prints the seed first and the figures at the end."""
    print(f"fault run: seed {seed}, {duration:g} s of faults", flush=True)
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="faultrun-")))
        folder.mkdir(parents=True, exist_ok=True)
        # Durable: an immediate stop must not lose commits the writers were told of.
        cluster = stack.enter_context(temp_cluster(durable=True))
        stack.enter_context(_logging_to(folder / "harness.log"))
        report = trio.run(_run, cluster, folder, duration, seed)
    print(report.figures(), flush=True)
    return report
