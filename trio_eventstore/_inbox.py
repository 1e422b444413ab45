"""What a persistent subscription's consumers receive from its driver, and how they wait:
`Consumer` (one consumer of a driver), the `Inbox` its batches wait in until the
consumer's task receives them (partition groups share one), and `Signal`, the flag or
pulse tasks wait for (subscribed, done, progress, checkpointed).

These are the objects a hibernated subscription keeps, so they are small: no
`trio.Event` or channel exists while nobody waits.
"""

from __future__ import annotations

import attrs
import trio

from ._subscription_types import EventBatch

__all__ = ["Consumer", "Inbox", "Signal"]


class Signal:
    """A flag tasks wait for (``set``), or a pulse that wakes those waiting now
    (``pulse``). Its `trio.Event` exists only while a task waits: an idle subscription
    keeps a few of these, and an Event with its set of waiters costs ~270 bytes."""

    __slots__ = ("_event", "_is_set")

    def __init__(self) -> None:
        self._event: trio.Event | None = None
        self._is_set = False

    def is_set(self) -> bool:
        return self._is_set

    def set(self) -> None:
        self._is_set = True
        self.pulse()

    def clear(self) -> None:
        self._is_set = False

    def pulse(self) -> None:
        """Wake the tasks waiting now (those that wait later wait for the next one)."""
        event, self._event = self._event, None
        if event is not None:
            event.set()

    async def wait(self) -> None:
        if self._is_set:
            await trio.lowlevel.checkpoint()
            return
        event = self._event
        if event is None:
            event = self._event = trio.Event()
        try:
            await event.wait()
        finally:
            # Cancelled, and nobody else waits: drop it (it is made again when needed).
            if self._event is event and not event.statistics().tasks_waiting:
                self._event = None


class Inbox:
    """Batches for a consumer's task (unbounded: the FSM bounds what is in flight).
    Lighter than a memory channel: a list while batches wait, and the waiting tasks
    while none do. Several consumers may share one (partition groups: one consumer per
    group, one task receiving them all): it ends once each of them has closed it."""

    __slots__ = ("_batches", "_failed", "_open", "_receivers")

    def __init__(self) -> None:
        self._batches: list[EventBatch] | None = None
        self._receivers: list[trio.lowlevel.Task] | None = None
        #: consumers still sending to it
        self._open = 0
        #: one of them stopped because its subscription failed: the inbox ends for all
        self._failed = False

    def attach(self) -> Inbox:
        self._open += 1
        return self

    def send(self, batch: EventBatch) -> None:
        if self._open <= 0:
            raise trio.ClosedResourceError
        if self._batches is None:
            self._batches = [batch]
        else:
            self._batches.append(batch)
        if self._receivers:
            trio.lowlevel.reschedule(self._receivers.pop(0))

    def close(self, *, failed: bool = False) -> None:
        """One sender fewer; with none left, or when it stops because its subscription
        failed (``failed``: a partition group's failure ends the iteration of all
        the groups, whose consumer then raises it), receivers get `trio.EndOfChannel`
        once the inbox is empty."""
        self._open -= 1
        self._failed = self._failed or failed
        if self._open > 0 and not self._failed:
            return
        receivers, self._receivers = self._receivers, None
        for task in receivers or ():
            trio.lowlevel.reschedule(task)

    async def receive(self) -> EventBatch:
        """The next batch (a checkpoint, as `trio.MemoryReceiveChannel.receive`).

        Raises:
            trio.EndOfChannel: closed, and every batch received.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            batches = self._batches
            if batches:
                batch = batches.pop(0)
                if not batches:
                    self._batches = None
                await trio.lowlevel.cancel_shielded_checkpoint()
                return batch
            if self._open <= 0 or self._failed:
                raise trio.EndOfChannel
            task = trio.lowlevel.current_task()
            if self._receivers is None:
                self._receivers = [task]
            else:
                self._receivers.append(task)

            def abort(_: object, task: trio.lowlevel.Task = task) -> trio.lowlevel.Abort:
                if self._receivers is not None and task in self._receivers:
                    self._receivers.remove(task)
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)


@attrs.define(eq=False)
class Consumer:
    """One consumer of a driver: its `Inbox` of batches, received by the consumer's
    task."""

    consumer_id: int
    buffer_size: int
    inbox: Inbox
    #: highest event number delivered in earlier sessions (their acks are stale)
    stale_up_to: int = -1
    delivered_high: int = -1
    #: the (session, epoch) of the batches its subscriber was last handed (`received`),
    #: and the highest event number among them: only these can be acknowledged (a
    #: batch of an ended session, or from before a nack, is delivered again)
    received_in: tuple[int, int] = (0, -1)
    received_high: int = -1
    _closed: bool = attrs.field(default=False, init=False)

    def received(self, batch: EventBatch) -> None:
        """``batch`` (current: `is_current`) is handed to the subscriber."""
        key = (batch.session, batch.epoch)
        if key != self.received_in:
            self.received_in, self.received_high = key, -1
        self.received_high = max(self.received_high, *(e.event_number for e in batch.events))

    def send(self, batch: EventBatch) -> None:
        if self._closed:
            raise trio.ClosedResourceError
        self.inbox.send(batch)

    def close(self, *, failed: bool = False) -> None:
        """No more batches from this consumer's driver (idempotent); ``failed``: it
        failed (see `Inbox.close`)."""
        if not self._closed:
            self._closed = True
            self.inbox.close(failed=failed)

    async def receive(self) -> EventBatch:
        return await self.inbox.receive()
