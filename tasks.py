"""Development tasks (``invoke --list``). ``make test`` runs ``invoke check`` in the venv."""

from __future__ import annotations

import sys
from pathlib import Path

from invoke.collection import Collection
from invoke.context import Context
from invoke.tasks import task

PY = sys.executable
BIN = Path(sys.executable).parent
LINTED = ("trio_eventstore", "tests", "property_tests", "bench", "examples", "tasks.py")


@task
def lint(c: Context) -> None:
    """ruff over the package, tests and tools."""
    paths = [p for p in LINTED if Path(p).exists()]
    c.run(f"{PY} -m ruff check {' '.join(paths)}", echo=True, pty=False)


@task
def typecheck(c: Context) -> None:
    """mypy --strict."""
    c.run(f"{PY} -m mypy", echo=True, pty=False)


@task
def layers(c: Context) -> None:
    """import-linter: the module layers and the single asyncio boundary."""
    c.run(f"{BIN / 'lint-imports'}", echo=True, pty=False)


@task(help={"k": "only tests matching this expression", "args": "more pytest arguments"})
def test(c: Context, k: str = "", args: str = "") -> None:
    """pytest against a real PostgreSQL (throwaway cluster unless TRIO_EVENTSTORE_TEST_URL)."""
    select = f"-k {k!r}" if k else ""
    c.run(f"{PY} -m pytest {select} {args}", echo=True, pty=False)


@task
def proptest(c: Context, profile: str = "ci") -> None:
    """Property tests and the hostile-input fuzzers with a longer Hypothesis profile
    (default: ci)."""
    c.run(
        f"{PY} -m pytest property_tests tests/test_hostile_input.py",
        env={"HYPOTHESIS_PROFILE": profile},
        echo=True,
        pty=False,
    )


@task
def bench(c: Context) -> None:
    """Benchmarks: ratios against baselines measured in the same run."""
    c.run(f"{PY} -m bench", echo=True, pty=False)


@task(
    help={
        "kills": "SIGKILLs of the projection process",
        "events": "events to project",
        "seed": "repeat a run (its seed)",
    }
)
def projection_kill_loop(c: Context, kills: int = 50, events: int = 20000, seed: str = "") -> None:
    """The exactly-once projection under a long kill -9 loop (the suite: 6 kills, 2000 events)."""
    env = {
        "PROJECTION_KILLS": str(kills),
        "PROJECTION_KILL_EVENTS": str(events),
        "PROJECTION_KILL_SEED": seed,
    }
    c.run(
        f"{PY} -m pytest -s tests/test_projection_kill.py -k neither", env=env, echo=True, pty=False
    )


@task(
    help={
        "duration": "seconds of faults (then quiescing and the checks)",
        "seed": "repeat a run's fault schedule (its seed; random by default)",
        "folder": "keep the run's logs in this folder",
    }
)
def faults(c: Context, duration: float = 180.0, seed: str = "", folder: str = "") -> None:
    """The fault run: writers and subscribers under network faults, PostgreSQL restarts,
    kills and pool exhaustion, then the checks and the figures (the suite runs two short
    ones)."""
    options = f"--duration {duration}" + (f" --seed {int(seed)}" if seed else "")
    options += f" --folder {folder!r}" if folder else ""
    c.run(f"{PY} -m tests.faultrun {options}", echo=True, pty=False)


@task(pre=[lint, typecheck, layers, test])
def check(c: Context) -> None:
    """Everything CI runs."""


def _admin(c: Context, command: str, url: str, schema: str, *, yes: bool = False) -> None:
    options = f"--schema {schema!r}" if schema else ""
    if yes:
        options += " --yes"
    # drop and reset ask for confirmation on a terminal: give them one.
    pty = command in ("drop", "reset") and not yes and sys.stdin.isatty()
    # The URL (its password) goes by the environment: the command is echoed (and a
    # command line is visible to every user of the machine).
    env = {"EVENTSTORE_URL": url} if url else {}
    c.run(f"{PY} -m trio_eventstore {command} {options}".rstrip(), echo=True, pty=pty, env=env)


_DB_HELP = {"url": "database URL (default: EVENTSTORE_URL)", "schema": "schema (default: public)"}


@task(help=_DB_HELP)
def create(c: Context, url: str = "", schema: str = "") -> None:
    """Create the database and schema."""
    _admin(c, "create", url, schema)


@task(help=_DB_HELP)
def init(c: Context, url: str = "", schema: str = "") -> None:
    """Create the event store tables."""
    _admin(c, "init", url, schema)


@task(help=_DB_HELP)
def migrate(c: Context, url: str = "", schema: str = "") -> None:
    """Apply pending migrations."""
    _admin(c, "migrate", url, schema)


_DESTRUCTIVE_HELP = {**_DB_HELP, "yes": "do not ask for confirmation"}


@task(help=_DESTRUCTIVE_HELP)
def drop(c: Context, url: str = "", schema: str = "", yes: bool = False) -> None:
    """Drop the database (public) or the schema (asks first, unless --yes)."""
    _admin(c, "drop", url, schema, yes=yes)


@task(help=_DESTRUCTIVE_HELP)
def reset(c: Context, url: str = "", schema: str = "", yes: bool = False) -> None:
    """Empty the store (asks first, unless --yes)."""
    _admin(c, "reset", url, schema, yes=yes)


db = Collection("db", create, init, migrate, drop, reset)
ns = Collection(
    lint, typecheck, layers, test, proptest, bench, check, projection_kill_loop, faults, db
)
