"""The operator command line: streams, subscriptions and lag, show, event, tail,
reset-subscription and delete-subscription, for people and (--json) scripts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import trio

from trio_eventstore import ANY_VERSION, EventData, EventStoreConfig, admin, open_event_store

from .helpers import run_cli

HANG_GUARD = 60


def cli(config: EventStoreConfig, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"EVENTSTORE_URL": config.url or "", "EVENTSTORE_SCHEMA": config.schema}
    return run_cli(*args, env=env, timeout=HANG_GUARD)


def lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


async def seed(config: EventStoreConfig) -> None:
    async with open_event_store(config) as store:
        await store.append_to_stream(
            "acct-1", ANY_VERSION, [EventData({"n": n}, event_type="T") for n in range(3)]
        )
        await store.append_to_stream("other", ANY_VERSION, [EventData({"n": 9}, event_type="T")])
        async with store.subscribe_to_all_streams("proj", buffer_size=2) as sub:
            batch = await sub.__anext__()
            sub.ack(batch)  # 2 of 4 acknowledged


def test_listing_and_showing(eventstore_config: EventStoreConfig) -> None:
    trio.run(seed, eventstore_config)
    streams = lines(cli(eventstore_config, "streams", "--json", "--search", "acct"))
    assert [(s["stream_uuid"], s["version"]) for s in streams] == [("acct-1", 3)]
    people = cli(eventstore_config, "streams")
    assert "page 1 of 1, 3 streams" in people.stdout  # $all is listed, as in Elixir
    by_version = lines(
        cli(eventstore_config, "streams", "--json", "--sort-by", "stream_version", "--desc")
    )
    assert [(s["stream_uuid"], s["version"]) for s in by_version] == [
        ("$all", 4),
        ("acct-1", 3),
        ("other", 1),
    ]
    [proj] = lines(cli(eventstore_config, "subscriptions", "--json"))
    assert (proj["subscription_name"], proj["last_seen"], proj["head"], proj["lag"]) == (
        "proj",
        2,
        4,
        2,
    )
    shown = lines(cli(eventstore_config, "show", "acct-1", "--json", "--from", "2"))
    assert [e["stream_version"] for e in shown] == [2, 3]
    [one] = lines(cli(eventstore_config, "event", str(shown[0]["event_id"]), "--json"))
    assert one["data"] == {"n": 1}
    missing = cli(eventstore_config, "show", "nope")
    assert missing.returncode == 1
    assert "StreamNotFoundError" in missing.stderr


def test_reset_and_delete_subscription(eventstore_config: EventStoreConfig) -> None:
    trio.run(seed, eventstore_config)
    reset = cli(eventstore_config, "reset-subscription", "$all", "proj", "0")
    assert reset.returncode == 0, reset.stderr

    async def active_refuses_then_resumes() -> None:
        async with (
            open_event_store(eventstore_config) as store,
            store.subscribe_to_all_streams("proj", buffer_size=10) as sub,
        ):
            await sub.wait_subscribed()
            refused = await trio.to_thread.run_sync(
                lambda: cli(eventstore_config, "reset-subscription", "$all", "proj", "3")
            )
            assert refused.returncode == 1
            assert "subscription 'proj' on '$all' is active on another node" in refused.stderr
            assert "its lock is held" in refused.stderr
            assert "AlreadyExists" not in refused.stderr
            batch = await sub.__anext__()
            assert [e.event_number for e in batch.events] == [1, 2, 3, 4]  # after reset

    trio.run(active_refuses_then_resumes)
    assert cli(eventstore_config, "delete-subscription", "$all", "proj").returncode == 0
    assert lines(cli(eventstore_config, "subscriptions", "--json")) == []
    gone = cli(eventstore_config, "delete-subscription", "$all", "proj")
    assert gone.returncode == 1
    assert "SubscriptionNotFoundError" in gone.stderr


def test_tail_follows_live_and_stops_on_ctrl_c(eventstore_config: EventStoreConfig) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_")}
    env.update(
        EVENTSTORE_URL=eventstore_config.url or "", EVENTSTORE_SCHEMA=eventstore_config.schema
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "trio_eventstore", "tail", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        assert process.stdout is not None
        assert "following" in process.stderr.readline()  # subscribed

        async def append() -> None:
            async with open_event_store(eventstore_config) as store:
                await store.append_to_stream(
                    "s", ANY_VERSION, [EventData({"live": True}, event_type="T")]
                )

        trio.run(append)
        line = json.loads(process.stdout.readline())
        assert line["data"] == {"live": True}
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=HANG_GUARD) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def test_long_show_streams_out_with_progress(eventstore_config: EventStoreConfig) -> None:
    async def many() -> None:
        async with open_event_store(eventstore_config) as store:
            for _ in range(11):
                await store.append_to_stream(
                    "big", ANY_VERSION, [EventData({"n": i}, event_type="T") for i in range(1000)]
                )

    trio.run(many)
    result = cli(eventstore_config, "show", "big", "--json", "--count", "20000")
    assert len(lines(result)) == 11_000
    assert "10000 events so far" in result.stderr


def cli_env(config: EventStoreConfig) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_")}
    env.update(EVENTSTORE_URL=config.url or "", EVENTSTORE_SCHEMA=config.schema)
    return env


def test_reset_subscription_beyond_the_head_needs_force(
    eventstore_config: EventStoreConfig,
) -> None:
    trio.run(seed, eventstore_config)  # $all is at 4, "proj" at 2
    beyond = cli(eventstore_config, "reset-subscription", "$all", "proj", "999999")
    assert beyond.returncode == 1
    assert "beyond the head of '$all' (4)" in beyond.stderr
    assert "--force" in beyond.stderr
    [proj] = lines(cli(eventstore_config, "subscriptions", "--json"))
    assert proj["last_seen"] == 2  # unchanged
    assert cli(eventstore_config, "reset-subscription", "$all", "proj", "4").returncode == 0
    forced = cli(eventstore_config, "reset-subscription", "$all", "proj", "999999", "--force")
    assert forced.returncode == 0, forced.stderr
    [proj] = lines(cli(eventstore_config, "subscriptions", "--json"))
    assert proj["last_seen"] == 999999

    async def on_a_stream() -> None:
        async with (
            open_event_store(eventstore_config) as store,
            store.subscribe_to_stream("acct-1", "per-stream"),
        ):
            pass

    trio.run(on_a_stream)
    # The head of a stream is its version (3), not the last event number (4).
    refused = cli(eventstore_config, "reset-subscription", "acct-1", "per-stream", "4")
    assert refused.returncode == 1
    assert "beyond the head of 'acct-1' (3)" in refused.stderr
    assert cli(eventstore_config, "reset-subscription", "acct-1", "per-stream", "3").returncode == 0


def test_output_piped_to_a_reader_that_stops_early_exits_quietly(
    eventstore_config: EventStoreConfig,
) -> None:
    async def many() -> None:
        async with open_event_store(eventstore_config) as store:
            for _ in range(3):
                await store.append_to_stream(
                    "big", ANY_VERSION, [EventData({"n": i}, event_type="T") for i in range(1000)]
                )

    trio.run(many)
    for args in (("show", "big", "--count", "3000"), ("show", "big", "--json", "--count", "3000")):
        process = subprocess.Popen(
            [sys.executable, "-m", "trio_eventstore", *args],
            env=cli_env(eventstore_config),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert process.stdout is not None
        assert process.stdout.readline()  # as `| head -1` does
        process.stdout.close()
        _, stderr = process.communicate(timeout=HANG_GUARD)
        assert b"Traceback" not in stderr, stderr.decode()
        assert b"BrokenPipeError" not in stderr
        assert process.returncode == 141


def test_event_is_shown_as_a_record(eventstore_config: EventStoreConfig) -> None:
    long_text = "x" * 200

    async def write() -> None:
        async with open_event_store(eventstore_config) as store:
            await store.append_to_stream(
                "acct-1",
                ANY_VERSION,
                [EventData({"note": long_text, "n": 1}, event_type="T", metadata={"by": "me"})],
            )

    trio.run(write)
    [row] = lines(cli(eventstore_config, "show", "acct-1", "--json"))
    shown = cli(eventstore_config, "event", str(row["event_id"]))
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout.splitlines()
    assert out[0].split() == ["event_number:", "1"]
    assert f"event_id:       {row['event_id']}" in out
    assert "stream_uuid:    acct-1" in out
    assert "data:           {" in out
    assert f'                  "note": "{long_text}",' in out  # whole, pretty-printed
    assert '                  "n": 1' in out
    assert "..." not in shown.stdout
    [as_json] = lines(cli(eventstore_config, "event", str(row["event_id"]), "--json"))
    assert as_json == row  # --json unchanged


def test_tail_of_a_missing_stream_is_refused_unless_allowed(
    eventstore_config: EventStoreConfig,
) -> None:
    refused = cli(eventstore_config, "tail", "acct-typo")
    assert refused.returncode == 1
    # One line, not a traceback (the error left the command's nursery in a group).
    assert refused.stderr.startswith(
        "trio-eventstore tail: StreamNotFoundError: stream 'acct-typo' does not exist"
    ), refused.stderr
    assert "Traceback" not in refused.stderr
    assert "--allow-missing" in refused.stderr
    process = subprocess.Popen(
        [sys.executable, "-m", "trio_eventstore", "tail", "later", "--allow-missing", "--json"],
        env=cli_env(eventstore_config),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        assert process.stdout is not None
        assert "following later" in process.stderr.readline()

        async def append() -> None:
            async with open_event_store(eventstore_config) as store:
                await store.append_to_stream("later", ANY_VERSION, [EventData({}, event_type="T")])

        trio.run(append)
        assert json.loads(process.stdout.readline())["stream_uuid"] == "later"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=HANG_GUARD) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


@pytest.mark.parametrize(
    "command", ["create", "migrate", "drop", "reset", "info", "streams", "show", "tail"]
)
def test_column_data_type_is_an_option_of_init_only(
    eventstore_config: EventStoreConfig, command: str
) -> None:
    args = [command, "--column-data-type", "jsonb", *(["x"] if command == "show" else [])]
    result = cli(eventstore_config, *args)
    assert result.returncode == 2
    assert "unrecognized arguments: --column-data-type" in result.stderr


def test_commands_read_a_jsonb_store_without_being_told(test_database: str) -> None:
    config = EventStoreConfig(url=test_database, schema="t_jsonb_cli", column_data_type="jsonb")

    async def write() -> None:
        await admin.create(config)
        await admin.init(config)
        async with open_event_store(config) as store:
            await store.append_to_stream("j", ANY_VERSION, [EventData({"n": 1}, event_type="T")])

    trio.run(write)
    try:
        bytea = EventStoreConfig(url=test_database, schema=config.schema)  # the default
        [event] = lines(cli(bytea, "show", "j", "--json"))
        assert event["data"] == {"n": 1}
        assert lines(cli(bytea, "event", str(event["event_id"]), "--json"))[0]["data"] == {"n": 1}
        assert cli(bytea, "info", "j").returncode == 0
        reset = cli(bytea, "reset", "--yes")
        assert reset.returncode == 0, reset.stderr
    finally:
        trio.run(admin.drop, config)


def test_subscriptions_show_who_holds_them(eventstore_config: EventStoreConfig) -> None:
    """The holder comes from the database (pg_locks, pg_stat_activity), so the command
    tells it from any machine."""
    trio.run(seed, eventstore_config)
    [free] = lines(cli(eventstore_config, "subscriptions", "--json"))
    assert (free["state"], free["holder_pid"], free["holder"]) == ("free", None, None)

    async def while_held() -> None:
        async with (
            open_event_store(eventstore_config) as store,
            store.subscribe_to_all_streams("proj", buffer_size=10) as sub,
        ):
            await sub.wait_subscribed()
            result = await trio.to_thread.run_sync(
                lambda: cli(eventstore_config, "subscriptions", "--json")
            )
            [held] = lines(result)
            assert held["state"] == "held"
            assert held["holder_pid"] == store.statistics().lock_pid
            assert str(held["holder"]).startswith(
                f"trio-eventstore locks {eventstore_config.schema}@"
            )
            assert held["holder_since"] is not None
            assert (held["last_seen"], held["head"], held["lag"]) == (2, 4, 2)
            people = await trio.to_thread.run_sync(lambda: cli(eventstore_config, "subscriptions"))
            assert people.returncode == 0, people.stderr
            header, row = people.stdout.splitlines()[:2]
            assert header.split()[:10] == [
                "subscription_id",
                "stream_uuid",
                "subscription_name",
                "last_seen",
                "head",
                "lag",
                "state",
                "holder_pid",
                "holder",
                "holder_since",
            ]
            assert " held " in row

    trio.run(while_held)
