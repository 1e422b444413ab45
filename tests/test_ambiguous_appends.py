"""An append whose connection stops answering mid-commit has an ambiguous outcome
(`StorageUnavailableError`): it may or may not be stored. Retried with the same event ids,
as README's ``append_once`` does, it is stored exactly once either way."""

from __future__ import annotations

import urllib.parse
import uuid
from collections.abc import AsyncIterator

import pytest
import trio

from trio_eventstore import (
    ANY_VERSION,
    NO_STREAM,
    STREAM_EXISTS,
    DuplicateEventError,
    EventData,
    EventStoreConfig,
    StorageUnavailableError,
    StreamExistsError,
    WrongExpectedVersionError,
    open_event_store,
)

from .faultproxy import POOL, Drop, FaultProxy, open_fault_proxy

HANG_GUARD = 30  # a guard against hangs, never a speed assertion


@pytest.fixture
async def proxy(test_database: str) -> AsyncIterator[FaultProxy]:
    parts = urllib.parse.urlsplit(test_database)
    assert parts.hostname is not None
    assert parts.port is not None
    async with open_fault_proxy(parts.hostname, parts.port) as opened:
        yield opened


@pytest.mark.parametrize(
    ("drop", "committed"),
    [(Drop("to_client"), True), (Drop("to_server"), False)],
    ids=["the-answer-is-lost", "the-statement-is-lost"],
)
async def test_an_ambiguous_append_retried_with_its_ids_is_stored_exactly_once(
    initialized: EventStoreConfig, proxy: FaultProxy, drop: Drop, committed: bool
) -> None:
    assert initialized.url is not None
    config = initialized.with_changes(url=proxy.url_for(initialized.url), timeout=1.0)
    events = [EventData({"n": n}, event_type="Counted", event_id=uuid.uuid4()) for n in (1, 2)]
    with trio.fail_after(HANG_GUARD):
        async with open_event_store(config) as store:
            # Two events, as the append below: its statement is prepared on the pooled
            # connection by now, so that the append is one round trip (else the lost
            # answer could be the one to its Parse, and nothing would be committed).
            await store.append_to_stream(
                "s", ANY_VERSION, [EventData({"n": 0}, event_type="C") for _ in range(2)]
            )
            proxy.set(POOL, drop)
            with pytest.raises(StorageUnavailableError):
                await store.append_to_stream("s", ANY_VERSION, events)
            proxy.clear()
            if committed:  # the server committed; only its answer was lost
                with pytest.raises(DuplicateEventError):
                    await store.append_to_stream("s", ANY_VERSION, events)
            else:  # the server never saw it: the retry stores it
                assert await store.append_to_stream("s", ANY_VERSION, events) == 4
            stored = await store.read_stream_forward("s")
    assert [e.event_id for e in stored[2:]] == [e.event_id for e in events]
    assert [e.stream_version for e in stored] == [1, 2, 3, 4]


async def test_a_retry_is_checked_for_its_expected_version_before_its_event_ids(
    initialized: EventStoreConfig,
) -> None:
    """README (Writes, Cancellation): only a retry with `ANY_VERSION` or `STREAM_EXISTS`
    tells a stored first attempt by `DuplicateEventError`; with `NO_STREAM` or a version
    number the version is refused first, and the ids read back say what happened."""
    events = [EventData({"n": n}, event_type="Counted", event_id=uuid.uuid4()) for n in (1, 2)]
    async with open_event_store(initialized) as store:
        assert await store.append_to_stream("s", NO_STREAM, events) == 2  # "timed out"
        with pytest.raises(StreamExistsError):
            await store.append_to_stream("s", NO_STREAM, events)
        with pytest.raises(WrongExpectedVersionError):
            await store.append_to_stream("s", 0, events)
        for expected in (ANY_VERSION, STREAM_EXISTS):
            with pytest.raises(DuplicateEventError):
                await store.append_to_stream("s", expected, events)
        after = await store.read_stream_forward("s", 1)
        assert [e.event_id for e in after] == [e.event_id for e in events]
