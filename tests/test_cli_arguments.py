"""Command-line arguments that are wrong or empty: refused with a message naming them,
before anything is changed (never taken as "not given")."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.parse
import uuid
from pathlib import Path

import trio

from trio_eventstore import ANY_VERSION, EventData, EventStoreConfig, admin, open_event_store
from trio_eventstore._pg import open_connection

from .helpers import run_cli, url_for

HANG_GUARD = 120
ROOT = Path(__file__).resolve().parent.parent


def database_exists(server_url: str, name: str) -> bool:
    async def query() -> bool:
        maintenance = EventStoreConfig(url=url_for(server_url, "postgres"))
        async with open_connection(maintenance) as conn:
            sql = "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)"
            return bool(await conn.fetchval(sql, name))

    return trio.run(query)


def test_an_empty_schema_option_is_refused_not_taken_for_public(server_url: str) -> None:
    # `drop --schema "$SCHEMA" --yes` with SCHEMA unset must not drop the whole database.
    name = f"cli_{uuid.uuid4().hex[:10]}"
    url = url_for(server_url, name)
    config = EventStoreConfig(url=url)
    trio.run(admin.create, config)
    trio.run(admin.init, config)
    try:
        dropped = run_cli("drop", "--url", url, "--schema", "", "--yes")
        assert dropped.returncode == 2, dropped.stdout + dropped.stderr
        assert "schema: must be a non-empty name" in dropped.stderr
        assert database_exists(server_url, name)
        # Nor does an empty --url fall back to the environment's.
        reset = run_cli("reset", "--url", "", "--yes", env={"EVENTSTORE_URL": url})
        assert reset.returncode == 2, reset.stdout + reset.stderr
        assert "url: expected a postgresql:// or postgres:// URL" in reset.stderr
    finally:
        trio.run(admin.drop, config)


async def seed(config: EventStoreConfig) -> None:
    async with open_event_store(config) as store:
        await store.append_to_stream("acct", ANY_VERSION, [EventData({"n": 1}, event_type="T")])
        async with store.subscribe_to_all_streams("proj") as sub:
            await sub.wait_subscribed()


def test_operator_commands_name_the_bad_argument(eventstore_config: EventStoreConfig) -> None:
    trio.run(seed, eventstore_config)
    env = {
        "EVENTSTORE_URL": eventstore_config.url or "",
        "EVENTSTORE_SCHEMA": eventstore_config.schema,
    }

    huge = str(2**70)
    beyond = run_cli("reset-subscription", "$all", "proj", huge, "--force", env=env)
    assert beyond.returncode == 1
    assert f"position: must be < 2**63 (PostgreSQL's bigint), got {huge}" in beyond.stderr
    assert "DatabaseError" not in beyond.stderr

    for action in ("replay", "discard"):
        bad_id = run_cli("parked", action, "$all", "proj", "--event", "not-an-id", env=env)
        assert bad_id.returncode == 1
        assert "--event: not an event id: 'not-an-id'" in bad_id.stderr

    for count in ("0", "-1"):
        shown = run_cli("show", "acct", "--count", count, env=env)
        assert shown.returncode == 1, shown.stdout
        assert f"--count: must be >= 1, got {count}" in shown.stderr


def test_a_handler_with_an_empty_subscription_name_is_refused(
    eventstore_config: EventStoreConfig,
) -> None:
    env = {
        "EVENTSTORE_URL": eventstore_config.url or "",
        "EVENTSTORE_SCHEMA": eventstore_config.schema,
    }
    run = run_cli("run", "tests.daemon_handlers:record=", env=env)
    assert run.returncode == 2
    assert "no subscription name after '='" in run.stderr


def test_the_invoke_db_tasks_never_show_the_password(server_url: str) -> None:
    """invoke echoes the command it runs (into CI logs): the URL goes by the environment."""
    name = f"cli_{uuid.uuid4().hex[:10]}"
    url = url_for(server_url, name)
    password = urllib.parse.urlsplit(url).password
    assert password
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_")}
    try:
        for task in ("db.create", "db.init", "db.migrate"):
            done = subprocess.run(
                [sys.executable, "-m", "invoke", task, "--url", url, "--schema", "leak"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=HANG_GUARD,
                check=False,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            assert password not in done.stdout + done.stderr, task
            assert "trio_eventstore" in done.stdout  # the command, echoed
    finally:
        trio.run(admin.drop, EventStoreConfig(url=url))
