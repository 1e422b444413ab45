"""A burst of concurrent writers is back-pressure, never an error."""

from __future__ import annotations

import trio

from trio_eventstore import NO_STREAM, EventData, EventStoreConfig, open_event_store

WRITERS = 200


async def test_a_burst_of_writers_on_a_small_pool_all_succeed(
    initialized: EventStoreConfig,
) -> None:
    """200 tasks each append one event to a stream of their own, on a pool of 10: every
    append succeeds (they wait their turn), and $all holds them all, densely.

    The pool's admission control is strict here (a connection within 10 ms, judged over
    100 ms), so that a burst that waits for connections fails every time: appends must
    queue for the store's writer, whatever the pool's settings."""
    config = initialized.with_changes(pool_size=10, queue_target=0.01, queue_interval=0.1)
    outcomes: dict[int, object] = {}
    async with open_event_store(config) as store:

        async def write(i: int) -> None:
            try:
                outcomes[i] = await store.append_to_stream(
                    f"burst-{i}", NO_STREAM, [EventData({"i": i}, event_type="Burst")]
                )
            except Exception as exc:
                outcomes[i] = exc

        async with trio.open_nursery() as nursery:
            for i in range(WRITERS):
                nursery.start_soon(write, i)
        failures = [o for o in outcomes.values() if o != 1]
        assert not failures, f"{len(failures)} of {WRITERS} failed, first: {failures[:2]}"
        everything = await store.read_all_streams_forward(0, 10 * WRITERS)
        assert [e.event_number for e in everything] == list(range(1, WRITERS + 1))
        assert sorted(e.data["i"] for e in everything) == list(range(WRITERS))  # type: ignore[index]
