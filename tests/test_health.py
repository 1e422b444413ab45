"""The daemon's HTTP endpoint: ``/metrics`` in the Prometheus text format (checked by a
small parser of our own), ``/health/live`` and ``/health/ready`` (503 while Postgres is
down, 200 again after), and bad requests (400; the daemon goes on)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_eventstore import (
    ANY_VERSION,
    EventData,
    EventStore,
    EventStoreConfig,
    RecordedEvent,
    SubscriberSpec,
    _storage,
    admin,
    open_event_store,
    open_subscriber_daemon,
)
from trio_eventstore._tempcluster import TempCluster, free_port, temp_cluster

HANG_GUARD = 60

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"({_NAME})(?:\{{(.*)\}})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def parse_prometheus(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a text exposition (format 0.0.4), checking its grammar: HELP and TYPE
    once per family and before its samples, label syntax and escapes, numbers, no
    duplicate series, histogram buckets cumulative up to ``+Inf`` == ``_count``."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        assert line, "blank line"
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.fullmatch(_NAME, name), line
            assert name not in helps, line
            helps.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name not in types, f"TYPE twice: {line}"
            types[name] = kind
            continue
        assert not line.startswith("#"), line
        match = _SAMPLE.fullmatch(line)
        assert match is not None, f"not a sample: {line!r}"
        name, label_text, value_text = match.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample before its TYPE: {line}"
        if types[family] == "counter":
            assert name.endswith("_total"), line
        labels: list[tuple[str, str]] = []
        rest = label_text or ""
        while rest:
            label = _LABEL.match(rest)
            assert label is not None, f"bad labels: {line!r}"
            labels.append((label.group(1), label.group(2)))
            rest = rest[label.end() :]
        value = float(value_text.replace("+Inf", "inf").replace("-Inf", "-inf"))
        key = (name, frozenset(labels))
        assert key not in samples, f"duplicate series: {line}"
        samples[key] = value
    for family, kind in types.items():
        if kind != "histogram":
            continue
        buckets: dict[frozenset[tuple[str, str]], list[tuple[float, float]]] = {}
        for (name, label_set), value in samples.items():
            if name == family + "_bucket":
                le = dict(label_set)["le"]
                rest_labels = frozenset(kv for kv in label_set if kv[0] != "le")
                buckets.setdefault(rest_labels, []).append((float(le), value))
        for rest_labels, points in buckets.items():
            points.sort()
            counts = [c for _, c in points]
            assert counts == sorted(counts), family
            assert points[-1][0] == math.inf
            assert samples[(family + "_count", rest_labels)] == points[-1][1]
    return samples


def series(samples: dict[Any, float], name: str, **labels: str) -> float:
    found = [
        v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= dict(ls).items()
    ]
    assert len(found) == 1, (name, labels, found)
    return found[0]


async def http(
    port: int, request: bytes, *, eof: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` raw (``eof``: then close the sending side); (status, headers,
    body) of the answer."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        if eof:
            await stream.send_eof()
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    assert int(headers["content-length"]) == len(body) or request.startswith(b"HEAD")
    return int(status_line.split(" ")[1]), headers, body


async def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return await http(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def ev(n: int) -> EventData:
    return EventData({"n": n}, event_type="Counted")


@pytest.fixture
async def daemon_port(store: EventStore) -> AsyncIterator[int]:
    handled: list[RecordedEvent] = []
    spec = SubscriberSpec(name="counter", handler=handled.append)
    async with open_subscriber_daemon(store, [spec], http_port=0) as daemon:
        assert daemon.http_port is not None
        yield daemon.http_port


async def test_metrics_are_prometheus_text_with_the_expected_series(
    store: EventStore, daemon_port: int
) -> None:
    labels = {"subscription": "counter", "stream": "$all"}
    with trio.fail_after(HANG_GUARD):
        # Append once the subscriber is at the head: the delivery lag is measured for
        # events delivered there (not for those a catch-up read finds).
        while True:
            samples = parse_prometheus((await get(daemon_port, "/metrics"))[2].decode())
            state = "eventstore_subscriber_state"
            if {dict(ls)["state"] for (n, ls) in samples if n == state} == {"running"}:
                break
            await trio.sleep(0.05)
        await store.append_to_stream("s", ANY_VERSION, [ev(1), ev(2)])
        await store.append_to_stream("s", ANY_VERSION, [ev(3)])
        await store.read_stream_forward("s")
        while True:
            status, headers, body = await get(daemon_port, "/metrics")
            samples = parse_prometheus(body.decode())
            if series(samples, "eventstore_subscription_checkpoint", **labels) == 3:
                break
            await trio.sleep(0.05)
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    schema = store.config.schema
    assert series(samples, "eventstore_appends_total", schema=schema) == 2
    assert series(samples, "eventstore_appended_events_total") == 3
    assert series(samples, "eventstore_append_duration_seconds_count") == 2
    assert series(samples, "eventstore_append_duration_seconds_bucket", le="+Inf") == 2
    assert series(samples, "eventstore_reads_total") >= 1
    assert series(samples, "eventstore_pool_in_use") >= 0
    assert series(samples, "eventstore_listener_connected") == 1
    assert series(samples, "eventstore_subscription_lag_events", **labels) == 0
    assert series(samples, "eventstore_subscription_head", **labels) == 3
    assert series(samples, "eventstore_subscription_delivered_total", **labels) == 3
    assert series(samples, "eventstore_subscription_parked_total", **labels) == 0
    assert series(samples, "eventstore_subscription_role", role="holder", **labels) == 1
    assert series(samples, "eventstore_subscription_role", role="standby", **labels) == 0
    assert series(samples, "eventstore_subscriber_handled_total", **labels) == 3
    assert series(samples, "eventstore_subscriber_state", state="running", **labels) == 1
    assert series(samples, "eventstore_delivery_lag_seconds_count") >= 1


@pytest.fixture
def slow_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Subscriptions' reads take 0.3 s: a subscription stays ``catching_up`` (already
    ready) that long before it is ``running``."""
    read_rows = _storage.read_rows

    async def slow(*args: Any, **kwargs: Any) -> Any:
        await trio.sleep(0.3)
        return await read_rows(*args, **kwargs)

    monkeypatch.setattr(_storage, "read_rows", slow)


