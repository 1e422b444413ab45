"""The ``trio-eventstore`` command line: the admin tasks (create, init, migrate, drop,
reset, grant) and inspection commands.

Connection settings come from ``--url``/``--schema`` or the environment
(``EVENTSTORE_URL``, ``EVENTSTORE_SCHEMA``, ... as in `EventStoreConfig.from_env`).
Commands other than ``init`` use the column data type the schema was initialised with.
``drop`` and ``reset`` say what they would destroy and ask for confirmation (``--yes``
skips it; without a terminal they refuse unless given ``--yes``).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from . import _operator, admin
from ._cli_parser import _DESTRUCTIVE, _TASKS, _parser
from ._config import EventStoreConfig
from ._daemon import load_handler, run_subscribers
from ._daemon_types import SubscriberSpec
from ._errors import (
    EventStoreError,
    StreamDeletedError,
    StreamNotFoundError,
    SubscriptionAlreadyExistsError,
    single_errors,
)
from ._serialization import load_serializer
from ._store import EventStore, open_event_store
from ._subscription_types import RetryPolicy
from ._transient import TransientSubscription

__all__ = ["main"]


def _http_port(args: argparse.Namespace) -> int | None:
    """``--http-port``, else EVENTSTORE_HTTP_PORT, else None (not served)."""
    if args.http_port is not None:
        port: int = args.http_port
        return port
    value = os.environ.get("EVENTSTORE_HTTP_PORT", "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"EVENTSTORE_HTTP_PORT: expected a port number, got {value!r}") from None


def _specs(args: argparse.Namespace) -> list[SubscriberSpec]:
    specs = []
    for item in args.handlers:
        target, equals, name = item.partition("=")
        if equals and not name:
            raise ValueError(f"handler {item!r}: no subscription name after '='")
        specs.append(
            SubscriberSpec(
                name=name or target,
                handler=load_handler(target),
                stream_uuid=args.stream,
                on_error=args.on_error,
                retry_delay=args.retry_delay,
                max_retry_delay=args.max_retry_delay,
                retry_policy=RetryPolicy(
                    max_attempts=args.max_attempts,
                    backoff=args.retry_delay,
                    max_backoff=args.max_retry_delay,
                    deadline=args.retry_deadline,
                ),
                buffer_size=args.buffer_size,
                checkpoint_threshold=args.checkpoint_threshold,
                checkpoint_after=args.checkpoint_after,
            )
        )
    return specs


def _run(args: argparse.Namespace) -> int:
    """``trio-eventstore run``: 0 after SIGINT/SIGTERM, 1 when a handler stops the daemon
    (or the store fails), 2 for bad usage or configuration."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        _JsonLogFormatter()
        if args.json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    logging.basicConfig(level=logging.INFO, force=True, handlers=[handler])
    # As `python -m` does: the handlers' modules may live in the current directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        config = _config(args)  # EVENTSTORE_SERIALIZER is honoured here
        if args.serializer:
            config = config.with_changes(serializer=load_serializer(args.serializer))
        specs = _specs(args)
        http_port = _http_port(args)
    except (ValueError, TypeError) as exc:
        print(f"trio-eventstore run: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("trio_eventstore.daemon").info("serializer: %r", config.serializer)
    status = Path(args.status_file) if args.status_file else None
    try:
        config = trio.run(_operator.store_config, config)  # the schema's column type
        trio.run(
            functools.partial(
                run_subscribers,
                config,
                specs,
                status_file=status,
                shutdown_timeout=args.shutdown_timeout,
                http_port=http_port,
                http_host=args.http_host,
            )
        )
    except EventStoreError as exc:
        print(
            f"trio-eventstore run: {type(exc).__name__}: {config.redact(str(exc))}",
            file=sys.stderr,
        )
        return 1
    except (ValueError, TypeError) as exc:  # options refused before anything ran
        print(f"trio-eventstore run: {exc}", file=sys.stderr)
        return 2
    return 0


def _config(args: argparse.Namespace) -> EventStoreConfig:
    overrides: dict[str, Any] = {}
    # Given, even empty, wins: an empty `--schema "$UNSET"` must not mean schema public
    # (`drop` would take the whole database), nor `--url ""` the environment's URL.
    if args.url is not None:
        overrides["url"] = args.url
    if args.schema is not None:
        overrides["schema"] = args.schema
    if getattr(args, "column_data_type", None):
        overrides["column_data_type"] = args.column_data_type
    return EventStoreConfig.from_env(**overrides)


async def _info(config: EventStoreConfig, stream_uuid: str) -> dict[str, Any]:
    config = await _operator.store_config(config)
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


async def _streams(config: EventStoreConfig, args: argparse.Namespace) -> Any:
    async with open_event_store(config) as store:
        page = await store.paginate_streams(
            page_size=args.page_size,
            page_number=args.page,
            search=args.search,
            sort_by=args.sort_by,
            sort_dir="desc" if args.desc else "asc",
        )
    rows = [
        {
            "stream_id": i.stream_id,
            "stream_uuid": i.stream_uuid,
            "version": i.stream_version,
            "status": i.status.value,
            "created_at": i.created_at.isoformat(),
        }
        for i in page.entries
    ]
    footer = f"page {page.page_number} of {page.total_pages}, {page.total_entries} streams"
    return rows, footer


async def _subscriptions(config: EventStoreConfig, args: argparse.Namespace) -> Any:
    async with open_event_store(config) as store:
        rows = await _operator.subscriptions_with_lag(store)
    return rows, f"{len(rows)} subscriptions"


async def _show(config: EventStoreConfig, args: argparse.Namespace) -> Any:
    """Stream the events out as they are read (pages of 1000), with progress on stderr
    for long reads."""
    if args.count < 1:
        raise ValueError(f"--count: must be >= 1, got {args.count}")
    shown = 0
    async with open_event_store(config) as store:
        async for event in store.stream_forward(args.stream_uuid, start_version=args.start):
            if shown >= args.count:
                break
            row = _operator.event_dict(event)
            if args.json:
                print(json.dumps(row, default=str), flush=shown % 1000 == 0)
            else:
                print(
                    f"#{row['event_number']:<8} {row['stream_uuid']}/{row['stream_version']}"
                    f"  {row['event_type']}  {_cell(row['data'])}  {row['created_at']}"
                )
            shown += 1
            if shown % 10_000 == 0:
                print(f"... {shown} events so far", file=sys.stderr, flush=True)
    return [], f"{shown} events"


async def _event(config: EventStoreConfig, args: argparse.Namespace) -> Any:
    async with open_event_store(config) as store:
        event = await _operator.read_event(store, args.event_id)
    row = _operator.event_dict(event)
    if args.json:
        return [row], ""
    _print_record(row)
    return [], ""


async def _reset_subscription(config: EventStoreConfig, args: argparse.Namespace) -> Any:
    await _operator.reset_subscription(
        config, args.stream_uuid, args.subscription_name, args.position, force=args.force
    )
    return [], (f"subscription {args.subscription_name!r} will resume after event {args.position}")


async def _delete_subscription(config: EventStoreConfig, args: argparse.Namespace) -> Any:
    await _operator.delete_subscription(config, args.stream_uuid, args.subscription_name)
    return [], f"subscription {args.subscription_name!r} deleted"


async def _parked(config: EventStoreConfig, args: argparse.Namespace) -> Any:
    async with open_event_store(config) as store:
        return await _operator.parked_command(
            store, args.action, args.stream_uuid, args.subscription_name, args.event
        )


async def _tail(config: EventStoreConfig, args: argparse.Namespace) -> Any:
    # Ctrl-C (or SIGTERM) cancels the follow and closes the store cleanly, rather than
    # a KeyboardInterrupt that may land inside the driver's callbacks.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals, single_errors():
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            async with open_event_store(config) as store:
                if not args.allow_missing:
                    await _existing_stream(store, args.stream_uuid)
                async with store.subscribe(args.stream_uuid) as live:
                    await _follow(live, args)
            nursery.cancel_scope.cancel()
    return [], ""


async def _existing_stream(store: EventStore, stream_uuid: str) -> None:
    """Refuse to follow a stream that does not exist or was deleted (a typo, most often:
    an operator would wait for nothing)."""
    try:
        info = await store.stream_info(stream_uuid)
    except StreamNotFoundError:
        raise StreamNotFoundError(
            f"stream {stream_uuid!r} does not exist (--allow-missing follows it anyway)",
            stream_uuid=stream_uuid,
        ) from None
    if info.deleted_at is not None:
        raise StreamDeletedError(
            f"stream {stream_uuid!r} has been deleted (--allow-missing follows it anyway)",
            stream_uuid=stream_uuid,
        )


async def _follow(live: TransientSubscription, args: argparse.Namespace) -> None:
    print(f"following {args.stream_uuid} (Ctrl-C stops)", file=sys.stderr, flush=True)
    async for batch in live:
        for event in batch:
            _print_rows([_operator.event_dict(event)], args.json, header=False)


_INSPECT: dict[str, Callable[[EventStoreConfig, argparse.Namespace], Awaitable[Any]]] = {
    "streams": _streams,
    "subscriptions": _subscriptions,
    "show": _show,
    "event": _event,
    "tail": _tail,
    "reset-subscription": _reset_subscription,
    "delete-subscription": _delete_subscription,
    "parked": _parked,
}


def _print_rows(rows: list[dict[str, Any]], as_json: bool, *, header: bool = True) -> None:
    if as_json:
        for row in rows:
            print(json.dumps(row, default=str), flush=True)
        return
    if not rows:
        return
    keys = list(rows[0])
    cells = [[_cell(row.get(k)) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    if header:
        print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)).rstrip())
    for line in cells:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip(), flush=True)


