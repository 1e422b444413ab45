"""The daemon's HTTP endpoint: ``/metrics`` (Prometheus text), ``/health``,
``/health/live`` and ``/health/ready`` (JSON), served with `trio.serve_tcp` in the
daemon's nursery.

Minimal HTTP/1.1: one request per connection (``Connection: close``), GET or HEAD, the
request head bounded in size and time; a bad request gets 400 and the connection closes.
Nothing a client sends can raise out of the server into the daemon.

At most `MAX_CONNECTIONS` connections are served at once. At the cap, a new connection
takes the place of the oldest one still waiting on its client (for its request head, or
for it to take the answer), which is closed without an answer; only if every connection
is a request being answered is the new one closed. Idle connections, however many, thus
cannot keep a probe from being answered; tasks and memory stay bounded.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

from ._errors import EventStoreError
from ._exposition import CONTENT_TYPE, render_metrics
from ._store import EventStore

__all__ = ["HealthEndpoint", "serve_health"]

logger = logging.getLogger("trio_eventstore.daemon")

#: The request line and headers together, at most.
MAX_HEAD_BYTES = 8192
#: Seconds a client gets to send its request head, and to take the response.
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0
#: Connections served at once; at the cap, the oldest waiting on its client makes room.
MAX_CONNECTIONS = 64
#: Seconds the readiness check's query may take.
READY_QUERY_TIMEOUT = 2.0

#: Subscriber states (the daemon's) and subscription roles (the store's) that count as
#: ready: holding the subscription, or standing by for it.
READY_STATES = frozenset({"standby", "catching_up", "running", "retrying"})
READY_ROLES = frozenset({"holder", "hibernated", "standby"})

_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) (/[\x21-\x7e]*) HTTP/1\.[01]")
_HEADER = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class _BadRequest(Exception):
    pass


class _Connection:
    """One connection being served: its cancel scope closes it to make room."""

    __slots__ = ("scope",)

    def __init__(self) -> None:
        self.scope = trio.CancelScope()


class HealthEndpoint:
    """What the endpoint serves: the store's figures, and the daemon's subscribers
    (``subscribers``: `SubscriberStatistics.as_dict` of each; None: the store's own
    subscriptions decide readiness)."""

    def __init__(
        self,
        store: EventStore,
        subscribers: Callable[[], Sequence[Mapping[str, Any]]] | None = None,
    ) -> None:
        self.store = store
        self.subscribers = subscribers
        # The connections served; those waiting on their client, oldest first.
        self._connections: set[_Connection] = set()
        self._waiting: dict[_Connection, None] = {}

    def metrics(self) -> str:
        subscribers = self.subscribers() if self.subscribers is not None else ()
        return render_metrics(self.store.statistics(), subscribers)

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready: a query goes through the pool, the LISTEN and lock connections are
        up, and every subscription is held or standing by."""
        store = self.store
        pool_error = None
        try:
            with trio.move_on_after(READY_QUERY_TIMEOUT) as scope:
                await store._db.fetchval("SELECT 1")
            if scope.cancelled_caught:
                pool_error = f"no answer within {READY_QUERY_TIMEOUT:g} s"
        except EventStoreError as exc:
            pool_error = f"{type(exc).__name__}: {exc}"
        stats = store.statistics()
        if self.subscribers is not None:
            subs = [
                {k: s[k] for k in ("name", "stream_uuid", "state", "lag", "last_checkpoint")}
                for s in self.subscribers()
            ]
            subs_ok = all(s["state"] in READY_STATES for s in subs)
        else:
            subs = [
                {
                    "name": d.name,
                    "stream_uuid": d.stream_uuid,
                    "role": d.role,
                    "lag": d.lag,
                    "last_checkpoint": d.last_persisted,
                }
                for d in stats.subscription_details
            ]
            subs_ok = all(s["role"] in READY_ROLES for s in subs)
        checks = {
            "pool": {
                "ok": pool_error is None,
                "error": pool_error,
                "size": stats.pool_size,
                "in_use": stats.pool_in_use,
                "waiting": stats.pool_waiting,
                "overloaded": stats.pool_overloaded,
            },
            "listener": {
                "ok": stats.listener_connected,
                "reconnects": stats.listener_reconnects,
            },
            "lock": {"ok": stats.lock_connected, "reconnects": stats.lock_reconnects},
            "subscriptions": {"ok": subs_ok, "subscriptions": subs},
        }
        ready = pool_error is None and stats.listener_connected and stats.lock_connected and subs_ok
        return ready, {"status": "ready" if ready else "not ready", "checks": checks}

    async def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a well-formed request."""
        path = path.split("?", 1)[0]
        if path not in ("/metrics", "/health", "/health/live", "/health/ready"):
            return 404, "text/plain; charset=utf-8", b"not found\n"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"method not allowed\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE, self.metrics().encode()
        if path == "/health/live":
            return 200, "application/json", b'{"status": "live"}\n'
        ready, body = await self.readiness()
        return 200 if ready else 503, "application/json", json.dumps(body).encode() + b"\n"

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one connection (never raises: a client cannot stop the daemon)."""
        connection = _Connection()
        try:
            if not self._admit(connection):
                return  # every one is a request being answered: closed without an answer
            try:
                with connection.scope:
                    await self._serve(stream, connection)
            finally:
                self._connections.discard(connection)
                self._waiting.pop(connection, None)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            logger.exception("health endpoint: a request failed")
        finally:
            await trio.aclose_forcefully(stream)

    def _admit(self, connection: _Connection) -> bool:
        """Count ``connection`` in; at the cap, close the oldest connection waiting on its
        client to make room (False: none is, the new one is refused)."""
        if len(self._connections) >= MAX_CONNECTIONS:
            if not self._waiting:
                return False
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            self._connections.discard(oldest)
            oldest.scope.cancel()
        self._connections.add(connection)
        self._waiting[connection] = None
        return True

    async def _serve(self, stream: trio.abc.Stream, connection: _Connection) -> None:
        method = "GET"
        with trio.move_on_after(READ_TIMEOUT) as reading:
            try:
                head = await _read_head(stream)
                self._waiting.pop(connection, None)  # being answered: not closed for room
                method, path = _parse(head)
                status, content_type, body = await self.respond(method, path)
            except _BadRequest as exc:
                status, content_type, body = 400, "text/plain; charset=utf-8", f"{exc}\n".encode()
            except Exception:
                logger.exception("health endpoint: a request failed")
                status, content_type, body = 500, "text/plain; charset=utf-8", b"error\n"
        if reading.cancelled_caught:
            status, content_type, body = 408, "text/plain; charset=utf-8", b"timeout\n"
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n" + ("Allow: GET, HEAD\r\n" if status == 405 else "") + "\r\n"
        ).encode()
        if connection in self._connections:
            self._waiting[connection] = None  # waiting for the client to take the answer
        with trio.move_on_after(WRITE_TIMEOUT):
            await stream.send_all(head if method == "HEAD" else head + body)


