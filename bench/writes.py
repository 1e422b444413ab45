"""Write-path benchmarks: appends against baselines measured in the same run, same Postgres.

``python -m bench --only=writes`` (``--full`` for longer runs and 10,000-event appends).
Meant for a durable server (fsync and synchronous_commit on: the bench's own throwaway
cluster is). Every measurement runs for a fixed time after a warm-up; it reports events
per second, append latency (p50/p99) and client CPU per event (``time.process_time`` over
the run / events: the Python side only, the server runs in other processes). Baselines
run on plain asyncio with asyncpg:

* **B**: the Elixir EventStore 1.4.8 library's own statements as it issues them
  (``EventStore.Streams.Stream.append_to_stream``): the ``query_stream_info`` SELECT, the
  expected version checked on the client, then its one ``insert_events`` statement, each
  statement on a connection checked out of the pool for it (as ``Postgrex.query`` on a pool
  does); no transaction below 1,000 events, one transaction with the statement chunked by
  1,000 events from 1,000 events on. The SQL text is ported below (it is the baseline, not
  the store's SQL). Not ported: the retry after a lost stream-creation race (never happens
  here: every writer has its own streams).
* **floor**: single-row autocommit INSERTs (one event-sized row each) into a plain table
  outside the store's schema.
* **COPY**: the physical limit of a bulk append: a binary COPY of the same rows (events, and
  both stream_events rows of each event: its stream's and ``$all``'s) in one transaction,
  into the same tables, with the stream rows made beforehand and no ``$all`` lock (the
  ``$all`` numbers come from a client-side counter, counting down from -1 so that they never
  meet the store's, and readers from the origin never see them).

Payloads are the same everywhere: `EventData` built and serialized with the store's
serializer inside the timed loop, on every side.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import attrs
import trio

from bench._util import keep_session, run_asyncio, vacuum
from trio_eventstore import (
    NO_STREAM,
    EventData,
    EventStore,
    EventStoreConfig,
    StreamNotFoundError,
    _storage,
    open_event_store,
)

Pool = Any  # an asyncpg pool (the stubs' generic Pool is awkward to spell across versions)
One = Callable[[int], Awaitable[int]]  # one append by writer k; returns the events written

FLOOR_SCHEMA = "bench_floor"


def events(n: int) -> list[EventData]:
    """The benchmark payload (the streams benchmarks' shape)."""
    return [
        EventData(
            {"account_id": "acc", "amount": i, "note": "benchmark"},
            event_type="Deposited",
            metadata={"user": "bench"},
        )
        for i in range(n)
    ]


# -- measuring -----------------------------------------------------------------------------


@attrs.frozen
class Run:
    """One timed measurement."""

    events: int
    appends: int
    seconds: float
    cpu: float
    latencies: list[float]
    errors: dict[str, int]
    #: ours: the group-commit writer's statements and the appends they carried (warm-up
    #: included), to show how many appends share a commit
    writer: tuple[int, int] = (0, 0)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """Append latency in ms at quantile ``q`` (nan when nothing succeeded)."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) * 1e3 if self.latencies else float("nan")

    @property
    def p99(self) -> float:
        return self.percentile(0.99)

    @property
    def cpu_per_event(self) -> float:
        """Client CPU per event, in microseconds."""
        return self.cpu / self.events * 1e6 if self.events else float("nan")

    @property
    def per_statement(self) -> float:
        statements, appends = self.writer
        return appends / statements if statements else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "ev_s": round(self.rate, 1),
            "appends": self.appends,
            "p50_ms": round(self.p50, 3),
            "p99_ms": round(self.p99, 3),
            "cpu_us_per_event": round(self.cpu_per_event, 1),
            "errors": dict(self.errors),
            **({"appends_per_statement": round(self.per_statement, 1)} if self.writer[0] else {}),
        }


class Tally:
    """What the writers of one phase did."""

    def __init__(self, errors: Counter[str]) -> None:
        self.events = 0
        self.latencies: list[float] = []
        self.errors = errors

    async def writer(self, k: int, one: One, deadline: float) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                n = await one(k)
            except Exception as exc:  # counted and reported, never fatal to the benchmark
                self.errors[type(exc).__name__] += 1
                continue
            self.latencies.append(time.perf_counter() - started)
            self.events += n

    def run(self, seconds: float, cpu: float) -> Run:
        return Run(
            self.events, len(self.latencies), seconds, cpu, self.latencies, dict(self.errors)
        )


@attrs.frozen
class Timing:
    duration: float
    warmup: float


async def drive_trio(writers: int, one: One, timing: Timing) -> Run:
    """``writers`` Trio tasks calling ``one(k)`` until the time is up (warm-up first;
    errors of the warm-up count too)."""
    errors: Counter[str] = Counter()

    async def phase(seconds: float) -> Tally:
        tally = Tally(errors)
        deadline = time.perf_counter() + seconds
        async with trio.open_nursery() as nursery:
            for k in range(writers):
                nursery.start_soon(tally.writer, k, one, deadline)
        return tally

    await phase(timing.warmup)
    cpu, started = time.process_time(), time.perf_counter()
    tally = await phase(timing.duration)
    return tally.run(time.perf_counter() - started, time.process_time() - cpu)


async def drive_asyncio(writers: int, one: One, timing: Timing) -> Run:
    """`drive_trio` on asyncio."""
    errors: Counter[str] = Counter()

    async def phase(seconds: float) -> Tally:
        tally = Tally(errors)
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(tally.writer(k, one, deadline) for k in range(writers)))
        return tally

    await phase(timing.warmup)
    cpu, started = time.process_time(), time.perf_counter()
    tally = await phase(timing.duration)
    return tally.run(time.perf_counter() - started, time.process_time() - cpu)


# -- ours ----------------------------------------------------------------------------------


class OurAppends:
    """Appends of ``batch`` events through the store, each writer to its own stream with
    exact expected versions (``NO_STREAM``, then the version the last append returned), or
    with ``fresh`` each append to a new stream (``NO_STREAM``)."""

    def __init__(self, store: EventStore, prefix: str, batch: int, *, fresh: bool) -> None:
        self.store = store
        self.prefix = prefix
        self.batch = batch
        self.fresh = fresh
        self.versions: dict[int, int | None] = {}
        self.count = 0

    async def one(self, k: int) -> int:
        payload = events(self.batch)
        if self.fresh:
            self.count += 1
            await self.store.append_to_stream(f"{self.prefix}-{self.count}", NO_STREAM, payload)
            return self.batch
        stream = f"{self.prefix}-{k}"
        version = self.versions.get(k, 0)
        if version is None:  # after an error: the append may or may not have landed
            version = await self._current(stream)
        try:
            self.versions[k] = await self.store.append_to_stream(
                stream, version or NO_STREAM, payload
            )
        except BaseException:
            self.versions[k] = None
            raise
        return self.batch

    async def _current(self, stream: str) -> int:
        try:
            return (await self.store.stream_info(stream)).stream_version
        except StreamNotFoundError:
            return 0


async def ours(
    config: EventStoreConfig, writers: int, batch: int, timing: Timing, *, fresh: bool = False
) -> Run:
    async with open_event_store(config) as store:
        work = OurAppends(store, f"ours-{uuid.uuid4().hex[:8]}", batch, fresh=fresh)
        before = store.statistics().writer
        run = await drive_trio(writers, work.one, timing)
        after = store.statistics().writer
        if before is None or after is None:  # group commit off
            return run
        return attrs.evolve(
            run, writer=(after.batches - before.batches, after.appends - before.appends)
        )


def has_group_commit() -> bool:
    return "group_commit" in attrs.fields_dict(EventStoreConfig)


def has_replica_appends() -> bool:
    return "replica_appends" in attrs.fields_dict(EventStoreConfig)


def _as_ours(runs: dict[str, Run], name: str) -> dict[str, Run]:
    """``runs`` with ``name``'s run in place of ours (a table for an option of ours)."""
    return {"ours": runs[name], **{k: v for k, v in runs.items() if k not in ("ours", name)}}


# -- B: the Elixir library's statements ----------------------------------------------------


@functools.cache
def elixir_query_stream_info(schema: str) -> str:
    """``query_stream_info.sql.eex`` of EventStore 1.4.8."""
    return (
        "SELECT stream_id, stream_uuid, stream_version, created_at, deleted_at "
        f'FROM "{schema}".streams WHERE stream_uuid = $1;'
    )


@functools.cache
def elixir_insert_events(schema: str, stream_id_known: bool, n: int) -> str:
    """``insert_events.sql.eex`` of EventStore 1.4.8 (no ``created_at`` override), for ``n``
    events: $1 the stream id (or, for a new stream, its uuid), $2 the event count, then
    nine parameters per event: id, type, causation id, correlation id, data, metadata,
    created_at, index (1..n), stream version."""
    s = f'"{schema}"'
    indexes = ", ".join(
        f"(${i * 9 + 3}::uuid, ${i * 9 + 10}::int, ${i * 9 + 11}::bigint)" for i in range(n)
    )
    values = ", ".join(
        "(" + ", ".join(f"${i * 9 + j}" for j in range(3, 10)) + ")" for i in range(n)
    )
    if stream_id_known:
        stream = (
            f"UPDATE {s}.streams SET stream_version = stream_version + $2::bigint "
            "WHERE stream_id = $1::bigint returning stream_id"
        )
    else:
        stream = (
            f"INSERT INTO {s}.streams (stream_uuid, stream_version) VALUES ($1, $2::bigint) "
            "returning stream_id"
        )
    return f"""
WITH
  new_events_indexes (event_id, index, stream_version) AS (
    VALUES {indexes}
  ),
  events AS (
    INSERT INTO {s}.events
      (event_id, event_type, causation_id, correlation_id, data, metadata, created_at)
    VALUES {values}
  ),
  stream AS (
    {stream}
  ),
  source_stream_events AS (
    INSERT INTO {s}.stream_events
      (event_id, stream_id, stream_version, original_stream_id, original_stream_version)
    SELECT
      new_events_indexes.event_id,
      stream.stream_id,
      new_events_indexes.stream_version,
      stream.stream_id,
      new_events_indexes.stream_version
    FROM new_events_indexes, stream
  ),
  linked_stream AS (
    UPDATE {s}.streams
    SET stream_version = stream_version + $2::bigint
    WHERE stream_id = 0
    RETURNING stream_version - $2::bigint as initial_stream_version
  ),
  linked_stream_events AS (
    INSERT INTO {s}.stream_events
      (event_id, stream_id, stream_version, original_stream_id, original_stream_version)
    SELECT
      new_events_indexes.event_id,
      0,
      linked_stream.initial_stream_version + new_events_indexes.index,
      stream.stream_id,
      new_events_indexes.stream_version
    FROM new_events_indexes, linked_stream, stream
  )

SELECT stream_id from stream;"""


class ElixirError(Exception):
    """An append the Elixir library would refuse (``{:error, reason}``)."""


def elixir_validate(row: Any, expected: int) -> None:
    """``StreamInfo.validate_expected_version`` for an int expected version (0: the
    stream has no events, as ``:no_stream`` for a new stream)."""
    if row is None:
        if expected != 0:
            raise ElixirError("wrong_expected_version")
        return
    if row["deleted_at"] is not None:
        raise ElixirError("stream_deleted")
    if row["stream_version"] != expected:
        raise ElixirError("stream_exists" if expected == 0 else "wrong_expected_version")


async def elixir_append(
    pool: Pool, config: EventStoreConfig, stream_uuid: str, expected: int, payload: list[EventData]
) -> None:
    """``EventStore.Streams.Stream.append_to_stream`` for an int expected version."""
    if len(payload) < 1000:  # Elixir: `when length(events) < 1000`, no transaction
        await _elixir_append(pool, config, stream_uuid, expected, payload)
        return
    async with pool.acquire() as conn, conn.transaction():
        await _elixir_append(conn, config, stream_uuid, expected, payload)


async def _elixir_append(
    conn: Any, config: EventStoreConfig, stream_uuid: str, expected: int, payload: list[EventData]
) -> None:
    schema = config.schema
    row = await conn.fetchrow(elixir_query_stream_info(schema), stream_uuid)
    elixir_validate(row, expected)
    serializer = config.serializer
    created_at = datetime.datetime.now(datetime.UTC)
    base = 0 if row is None else row["stream_version"]
    stream_id = None if row is None else row["stream_id"]
    for start in range(0, len(payload), 1000):  # Appender: Stream.chunk_every(1_000)
        chunk = payload[start : start + 1000]
        params: list[object] = [stream_uuid if stream_id is None else stream_id, len(chunk)]
        for index, event in enumerate(_storage.encode_events(serializer, chunk), 1):
            params += [
                event.event_id,
                event.event_type,
                event.causation_id,
                event.correlation_id,
                event.data,
                event.metadata,
                created_at,
                index,
                base + start + index,
            ]
        sql = elixir_insert_events(schema, stream_id is not None, len(chunk))
        stream_id = await conn.fetchval(sql, *params)
        if stream_id is None:
            raise ElixirError("not_found")


async def _pool(config: EventStoreConfig) -> Pool:
    """A pool as the store's: ``pool_size`` connections, no reset round trip on release."""
    return await asyncpg.create_pool(
        **config.connect_params(),
        min_size=config.pool_size,
        max_size=config.pool_size,
        reset=keep_session,
    )


async def baseline_b(
    config: EventStoreConfig, writers: int, batch: int, timing: Timing, *, fresh: bool = False
) -> Run:
    pool = await _pool(config)
    prefix = f"b-{uuid.uuid4().hex[:8]}"
    versions: dict[int, int | None] = {}
    count = 0

    async def one(k: int) -> int:
        nonlocal count
        payload = events(batch)
        if fresh:
            count += 1
            await elixir_append(pool, config, f"{prefix}-{count}", 0, payload)
            return batch
        stream = f"{prefix}-{k}"
        version = versions.get(k, 0)
        if version is None:  # after an error: the append may or may not have landed
            row = await pool.fetchrow(elixir_query_stream_info(config.schema), stream)
            version = 0 if row is None else row["stream_version"]
        versions[k] = None
        await elixir_append(pool, config, stream, version, payload)
        versions[k] = version + batch
        return batch

    try:
        return await drive_asyncio(writers, one, timing)
    finally:
        await pool.close()


# -- floor: single-row autocommit INSERTs --------------------------------------------------


async def baseline_floor(config: EventStoreConfig, writers: int, timing: Timing) -> Run:
    pool = await _pool(config)
    serializer = config.serializer
    async with pool.acquire() as conn:
        await conn.execute(
            f"CREATE SCHEMA IF NOT EXISTS {FLOOR_SCHEMA}; "
            f"CREATE TABLE IF NOT EXISTS {FLOOR_SCHEMA}.events ("
            "event_id uuid PRIMARY KEY, stream_uuid text NOT NULL, event_type text NOT NULL, "
            "data bytea NOT NULL, metadata bytea, "
            "created_at timestamp with time zone DEFAULT now() NOT NULL)"
        )
    sql = (
        f"INSERT INTO {FLOOR_SCHEMA}.events (event_id, stream_uuid, event_type, data, metadata) "
        "VALUES ($1, $2, $3, $4, $5)"
    )
    prefix = f"floor-{uuid.uuid4().hex[:8]}"

    async def one(k: int) -> int:
        (event,) = events(1)
        await pool.execute(
            sql,
            event.event_id,
            f"{prefix}-{k}",
            event.event_type,
            serializer.serialize(event.data),
            serializer.serialize_metadata(event.metadata),
        )
        return 1

    try:
        return await drive_asyncio(writers, one, timing)
    finally:
        await pool.close()


async def drop_floor(config: EventStoreConfig) -> None:
    conn = await asyncpg.connect(**config.connect_params())
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {FLOOR_SCHEMA} CASCADE")
    finally:
        await conn.close()


# -- COPY: the physical limit of a bulk append ---------------------------------------------

EVENT_COLUMNS = (
    "event_id",
    "event_type",
    "causation_id",
    "correlation_id",
    "data",
    "metadata",
    "created_at",
)
STREAM_EVENT_COLUMNS = (
    "event_id",
    "stream_id",
    "stream_version",
    "original_stream_id",
    "original_stream_version",
)


async def baseline_copy(config: EventStoreConfig, writers: int, batch: int, timing: Timing) -> Run:
    pool = await _pool(config)
    schema = config.schema
    serializer = config.serializer
    prefix = f"copy-{uuid.uuid4().hex[:8]}"
    async with pool.acquire() as conn:
        stream_ids = [
            await conn.fetchval(
                f'INSERT INTO "{schema}".streams (stream_uuid) VALUES ($1) RETURNING stream_id',
                f"{prefix}-{k}",
            )
            for k in range(writers)
        ]
        lowest = await conn.fetchval(
            f'SELECT min(stream_version) FROM "{schema}".stream_events WHERE stream_id = 0'
        )
    next_all = min(0, lowest or 0) - 1  # counts down: never meets the store's numbers
    versions = [0] * writers

    async def one(k: int) -> int:
        nonlocal next_all
        payload = events(batch)
        created_at = datetime.datetime.now(datetime.UTC)
        stream_id, version = stream_ids[k], versions[k]
        rows, links = [], []
        for i, event in enumerate(_storage.encode_events(serializer, payload), version + 1):
            rows.append(
                (
                    event.event_id,
                    event.event_type,
                    event.causation_id,
                    event.correlation_id,
                    event.data,
                    event.metadata,
                    created_at,
                )
            )
            links.append((event.event_id, stream_id, i, stream_id, i))
            links.append((event.event_id, 0, next_all, stream_id, i))
            next_all -= 1
        async with pool.acquire() as conn, conn.transaction():
            await conn.copy_records_to_table(
                "events", schema_name=schema, columns=EVENT_COLUMNS, records=rows
            )
            await conn.copy_records_to_table(
                "stream_events", schema_name=schema, columns=STREAM_EVENT_COLUMNS, records=links
            )
        versions[k] = version + batch
        return batch

    try:
        return await drive_asyncio(writers, one, timing)
    finally:
        await pool.close()


# -- reporting -----------------------------------------------------------------------------


@attrs.frozen
class Goal:
    """``ours_value / baseline_value`` compared with ``bound``."""

    metric: str  # "ev/s" or "p50 ms"
    baseline: str
    bound: float
    at_least: bool

    def text(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.bound:g}x {self.baseline}"

    def met(self, ratio: float) -> bool:
        return ratio >= self.bound if self.at_least else ratio <= self.bound


def value(run: Run, metric: str) -> float:
    return run.rate if metric == "ev/s" else run.p50


class Report:
    """Tables per benchmark, a summary table and a JSON summary."""

    def __init__(self) -> None:
        self.summary: list[tuple[str, str, float, str, float, str, str]] = []
        self.data: dict[str, Any] = {}

    def table(
        self,
        title: str,
        runs: dict[str, Run],
        comparisons: Sequence[tuple[str, str, Goal | None]],
    ) -> None:
        """Print one benchmark: a row per side, then ``ours/<baseline>`` for each
        (metric, baseline, goal) in ``comparisons``."""
        print(f"\n{title}")
        print(
            f"  {'':8} {'ev/s':>10} {'appends':>8} {'p50 ms':>9} {'p99 ms':>9} "
            f"{'CPU us/ev':>10}  errors"
        )
        for side, run in runs.items():
            errors = ", ".join(f"{n} x{c}" for n, c in run.errors.items()) or "-"
            shared = f"  ({run.per_statement:.1f} appends/statement)" if run.writer[0] else ""
            print(
                f"  {side:8} {run.rate:10.1f} {run.appends:8d} {run.p50:9.2f} {run.p99:9.2f} "
                f"{run.cpu_per_event:10.1f}  {errors}{shared}"
            )
        self.data[title] = {side: run.summary() for side, run in runs.items()}
        for metric, baseline, goal in comparisons:
            ours_value, base_value = value(runs["ours"], metric), value(runs[baseline], metric)
            ratio = ours_value / base_value if base_value else float("nan")
            verdict = "" if goal is None else ("met" if goal.met(ratio) else "MISSED")
            goal_text = "-" if goal is None else goal.text()
            print(f"  ratio ours/{baseline} {metric}: {ratio:.2f}   goal {goal_text}   {verdict}")
            self.summary.append(
                (f"{title}, {metric}", metric, ours_value, baseline, base_value, goal_text, verdict)
            )
            self.data[title][f"ratio {metric} vs {baseline}"] = round(ratio, 3)
        sys.stdout.flush()

    def note(self, title: str, text: str) -> None:
        print(f"\n{title}\n  {text}")
        self.summary.append((title, "", float("nan"), "", float("nan"), "", text))
        self.data[title] = text

    def print_summary(self) -> None:
        print("\nSummary (ours, baseline, ratio ours/baseline, goal):\n")
        print("| benchmark | ours | baseline | ratio | goal | |")
        print("|---|---|---|---|---|---|")
        for name, metric, ours_value, baseline, base_value, goal, verdict in self.summary:
            if not metric:
                print(f"| {name} | | | | | {verdict} |")
                continue
            ratio = ours_value / base_value if base_value else float("nan")
            print(
                f"| {name} | {_fmt(ours_value)} | {baseline} {_fmt(base_value)} | "
                f"{ratio:.2f} | {goal} | {verdict} |"
            )


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}"