def _print_record(row: dict[str, Any]) -> None:
    """One record as ``field: value`` lines, JSON values pretty-printed in full."""
    width = max(len(key) for key in row) + 1
    for key, value in row.items():
        text = value if isinstance(value, str) else json.dumps(value, indent=2, default=str)
        first, *rest = text.splitlines() or [""]
        print(f"{key + ':':<{width}} {first}".rstrip())
        for line in rest:
            print(f"{'':<{width}} {line}".rstrip())


def _cell(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _report(args: argparse.Namespace, config: EventStoreConfig, exc: Exception) -> int:
    """Print a failed command's error (the type is named when it tells something)."""
    message = config.redact(str(exc))
    if args.json:
        print(json.dumps({"ok": False, "error": type(exc).__name__, "message": message}))
    if isinstance(exc, EventStoreError) and not isinstance(exc, SubscriptionAlreadyExistsError):
        message = f"{type(exc).__name__}: {message}"
    print(f"trio-eventstore {args.command}: {message}", file=sys.stderr)
    return 1


async def _inspect_command(config: EventStoreConfig, args: argparse.Namespace) -> Any:
    return await _INSPECT[args.command](await _operator.store_config(config), args)


def _inspect(args: argparse.Namespace, config: EventStoreConfig) -> int:
    try:
        rows, footer = trio.run(_inspect_command, config, args)
    except KeyboardInterrupt:
        return 0
    except (EventStoreError, LookupError, ValueError) as exc:
        return _report(args, config, exc)
    _print_rows(rows, args.json)
    if footer and not args.json:
        print(footer)
    return 0


def _confirm(args: argparse.Namespace, config: EventStoreConfig) -> int | None:
    """Ask before ``drop``/``reset`` destroys anything: None to go on, else the exit
    status (2: no terminal to ask and no ``--yes``; 1: not confirmed)."""
    target = trio.run(_operator.destruction, config, args.command)
    if target is None:
        return None  # nothing to destroy: the task says so
    if not sys.stdin.isatty():
        message = (
            f"this would destroy {target.description}; refusing without --yes "
            "(stdin is not a terminal to confirm on)"
        )
        if args.json:
            print(json.dumps({"ok": False, "error": "NotConfirmed", "message": message}))
        print(f"trio-eventstore {args.command}: {message}", file=sys.stderr)
        return 2
    print(f"This will destroy {target.description}.", file=sys.stderr)
    print(f"Type {target.name!r} to confirm: ", end="", file=sys.stderr, flush=True)
    try:
        answer = sys.stdin.readline()
    except KeyboardInterrupt:
        answer = ""
    if answer.strip() != target.name:
        print(f"trio-eventstore {args.command}: not confirmed; nothing changed", file=sys.stderr)
        return 1
    return None


class _JsonLogFormatter(logging.Formatter):
    """One JSON object per log record (``trio-eventstore run --json``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failed, 2 usage or not
    confirmed without a terminal, 141 output pipe closed early, as after SIGPIPE)."""
    try:
        return _main(argv)
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except BaseExceptionGroup as group:
        if group.subgroup(lambda exc: not isinstance(exc, BrokenPipeError)) is not None:
            raise
        return _quiet_broken_pipe()


def _quiet_broken_pipe() -> int:
    """The reader of our output has gone (``... | head``): stop quietly, and keep the
    interpreter from flushing into the closed pipe on exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = _config(args)
    except (ValueError, TypeError) as exc:
        print(f"trio-eventstore: bad configuration: {exc}", file=sys.stderr)
        return 2
    if args.command in _INSPECT:
        return _inspect(args, config)
    try:
        if args.command in _DESTRUCTIVE and not args.yes:
            refused = _confirm(args, config)
            if refused is not None:
                return refused
        if args.command == "reset":
            config = trio.run(_operator.store_config, config)
        if args.command == "info":
            info = trio.run(_info, config, args.stream_uuid)
            if args.json:
                print(json.dumps(info))
            else:
                for key, value in info.items():
                    print(f"{key:15} {value}")
            return 0
        if args.command == "grant":
            result = trio.run(
                functools.partial(
                    admin.grant,
                    config,
                    args.role,
                    apply=not args.print_only,
                    hard_deletes=args.hard_deletes,
                )
            )
        else:
            result = trio.run(_TASKS[args.command][0], config)
    except (EventStoreError, ValueError, TypeError) as exc:
        return _report(args, config, exc)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": True,
                    "task": result.task,
                    "changed": result.changed,
                    "message": result.message,
                    **({"statements": list(result.statements)} if result.statements else {}),
                }
            )
        )
    else:
        print(result.message, end="" if result.message.endswith("\n") else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
