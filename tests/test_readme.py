"""Every Python snippet of README.md runs, in order, against the test server.

The snippets share one namespace, as a reader reads them top to bottom. The test supplies
what the text says they assume: database URLs (``"postgresql://..."``) point at a fresh
database; a snippet that uses ``store`` without opening one gets a store opened with the
README's ``config``; ``project`` ("your own code") records what it is given and ends the
subscription loop that called it (by cancelling it, as a service's shutdown would); a snippet
that runs a projection (``<projection>.run(store, ...)``) is cancelled likewise once the
projection has applied events; a snippet defining ``test_*`` functions (the testing kit's)
runs in the namespace of the example it comes from, and those functions are called. A
snippet that raises, or whose subscription never delivers, fails the test, with a traceback
into README.md.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import re
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import settings

import trio_eventstore as es
from trio_eventstore import ANY_VERSION, EventData, EventStoreConfig, admin, open_event_store
from trio_eventstore._pg import open_connection
from trio_eventstore.testing import open_fresh_event_store

from .helpers import url_for

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLE = ROOT / "examples" / "test_balances_consumer.py"
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
URL = re.compile(r"""(["'])postgres(?:ql)?://[^"']*\1""")
PROJECTION_RUN = re.compile(r"\b(\w+)\.run\(store\b")
HANG_GUARD = 60  # seconds: a guard against hangs, never a speed assertion


def snippets() -> list[tuple[int, str]]:
    """(first line in README.md, code) of each ```python block."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def compiled(line: int, code: str, url: str) -> Any:
    """The snippet compiled with README.md's line numbers (top-level await allowed)."""
    source = "\n" * (line - 1) + URL.sub(repr(url), code)
    return compile(
        source, str(README), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
    )


def uses_name(code: str, name: str) -> bool:
    return any(isinstance(node, ast.Name) and node.id == name for node in ast.walk(ast.parse(code)))


def example_namespace() -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("readme_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(vars(module))


class Projection:
    """``project`` of the README: records the events and ends the loop that called it."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.stop: trio.CancelScope | None = None

    async def __call__(self, batch: Any) -> None:
        one = isinstance(batch, es.RecordedEvent)  # an event, as a per-event loop gives
        events = [batch] if one else list(getattr(batch, "events", batch))
        assert events, "a subscription delivered an empty batch"
        self.events.extend(events)
        assert self.stop is not None
        self.stop.cancel()


async def run_async(code: Any, namespace: dict[str, Any], source: str) -> list[Any]:
    """Run a snippet with top-level ``await``; returns what ``project`` received."""
    projection = Projection()
    namespace["project"] = projection
    with trio.fail_after(HANG_GUARD):
        if uses_name(source, "store") and "open_event_store(" not in source:
            async with open_event_store(namespace["config"]) as store, trio.open_nursery() as n:
                namespace["store"] = store
                n.start_soon(keep_appending, store, namespace)
                for name in PROJECTION_RUN.findall(source):
                    n.start_soon(stop_once_applied, store, namespace, name, projection)
                await run_until_projected(code, namespace, projection)
                n.cancel_scope.cancel()
        else:
            await run_until_projected(code, namespace, projection)
    if uses_name(source, "project"):
        assert projection.events, "the subscription delivered nothing"
    return projection.events


async def run_until_projected(code: Any, namespace: dict[str, Any], projection: Projection) -> None:
    with trio.CancelScope() as projection.stop:
        coroutine = eval(code, namespace)  # the README's own code
        if coroutine is not None:
            await coroutine


async def stop_once_applied(
    store: Any, namespace: dict[str, Any], name: str, projection: Projection
) -> None:
    """End a snippet running the projection ``name`` once it has applied events."""
    while True:
        running = namespace.get(name)
        if isinstance(running, es.Projection) and await running.position(store) > 0:
            assert projection.stop is not None
            projection.stop.cancel()
            return
        await trio.sleep(0.05)


async def keep_appending(store: Any, namespace: dict[str, Any]) -> None:
    """Events for subscriptions that only see later appends: the README's Deposited and
    an event of another type."""
    deposited = namespace["Deposited"]
    while True:
        await store.append_to_stream(
            "account-readme",
            ANY_VERSION,
            [
                EventData(deposited("account-readme", 1)),
                EventData({"amount": 1}, event_type="Elixir.Bank.Events.Withdrawn"),
            ],
        )
        await trio.sleep(0.05)


def call_tests(namespace: dict[str, Any], code: str, url: str) -> int:
    """Call the ``test_*`` functions the snippet defines (Hypothesis tests: fewer examples),
    as pytest with pytest-trio would: the plugin's ``fresh_event_store`` fixture given, an
    async Hypothesis test's examples each run in a Trio run."""
    fixtures: dict[str, Any] = {
        "fresh_event_store": functools.partial(
            open_fresh_event_store, EventStoreConfig(url=url, subscription_retry_interval=1.0)
        )
    }
    called = 0
    for node in ast.parse(code).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith(
            "test_"
        ):
            function = namespace[node.name]
            kwargs = {
                name: fixtures[name]
                for name in inspect.signature(function).parameters
                if name in fixtures
            }
            if hasattr(function, "hypothesis"):
                inner = function.hypothesis.inner_test
                if inspect.iscoroutinefunction(inner):
                    function.hypothesis.inner_test = _in_trio(inner)
                if not hasattr(function, "_hypothesis_internal_use_settings"):
                    function = settings(max_examples=10, deadline=None)(function)
            result = function(**kwargs)
            if inspect.iscoroutine(result):
                trio.run(_awaited, result)
            called += 1
    return called


def _in_trio(inner: Callable[..., Awaitable[object]]) -> Callable[..., None]:
    @functools.wraps(inner)
    def run(*args: Any, **kwargs: Any) -> None:
        trio.run(functools.partial(inner, *args, **kwargs))

    return run


async def _awaited(awaitable: Awaitable[object]) -> None:
    await awaitable


@pytest.fixture
def readme_url(server_url: str) -> Any:
    """A fresh database with an initialised store in schema public (the README's)."""
    url = url_for(server_url, f"readme_{uuid.uuid4().hex[:10]}")
    config = EventStoreConfig(url=url)
    trio.run(admin.create, config)
    trio.run(admin.init, config)
    yield url
    trio.run(admin.drop, config)


def test_the_readme_has_python_snippets() -> None:
    found = snippets()
    assert len(found) >= 5
    assert all(code.strip() for _, code in found)


def test_every_readme_snippet_runs(readme_url: str) -> None:
    namespace: dict[str, Any] = {"__name__": "readme"}
    ran = 0
    for line, code in snippets():
        compiled_code = compiled(line, code, readme_url)
        if "def test_" in code:  # the testing kit's: in its example's namespace
            own = example_namespace()
            exec(compiled_code, own)  # the README's own code
            assert call_tests(own, code, readme_url), f"README.md:{line}: no test was called"
        elif compiled_code.co_flags & inspect.CO_COROUTINE:
            events = trio.run(run_async, compiled_code, namespace, code)
            if "selector=" in code and uses_name(code, "project"):
                types = {e.event_type for e in events}
                assert types == {"Elixir.Bank.Events.Deposited"}, f"README.md:{line}: {types}"
        else:
            exec(compiled_code, namespace)  # the README's own code
        ran += 1
    assert ran == len(snippets())
    checkpoint = _checkpoint(readme_url, "balances")
    assert checkpoint >= 1, "the persistent snippet's ack was persisted when it was left"
    assert _deposits(readme_url) > 0, "the projection snippet's read model has its deposits"


def _deposits(url: str) -> int:
    async def read() -> int:
        async with open_connection(EventStoreConfig(url=url)) as conn:
            return int(await conn.fetchval("SELECT count(*) FROM read_model.deposits"))

    return trio.run(read)


def _checkpoint(url: str, name: str) -> int:
    async def read() -> int:
        async with open_connection(EventStoreConfig(url=url)) as conn:
            value = await conn.fetchval(
                "SELECT last_seen FROM public.subscriptions WHERE subscription_name = $1", name
            )
        return int(value or 0)

    return trio.run(read)


INTERNAL = re.compile(
    r"DESIGN\.md|STYLE\.md|\.\./shared|\b(?:issue|session|work item)s? #?\d+", re.IGNORECASE
)


@pytest.mark.parametrize("document", ["README.md", "CHANGELOG.md"])
def test_user_documents_name_nothing_internal(document: str) -> None:
    """Users have the package and its repository: no internal documents or work items."""
    text = (ROOT / document).read_text(encoding="utf-8")
    found = [
        f"{document}:{text.count(chr(10), 0, m.start()) + 1}: {m.group()}"
        for m in INTERNAL.finditer(text)
    ]
    assert not found, found


GUARANTEE_TEST = re.compile(r"`((?:tests|property_tests)/[\w/]+\.py)::(\w+)`")


def guarantees() -> list[str]:
    """The rows of README.md's Guarantees table."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Guarantees\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and "`" in line]


def test_every_guarantee_names_tests_that_exist() -> None:
    """Each promise of the Guarantees section names the tests that prove it, and each of
    them exists (a renamed or deleted test fails here, not silently in the README)."""
    rows = guarantees()
    assert len(rows) >= 8
    missing = []
    for row in rows:
        named = GUARANTEE_TEST.findall(row)
        assert named, f"a guarantee names no test: {row[:80]}"
        for path, name in named:
            file = ROOT / path
            defined = (
                {
                    node.name
                    for node in ast.parse(file.read_text(encoding="utf-8")).body
                    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                }
                if file.is_file()
                else set()
            )
            if name not in defined:
                missing.append(f"{path}::{name}")
    assert not missing, missing
