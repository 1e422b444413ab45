"""Stream benchmarks: ratios against baselines measured in the same run, same Postgres.

``python -m bench`` (or ``invoke bench``). Uses ``EVENTSTORE_BENCH_URL`` (a superuser URL)
or starts a throwaway cluster. Absolute times on shared machines are noise: read the
ratios. Baselines run on plain asyncio with asyncpg:

* append latency / concurrent writers: the very same unit of work (our SQL and logic,
  `_storage.append_unit`) without the Trio bridge;
* batch append: COPY of the same rows into events and stream_events;
* reads: the same SELECT, rows fetched raw (no deserialization, no RecordedEvent).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import uuid
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
    _sql,
    _storage,
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


# -- asyncio baselines ---------------------------------------------------------------------


async def keep_session(_conn: Any) -> None:
    """The baseline pool's reset on release: nothing (as our own pool: units of work
    never change session state), so both sides skip the RESET ALL round trip."""


async def run_plan(conn: Any, config: EventStoreConfig, stream: str, encoded: Any) -> int:
    """What `_storage.append` does, on plain asyncio: one statement."""
    request = _storage.AppendRequest.build(stream, ANY_VERSION, encoded)
    sql, params, created_at = _storage.batch_statement(config, [request])
    rows = await conn.fetch(sql, *params)
    [outcome] = _storage.batch_outcomes([request], rows, created_at)
    assert isinstance(outcome, _storage.Appended)
    return outcome.version


async def baseline_append_latency(config: EventStoreConfig, n: int) -> list[float]:
    """One append at a time through an asyncpg pool configured as ours."""
    pool = await asyncpg.create_pool(
        **config.connect_params(), min_size=1, max_size=config.pool_size, reset=keep_session
    )
    times = []
    try:
        for _ in range(n):
            one = events(1)
            started = time.perf_counter()  # encoding included, as in ours
            encoded = _storage.encode_events(config.serializer, one)
            async with pool.acquire() as conn:
                await run_plan(conn, config, "latency-base", encoded)
            times.append(time.perf_counter() - started)
    finally:
        await pool.close()
    return times


async def baseline_writers(config: EventStoreConfig, writers: int, per_writer: int) -> float:
    pool = await asyncpg.create_pool(
        **config.connect_params(), min_size=writers, max_size=writers, reset=keep_session
    )

    async def writer(k: int) -> None:
        for _ in range(per_writer):
            encoded = _storage.encode_events(config.serializer, events(1))
            async with pool.acquire() as conn:
                await run_plan(conn, config, f"w-base-{k}", encoded)

    started = time.perf_counter()
    await asyncio.gather(*(writer(k) for k in range(writers)))
    elapsed = time.perf_counter() - started
    await pool.close()
    return writers * per_writer / elapsed


async def baseline_copy(config: EventStoreConfig, batch: int, rounds: int) -> float:
    conn = await asyncpg.connect(**config.connect_params())
    schema = config.schema
    times = []
    try:
        stream_id = await conn.fetchval(
            f"INSERT INTO {_sql.quote_ident(schema)}.streams (stream_uuid) VALUES ($1) "
            "RETURNING stream_id",
            f"copy-{uuid.uuid4()}",
        )
        version = 0
        for _ in range(rounds):
            payload = events(batch)
            now = time.time()
            started = time.perf_counter()  # encoding included, as in ours
            encoded = _storage.encode_events(config.serializer, payload)
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "events",
                    schema_name=schema,
                    columns=[
                        "event_id",
                        "event_type",
                        "causation_id",
                        "correlation_id",
                        "data",
                        "metadata",
                        "created_at",
                    ],
                    records=[
                        (e.event_id, e.event_type, None, None, e.data, e.metadata, _utc(now))
                        for e in encoded
                    ],
                )
                await conn.copy_records_to_table(
                    "stream_events",
                    schema_name=schema,
                    columns=[
                        "event_id",
                        "stream_id",
                        "stream_version",
                        "original_stream_id",
                        "original_stream_version",
                    ],
                    records=[
                        (e.event_id, stream_id, version + i + 1, stream_id, version + i + 1)
                        for i, e in enumerate(encoded)
                    ],
                )
            version += batch
            times.append(time.perf_counter() - started)
    finally:
        await conn.close()
    return statistics.median(times)


def _utc(ts: float) -> Any:
    import datetime

    return datetime.datetime.fromtimestamp(ts, datetime.UTC)


# -- ours ----------------------------------------------------------------------------------


async def ours(config: EventStoreConfig, quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    latency_n = 200 if quick else 1000
    async with open_event_store(config.with_changes(pool_size=50)) as store:
        # warm up
        for _ in range(20):
            await store.append_to_stream("warm", ANY_VERSION, events(1))
        times = []
        for _ in range(latency_n):
            one = events(1)
            started = time.perf_counter()
            await store.append_to_stream("latency", ANY_VERSION, one)
            times.append(time.perf_counter() - started)
        results["latency"] = times

        for writers in (1, 10, 50):
            per_writer = max(10, (400 if quick else 2000) // writers)

            async def writer(k: int, per_writer: int = per_writer, writers: int = writers) -> None:
                for _ in range(per_writer):
                    await store.append_to_stream(f"w-{writers}-{k}", ANY_VERSION, events(1))

            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for k in range(writers):
                    nursery.start_soon(writer, k)
            results[f"writers-{writers}"] = writers * per_writer / (time.perf_counter() - started)

        for batch in (100, 1000):
            rounds = 10 if quick else 30
            batch_times = []
            for r in range(rounds):
                payload = events(batch)
                started = time.perf_counter()
                await store.append_to_stream(f"batch-{batch}-{r}", ANY_VERSION, payload)
                batch_times.append(time.perf_counter() - started)
            results[f"batch-{batch}"] = statistics.median(batch_times)

        total = 20_000 if quick else 100_000
        for _ in range(0, total, 1000):
            await store.append_to_stream("big-read", ANY_VERSION, events(1000))
    return results


async def ours_reads(config: EventStoreConfig, results: dict[str, Any]) -> None:
    async with open_event_store(config) as store:
        # Best of two passes, as for the baseline (the first pass warms the cache).
        results["read-stream"] = max(
            [await _read_rate(store.stream_forward("big-read")) for _ in "ab"]
        )
        info = await store.stream_info("big-read")
        results["big-read-id"] = info.stream_id
        results["read-all"] = max([await _read_rate(store.stream_all_forward()) for _ in "ab"])


async def _read_rate(iterator: Any) -> float:
    started = time.perf_counter()
    count = 0
    async for _ in iterator:
        count += 1
    return count / (time.perf_counter() - started)


@contextmanager
def server() -> Iterator[str]:
    if os.environ.get("EVENTSTORE_BENCH_URL"):
        yield os.environ["EVENTSTORE_BENCH_URL"]
        return
    with temp_cluster() as cluster:
        yield cluster.url("bench")


def main() -> int:
    quick = "--full" not in sys.argv
    only = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--only=")), None)
    with server() as url:
        config = EventStoreConfig(url=url, schema="bench")
        trio.run(admin.create, config)
        trio.run(admin.drop, config)
        trio.run(admin.create, config)
        trio.run(admin.init, config)
        print(
            f"trio-eventstore benchmarks ({'quick' if quick else 'full'}; --full for more, "
            "--only=streams or --only=subscriptions)"
        )
        from trio_eventstore._serialization import JSON_DECODER

        print(f"JSON decoder: {JSON_DECODER} (orjson with the `fast` extra)")
        if only in (None, "subscriptions"):
            from bench import subscriptions

            subscriptions.run(config, quick, report)
        if only == "subscriptions":
            trio.run(admin.drop, config)
            return 0
        mine = trio.run(ours, config, quick)
        vacuum(config)
        trio.run(ours_reads, config, mine)
        base_latency = run_asyncio(baseline_append_latency(config, len(mine["latency"])))
        ours_p50 = statistics.median(mine["latency"]) * 1e6
        base_p50 = statistics.median(base_latency) * 1e6
        report("single-event append p50 latency", ours_p50, base_p50, "us", lower_is_better=True)
        for writers in (1, 10, 50):
            per_writer = max(10, (400 if quick else 2000) // writers)
            base = run_asyncio(baseline_writers(config, writers, per_writer))
            report(
                f"{writers} concurrent writers throughput",
                mine[f"writers-{writers}"],
                base,
                "ev/s",
                lower_is_better=False,
            )
        for batch in (100, 1000):
            base = run_asyncio(baseline_copy(config, batch, 10 if quick else 30))
            report(
                f"batch append of {batch} (median)",
                mine[f"batch-{batch}"] * 1e3,
                base * 1e3,
                "ms",
                lower_is_better=True,
            )
        base = max(run_asyncio(raw_read_rate(config, mine["big-read-id"], 10**9)) for _ in "ab")
        report(
            "read stream, pages of 1000", mine["read-stream"], base, "ev/s", lower_is_better=False
        )
        base = max(run_asyncio(raw_read_rate(config, 0, 10**9)) for _ in "ab")
        report("read $all, pages of 1000", mine["read-all"], base, "ev/s", lower_is_better=False)
        trio.run(admin.drop, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
