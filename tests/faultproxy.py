"""A TCP proxy between the store and PostgreSQL that injects network faults on command,
per connection class (for fault tests; not part of the package).

Connections are told apart by the ``application_name`` the store gives each one
(``trio-eventstore pool <schema>``, ``... listener <schema>``, ``... locks <schema>``,
``... admin``, ``... operator <schema>``), read from the startup message, which travels
in plain text before any TLS: the proxy answers an ``SSLRequest`` with ``N`` (TLS
refused, so the client goes on in plain text; ``tls="pass"`` forwards it to the server
instead, and connections that then speak TLS cannot be classified). A ``CancelRequest``
belongs to the class of the connection it cancels (the proxy notes each connection's
backend pid). Connections that arrive on the second port (``url_for(url,
session_mode=True)``, for ``session_mode_url``) are of class ``session`` as well.

Faults, set per class with `FaultProxy.set` and lifted with `FaultProxy.clear`; a fault
applies at once to the connections of its class that are open, and to those that open
while it is set:

* `Delay`: added latency per direction (order kept);
* `Drop`: bytes are read and thrown away (the sockets stay open; after `clear` the
  stream goes on, without what was dropped);
* `Cut`: RST both ways (``SO_LINGER`` 0, then close); new connections of the class are
  reset at once while it is set (set and clear at once: a one-off cut);
* `HalfClose`: shut the write side one way (the peer reads EOF), then forward nothing
  more that way;
* `Blackhole`: new connections are accepted and never answered; open ones stop
  forwarding (nothing is read, nothing lost: after `clear` everything held flows on,
  as after a healed partition).

``injected`` counts the faults applied, by kind, one per connection each time a fault
reaches it.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
import urllib.parse
from collections.abc import AsyncIterator
from collections.abc import Set as AbstractSet
from typing import Literal

import attrs
import trio

__all__ = [
    "ADMIN",
    "ALL",
    "LISTEN",
    "LOCK",
    "OTHER",
    "POOL",
    "SESSION",
    "Blackhole",
    "Cut",
    "Delay",
    "Drop",
    "Fault",
    "FaultProxy",
    "HalfClose",
    "open_fault_proxy",
]

POOL = "pool"
LISTEN = "listen"
LOCK = "lock"
ADMIN = "admin"
#: connections that came in on the session-mode port
SESSION = "session"
#: clients that name no known role (raw drivers, psql, TLS connections passed through)
OTHER = "other"
#: every connection
ALL = "*"
CLASSES = (POOL, LISTEN, LOCK, ADMIN, SESSION, OTHER, ALL)

#: application_name "trio-eventstore <role> ..." -> class
_ROLES = {"pool": POOL, "listener": LISTEN, "locks": LOCK, "admin": ADMIN, "operator": ADMIN}

Direction = Literal["to_server", "to_client", "both"]
_DIRECTIONS = ("to_server", "to_client", "both")


def _check_direction(_: object, __: object, value: str) -> None:
    if value not in _DIRECTIONS:
        raise ValueError(f"direction: expected one of {_DIRECTIONS}, got {value!r}")


@attrs.frozen
class Delay:
    """Added latency, in seconds, for bytes going ``direction``."""

    seconds: float
    direction: Direction = attrs.field(default="both", validator=_check_direction)
    kind = "delay"


@attrs.frozen
class Drop:
    """Bytes going ``direction`` are read and thrown away."""

    direction: Direction = attrs.field(default="both", validator=_check_direction)
    kind = "drop"


@attrs.frozen
class Cut:
    """Reset the connections (RST both ways)."""

    kind = "cut"


@attrs.frozen
class HalfClose:
    """Shut the write side towards ``direction``'s receiver (it reads EOF)."""

    direction: Direction = attrs.field(default="to_server", validator=_check_direction)
    kind = "half_close"


@attrs.frozen
class Blackhole:
    """Never answer new connections; stop forwarding on open ones."""

    kind = "blackhole"


Fault = Delay | Drop | Cut | HalfClose | Blackhole

_UP, _DOWN = "to_server", "to_client"

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_PROTOCOL_3 = 196608
_MAX_STARTUP = 10000  # PostgreSQL's MAX_STARTUP_PACKET_LENGTH


def _applies(fault: Fault | None, direction: str) -> bool:
    return fault is not None and getattr(fault, "direction", "both") in (direction, "both")