# -- the benchmark -------------------------------------------------------------------------


def run(config: EventStoreConfig, quick: bool, *, json_out: str | None = None) -> dict[str, Any]:
    """Run the write benchmarks; prints tables and returns the machine-readable summary.

    ``json_out``: also write the summary there as JSON (``-`` prints it as one line
    starting with ``writes-json``)."""
    timing = Timing(duration=4.5, warmup=0.75) if quick else Timing(duration=12.0, warmup=1.0)
    if os.environ.get("BENCH_WRITES_SECONDS"):  # a smoke run of the harness itself
        timing = Timing(duration=float(os.environ["BENCH_WRITES_SECONDS"]), warmup=0.1)
    report = Report()
    try:
        _run(config, quick, timing, report)
    finally:
        run_asyncio(drop_floor(config))
    report.print_summary()
    if json_out == "-":
        print("writes-json " + json.dumps(report.data, sort_keys=True))
    elif json_out:
        with open(json_out, "w") as f:
            json.dump(report.data, f, indent=1, sort_keys=True)
    return report.data


#: Streams (of `SEED_EVENTS` events each) a store holds before the write benchmarks.
SEED_STREAMS, SEED_EVENTS = 10_000, 2


async def _stream_count(config: EventStoreConfig) -> int:
    conn = await asyncpg.connect(**config.connect_params())
    try:
        return int(await conn.fetchval(f'SELECT count(*) FROM "{config.schema}".streams'))
    finally:
        await conn.close()


