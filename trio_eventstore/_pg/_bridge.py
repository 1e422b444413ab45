"""The trio-asyncio loop asyncpg runs on, and crossing into it from Trio (`_cross`).

`_asyncio_loop` opens the loop (or joins the caller's), logs what asyncio reports
instead of crashing the store, and installs the batching overrides: every ready
asyncio callback runs in one Trio scheduling pass (`_run_ready_callbacks_together`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import types
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import sniffio
import trio
import trio_asyncio

try:  # the trio-asyncio internals `_run_ready_callbacks_together` relies on
    from trio_asyncio._base import AsyncHandle as _AsyncHandle
except ImportError:  # pragma: no cover - another trio-asyncio: its loop runs as shipped
    _AsyncHandle = None

from .._config import EventStoreConfig
from .._errors import single_errors
from ._translate import _translated

T = TypeVar("T")

logger = logging.getLogger("trio_eventstore.pg")


async def _cross(loop: Any, coro: Awaitable[T], config: EventStoreConfig | None) -> T:
    """Run an asyncio coroutine on `loop` from Trio, translating driver errors."""
    result: T = await _translated(loop.run_aio_coroutine(coro), config)
    return result


def _log_asyncio_error(_loop: Any, context: dict[str, Any]) -> None:
    exception = context.get("exception")
    level = logging.DEBUG if isinstance(exception, ConnectionError | OSError) else logging.WARNING
    logger.log(
        level, "asyncio reported: %s", context.get("message", "an error"), exc_info=exception
    )


@contextlib.asynccontextmanager
async def _asyncio_loop() -> AsyncIterator[Any]:
    """The trio-asyncio loop of the calling context, or a new one for this block."""
    loop = trio_asyncio.current_loop.get()
    if loop is not None and not loop.is_closed():
        yield loop
        return
    with single_errors():
        async with trio_asyncio.open_loop() as new_loop:
            # trio-asyncio's default handler re-raises every error asyncio reports into
            # the loop's nursery, so a future asyncpg abandons when a connection drops
            # ("unexpected connection_lost() call") would take the whole store down.
            # Connection loss is handled where it matters (units of work, the notifier,
            # the lock keeper): here it is only logged.
            new_loop.set_exception_handler(_log_asyncio_error)
            _run_ready_callbacks_together(new_loop)
            yield new_loop


def _run_ready_callbacks_together(loop: Any) -> None:
    """Make a trio-asyncio loop run every ready asyncio callback in one pass, and
    cheaply.

    As shipped, trio-asyncio runs one callback per Trio scheduling pass, each behind a
    fresh cancel scope, and checks every ``call_soon`` callback with `inspect`
    (asyncio's debug-style ``_check_callback``): about 18 passes for one query. asyncio
    itself runs all ready callbacks in one iteration; `_main_loop_one_batched` does
    that, and `_call_soon` skips the check (the callbacks are asyncpg's and asyncio's
    own). (Waiting for the first callback without the shipped ``move_on_after`` was
    tried: deliveries then stalled now and then.) Needs the loop internals of
    trio-asyncio 0.15-0.16 (pinned in pyproject); without them, nothing changes.
    """
    if _AsyncHandle is not None and all(
        hasattr(loop, name)
        for name in ("_main_loop_one", "_q_recv", "_timers", "_nursery", "_queue_handle")
    ):
        loop._main_loop_one = types.MethodType(_main_loop_one_batched, loop)
        loop.call_soon = types.MethodType(_call_soon, loop)


def _call_soon(self: Any, callback: Any, *args: Any, context: Any = None) -> Any:
    """trio-asyncio's ``call_soon`` without asyncio's callback check."""
    self._check_closed()
    return self._queue_handle(asyncio.Handle(callback, args, self, context=context))


def _run_handle(self: Any, handle: Any) -> bool:
    """Run a plain asyncio callback; False for a Trio task to start (the caller
    awaits it, as shipped)."""
    if isinstance(handle, _AsyncHandle):
        return False
    if not handle._cancelled:
        previous, sniffio.thread_local.name = sniffio.thread_local.name, "asyncio"
        try:
            handle._run()
        finally:
            sniffio.thread_local.name = previous
    return True


async def _main_loop_one_batched(self: Any, no_wait: bool = False) -> None:
    await type(self)._main_loop_one(self, no_wait)  # one callback, as shipped
    receive = self._q_recv
    for _ in range(_BATCH):  # then what else is ready, without a Trio checkpoint each
        if self._timers and self._timers[0]._when <= self.time():
            return  # a timer is due: the shipped path orders it
        try:
            handle = receive.receive_nowait()
        except trio.WouldBlock:
            return
        if isinstance(handle, asyncio.TimerHandle):
            heapq.heappush(self._timers, handle)
        elif not _run_handle(self, handle):  # a Trio task to start: as shipped
            handle._context.run(self._nursery.start_soon, handle._run, name=handle._callback)
            await handle._started.wait()
            return


#: Ready callbacks run in one pass at most (then Trio's other tasks get their turn).
_BATCH = 64