def _reset(stream: trio.SocketStream | None) -> None:
    """Close with RST (SO_LINGER 0); never raises."""
    if stream is None:
        return
    sock = stream.socket
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _shutdown_write(stream: trio.SocketStream | None) -> None:
    if stream is None:
        return
    with contextlib.suppress(OSError):
        stream.socket.shutdown(socket.SHUT_WR)


class _KeyWatcher:
    """Reads the server's first messages for BackendKeyData (then stops)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.done = False

    def feed(self, data: bytes) -> int | None:
        """The backend pid once seen (None otherwise)."""
        self.buffer += data
        while len(self.buffer) >= 5:
            kind = self.buffer[:1]
            (length,) = struct.unpack("!i", self.buffer[1:5])
            if length < 4 or length > 1 << 20:
                self.done = True  # not the protocol we know: give up
                return None
            if len(self.buffer) < 1 + length:
                return None
            body, self.buffer = self.buffer[5 : 1 + length], self.buffer[1 + length :]
            if kind == b"K" and len(body) >= 4:
                self.done = True
                pid: int = struct.unpack("!i", body[:4])[0]
                return pid
            if kind in (b"Z", b"E"):  # ready (no key data came) or refused
                self.done = True
                return None
        return None


class _Link:
    """One proxied connection."""

    def __init__(self, proxy: FaultProxy, client: trio.SocketStream, classes: set[str]) -> None:
        self.proxy = proxy
        self.client = client
        self.server: trio.SocketStream | None = None
        self.classes = classes
        self.fault: Fault | None = None
        self.half_closed: set[str] = set()
        self.cut = False
        self.scope = trio.CancelScope()
        self.backend_pid: int | None = None
        #: the client and the server speak TLS (passed through): nothing to read
        self.tls = False
        self._changed = trio.Event()

    # -- faults ---------------------------------------------------------------------------

    def apply(self, fault: Fault | None) -> None:
        """Make ``fault`` this link's fault (sync: cuts and half-closes happen now)."""
        if fault == self.fault and fault is not None:
            return
        self.fault = fault
        if fault is not None:
            self.proxy.injected[fault.kind] += 1
            self.proxy._signal()
        if isinstance(fault, Cut):
            self.abort()
        elif isinstance(fault, HalfClose):
            for direction in (_UP, _DOWN):
                if _applies(fault, direction) and direction not in self.half_closed:
                    self.half_closed.add(direction)
                    _shutdown_write(self.server if direction == _UP else self.client)
        self._changed.set()
        self._changed = trio.Event()

    def abort(self) -> None:
        self.cut = True
        _reset(self.client)
        _reset(self.server)
        self.scope.cancel()

    async def _until_flowing(self) -> None:
        while isinstance(self.fault, Blackhole):
            await self._changed.wait()

    # -- forwarding -----------------------------------------------------------------------

    async def _read(
        self,
        source: trio.SocketStream,
        direction: str,
        send: trio.MemorySendChannel[tuple[float, bytes]],
        watcher: _KeyWatcher | None,
    ) -> None:
        async with send:
            while True:
                await self._until_flowing()
                data = await source.receive_some(65536)
                if watcher is not None and not watcher.done and data:
                    pid = watcher.feed(data)
                    if pid is not None:
                        self.backend_pid = pid
                        self.proxy._by_pid[pid] = self
                if direction in self.half_closed:
                    if not data:
                        return
                    continue
                if data and _applies(self.fault, direction) and isinstance(self.fault, Drop):
                    self.proxy.dropped_bytes += len(data)
                    continue
                delay = self.fault.seconds if isinstance(self.fault, Delay) else 0.0
                if not _applies(self.fault, direction):
                    delay = 0.0
                await send.send((trio.current_time() + delay, data))
                if not data:
                    return

    async def _write(
        self,
        target: trio.SocketStream,
        direction: str,
        receive: trio.MemoryReceiveChannel[tuple[float, bytes]],
    ) -> None:
        async with receive:
            async for due, data in receive:
                await trio.sleep_until(due)
                await self._until_flowing()
                if direction in self.half_closed:
                    continue
                if data and _applies(self.fault, direction) and isinstance(self.fault, Drop):
                    self.proxy.dropped_bytes += len(data)
                    continue
                if not data:
                    _shutdown_write(target)
                    return
                await target.send_all(data)

    async def forward(self, first: bytes) -> None:
        """Connect to the server, send ``first``, and pump both ways until both ends
        close (or a fault, or an error, resets the link)."""
        assert self.server is not None
        up_send, up_receive = trio.open_memory_channel[tuple[float, bytes]](256)
        down_send, down_receive = trio.open_memory_channel[tuple[float, bytes]](256)
        delay = self.fault.seconds if isinstance(self.fault, Delay) else 0.0
        if first and not (_applies(self.fault, _UP) and isinstance(self.fault, Drop)):
            up_send.send_nowait(
                (trio.current_time() + (delay if _applies(self.fault, _UP) else 0.0), first)
            )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, self.client, _UP, up_send, None)
                nursery.start_soon(self._write, self.server, _UP, up_receive)
                watcher = None if self.tls else _KeyWatcher()
                nursery.start_soon(self._read, self.server, _DOWN, down_send, watcher)
                nursery.start_soon(self._write, self.client, _DOWN, down_receive)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.abort()  # a reset on one side resets the other