async def test_health_live_and_ready(slow_reads: None, store: EventStore, daemon_port: int) -> None:
    with trio.fail_after(HANG_GUARD):
        status, _, body = await get(daemon_port, "/health/live")
        assert status == 200
        assert json.loads(body) == {"status": "live"}
        while True:
            status, headers, body = await get(daemon_port, "/health/ready")
            if status == 200:
                break
            await trio.sleep(0.05)
        # Ready once the subscriber holds its subscription, caught up or not yet.
        [sub] = json.loads(body)["checks"]["subscriptions"]["subscriptions"]
        assert (sub["name"], sub["state"]) in (("counter", "catching_up"), ("counter", "running"))
        while sub["state"] != "running":
            await trio.sleep(0.05)
            status2, _, body2 = await get(daemon_port, "/health?verbose=1")
            assert status2 == 200
            [sub] = json.loads(body2)["checks"]["subscriptions"]["subscriptions"]
        status2, _, body2 = await get(daemon_port, "/health?verbose=1")
    assert headers["content-type"] == "application/json"
    ready = json.loads(body)
    assert ready["status"] == "ready"
    assert {k: v["ok"] for k, v in ready["checks"].items()} == {
        "pool": True,
        "listener": True,
        "lock": True,
        "subscriptions": True,
    }
    assert status2 == 200
    assert json.loads(body2)["status"] == "ready"