async def _read_head(stream: trio.abc.Stream) -> bytes:
    """The request line and headers (up to the blank line), at most `MAX_HEAD_BYTES`."""
    data = bytearray()
    while True:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise _BadRequest("incomplete request")
        data += chunk
        end = data.find(b"\r\n\r\n")
        if end > MAX_HEAD_BYTES or (end < 0 and len(data) > MAX_HEAD_BYTES):
            raise _BadRequest("request head too large")
        if end >= 0:
            return bytes(data[:end])


def _parse(head: bytes) -> tuple[str, str]:
    """(method, path) of a request head, or `_BadRequest`."""
    request_line, *headers = head.split(b"\r\n")
    match = _REQUEST_LINE.fullmatch(request_line)
    if match is None:
        raise _BadRequest("malformed request line")
    for header in headers:
        if _HEADER.fullmatch(header) is None:
            raise _BadRequest("malformed header")
    return match.group(1).decode(), match.group(2).decode()


async def serve_health(
    endpoint: HealthEndpoint,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``endpoint`` on ``host``:``port`` until cancelled; reports the bound port
    once listening (``port=0``: one the system picks).

    Raises:
        ValueError: it cannot listen there (the port is in use, the host is unknown
            or not this machine's).
    """
    async with trio.open_nursery() as nursery:
        try:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, endpoint.handle, port, host=host)
            )
        except OSError as exc:  # socket.gaierror too
            why = exc.strerror or str(exc)
            raise ValueError(f"http_port/http_host: cannot serve on {host}:{port}: {why}") from exc
        bound: int = listeners[0].socket.getsockname()[1]
        logger.info("serving /metrics and /health on %s:%s", host, bound)
        task_status.started(bound)
