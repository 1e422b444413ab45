"""The ``trio-eventstore`` command line: the admin tasks (create, init, migrate, drop,
reset) and inspection commands.

Connection settings come from ``--url``/``--schema`` or the environment
(``EVENTSTORE_URL``, ``EVENTSTORE_SCHEMA``, ... as in `EventStoreConfig.from_env`).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from . import admin
from ._config import EventStoreConfig
from ._daemon import SubscriberSpec, load_handler, run_subscribers
from ._errors import EventStoreError
from ._store import open_event_store

__all__ = ["main"]

_TASKS: dict[str, tuple[Callable[[EventStoreConfig], Awaitable[admin.AdminResult]], str]] = {
    "create": (admin.create, "create the database and schema if missing"),
    "init": (admin.init, "create the event store tables in the schema"),
    "migrate": (admin.migrate, "apply pending schema migrations"),
    "drop": (admin.drop, "drop the database (schema public) or the schema"),
    "reset": (admin.reset, "delete every event, stream, subscription and snapshot"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-eventstore",
        description="Administer a trio-eventstore / Elixir EventStore database.",
        epilog="Settings not given as options come from EVENTSTORE_* environment variables.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="postgresql://user:password@host:port/database")
    common.add_argument("--schema", help="the store's schema (default: public)")
    common.add_argument(
        "--column-data-type",
        choices=["bytea", "jsonb"],
        help="data column type for init (default: bytea)",
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in _TASKS.items():
        sub.add_parser(name, parents=[common], help=help_text, description=help_text)
    info = sub.add_parser(
        "info",
        parents=[common],
        help="show a stream's information",
        description="show a stream's information",
    )
    info.add_argument("stream_uuid", nargs="?", default="$all")
    run = sub.add_parser(
        "run",
        parents=[common],
        help="run subscriber handlers until SIGINT/SIGTERM",
        description="Run handlers (module:function, called with each RecordedEvent) on "
        "persistent subscriptions; SIGINT/SIGTERM stop them cleanly (exit 0).",
    )
    run.add_argument(
        "handlers",
        nargs="+",
        metavar="MODULE:FUNCTION[=NAME]",
        help="a handler; NAME is its subscription name (default: MODULE:FUNCTION)",
    )
    run.add_argument("--stream", default="$all", help="the stream to follow (default: $all)")
    run.add_argument(
        "--on-error",
        choices=["retry", "stop"],
        default="retry",
        help="when a handler raises: retry with back-off, or stop (exit 1)",
    )
    run.add_argument("--buffer-size", type=int, default=100)
    run.add_argument("--checkpoint-threshold", type=int, default=100)
    run.add_argument("--checkpoint-after", type=float, default=1.0)
    run.add_argument("--status-file", help="write a JSON health snapshot here every 5 s")
    return parser


def _specs(args: argparse.Namespace) -> list[SubscriberSpec]:
    specs = []
    for item in args.handlers:
        target, _, name = item.partition("=")
        specs.append(
            SubscriberSpec(
                name=name or target,
                handler=load_handler(target),
                stream_uuid=args.stream,
                on_error=args.on_error,
                options={
                    "buffer_size": args.buffer_size,
                    "checkpoint_threshold": args.checkpoint_threshold,
                    "checkpoint_after": args.checkpoint_after,
                },
            )
        )
    return specs


def _config(args: argparse.Namespace) -> EventStoreConfig:
    overrides: dict[str, Any] = {}
    if args.url:
        overrides["url"] = args.url
    if args.schema:
        overrides["schema"] = args.schema
    if args.column_data_type:
        overrides["column_data_type"] = args.column_data_type
    return EventStoreConfig.from_env(**overrides)


async def _info(config: EventStoreConfig, stream_uuid: str) -> dict[str, Any]:
    async with open_event_store(config) as store:
        info = await store.stream_info(stream_uuid)
    return {
        "stream_uuid": info.stream_uuid,
        "stream_id": info.stream_id,
        "stream_version": info.stream_version,
        "status": info.status.value,
        "created_at": info.created_at.isoformat(),
        "deleted_at": info.deleted_at.isoformat() if info.deleted_at else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failed, 2 usage)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = _config(args)
    except (ValueError, TypeError) as exc:
        print(f"trio-eventstore: bad configuration: {exc}", file=sys.stderr)
        return 2
    if args.command == "run":
        logging.basicConfig(
            level=logging.INFO,
            force=True,
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
        )
        try:
            specs = _specs(args)
        except (ValueError, TypeError) as exc:
            print(f"trio-eventstore run: {exc}", file=sys.stderr)
            return 2
        status = Path(args.status_file) if args.status_file else None
        try:
            trio.run(functools.partial(run_subscribers, config, specs, status_file=status))
        except EventStoreError as exc:
            print(
                f"trio-eventstore run: {type(exc).__name__}: {config.redact(str(exc))}",
                file=sys.stderr,
            )
            return 1
        return 0
    try:
        if args.command == "info":
            info = trio.run(_info, config, args.stream_uuid)
            if args.json:
                print(json.dumps(info))
            else:
                for key, value in info.items():
                    print(f"{key:15} {value}")
            return 0
        task = _TASKS[args.command][0]
        result = trio.run(task, config)
    except EventStoreError as exc:
        message = config.redact(str(exc))
        if args.json:
            print(json.dumps({"ok": False, "error": type(exc).__name__, "message": message}))
        print(f"trio-eventstore {args.command}: {type(exc).__name__}: {message}", file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                {
                    "ok": True,
                    "task": result.task,
                    "changed": result.changed,
                    "message": result.message,
                }
            )
        )
    else:
        print(result.message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