class FaultProxy:
    """The proxy (see the module docstring). Made by `open_fault_proxy`."""

    def __init__(self, target_host: str, target_port: int, tls: Literal["refuse", "pass"]):
        self.target_host = target_host
        self.target_port = target_port
        self.tls = tls
        self.host = "127.0.0.1"
        self.port = 0
        self.session_port = 0
        #: faults applied, by kind (one per connection reached)
        self.injected: collections.Counter[str] = collections.Counter()
        #: connections opened, by class
        self.opened: collections.Counter[str] = collections.Counter()
        self.dropped_bytes = 0
        self._faults: dict[str, Fault] = {}
        self._links: set[_Link] = set()
        self._by_pid: dict[int, _Link] = {}
        self._changed = trio.Event()

    # -- commands -------------------------------------------------------------------------

    def url_for(self, url: str, *, session_mode: bool = False) -> str:
        """``url`` with its host and port replaced by the proxy's (``session_mode``: the
        port whose connections are of class ``session`` too)."""
        parts = urllib.parse.urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        port = self.session_port if session_mode else self.port
        netloc = f"{userinfo}@{self.host}:{port}" if userinfo else f"{self.host}:{port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    def set(self, cls: str, fault: Fault) -> None:
        """Inject ``fault`` on the connections of class ``cls`` (open and new ones) until
        `clear`. The latest `set` wins where classes overlap."""
        if cls not in CLASSES:
            raise ValueError(f"cls: expected one of {CLASSES}, got {cls!r}")
        if not isinstance(fault, Fault):
            raise TypeError(f"fault: expected a Fault, got {type(fault).__name__}")
        self._faults.pop(cls, None)
        self._faults[cls] = fault
        self._refresh()

    def clear(self, cls: str | None = None) -> None:
        """Lift the fault of ``cls`` (every fault when None)."""
        if cls is None:
            self._faults.clear()
        else:
            self._faults.pop(cls, None)
        self._refresh()

    def connections(self, cls: str = ALL) -> int:
        """How many connections of ``cls`` are open through the proxy."""
        return sum(1 for link in self._links if cls == ALL or cls in link.classes)

    def pids(self, cls: str = ALL) -> AbstractSet[int]:
        """The backend pids of the open connections of ``cls``."""
        return {
            link.backend_pid
            for link in self._links
            if link.backend_pid is not None and (cls == ALL or cls in link.classes)
        }

    async def wait_connections(self, cls: str, count: int) -> None:
        """Return once at least ``count`` connections of ``cls`` are open."""
        while self.connections(cls) < count:
            await self._changed.wait()

    async def wait_injected(self, kind: str, count: int) -> None:
        """Return once faults of ``kind`` have been applied ``count`` times."""
        while self.injected[kind] < count:
            await self._changed.wait()

    # -- internals ------------------------------------------------------------------------

    def fault_for(self, classes: AbstractSet[str]) -> Fault | None:
        for cls, fault in reversed(self._faults.items()):
            if cls == ALL or cls in classes:
                return fault
        return None

    def _refresh(self) -> None:
        for link in list(self._links):
            link.apply(self.fault_for(link.classes))
        self._signal()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_fault_change(self) -> None:
        await self._changed.wait()

    async def handle(self, client: trio.SocketStream, session: bool) -> None:
        classes = {SESSION} if session else set()
        link = _Link(self, client, classes)
        try:
            with link.scope:
                first = await self._classify(link)
                if first is None:
                    return
                self.opened.update(link.classes)
                self._links.add(link)
                self._signal()
                fault = self.fault_for(link.classes)
                while isinstance(fault, Blackhole):  # never answered (until cleared)
                    if link.fault != fault:
                        link.apply(fault)
                    await self._wait_fault_change()
                    fault = self.fault_for(link.classes)
                link.apply(fault)
                if link.cut:
                    return
                if link.server is None:
                    try:
                        link.server = await trio.open_tcp_stream(self.target_host, self.target_port)
                    except OSError:
                        link.abort()
                        return
                    if link.cut:  # cut while connecting
                        _reset(link.server)
                        return
                    if _UP in link.half_closed:
                        _shutdown_write(link.server)
                await link.forward(first)
        finally:
            self._links.discard(link)
            if link.backend_pid is not None and self._by_pid.get(link.backend_pid) is link:
                del self._by_pid[link.backend_pid]
            with trio.CancelScope(shield=True):
                for stream in (link.client, link.server):
                    if stream is not None:
                        with contextlib.suppress(Exception):
                            await stream.aclose()
            self._signal()

    async def _classify(self, link: _Link) -> bytes | None:
        """Read the client's first message (answering TLS requests), set the link's
        classes; the bytes to forward (None: the client went away)."""
        while True:
            while isinstance(self._faults.get(ALL), Blackhole):  # answer nothing at all
                await self._wait_fault_change()
            head = await _receive_exactly(link.client, 8)
            if head is None:
                return None
            length, code = struct.unpack("!ii", head)
            if not 8 <= length <= _MAX_STARTUP:
                link.classes.add(OTHER)  # not a startup we know: pass it through as is
                return head
            rest = await _receive_exactly(link.client, length - 8)
            if rest is None:
                return None
            if code == _SSL_REQUEST and self.tls == "pass":
                link.server = await trio.open_tcp_stream(self.target_host, self.target_port)
                await link.server.send_all(head)
                answer = await _receive_exactly(link.server, 1)
                if answer is None:
                    return None
                await link.client.send_all(answer)
                if answer == b"S":
                    link.classes.add(OTHER)  # TLS from here on: nothing to read
                    link.tls = True
                    return b""
                continue
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                await link.client.send_all(b"N")
                continue
            if code == _CANCEL_REQUEST and len(rest) >= 4:
                (pid,) = struct.unpack("!i", rest[:4])
                target = self._by_pid.get(pid)
                link.classes |= target.classes if target is not None else {OTHER}
                return head + rest
            if code == _PROTOCOL_3:
                name = _parameters(rest).get("application_name", "")
                words = name.split()
                role = words[1] if len(words) > 1 and words[0] == "trio-eventstore" else ""
                link.classes.add(_ROLES.get(role, OTHER))
                return head + rest
            link.classes.add(OTHER)
            return head + rest


