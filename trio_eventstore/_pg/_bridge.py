"""The trio-asyncio loop asyncpg runs on, and crossing into it from Trio (`_cross`).

`_asyncio_loop` opens the loop (or joins the caller's), logs what asyncio reports
instead of crashing the store, and installs the overrides that make a round trip
cheap: every ready asyncio callback runs in one Trio scheduling pass
(`_run_ready_callbacks_together`), and a crossing runs its coroutine in the calling
Trio task (`_run_inline`), woken directly by the reply. One query then costs two Trio
scheduling passes (the socket's reader task, then the caller) where trio-asyncio as
shipped needs about five.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import types
import weakref
from asyncio.tasks import _enter_task, _leave_task
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import sniffio
import trio
import trio_asyncio
from trio_asyncio import current_loop as _current_loop

try:  # the trio-asyncio internals `_run_ready_callbacks_together` relies on
    from trio_asyncio._base import AsyncHandle as _AsyncHandle
except ImportError:  # pragma: no cover - another trio-asyncio: its loop runs as shipped
    _AsyncHandle = None

from .._config import EventStoreConfig
from .._errors import EventStoreClosedError, single_errors
from ._translate import _translated

T = TypeVar("T")

logger = logging.getLogger("trio_eventstore.pg")


async def _cross(loop: Any, coro: Coroutine[Any, Any, T], config: EventStoreConfig | None) -> T:
    """Run an asyncio coroutine on `loop` from Trio, translating driver errors.

    Raises:
        EventStoreClosedError: the loop (the store) closed before or while it ran.
    """
    crossings = _CROSSINGS.get(loop)
    if crossings is None:  # a loop this module did not open: its owner closes it
        result: T = await _translated(_run_inline(loop, coro), config)
        return result
    if crossings.closing:
        coro.close()
        raise EventStoreClosedError()
    with trio.CancelScope() as scope:
        crossings.scopes.add(scope)
        try:
            result = await _translated(_run_inline(loop, coro), config)
            return result
        finally:
            crossings.left(scope)
    raise EventStoreClosedError(
        "the event store closed while a statement was in flight (an append may have been committed)"
    )


class _Crossings:
    """The crossings in flight on a loop `_asyncio_loop` opened. Callers cross in their
    own tasks, outside the store's nursery: before the loop closes they are cancelled
    (`_cross` then raises `EventStoreClosedError`) and waited for, each running its
    cleanup to the end, so that none is left waiting on a closed loop."""

    __slots__ = ("closing", "drained", "scopes")

    def __init__(self) -> None:
        self.scopes: set[trio.CancelScope] = set()
        self.closing = False
        self.drained = trio.Event()

    def left(self, scope: trio.CancelScope) -> None:
        self.scopes.discard(scope)
        if self.closing and not self.scopes:
            self.drained.set()

    async def close(self) -> None:
        """Cancel every crossing and wait for them (shielded, bounded)."""
        self.closing = True
        if not self.scopes:
            return
        for scope in self.scopes:
            scope.cancel()
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
            await self.drained.wait()


#: How long a closing loop waits for its cancelled crossings (as `_units.CLEANUP_TIMEOUT`).
_CLOSE_TIMEOUT = 5.0

_CROSSINGS: weakref.WeakKeyDictionary[Any, _Crossings] = weakref.WeakKeyDictionary()


class _InlineTask:
    """What `asyncio.current_task()` returns while `_run_inline` steps a coroutine: the
    parts of `asyncio.Task` that asyncio's own helpers use on the current task
    (``asyncio.timeout`` cancels it and counts its cancellations)."""

    __slots__ = ("_cancel_message", "_cancels", "_loop", "_must_cancel", "_waiter")

    def __init__(self, loop: Any) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[Any] | None = None
        self._must_cancel = False
        self._cancel_message: Any = None
        self._cancels = 0

    def get_loop(self) -> Any:
        return self._loop

    def done(self) -> bool:
        return False

    def get_name(self) -> str:
        return "trio-eventstore inline task"

    def cancel(self, msg: Any = None) -> bool:
        self._cancels += 1
        if self._waiter is not None and self._waiter.cancel(msg=msg):
            return True  # the coroutine wakes up with CancelledError
        self._must_cancel, self._cancel_message = True, msg
        return True

    def cancelling(self) -> int:
        return self._cancels

    def uncancel(self) -> int:
        if self._cancels > 0:
            self._cancels -= 1
        return self._cancels


class _Wake:
    """The done-callback of the future an inline coroutine waits on: reschedules the
    waiting Trio task. `_call_soon` runs it at once instead of queueing it for the
    loop (it only marks a Trio task runnable, so running it early is safe)."""

    __slots__ = ("task",)

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task

    def __call__(self, _future: Any) -> None:
        trio.lowlevel.reschedule(self.task)

    #: the same, as a callback `_call_soon` queues like any other (not a `_Wake`)
    queued = __call__


class AtOnce:
    """A synchronous callback handed to asyncpg (a LISTEN callback) that `_call_soon`
    runs at once, inside the asyncpg callback that schedules it, instead of in a later
    pass of the loop. It must not block; what it raises is logged, not propagated."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> None:
        try:
            self.fn(*args)
        except Exception:
            logger.exception("a notification callback failed")