async def seed(config: EventStoreConfig, have: int) -> None:
    """Fill the store up to `SEED_STREAMS` streams (it holds ``have``), so that every side
    measures a store in use. On empty tables just vacuumed, PostgreSQL plans sequential
    scans (for the `$all` row, for the foreign-key checks) and a connection keeps those
    plans while the tables grow under the measurement: whichever side ran first paid for
    it (the first slice of one writer's new streams ran at half speed)."""
    prefix = f"seed-{uuid.uuid4().hex[:8]}"
    missing = iter(range(max(0, SEED_STREAMS - have)))
    async with open_event_store(config) as store:

        async def writer() -> None:
            for k in missing:
                await store.append_to_stream(f"{prefix}-{k}", NO_STREAM, events(SEED_EVENTS))

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(writer)


def alternate(measures: dict[str, Callable[[Timing], Run]], timing: Timing) -> dict[str, Run]:
    """Measure each side in ``ROUNDS`` slices, taking turns (in a rotating order), and
    merge each side's slices: on a shared machine the load drifts over a run, and
    measuring one side after the other would hand the drift to the ratio."""
    # Each slice opens its store (or pool) afresh: the full warm-up each time, so that
    # connecting and preparing statements (custom plans for the first executions) stay
    # out of the measurement on both sides.
    part = Timing(duration=timing.duration / ROUNDS, warmup=timing.warmup)
    runs: dict[str, list[Run]] = {name: [] for name in measures}
    names = list(measures)
    for round_ in range(ROUNDS):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            runs[name].append(measures[name](part))
    return {name: _merge(parts) for name, parts in runs.items()}


