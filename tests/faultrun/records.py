"""What the fault run's processes write down, and how the checker reads it back.

Every process appends JSON lines to its own files in the run's folder, flushed after each
line (a SIGKILL loses nothing written before it):

* ``appends-<writer>.jsonl``: per append, an ``attempt`` line before the call and an
  ``outcome`` line after it (``ok``, ``failed`` for a typed refusal, ``ambiguous`` when
  the connection was lost or no answer came); an attempt without an outcome (the process
  was killed during the call) counts as ambiguous;
* ``deliveries-<role>.jsonl``: per delivered event, the consumer session, subscription,
  stream, stream version, ``$all`` position and time; ``start`` and ``stop`` lines per
  process (``stop`` with the persisted checkpoint after a clean stop).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import attrs

#: the streams the writers append to
STREAMS = tuple(f"s-{i}" for i in range(6))
#: the persistent subscriptions (both to $all)
SINGLE = "single"
COMPETING = "competing"
SUBSCRIPTIONS = (SINGLE, COMPETING)
#: consumers of the competing subscription (its concurrency_limit)
CONSUMERS = 3
#: a writer or subscriber process's exit code when its store could not be opened (the
#: database down or unreachable: expected under faults; it is restarted)
COULD_NOT_OPEN = 3


def partition_of(stream_uuid: str) -> int:
    """The competing subscription's partition key (``partition_by``): two streams each."""
    return int(stream_uuid.rpartition("-")[2]) % CONSUMERS


class JsonLines:
    """A file of JSON lines, each flushed to the OS as it is written."""

    def __init__(self, path: Path) -> None:
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def write(self, **record: Any) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def write_many(self, records: list[dict[str, Any]]) -> None:
        self._file.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a JSON-lines file (a last line cut by a kill is skipped)."""
    with path.open(encoding="utf-8") as file:
        for line in file:
            if line.endswith("\n"):
                yield json.loads(line)


class Opening:
    """Tells, when a process ends with an error, whether its store was ever open."""

    def __init__(self) -> None:
        self.opened = False

    def exit_code(self) -> int:
        return 1 if self.opened else COULD_NOT_OPEN


def now() -> float:
    """Wall-clock time, comparable across the run's processes and the database."""
    return time.time()


@attrs.define
class Append:
    """One append as its writer saw it."""

    writer: str
    op: int
    stream: str
    expected: str  # "any", "no_stream", "stream_exists" or a version
    ids: list[str]
    t0: float
    outcome: str = "ambiguous"  # ok | failed | ambiguous
    error: str = "killed"  # the error's class name ("" when ok; "killed": no outcome)
    version: int | None = None  # the stream's version after an ok append
    t1: float | None = None


def read_appends(folder: Path) -> list[Append]:
    appends: dict[tuple[str, int], Append] = {}
    for path in sorted(folder.glob("appends-*.jsonl")):
        for record in read_lines(path):
            key = (record["w"], record["op"])
            if record["k"] == "attempt":
                appends[key] = Append(
                    record["w"], record["op"], record["s"], record["e"], record["ids"], record["t"]
                )
            else:
                append = appends[key]
                append.outcome = record["o"]
                append.error = record["err"]
                append.version = record.get("v")
                append.t1 = record["t"]
    return list(appends.values())


@attrs.frozen
class Delivery:
    subscription: str
    session: str  # process incarnation : driver session : consumer
    event_number: int
    stream: str
    version: int
    at: float


@attrs.frozen
class Stop:
    """A subscriber process stopped on SIGTERM (``clean``: its last checkpoint was
    persisted as it left)."""

    subscription: str
    role: str
    pid: int
    checkpoint: int
    clean: bool
    at: float
    error: str


def read_deliveries(folder: Path) -> tuple[list[Delivery], list[Stop]]:
    deliveries: list[Delivery] = []
    stops: list[Stop] = []
    for path in sorted(folder.glob("deliveries-*.jsonl")):
        for r in read_lines(path):
            if r["k"] == "d":
                deliveries.append(Delivery(r["sub"], r["ses"], r["n"], r["s"], r["v"], r["t"]))
            elif r["k"] == "stop":
                stops.append(
                    Stop(r["sub"], r["role"], r["pid"], r["cp"], r["clean"], r["t"], r["err"])
                )
    return deliveries, stops
