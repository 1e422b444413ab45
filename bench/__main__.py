"""Benchmarks: ratios against baselines measured in the same run, same Postgres.

``python -m bench`` (or ``invoke bench``); ``--full`` for longer runs, ``--only=SECTION``
for one of subscriptions, writes, reads; ``--json[=FILE]`` for the writes' summary as JSON.
Uses ``EVENTSTORE_BENCH_URL`` (a superuser URL) or starts a throwaway cluster that is
durable (fsync on). Absolute numbers on shared machines are noise: read the ratios.
Baselines run on plain asyncio with asyncpg:

* subscriptions: see `bench.subscriptions`;
* writes (appends): see `bench.writes`;
* reads: the same SELECT, rows fetched raw (no deserialization, no RecordedEvent).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
import trio

from bench._util import raw_read_rate, run_asyncio, vacuum
from trio_eventstore import (
    ANY_VERSION,
    EventData,
    EventStoreConfig,
    admin,
    open_event_store,
)
from trio_eventstore._tempcluster import temp_cluster

ROWS: list[tuple[str, float, float, str]] = []


def report(name: str, ours: float, baseline: float, unit: str, *, lower_is_better: bool) -> None:
    ratio = ours / baseline
    ROWS.append((name, ours, baseline, unit))
    direction = (
        "(ours/baseline, lower is better)"
        if lower_is_better
        else "(ours/baseline, higher is better)"
    )
    print(
        f"{name:40} ours {ours:10.1f} {unit:5} baseline {baseline:10.1f}  "
        f"ratio {ratio:5.2f} {direction}"
    )
    sys.stdout.flush()


def events(n: int) -> list[EventData]:
    return [
        EventData(
            {"account_id": "acc", "amount": i, "note": "benchmark"},
            event_type="Deposited",
            metadata={"user": "bench"},
        )
        for i in range(n)
    ]


# -- reads ---------------------------------------------------------------------------------


async def fill(config: EventStoreConfig, stream: str, total: int) -> None:
    async with open_event_store(config) as store:
        for _ in range(0, total, 1000):
            await store.append_to_stream(stream, ANY_VERSION, events(1000))


async def ours_reads(config: EventStoreConfig) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with open_event_store(config) as store:
        # Best of two passes, as for the baseline (the first pass warms the cache).
        results["read-stream"] = max(
            [await _read_rate(store.stream_forward("big-read")) for _ in "ab"]
        )
        info = await store.stream_info("big-read")
        results["big-read-id"] = info.stream_id
        results["read-all"] = max([await _read_rate(store.stream_all_forward()) for _ in "ab"])
    return results


async def _read_rate(iterator: Any) -> float:
    started = time.perf_counter()
    count = 0
    async for _ in iterator:
        count += 1
    return count / (time.perf_counter() - started)


@contextmanager
def server() -> Iterator[str]:
    """``EVENTSTORE_BENCH_URL``, else a throwaway cluster that is durable (fsync and
    synchronous_commit on, as in production: commit flushes are part of every append)."""
    if os.environ.get("EVENTSTORE_BENCH_URL"):
        yield os.environ["EVENTSTORE_BENCH_URL"]
        return
    with temp_cluster(durable=True) as cluster:
        yield cluster.url("bench")


async def _settings(config: EventStoreConfig) -> str:
    conn = await asyncpg.connect(**config.connect_params())
    try:
        names = ("server_version", "fsync", "synchronous_commit", "full_page_writes")
        return ", ".join([f"{n}={await conn.fetchval(f'SHOW {n}')}" for n in names])
    finally:
        await conn.close()


SECTIONS = ("subscriptions", "writes", "reads")


USAGE = """usage: python -m bench [--full] [--only=subscriptions|writes|reads] [--json[=FILE]]

Benchmarks, each a ratio against a baseline measured in the same run, on
EVENTSTORE_BENCH_URL (a superuser URL) or a throwaway durable cluster (fsync on).
  --full     longer measurements and more sizes (default: quick)
  --only=S   one section
  --json     the writes' summary as JSON (to FILE, or standard output)"""


def main() -> int:
    known = ("--full", "--only=", "--json")
    unknown = [a for a in sys.argv[1:] if not a.startswith(known)]
    if unknown:
        help_asked = any(a in ("-h", "--help") for a in unknown)
        print(USAGE, file=sys.stdout if help_asked else sys.stderr)
        return 0 if help_asked else 2
    quick = "--full" not in sys.argv
    only = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--only=")), None)
    only = "reads" if only == "streams" else only  # the former name of the reads
    if only is not None and only not in SECTIONS:
        print(f"--only: one of {', '.join(SECTIONS)}, not {only!r}", file=sys.stderr)
        return 2
    json_out = next(
        (a.partition("=")[2] or "-" for a in sys.argv if a.split("=", 1)[0] == "--json"), None
    )
    with server() as url:
        config = EventStoreConfig(url=url, schema="bench")
        trio.run(admin.create, config)
        trio.run(admin.drop, config)
        trio.run(admin.create, config)
        trio.run(admin.init, config)
        print(
            f"trio-eventstore benchmarks ({'quick' if quick else 'full'}; --full for more, "
            f"--only={'|'.join(SECTIONS)}, --json[=FILE] for the writes' summary)"
        )
        from trio_eventstore._json import JSON_DECODER

        print(f"JSON decoder: {JSON_DECODER} (orjson with the `fast` extra)")
        print(f"server: {run_asyncio(_settings(config))}")
        if only in (None, "subscriptions"):
            from bench import subscriptions

            subscriptions.run(config, quick, report)
        if only in (None, "writes"):
            from bench import writes

            writes.run(config, quick, json_out=json_out)
        if only in (None, "reads"):
            reads(config, quick)
        trio.run(admin.drop, config)
    return 0


def reads(config: EventStoreConfig, quick: bool) -> None:
    print()
    trio.run(fill, config, "big-read", 20_000 if quick else 100_000)
    vacuum(config)
    mine = trio.run(ours_reads, config)
    base = max(run_asyncio(raw_read_rate(config, mine["big-read-id"], 10**9)) for _ in "ab")
    report("read stream, pages of 1000", mine["read-stream"], base, "ev/s", lower_is_better=False)
    base = max(run_asyncio(raw_read_rate(config, 0, 10**9)) for _ in "ab")
    report("read $all, pages of 1000", mine["read-all"], base, "ev/s", lower_is_better=False)


if __name__ == "__main__":
    sys.exit(main())