async def _run_inline(loop: Any, coro: Coroutine[Any, Any, T]) -> T:
    """``await coro`` (asyncio-flavoured) from the calling Trio task, as an
    `asyncio.Task` would run it, but stepped by this task itself.

    trio-asyncio's ``run_aio_coroutine`` wraps the coroutine in an `asyncio.Task`: one
    scheduling pass of the loop to start it and one more to hand its result back, on
    top of the passes the I/O itself needs. Here the calling task runs each step,
    and sleeps (a plain Trio wait) on the future the step blocked on. Cancelled from
    Trio, the coroutine gets `asyncio.CancelledError` at that future, as a cancelled
    asyncio task would, runs its cleanup to the end, and then this raises
    `trio.Cancelled`.
    """
    task = _InlineTask(loop)
    wake = _Wake(trio.lowlevel.current_task())
    raise_cancel: Any = None
    to_throw: BaseException | None = None
    queue = loop._q_recv

    def abort(raise_cancel_arg: Any) -> trio.lowlevel.Abort:
        nonlocal raise_cancel
        raise_cancel = raise_cancel_arg
        if loop.is_closed():  # nothing will ever wake it (nor run its cleanup)
            return trio.lowlevel.Abort.SUCCEEDED
        task.cancel()
        # The wake-up still comes: from the cancelled waiter, or (no waiter: a bare
        # yield) from the loop, and the coroutine then gets CancelledError.
        return trio.lowlevel.Abort.FAILED

    while True:
        if task._must_cancel and to_throw is None:
            to_throw = asyncio.CancelledError(task._cancel_message)
            task._must_cancel = False
        token = _current_loop.set(loop)
        previous, sniffio.thread_local.name = sniffio.thread_local.name, "asyncio"
        _enter_task(loop, task)  # type: ignore[arg-type]  # an asyncio.Task stand-in
        try:
            if to_throw is None:
                yielded = coro.send(None)
            else:
                exc, to_throw = to_throw, None
                yielded = coro.throw(exc)
        except StopIteration as stop:
            result: T = stop.value
            return result
        except asyncio.CancelledError:
            if raise_cancel is not None:
                raise_cancel()  # raises trio.Cancelled
            raise
        finally:
            _leave_task(loop, task)  # type: ignore[arg-type]
            sniffio.thread_local.name = previous
            _current_loop.reset(token)
        if yielded is None:  # a bare yield (asyncio.sleep(0)): after one pass of the loop
            loop.call_soon(wake.queued, None)
        elif getattr(yielded, "_asyncio_future_blocking", False):
            yielded._asyncio_future_blocking = False
            task._waiter = yielded
            if task._must_cancel and yielded.cancel(msg=task._cancel_message):
                task._must_cancel = False
            # Alone on its future (or after asyncpg's bookkeeping, which runs at once
            # too), the wake-up may run at once (`_Wake`); after other done-callbacks
            # it is queued behind them, so that they run first, in order.
            callbacks = yielded._callbacks
            at_once = not callbacks or all(_is_bookkeeping(cb) for cb, _ in callbacks)
            yielded.add_done_callback(wake if at_once else wake.queued)
        else:
            to_throw = RuntimeError(f"inline coroutine yielded {yielded!r}, not a future")
            continue
        try:
            if raise_cancel is None:
                await trio.lowlevel.wait_task_rescheduled(abort)
            else:  # cancelled once, as an asyncio task is: its cleanup runs undisturbed
                with trio.CancelScope(shield=True):
                    await trio.lowlevel.wait_task_rescheduled(abort)
            if queue.statistics().current_buffer_used:
                # Woken at once (`_Wake`): callbacks queued before the wake-up (the
                # future's earlier done-callbacks among them) run first, as in asyncio.
                with trio.CancelScope(shield=True):
                    await loop.synchronize()
        finally:
            task._waiter = None


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
            crossings = _CROSSINGS[new_loop] = _Crossings()
            try:
                yield new_loop
            finally:
                await crossings.close()


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
        for name in (
            "_main_loop_one",
            "_q_recv",
            "_timers",
            "_nursery",
            "_queue_handle",
            "_io_task",
            "synchronize",
        )
    ):
        loop._main_loop_one = types.MethodType(_main_loop_one_batched, loop)
        loop.call_soon = types.MethodType(_call_soon, loop)
        loop._io_task = types.MethodType(_io_task, loop)


def _call_soon(self: Any, callback: Any, *args: Any, context: Any = None) -> Any:
    """trio-asyncio's ``call_soon`` without asyncio's callback check; a `_Wake` or an
    `AtOnce` runs at once (no pass of the loop just to wake a Trio task, or to hand a
    notification over)."""
    self._check_closed()
    handle = asyncio.Handle(callback, args, self, context=context)
    if type(callback) is _Wake or type(callback) is AtOnce or _bookkeeping(callback, args):
        callback(*args)
        return handle
    return self._queue_handle(handle)


def _bookkeeping(callback: Any, args: tuple[Any, ...]) -> bool:
    """asyncpg's own done-callback on a query's reply future (``_on_waiter_completed``),
    for a reply that came (not a cancelled wait): it only clears a timer the reply
    already cleared, so it may run at once, and then the `_Wake` after it may too."""
    return _is_bookkeeping(callback) and len(args) == 1 and not args[0].cancelled()


def _is_bookkeeping(callback: Any) -> bool:
    return getattr(callback, "__name__", None) == "_on_waiter_completed"


async def _io_task(self: Any, fd: Any, handle: Any, wait_ready: Any) -> None:
    """trio-asyncio's reader/writer task, which after each callback waits for the
    loop to run everything queued so far (``synchronize``): here only when the
    callback did queue something (a reply that only woke a Trio task did not)."""
    with handle._scope:
        try:
            while True:
                if handle._cancelled:
                    break
                try:
                    await wait_ready(fd)
                except OSError:
                    if handle._cancelled:
                        break
                    raise
                if handle._cancelled:
                    break
                handle._run()
                if self._q_recv.statistics().current_buffer_used:
                    await self.synchronize()
        except Exception as exc:
            handle._raise(exc)


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
