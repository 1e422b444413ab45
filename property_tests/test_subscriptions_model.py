"""At-least-once delivery and order of a persistent subscription under faults.

Random schedules of appends, consumer crashes (leaving before acking a batch), store
restarts, lost lock connections and killed LISTEN connections. Afterwards:

* every event appended was delivered (nothing lost);
* within one delivery session (one lock tenure), event numbers strictly ascend with no
  gap (one consumer, ``$all``);
* an event whose checkpoint was confirmed persisted is never delivered again.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import trio
import trio.lowlevel
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_eventstore import (
    ANY_VERSION,
    EventData,
    EventStore,
    EventStoreConfig,
    admin,
    open_event_store,
)
from trio_eventstore._pg import open_connection

HANG_GUARD = 60

steps = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 5)),
        st.tuples(st.sampled_from(["crash", "restart", "kill_lock", "kill_listener", "pause"])),
    ),
    min_size=1,
    max_size=10,
)


async def terminate(config: EventStoreConfig, pid: int | None) -> None:
    if pid is None:
        return
    async with open_connection(config) as conn:
        await conn.fetchval("SELECT pg_terminate_backend($1)", pid)


@settings(max_examples=max(5, settings().max_examples // 3))
@given(program=steps, threshold=st.integers(1, 3), buffer_size=st.integers(1, 4))
def test_at_least_once_in_order_under_faults(
    store_config: EventStoreConfig,
    program: list[tuple[Any, ...]],
    threshold: int,
    buffer_size: int,
) -> None:
    config = store_config.with_changes(
        subscription_retry_interval=0.1,
        subscription_standby_interval=0.2,
        notification_poll_interval=2.0,
    )
    # (incarnation, driver session) -> event numbers delivered, in order
    sessions: dict[tuple[int, int], list[int]] = {}
    confirmed: list[tuple[int, int]] = []  # (persisted checkpoint, when: delivery count)
    deliveries: list[tuple[int, int, int]] = []  # (incarnation, session, number)

    progress = [trio.Event()]

    async def consumer(
        store: EventStore,
        incarnation: int,
        finished: trio.Event,
        task_status: trio.TaskStatus[trio.CancelScope],
    ) -> None:
        with trio.CancelScope() as scope:
            async with store.subscribe_to_all_streams(
                "p", buffer_size=buffer_size, checkpoint_threshold=threshold
            ) as sub:
                task_status.started(scope)
                async for batch in sub:
                    for event in batch.events:
                        key = (incarnation, batch.session)
                        sessions.setdefault(key, []).append(event.event_number)
                        deliveries.append((incarnation, batch.session, event.event_number))
                    progress[0].set()
                    progress[0] = trio.Event()
                    await trio.lowlevel.checkpoint()  # a crash may come before the ack
                    sub.ack(batch)
                    with trio.move_on_after(0.5):
                        await sub.wait_checkpointed(batch.last_event_number)
                        confirmed.append((batch.last_event_number, len(deliveries)))
        finished.set()

    async def body() -> int:
        await admin.reset(config)
        appended = 0
        incarnation = 0
        done = False
        while not done:
            async with open_event_store(config) as store, trio.open_nursery() as nursery:
                incarnation += 1
                finished = trio.Event()
                current = await nursery.start(consumer, store, incarnation, finished)
                restart = False
                while program and not restart:
                    step = program.pop(0)
                    kind = step[0]
                    if kind == "append":
                        events = [EventData({"i": i}, event_type="T") for i in range(step[1])]
                        await store.append_to_stream(
                            f"s-{uuid.uuid4().hex[:4]}", ANY_VERSION, events
                        )
                        appended += step[1]
                    elif kind == "crash":  # the consumer dies wherever it is
                        current.cancel()
                        await finished.wait()
                        incarnation += 1
                        finished = trio.Event()
                        current = await nursery.start(consumer, store, incarnation, finished)
                    elif kind == "restart":
                        restart = True
                    elif kind == "kill_lock":
                        await terminate(config, store.statistics().lock_pid)
                    elif kind == "kill_listener":
                        await terminate(config, store.statistics().listener_pid)
                    else:
                        await trio.sleep(0.05)
                if not program and not restart:
                    # Wait until everything was delivered, then stop.
                    with trio.fail_after(HANG_GUARD):
                        while not set(range(1, appended + 1)) <= {n for _, _, n in deliveries}:
                            await progress[0].wait()
                    done = True
                nursery.cancel_scope.cancel()
        return appended

    appended = trio.run(body)
    delivered = {n for _, _, n in deliveries}
    assert set(range(1, appended + 1)) <= delivered  # nothing lost
    for key, numbers in sessions.items():
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), (key, numbers)
    for checkpoint, at in confirmed:
        later = [n for _, _, n in deliveries[at:]]
        assert all(n > checkpoint for n in later), (checkpoint, later)
    assert math.isfinite(appended)
