"""kill -9 loop: a projection process killed at random moments and restarted applies
every event exactly once; a read model with its own checkpoint does not.

``PROJECTION_KILLS`` (default 6), ``PROJECTION_KILL_EVENTS`` (default 2000) and
``PROJECTION_KILL_SEED`` make a longer or a repeated run (``invoke projection-kill-loop``).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from trio_eventstore import ANY_VERSION, EventData, EventStoreConfig, open_event_store
from trio_eventstore._pg import Connection, open_connection
from trio_eventstore._sql import quote_ident

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD = 120  # seconds: a guard against hangs, never a speed assertion
EVENTS = int(os.environ.get("PROJECTION_KILL_EVENTS") or 2000)
KEYS = [f"k{i}" for i in range(13)]
#: checkpoint_threshold of a run: every ack, every 50 (replays after a kill), never
#: before a clean exit (every restart replays from the start)
THRESHOLDS = (1, 50, 1_000_000)


def _db(config: EventStoreConfig, query: Callable[[Connection], Awaitable[T]]) -> T:
    async def run() -> T:
        async with open_connection(config) as conn:
            return await query(conn)

    return trio.run(run)


def read_model(config: EventStoreConfig, read_schema: str) -> dict[str, int]:
    async def query(conn: Connection) -> dict[str, int]:
        rows = await conn.fetch(f"SELECT key, n FROM {quote_ident(read_schema)}.counts")
        return {row["key"]: row["n"] for row in rows}

    return _db(config, query)


def position(config: EventStoreConfig, read_schema: str) -> int:
    table = f"{quote_ident(read_schema)}.projection_versions"

    async def query(conn: Connection) -> int:
        if await conn.fetchval("SELECT to_regclass($1) IS NULL", table):
            return 0  # no batch has committed yet
        value = await conn.fetchval(f"SELECT max(last_seen_event_number) FROM {table}")
        return int(value or 0)

    return _db(config, query)


def checkpoint(config: EventStoreConfig) -> int:
    async def query(conn: Connection) -> int:
        value = await conn.fetchval(
            f"SELECT last_seen FROM {quote_ident(config.schema)}.subscriptions "
            "WHERE subscription_name = 'counts'"
        )
        return int(value or 0)

    return _db(config, query)


def set_checkpoint(config: EventStoreConfig, last_seen: int) -> None:
    async def query(conn: Connection) -> Any:
        return await conn.execute(
            f"UPDATE {quote_ident(config.schema)}.subscriptions SET last_seen = $1 "
            "WHERE subscription_name = 'counts'",
            last_seen,
        )

    _db(config, query)


def prepare(config: EventStoreConfig, seed: int) -> tuple[str, Counter[str]]:
    """EVENTS events with random keys in 8 streams; a read-model schema with its table."""
    rng = random.Random(seed)
    keys = [rng.choice(KEYS) for _ in range(EVENTS)]
    read_schema = f"rm_{config.schema}"

    async def run() -> None:
        async with open_event_store(config) as store:
            s = quote_ident(read_schema)
            await store._db.execute(f"CREATE SCHEMA {s}")
            await store._db.execute(
                f"CREATE TABLE {s}.counts (key text PRIMARY KEY, n bigint NOT NULL)"
            )
            for start in range(0, EVENTS, 250):
                await store.append_to_stream(
                    f"stream-{start // 250}",
                    ANY_VERSION,
                    [
                        EventData({"key": k}, event_type="Counted")
                        for k in keys[start : start + 250]
                    ],
                )

    trio.run(run)
    return read_schema, Counter(keys)


def drop(config: EventStoreConfig, read_schema: str) -> None:
    async def query(conn: Connection) -> Any:
        return await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(read_schema)} CASCADE")

    _db(config, query)


def worker(
    config: EventStoreConfig, read_schema: str, mode: str, threshold: int
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_")}
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "tests.projection_worker", config.url or ""]
    command += [config.schema, read_schema, mode, str(EVENTS), str(threshold)]
    return subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen[str]) -> None:
    """Wait for a worker to handle the last event and exit cleanly."""
    _, err = process.communicate(timeout=HANG_GUARD)
    assert process.returncode == 0, err[-3000:]


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("PROJECTION_KILL_SEED") or random.randrange(2**32))
    print(f"PROJECTION_KILL_SEED={value}")
    return value


def test_kill_9_at_random_moments_neither_loses_nor_double_applies(
    eventstore_config: EventStoreConfig, seed: int
) -> None:
    config = eventstore_config
    kills = int(os.environ.get("PROJECTION_KILLS", "6"))
    rng = random.Random(seed)
    read_schema, expected = prepare(config, seed)
    try:
        killed_mid_run = []
        for _ in range(kills):
            mode = rng.choice(["batch", "events", "daemon"])
            process = worker(config, read_schema, mode, rng.choice(THRESHOLDS))
            time.sleep(rng.uniform(0.3, 2.0))  # startup, catch-up, mid-transaction ...
            process.kill()  # SIGKILL
            process.communicate()
            at = position(config, read_schema)
            if 0 < at < EVENTS:
                killed_mid_run.append((mode, at))
        print("killed mid-run (mode, position):", killed_mid_run)
        finish(worker(config, read_schema, "batch", rng.choice(THRESHOLDS)))
        assert position(config, read_schema) == EVENTS
        assert checkpoint(config) == EVENTS  # acked after the commit, flushed on exit
        assert read_model(config, read_schema) == dict(expected), f"seed {seed}"
        assert killed_mid_run, f"seed {seed}: no kill landed mid-run"

        # A lost checkpoint (an old one, or a reset): everything comes again, and is
        # skipped; the checkpoint catches up.
        set_checkpoint(config, rng.randrange(EVENTS))
        finish(worker(config, read_schema, rng.choice(["batch", "events"]), 50))
        assert checkpoint(config) == EVENTS
        assert read_model(config, read_schema) == dict(expected), f"seed {seed}"
    finally:
        drop(config, read_schema)


def test_kill_9_double_applies_with_a_separate_checkpoint(
    eventstore_config: EventStoreConfig, seed: int
) -> None:
    """The same loop, with the read model committed in its own transaction and the
    checkpoint as the only position: a kill after a commit applies events twice. (What
    the test above would see, were the position not in the read model's transaction.)"""
    config = eventstore_config
    read_schema, expected = prepare(config, seed)
    try:
        process = worker(config, read_schema, "naive", 1_000_000)
        deadline = time.monotonic() + HANG_GUARD
        while sum(read_model(config, read_schema).values()) == 0:
            if time.monotonic() >= deadline:  # a hang guard, not a speed target
                pytest.fail("the naive projection applied nothing")
            assert process.poll() is None
            time.sleep(0.05)
        process.kill()
        process.communicate()
        applied_before = sum(read_model(config, read_schema).values())
        assert 0 < applied_before < EVENTS
        finish(worker(config, read_schema, "naive", 1_000_000))
        counts = read_model(config, read_schema)
        assert sum(counts.values()) == EVENTS + applied_before  # applied twice
        assert counts != dict(expected)
    finally:
        drop(config, read_schema)