def _parameters(body: bytes) -> dict[str, str]:
    """The name/value pairs of a startup message's body."""
    fields = body.split(b"\x00")
    params: dict[str, str] = {}
    for i in range(0, len(fields) - 1, 2):
        if not fields[i]:
            break
        params[fields[i].decode("utf-8", "replace")] = fields[i + 1].decode("utf-8", "replace")
    return params


async def _receive_exactly(stream: trio.SocketStream, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


@contextlib.asynccontextmanager
async def open_fault_proxy(
    target_host: str, target_port: int, *, tls: Literal["refuse", "pass"] = "refuse"
) -> AsyncIterator[FaultProxy]:
    """A `FaultProxy` to ``target_host:target_port``, listening on two ports of
    127.0.0.1 (plain and session mode) until the block exits."""
    proxy = FaultProxy(target_host, target_port, tls)
    async with trio.open_nursery() as nursery:
        plain = await trio.open_tcp_listeners(0, host="127.0.0.1")
        session = await trio.open_tcp_listeners(0, host="127.0.0.1")
        proxy.port = plain[0].socket.getsockname()[1]
        proxy.session_port = session[0].socket.getsockname()[1]

        async def serve(listeners: list[trio.SocketListener], is_session: bool) -> None:
            async def handler(stream: trio.SocketStream) -> None:
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, OSError
                ):
                    await proxy.handle(stream, is_session)

            await trio.serve_listeners(handler, listeners)

        nursery.start_soon(serve, plain, False)
        nursery.start_soon(serve, session, True)
        try:
            yield proxy
        finally:
            for link in list(proxy._links):
                link.abort()
            nursery.cancel_scope.cancel()