async def test_bad_requests_get_400_and_the_daemon_goes_on(
    store: EventStore, daemon_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trio_eventstore import _health

    monkeypatch.setattr(_health, "READ_TIMEOUT", 0.5)
    bad = [
        b"garbage\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"GET metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/2.0\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10_000 + b"\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\n\r\n",
        b"\xff\xfe\r\n\r\n",
    ]
    with trio.fail_after(HANG_GUARD):
        for request in bad:
            status, _, _ = await http(daemon_port, request)
            assert status == 400, request
        status, _, _ = await http(daemon_port, b"GET /metrics HTTP/1.1\r\n", eof=True)
        assert status == 400  # incomplete: the client stopped sending
        status, headers, _ = await http(daemon_port, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert status == 405
        assert headers["allow"] == "GET, HEAD"
        status, _, _ = await get(daemon_port, "/nowhere")
        assert status == 404
        # A client that sends nothing is answered 408 after the read timeout.
        async with await trio.open_tcp_stream("127.0.0.1", daemon_port) as slow:
            await slow.send_all(b"GET /metrics HT")
            answer = b""
            while chunk := await slow.receive_some(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 ")
        status, _, body = await http(daemon_port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert status == 200
        assert body == b""
        # The daemon still serves, and still delivers.
        await store.append_to_stream("s", ANY_VERSION, [ev(1)])
        status, _, body = await get(daemon_port, "/metrics")
        assert status == 200
        assert series(parse_prometheus(body.decode()), "eventstore_appends_total") == 1


async def test_idle_connections_do_not_starve_probes(store: EventStore, daemon_port: int) -> None:
    """More idle connections than the server serves at once (never sending a request):
    a probe is still answered, and the connections idle longest are closed to make room
    (they were kept and every further connection refused, liveness probes included)."""
    from trio_eventstore._health import MAX_CONNECTIONS

    idle: list[trio.SocketStream] = []
    try:
        with trio.fail_after(30):
            for _ in range(MAX_CONNECTIONS):
                idle.append(await trio.open_tcp_stream("127.0.0.1", daemon_port))
            await trio.sleep(0.5)  # taken by the server, which waits for their requests
            status, _, body = await get(daemon_port, "/health/live")
            assert status == 200
            assert json.loads(body) == {"status": "live"}
            # A flood of further idle connections: each takes the place of an older one.
            for _ in range(2 * MAX_CONNECTIONS):
                idle.append(await trio.open_tcp_stream("127.0.0.1", daemon_port))
            for path in ("/health/live", "/health/ready", "/metrics"):
                status, _, _ = await get(daemon_port, path)
                assert status in (200, 503), path
            # The oldest idle connection was closed without an answer (maybe reset).
            with contextlib.suppress(trio.BrokenResourceError):
                assert await idle[0].receive_some(4096) == b""
    finally:
        for stream in idle:
            await trio.aclose_forcefully(stream)


@pytest.fixture
def own_cluster() -> Iterator[TempCluster]:
    with temp_cluster() as cluster:
        yield cluster


async def test_ready_is_503_while_postgres_is_down_and_200_after(
    own_cluster: TempCluster,
) -> None:
    config = EventStoreConfig(
        url=own_cluster.url(f"health_{uuid.uuid4().hex[:6]}"),
        timeout=2,
        subscription_retry_interval=0.5,
    )
    await admin.create(config)
    await admin.init(config)

    async def ready_status(port: int) -> tuple[int, dict[str, Any]]:
        status, _, body = await get(port, "/health/ready")
        return status, json.loads(body)

    async def wait_for(port: int, wanted: int) -> dict[str, Any]:
        while True:
            status, body = await ready_status(port)
            if status == wanted:
                return body
            await trio.sleep(0.1)

    with trio.fail_after(HANG_GUARD * 2):
        async with open_event_store(config) as store:
            spec = SubscriberSpec(name="counter", handler=lambda event: None)
            async with open_subscriber_daemon(store, [spec], http_port=0) as daemon:
                port = daemon.http_port
                assert port is not None
                await wait_for(port, 200)
                await trio.to_thread.run_sync(own_cluster.stop, "fast")
                down = await wait_for(port, 503)
                assert down["status"] == "not ready"
                assert down["checks"]["pool"]["ok"] is False
                status, _, _ = await get(port, "/health/live")
                assert status == 200
                await trio.to_thread.run_sync(own_cluster.start)
                up = await wait_for(port, 200)
                assert up["status"] == "ready"


def test_the_command_line_daemon_serves_metrics_on_eventstore_http_port(
    eventstore_config: EventStoreConfig, tmp_path: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_")}
    env.update(
        DAEMON_LOG=str(tmp_path / "seen.log"),
        EVENTSTORE_URL=eventstore_config.url or "",
        EVENTSTORE_SCHEMA=eventstore_config.schema,
        EVENTSTORE_HTTP_PORT=str(port),
        PYTHONPATH=str(Path.cwd()),
    )

    async def seed() -> None:
        async with open_event_store(eventstore_config) as store:
            await store.append_to_stream("s", ANY_VERSION, [ev(1), ev(2)])

    trio.run(seed)
    command = [sys.executable, "-m", "trio_eventstore", "run", "tests.daemon_handlers:record"]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + HANG_GUARD
        handled = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    samples = parse_prometheus(r.read().decode())
                handled = series(samples, "eventstore_subscriber_handled_total")
                if handled == 2:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert handled == 2
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=5) as r:
            assert json.loads(r.read())["status"] == "ready"
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=HANG_GUARD)
    assert process.returncode == 0, err


@pytest.mark.parametrize("where", ["port in use", "unknown host"])
def test_the_command_line_daemon_reports_an_address_it_cannot_serve_on(
    eventstore_config: EventStoreConfig, where: str
) -> None:
    """One line naming the options, exit 2 (as for any other bad option), no traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        address = ["--http-port", str(port)]
        if where == "unknown host":
            address = ["--http-port", "0", "--http-host", "nosuch.invalid"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_")}
        env.update(
            EVENTSTORE_URL=eventstore_config.url or "",
            EVENTSTORE_SCHEMA=eventstore_config.schema,
            PYTHONPATH=str(Path.cwd()),
        )
        command = [sys.executable, "-m", "trio_eventstore", "run", "tests.daemon_handlers:record"]
        done = subprocess.run(
            [*command, *address], env=env, capture_output=True, text=True, timeout=HANG_GUARD
        )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = [x for x in done.stderr.splitlines() if x.startswith("trio-eventstore run:")]
    assert "http_port/http_host: cannot serve on" in line
    assert "subscribed" not in done.stderr  # no subscriber started