#: Slices per side in `alternate`.
ROUNDS = 3


def _run(config: EventStoreConfig, quick: bool, timing: Timing, report: Report) -> None:
    print(
        f"\nWrite benchmarks ({timing.duration:g} s per measurement, in {ROUNDS} slices taken "
        f"in turns with its baselines, each after a warm-up; pool_size {config.pool_size}; "
        "B = the Elixir library's statements, asyncpg on asyncio)"
    )

    # Lone writers, 1-event appends. The floor (one autocommit INSERT per event) shows
    # what a commit flush alone costs on this server.
    trio.run(seed, config, run_asyncio(_stream_count(config)))
    vacuum(config)
    replica = config.with_changes(replica_appends=True) if has_replica_appends() else None
    for title, fresh in (
        ("1 writer, 1-event appends, each to a new stream (NO_STREAM)", True),
        ("1 writer, 1-event appends to one existing stream (expected version)", False),
    ):
        runs = alternate(
            {
                "ours": lambda t, fresh=fresh: trio.run(  # type: ignore[misc]
                    functools.partial(ours, config, 1, 1, t, fresh=fresh)
                ),
                **(
                    {
                        "replica": lambda t, fresh=fresh: trio.run(  # type: ignore[misc]
                            functools.partial(ours, replica, 1, 1, t, fresh=fresh)
                        )
                    }
                    if replica is not None
                    else {}
                ),
                "B": lambda t, fresh=fresh: run_asyncio(  # type: ignore[misc]
                    baseline_b(config, 1, 1, t, fresh=fresh)
                ),
                "floor": lambda t: run_asyncio(baseline_floor(config, 1, t)),
            },
            timing,
        )
        lone_goals: list[tuple[str, str, Goal | None]] = [
            ("ev/s", "B", Goal("ev/s", "B", 1.5, at_least=True)),
            ("p50 ms", "B", Goal("p50 ms", "B", 1.0, at_least=False)),
            ("p50 ms", "floor", None),
        ]
        report.table(title, runs, lone_goals)
        if "replica" in runs:
            report.table(f"{title}, replica_appends", _as_ours(runs, "replica"), lone_goals)

    # Where a lone append's time goes (statement, bridge, store).
    from bench import anatomy

    anatomy.run(config, timing, report)

    # Group commit on vs off for a lone writer.
    title = "lone writer p50 latency, group commit on vs off (existing stream)"
    if has_group_commit():
        runs = alternate(
            {
                "ours": lambda t: trio.run(ours, config.with_changes(group_commit=True), 1, 1, t),
                "off": lambda t: trio.run(ours, config.with_changes(group_commit=False), 1, 1, t),
            },
            timing,
        )
        report.table(title, runs, [("p50 ms", "off", Goal("p50 ms", "off", 1.1, at_least=False))])
    else:
        report.note(title, "n/a (this EventStoreConfig has no group_commit option)")

    # Concurrent writers, 1-event appends, each writer its own stream.
    vacuum(config)
    for writers in (10, 50, 200):
        runs = alternate(
            {
                "ours": lambda t, w=writers: trio.run(ours, config, w, 1, t),  # type: ignore[misc]
                **(
                    {"replica": lambda t, w=writers: trio.run(ours, replica, w, 1, t)}  # type: ignore[misc]
                    if replica is not None
                    else {}
                ),
                "B": lambda t, w=writers: run_asyncio(baseline_b(config, w, 1, t)),  # type: ignore[misc]
                "floor": lambda t, w=writers: run_asyncio(baseline_floor(config, w, t)),  # type: ignore[misc]
            },
            timing,
        )
        goals: list[tuple[str, str, Goal | None]] = [
            ("ev/s", "B", Goal("ev/s", "B", 5.0, at_least=True) if writers == 50 else None),
            ("ev/s", "floor", Goal("ev/s", "floor", 1.5, at_least=True) if writers == 50 else None),
        ]
        title = f"{writers} writers x 1-event appends, each to its own stream"
        report.table(title, runs, goals)
        if "replica" in runs:
            report.table(f"{title}, replica_appends", _as_ours(runs, "replica"), goals)
        for name in ("ours", "replica"):
            if name in runs and runs[name].errors:
                report.note(
                    f"{writers} writers: errors", f"MISSED: {name} raised {runs[name].errors}"
                )

    # Bulk appends.
    vacuum(config)
    for batch in (100, 1000) if quick else (100, 1000, 10_000):
        for writers in (1, 10):
            runs = alternate(
                {
                    "ours": lambda t, w=writers, b=batch: trio.run(ours, config, w, b, t),  # type: ignore[misc]
                    "COPY": lambda t, w=writers, b=batch: run_asyncio(  # type: ignore[misc]
                        baseline_copy(config, w, b, t)
                    ),
                    "B": lambda t, w=writers, b=batch: run_asyncio(baseline_b(config, w, b, t)),  # type: ignore[misc]
                },
                timing,
            )
            report.table(
                f"{batch:,}-event appends, {writers} writer{'s' if writers > 1 else ''}",
                runs,
                [
                    ("ev/s", "COPY", Goal("ev/s", "COPY", 0.7, at_least=True)),
                    ("ev/s", "B", None),
                ],
            )


def _merge(runs: list[Run]) -> Run:
    errors: Counter[str] = Counter()
    for r in runs:
        errors.update(r.errors)
    return Run(
        sum(r.events for r in runs),
        sum(r.appends for r in runs),
        sum(r.seconds for r in runs),
        sum(r.cpu for r in runs),
        [t for r in runs for t in r.latencies],
        dict(errors),
        (sum(r.writer[0] for r in runs), sum(r.writer[1] for r in runs)),
    )
