"""The fault run's checker: reads the store's tables and the run's logs, checks what the
store promises, and sums the run up in figures.

Checks (each violation is listed in `Report.failures`):

* ``$all`` is dense (event numbers 1..N in ``stream_events`` of stream 0) and in commit
  order (within a stream, ``$all`` numbers grow with stream versions); every stream's
  versions are dense (1..its version) and every event is in ``$all`` once;
* every append reported ``ok`` is in the store, wholly, in its stream, at consecutive
  versions ending at the version it returned (starting after the expected version when
  that was a number); none reported ``failed`` is; an ``ambiguous`` one is wholly there
  or wholly absent; no event is in the store that no writer tried to append;
* each subscription received every event at least once (a missing one is a loss), only
  events that are in the store (with their stream and version); the single one in ``$all``
  order within each consumer session, the competing one in stream order within each
  consumer session and in partition order within each driver session;
* after a clean stop (SIGTERM), no event at or below the checkpoint it persisted is
  delivered to that subscription again; the last stops persisted the head;
* no open store failed: every store, in the harness and in the processes, rode out every
  fault (one that could not open while the database was unreachable is opened again).
"""

from __future__ import annotations

import collections
import datetime
import itertools
from typing import Any

import attrs

from trio_eventstore import EventStoreConfig
from trio_eventstore._pg import open_connection
from trio_eventstore._sql import quote_ident

from .records import (
    COMPETING,
    COULD_NOT_OPEN,
    SUBSCRIPTIONS,
    Append,
    Delivery,
    Stop,
    partition_of,
    read_appends,
    read_deliveries,
)

#: violations listed per check (the count is always given)
SHOWN = 5


