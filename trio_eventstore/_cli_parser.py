"""The ``trio-eventstore`` command line's arguments (`_parser`): every command, its
options and their help (the commands themselves are in ``__main__``)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Awaitable, Callable

from . import admin
from ._config import EventStoreConfig
from ._daemon_types import DEFAULT_SHUTDOWN_TIMEOUT
from ._sql import STREAM_SORT_COLUMNS
from ._subscription_types import DEFAULT_RETRY_POLICY

__all__ = ["_DESTRUCTIVE", "_TASKS", "_parser"]

_TASKS: dict[str, tuple[Callable[[EventStoreConfig], Awaitable[admin.AdminResult]], str]] = {
    "create": (admin.create, "create the database and schema if missing"),
    "init": (admin.init, "create the event store tables in the schema"),
    "migrate": (admin.migrate, "apply pending schema migrations"),
    "drop": (admin.drop, "drop the database (schema public) or the schema"),
    "reset": (admin.reset, "delete every event, stream, subscription and snapshot"),
}


#: Tasks that destroy data: they ask for confirmation (or ``--yes``).
_DESTRUCTIVE = ("drop", "reset")

#: The help of a subscription name argument.
_SUBSCRIPTION_NAME = "the subscription (one split into partition groups: all of its groups)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-eventstore",
        description="Administer a trio-eventstore / Elixir EventStore database.",
        epilog="Settings not given as options come from EVENTSTORE_* environment variables.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="postgresql://user:password@host:port/database")
    common.add_argument("--schema", help="the store's schema (default: public)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in _TASKS.items():
        task = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        if name == "init":
            task.add_argument(
                "--column-data-type",
                choices=["bytea", "jsonb"],
                help="the type of the data and metadata columns (default: bytea)",
            )
        if name in _DESTRUCTIVE:
            task.add_argument(
                "--yes",
                "-y",
                action="store_true",
                help="do not ask for confirmation (needed when stdin is not a terminal)",
            )
    grant = sub.add_parser(
        "grant",
        parents=[common],
        help="let an application role use the store (read and write rows, nothing more)",
        description=(
            "Grant ROLE what it needs to run the store (USAGE on the schema; SELECT, INSERT, "
            "UPDATE, DELETE where needed on its tables; USAGE on its sequences), and nothing "
            "more. Run it as the store's owner. The role must exist."
        ),
    )
    grant.add_argument("role", help="the application role (it must exist)")
    grant.add_argument(
        "--print",
        dest="print_only",
        action="store_true",
        help="print the GRANT statements (SQL) instead of running them; needs no connection",
    )
    grant.add_argument(
        "--hard-deletes",
        action="store_true",
        default=None,
        help="also grant DELETE for hard deletes (default: EVENTSTORE_ENABLE_HARD_DELETES)",
    )
    info = sub.add_parser(
        "info",
        parents=[common],
        help="show a stream's information",
        description="show a stream's information",
    )
    info.add_argument("stream_uuid", nargs="?", default="$all")
    streams = sub.add_parser("streams", parents=[common], help="list streams")
    streams.add_argument("--search", help="only streams whose id contains this (case-sensitive)")
    streams.add_argument("--page", type=int, default=1)
    streams.add_argument("--page-size", type=int, default=50)
    streams.add_argument("--sort-by", choices=STREAM_SORT_COLUMNS, default="stream_id")
    streams.add_argument("--desc", action="store_true", help="sort in descending order")
    sub.add_parser("subscriptions", parents=[common], help="list subscriptions and their lag")
    show = sub.add_parser("show", parents=[common], help="show a stream's events")
    show.add_argument("stream_uuid")
    show.add_argument("--from", dest="start", type=int, default=0, help="first version")
    show.add_argument("--count", type=int, default=100)
    event = sub.add_parser("event", parents=[common], help="show one event by id")
    event.add_argument("event_id")
    tail = sub.add_parser(
        "tail",
        parents=[common],
        help="follow a stream live (Ctrl-C stops)",
        description="Follow a stream live (Ctrl-C stops). A stream that does not exist is "
        "refused (a typo, most often) unless --allow-missing.",
    )
    tail.add_argument("stream_uuid", nargs="?", default="$all")
    tail.add_argument(
        "--allow-missing",
        action="store_true",
        help="follow the stream even if it does not exist (yet) or has been deleted",
    )
    reset_sub = sub.add_parser(
        "reset-subscription",
        parents=[common],
        help="set a subscription's checkpoint (refused while any node runs it)",
    )
    reset_sub.add_argument("stream_uuid")
    reset_sub.add_argument("subscription_name", help=_SUBSCRIPTION_NAME)
    reset_sub.add_argument("position", type=int, help="deliver events above this number")
    reset_sub.add_argument(
        "--force",
        action="store_true",
        help="accept a position beyond the stream's head (events up to it will be skipped)",
    )
    delete_sub = sub.add_parser(
        "delete-subscription",
        parents=[common],
        help="delete a subscription (refused while any node runs it)",
    )
    delete_sub.add_argument("stream_uuid")
    delete_sub.add_argument("subscription_name", help=_SUBSCRIPTION_NAME)
    parked = sub.add_parser(
        "parked",
        parents=[common],
        help="list, replay or discard a subscription's parked events",
        description="list: the events a persistent subscription parked; replay: deliver "
        "them again (the node holding the subscription does, at least once); discard: "
        "forget them. --event limits replay and discard to the given event ids.",
    )
    parked.add_argument("action", choices=["list", "replay", "discard"])
    parked.add_argument("stream_uuid", help="the subscription's stream ($all for all)")
    parked.add_argument("subscription_name", help=_SUBSCRIPTION_NAME)
    parked.add_argument("--event", action="append", metavar="EVENT_ID", help="an event id")
    run = sub.add_parser(
        "run",
        parents=[common],
        help="run subscriber handlers until SIGINT/SIGTERM",
        description="Run handlers on persistent subscriptions: MODULE:NAME is a function "
        "called with each RecordedEvent, or an EventHandler (batches, setup and teardown). "
        "Modules in the current directory are importable. SIGINT/SIGTERM stop them cleanly "
        "(exit 0); a second signal cancels the handlers in hand.",
    )
    run.add_argument(
        "handlers",
        nargs="+",
        metavar="MODULE:NAME[=SUBSCRIPTION]",
        help="a handler; SUBSCRIPTION is its subscription name (default: MODULE:NAME)",
    )
    run.add_argument(
        "--serializer",
        metavar="MODULE:NAME",
        help="the store's serializer: a Serializer, or a class or function making one "
        "(default: EVENTSTORE_SERIALIZER, else JsonSerializer(): unregistered types as dicts)",
    )
    run.add_argument("--stream", default="$all", help="the stream to follow (default: $all)")
    run.add_argument(
        "--on-error",
        choices=["park", "retry", "stop"],
        default="park",
        help="when a handler raises: retry with back-off then park the event and go on "
        "(default), retry for ever, or stop (exit 1)",
    )
    run.add_argument(
        "--max-attempts",
        type=int,
        default=DEFAULT_RETRY_POLICY.max_attempts,
        help="with --on-error park: attempts before an event is parked "
        f"(default: {DEFAULT_RETRY_POLICY.max_attempts})",
    )
    run.add_argument(
        "--retry-deadline",
        type=float,
        default=None,
        help="with --on-error park: park an event failing for this many seconds",
    )
    run.add_argument("--buffer-size", type=int, default=100)
    run.add_argument("--checkpoint-threshold", type=int, default=100)
    run.add_argument("--checkpoint-after", type=float, default=1.0)
    run.add_argument("--status-file", help="write a JSON health snapshot here every 5 s")
    run.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="serve /metrics (Prometheus) and /health, /health/live, /health/ready on this "
        "port (default: EVENTSTORE_HTTP_PORT, else not served)",
    )
    run.add_argument(
        "--http-host",
        default=os.environ.get("EVENTSTORE_HTTP_HOST", "127.0.0.1"),
        help="the address to serve them on (default: EVENTSTORE_HTTP_HOST, else 127.0.0.1)",
    )
    run.add_argument(
        "--shutdown-timeout",
        type=float,
        default=DEFAULT_SHUTDOWN_TIMEOUT,
        help="seconds the handlers in hand get to finish once stopping (default: "
        f"{DEFAULT_SHUTDOWN_TIMEOUT:g}); then they are cancelled and what was handled is flushed",
    )
    run.add_argument("--retry-delay", type=float, default=0.5, help="first back-off (s)")
    run.add_argument("--max-retry-delay", type=float, default=30.0, help="longest back-off (s)")
    return parser