@attrs.define
class Report:
    seed: int
    duration: float
    failures: list[str] = attrs.Factory(list)
    lines: list[str] = attrs.Factory(list)
    #: the main figures as numbers: faults, appends_ok, ambiguous, delivered, lost
    counts: collections.Counter[str] = attrs.Factory(collections.Counter)

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, check: str, violations: list[str]) -> None:
        if violations:
            shown = "; ".join(violations[:SHOWN])
            more = f" (and {len(violations) - SHOWN} more)" if len(violations) > SHOWN else ""
            self.failures.append(f"{check}: {len(violations)}: {shown}{more}")

    def figure(self, name: str, value: object) -> None:
        self.lines.append(f"  {name}: {value}")

    def figures(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        head = f"fault run seed {self.seed} ({self.duration:g} s of faults): {verdict}"
        return "\n".join([head, *self.lines, *(f"  FAILED {f}" for f in self.failures)])


async def head(config: EventStoreConfig) -> int:
    """The number of the newest event in ``$all``."""
    async with open_connection(config) as conn:
        value = await conn.fetchval(
            f"SELECT stream_version FROM {quote_ident(config.schema)}.streams WHERE stream_id = 0"
        )
    return int(value)


async def checkpoints(config: EventStoreConfig) -> dict[str, int]:
    """Each subscription's persisted checkpoint (``last_seen``)."""
    async with open_connection(config) as conn:
        rows = await conn.fetch(
            f"SELECT subscription_name, last_seen FROM {quote_ident(config.schema)}.subscriptions"
        )
    return {row["subscription_name"]: int(row["last_seen"] or 0) for row in rows}


@attrs.frozen
class Stored:
    """An event as the store holds it."""

    number: int  # in $all
    stream: str
    version: int
    created_at: float


@attrs.define
class StoreState:
    """The store's tables, as the checker needs them."""

    #: event id -> the event
    stored: dict[str, Stored]
    #: $all's event numbers, in order
    numbers: list[int]
    #: stream -> (version, event id) of its own events
    per_stream: dict[str, list[tuple[int, str]]]
    #: stream -> its version (streams table)
    versions: dict[str, int]
    #: subscription name -> last_seen
    checkpoints: dict[str, int]


async def _read_store(config: EventStoreConfig) -> StoreState:
    s = quote_ident(config.schema)
    async with open_connection(config) as conn:
        all_rows = await conn.fetch(
            "SELECT se.stream_version AS n, se.event_id, st.stream_uuid, "
            "se.original_stream_version AS v, e.created_at "
            f"FROM {s}.stream_events se "
            f"JOIN {s}.streams st ON st.stream_id = se.original_stream_id "
            f"JOIN {s}.events e ON e.event_id = se.event_id WHERE se.stream_id = 0 "
            "ORDER BY se.stream_version"
        )
        own_rows = await conn.fetch(
            "SELECT st.stream_uuid, se.stream_version AS v, se.event_id "
            f"FROM {s}.stream_events se JOIN {s}.streams st ON st.stream_id = se.stream_id "
            "WHERE se.stream_id <> 0"
        )
        stream_rows = await conn.fetch(
            f"SELECT stream_uuid, stream_version FROM {s}.streams WHERE stream_id <> 0"
        )
        subscription_rows = await conn.fetch(
            f"SELECT subscription_name, last_seen FROM {s}.subscriptions"
        )
    state = StoreState({}, [], collections.defaultdict(list), {}, {})
    for row in all_rows:
        created: datetime.datetime = row["created_at"]
        state.stored[str(row["event_id"])] = Stored(
            row["n"], row["stream_uuid"], row["v"], created.timestamp()
        )
        state.numbers.append(row["n"])
    for row in own_rows:
        state.per_stream[row["stream_uuid"]].append((row["v"], str(row["event_id"])))
    state.versions = {row["stream_uuid"]: row["stream_version"] for row in stream_rows}
    state.checkpoints = {
        row["subscription_name"]: int(row["last_seen"] or 0) for row in subscription_rows
    }
    return state


def _check_layout(report: Report, state: StoreState) -> None:
    stored, numbers, per_stream, versions = (
        state.stored,
        state.numbers,
        state.per_stream,
        state.versions,
    )
    n = len(numbers)
    report.fail(
        "$all not dense (1..N)",
        []
        if numbers == list(range(1, n + 1))
        else [f"{n} rows, numbers {numbers[:3]}..{numbers[-3:]}"],
    )
    bad_streams = []
    own_ids: set[str] = set()
    for stream, rows in per_stream.items():
        rows.sort()
        if [v for v, _ in rows] != list(range(1, versions.get(stream, -1) + 1)):
            bad_streams.append(f"{stream}: {len(rows)} events, version {versions.get(stream)}")
        own_ids.update(event_id for _, event_id in rows)
        for (v1, e1), (v2, e2) in itertools.pairwise(rows):
            a, b = stored.get(e1), stored.get(e2)
            if a is None or b is None or a.number >= b.number:
                bad_streams.append(f"{stream}: versions {v1}, {v2} not in $all order")
    report.fail("stream versions not dense or not in $all order", bad_streams)
    report.fail(
        "events not in exactly one stream and $all",
        [f"{len(own_ids ^ set(stored))} ids differ"] if own_ids != set(stored) else [],
    )


def _check_appends(report: Report, appends: list[Append], stored: dict[str, Stored]) -> None:
    violations: dict[str, list[str]] = collections.defaultdict(list)
    outcomes: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    ambiguous_stored = 0
    tried_ids: set[str] = set()
    for a in appends:
        tried_ids.update(a.ids)
        found = [stored[i] for i in a.ids if i in stored]
        outcomes[a.outcome] += 1
        if a.error:
            errors[f"{a.outcome}: {a.error}"] += 1
        what = f"{a.writer}#{a.op} ({a.outcome} {a.error}, {len(found)}/{len(a.ids)} stored)"
        if a.outcome == "failed" and found:
            violations["an append reported failed is stored"].append(what)
        if a.outcome == "ok" and len(found) != len(a.ids):
            violations["an append reported ok is missing"].append(what)
        if a.outcome == "ambiguous" and 0 < len(found) < len(a.ids):
            violations["an ambiguous append is half there"].append(what)
        if found and len(found) == len(a.ids):
            ambiguous_stored += a.outcome == "ambiguous"
            got = [(e.stream, e.version) for e in found]
            first = found[0].version
            if a.expected.isdigit():
                first = int(a.expected) + 1
            elif a.expected == "no_stream":
                first = 1
            want = [(a.stream, first + i) for i in range(len(a.ids))]
            if got != want or (a.version is not None and got[-1][1] != a.version):
                violations["an append is not where its outcome says"].append(
                    f"{what}: {got} for expected {a.expected}, version {a.version}"
                )
    for check, found_violations in sorted(violations.items()):
        report.fail(check, found_violations)
    strays = set(stored) - tried_ids
    report.fail("events no writer tried to append", sorted(strays))
    report.counts.update(appends_ok=outcomes["ok"], ambiguous=outcomes["ambiguous"])
    report.figure(
        "appends tried / ok / failed / ambiguous",
        f"{len(appends)} / {outcomes['ok']} / {outcomes['failed']} / {outcomes['ambiguous']}"
        f" (ambiguous found stored: {ambiguous_stored}, absent: "
        f"{outcomes['ambiguous'] - ambiguous_stored})",
    )
    report.figure("append errors", ", ".join(f"{k} {v}" for k, v in errors.most_common()) or "none")


def _check_deliveries(
    report: Report,
    deliveries: list[Delivery],
    stops: list[Stop],
    stored: dict[str, Stored],
    faults: list[tuple[str, float, float]],
) -> None:
    by_number = {e.number: e for e in stored.values()}
    n = len(by_number)
    report.figure("events in the store ($all head)", n)
    report.figure("events delivered (all subscriptions)", len(deliveries))
    total_redelivered = 0
    worst: tuple[float, str, int] = (0.0, "", 0)
    for sub in SUBSCRIPTIONS:
        mine = [d for d in deliveries if d.subscription == sub]
        first: dict[int, float] = {}
        wrong = []
        for d in mine:
            if d.event_number not in first:
                first[d.event_number] = d.at
            e = by_number.get(d.event_number)
            if e is None or (e.stream, e.version) != (d.stream, d.version):
                wrong.append(f"#{d.event_number} as {d.stream}@{d.version}")
        report.fail(f"{sub}: deliveries of events not in the store", wrong)
        lost = sorted(set(by_number) - set(first))
        redelivered = len(mine) - len(first)
        total_redelivered += redelivered
        report.counts.update(delivered=len(mine), lost=len(lost))
        report.fail(f"{sub}: events never delivered (lost)", [f"#{x}" for x in lost])
        report.figure(
            f"{sub}: delivered / redelivered / lost", f"{len(mine)} / {redelivered} / {len(lost)}"
        )
        for number, at in first.items():
            e = by_number.get(number)
            if e is not None and at - e.created_at > worst[0]:
                worst = (at - e.created_at, sub, number)
        _check_order(report, sub, mine)
        _check_stops(report, sub, mine, [s for s in stops if s.subscription == sub])
    report.figure("redeliveries", total_redelivered)
    stall, sub, number = worst
    if sub:
        e = by_number[number]
        end = e.created_at + stall
        causes = [
            f"{kind} ({start - e.created_at:+.1f} s .. {end_ - e.created_at:+.1f} s)"
            for kind, start, end_ in faults
            if start <= end and end_ >= e.created_at - 1.0
        ]
        report.figure(
            "longest delivery stall (committed -> first delivered)",
            f"{stall:.1f} s, {sub} #{number}; faults then: {', '.join(causes) or 'none'}",
        )


def _check_order(report: Report, sub: str, mine: list[Delivery]) -> None:
    """The single subscription: in $all order within each consumer session. The competing
    one: per stream within each consumer session, and per partition within each driver
    session (across its consumers, in delivery order; a consumer may get one partition's
    events after later ones of another)."""
    last: dict[tuple[str, ...], int] = {}
    violations = []
    for d in mine:
        role, pid, _consumer, session = d.session.split(":")
        if sub == COMPETING:
            keys = [
                ("consumer", d.session, d.stream),
                ("partition", role, pid, session, str(partition_of(d.stream))),
            ]
        else:
            keys = [("consumer", d.session)]
        for key in keys:
            before = last.get(key, 0)
            if d.event_number <= before:
                violations.append(f"{key}: #{d.event_number} after #{before}")
            last[key] = d.event_number
    report.fail(f"{sub}: out of order within a session", violations)


def _check_stops(report: Report, sub: str, mine: list[Delivery], stops: list[Stop]) -> None:
    clean = [s for s in stops if s.clean]
    violations = [
        f"#{d.event_number} at {d.at:.2f} after {s.role} stopped at checkpoint {s.checkpoint}"
        for s in clean
        for d in mine
        if d.at > s.at and d.event_number <= s.checkpoint
    ]
    report.fail(
        f"{sub}: redelivered at or below a checkpoint persisted by a clean stop", violations
    )
    unclean = [f"{s.role}: {s.error}" for s in stops if not s.clean]
    report.figure(
        f"{sub}: clean stops / failed final checkpoints", f"{len(clean)} / {len(unclean)}"
    )
    if unclean:
        report.figure(f"{sub}: failed final checkpoints", "; ".join(unclean[:3]))


async def check(
    config: EventStoreConfig,
    folder: Any,
    *,
    seed: int,
    duration: float,
    faults: list[tuple[str, float, float]],
    connection_faults: dict[str, int],
    store_errors: dict[str, int],
    exits: dict[str, list[int]],
) -> Report:
    """Check the run whose logs are in ``folder`` against the store behind ``config``."""
    report = Report(seed, duration)
    kinds = collections.Counter(kind for kind, _, _ in faults)
    report.counts["faults"] = len(faults)
    report.figure(
        "faults injected",
        f"{len(faults)}: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
    )
    report.figure(
        "proxy faults reaching connections",
        ", ".join(f"{k} {v}" for k, v in sorted(connection_faults.items())) or "none",
    )
    state = await _read_store(config)
    _check_layout(report, state)
    _check_appends(report, read_appends(folder), state.stored)
    deliveries, stops = read_deliveries(folder)
    _check_deliveries(report, deliveries, stops, state.stored, faults)
    checkpoints, numbers = state.checkpoints, state.numbers
    last_stops = {}
    for stop in sorted(stops, key=lambda s: s.at):
        last_stops[stop.subscription] = stop
    behind = [
        f"{sub}: {checkpoints.get(sub, 0)} < {len(numbers)}"
        for sub in SUBSCRIPTIONS
        if sub in last_stops and last_stops[sub].clean and checkpoints.get(sub, 0) < len(numbers)
    ]
    report.fail("checkpoints behind the head after the final clean stops", behind)
    report.figure(
        "checkpoints at the end", ", ".join(f"{k} {v}" for k, v in sorted(checkpoints.items()))
    )
    report.figure(
        "in-process store errors",
        ", ".join(f"{k} {v}" for k, v in sorted(store_errors.items())) or "none",
    )
    could_not_open = {
        role: codes.count(COULD_NOT_OPEN)
        for role, codes in exits.items()
        if COULD_NOT_OPEN in codes
    }
    crashed = {
        role: [c for c in codes if c != COULD_NOT_OPEN]
        for role, codes in exits.items()
        if any(c != COULD_NOT_OPEN for c in codes)
    }
    report.figure(
        "processes whose store could not open (then restarted)",
        ", ".join(f"{role} {n}" for role, n in sorted(could_not_open.items())) or "none",
    )
    report.fail(
        "a process's open store failed (see ROLE.err in the run's folder)",
        [f"{role} exit codes {codes}" for role, codes in sorted(crashed.items())],
    )
    report.fail(
        "an open store of the harness failed (see harness.log)",
        [f"{k} {v}" for k, v in sorted(store_errors.items()) if k.startswith("closed")],
    )
    return report
