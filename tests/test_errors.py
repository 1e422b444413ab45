"""Errors that tell the truth: a closed store says so, a missing database says so, and
errors carry their facts as attributes (and survive pickling)."""

from __future__ import annotations

import contextlib
import pickle
import ssl
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

import trio_eventstore as es
from trio_eventstore import (
    ANY_VERSION,
    NO_STREAM,
    STREAM_EXISTS,
    EventData,
    EventStore,
    EventStoreConfig,
    SnapshotData,
    admin,
    open_event_store,
)
from trio_eventstore._driver import Driver
from trio_eventstore._pg import open_connection, translate_error

from .helpers import url_for


def _event(n: int = 0, event_id: uuid.UUID | None = None) -> EventData:
    return EventData({"n": n}, event_type="T", event_id=event_id)


async def _iterate(iterator: Any) -> None:
    async for _ in iterator:
        pass


async def _enter(cm: Any) -> None:
    async with cm:
        pass


# Every public method of a store, called after the store has closed.
CLOSED_CALLS: dict[str, Callable[[EventStore], Awaitable[object]]] = {
    "append_to_stream": lambda s: s.append_to_stream("s", ANY_VERSION, [_event()]),
    "link_to_stream": lambda s: s.link_to_stream("t", ANY_VERSION, [uuid.uuid4()]),
    "read_stream_forward": lambda s: s.read_stream_forward("s"),
    "read_stream_backward": lambda s: s.read_stream_backward("s"),
    "read_all_streams_forward": lambda s: s.read_all_streams_forward(),
    "read_all_streams_backward": lambda s: s.read_all_streams_backward(),
    "stream_forward": lambda s: _iterate(s.stream_forward("s")),
    "stream_backward": lambda s: _iterate(s.stream_backward("s")),
    "stream_all_forward": lambda s: _iterate(s.stream_all_forward()),
    "stream_all_backward": lambda s: _iterate(s.stream_all_backward()),
    "stream_info": lambda s: s.stream_info("s"),
    "paginate_streams": lambda s: s.paginate_streams(),
    "delete_stream": lambda s: s.delete_stream("s", ANY_VERSION),
    "record_snapshot": lambda s: s.record_snapshot(
        SnapshotData(source_uuid="s", source_version=1, data={"a": 1})
    ),
    "read_snapshot": lambda s: s.read_snapshot("s"),
    "delete_snapshot": lambda s: s.delete_snapshot("s"),
    "subscribe": lambda s: _enter(s.subscribe("s")),
    "subscribe_to_stream": lambda s: _enter(s.subscribe_to_stream("s", "sub")),
    "subscribe_to_all_streams": lambda s: _enter(s.subscribe_to_all_streams("sub")),
    "delete_subscription": lambda s: s.delete_subscription("s", "sub"),
}

# The methods that hand back an iterator or a context manager: the call itself raises.
CLOSED_AT_CREATION: dict[str, Callable[[EventStore], object]] = {
    "stream_forward": lambda s: s.stream_forward("s"),
    "stream_backward": lambda s: s.stream_backward("s"),
    "stream_all_forward": lambda s: s.stream_all_forward(),
    "stream_all_backward": lambda s: s.stream_all_backward(),
    "subscribe": lambda s: s.subscribe("s"),
    "subscribe_to_stream": lambda s: s.subscribe_to_stream("s", "sub"),
    "subscribe_to_all_streams": lambda s: s.subscribe_to_all_streams("sub"),
}


def test_closed_error_is_a_closed_resource_error_and_not_retryable() -> None:
    assert issubclass(es.EventStoreClosedError, trio.ClosedResourceError)
    assert issubclass(es.EventStoreClosedError, es.EventStoreError)
    assert not issubclass(es.EventStoreClosedError, es.StorageUnavailableError)


def _broken(cause: BaseException | None) -> trio.BrokenResourceError:
    """As Trio's socket and TLS streams raise it."""
    try:
        raise trio.BrokenResourceError("socket connection broken: " + str(cause)) from cause
    except trio.BrokenResourceError as exc:
        return exc


def _ssl_error(cls: type[ssl.SSLError], reason: str) -> ssl.SSLError:
    error = cls(1, f"[SSL: {reason}] {reason.lower()}")
    error.reason = reason
    return error


@pytest.mark.parametrize(
    ("cause", "expected"),
    [
        (ConnectionResetError(104, "Connection reset by peer"), es.StorageUnavailableError),
        (None, es.StorageUnavailableError),
        (_ssl_error(ssl.SSLEOFError, "UNEXPECTED_EOF_WHILE_READING"), es.StorageUnavailableError),
        (_ssl_error(ssl.SSLError, "TLSV1_ALERT_UNKNOWN_CA"), es.TLSError),
        (_ssl_error(ssl.SSLError, "TLSV13_ALERT_CERTIFICATE_REQUIRED"), es.TLSError),
    ],
    ids=["reset", "bare", "tls-eof", "client-cert-unknown-ca", "client-cert-required"],
)
def test_a_broken_trio_stream_is_unavailable_unless_the_server_refused_our_certificate(
    cause: BaseException | None, expected: type[es.EventStoreError]
) -> None:
    """A connection reset while connecting (a server restarting) raised a raw
    `DatabaseError` "BrokenResourceError: ..." that retry loops do not catch; a TLS
    alert from a server refusing the client certificate is not worth retrying."""
    translated = translate_error(_broken(cause))
    assert type(translated) is expected
    assert "BrokenResourceError" not in str(translated)


def test_a_client_key_that_cannot_be_loaded_says_so(tmp_path: Path) -> None:
    """What `ssl` raises for an encrypted key given a wrong or no password ("[SSL] PEM
    lib") was reported as a failed TLS handshake, which never took place."""
    key, cert = tmp_path / "client.key", tmp_path / "client.crt"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-keyout", str(key), "-out",
         str(cert), "-days", "1", "-subj", "/CN=client", "-passout", "pass:right"],
        capture_output=True, check=False,
    )  # fmt: skip
    if made.returncode != 0:
        pytest.skip("openssl cannot make a key here")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with pytest.raises(ssl.SSLError) as raised:
        context.load_cert_chain(str(cert), str(key), password="wrong")
    translated = translate_error(raised.value)
    assert isinstance(translated, es.TLSError)
    assert "ssl_password" in str(translated)
    assert "handshake" not in str(translated)


@pytest.mark.parametrize("name", sorted(CLOSED_CALLS))
async def test_every_method_of_a_closed_store_raises_closed(
    initialized: EventStoreConfig, name: str
) -> None:
    async with open_event_store(initialized) as store:
        await store.append_to_stream("s", ANY_VERSION, [_event()])
    with trio.fail_after(5), pytest.raises(es.EventStoreClosedError, match="closed"):
        await CLOSED_CALLS[name](store)
    store.statistics()  # still fine


@pytest.mark.parametrize("name", sorted(CLOSED_AT_CREATION))
async def test_iterators_and_subscriptions_of_a_closed_store_raise_at_creation(
    initialized: EventStoreConfig, name: str
) -> None:
    async with open_event_store(initialized) as store:
        pass
    with pytest.raises(es.EventStoreClosedError):
        CLOSED_AT_CREATION[name](store)


async def test_an_iterator_made_while_open_raises_closed_when_used_after(
    initialized: EventStoreConfig,
) -> None:
    async with open_event_store(initialized) as store:
        await store.append_to_stream("s", ANY_VERSION, [_event(n) for n in range(3)])
        iterator = store.stream_forward("s", read_batch_size=1)
        assert (await iterator.__anext__()).stream_version == 1
        cm = store.subscribe_to_stream("s", "late")
    with pytest.raises(es.EventStoreClosedError):
        await iterator.__anext__()
    with pytest.raises(es.EventStoreClosedError):
        await _enter(cm)


async def test_a_transient_subscription_waiting_when_the_store_closes_raises_closed(
    initialized: EventStoreConfig,
) -> None:
    outcome: list[BaseException] = []
    done = trio.Event()

    async def consume(live: es.TransientSubscription, task_status: Any) -> None:
        task_status.started()
        try:
            await live.__anext__()
        except Exception as exc:
            outcome.append(exc)
        done.set()

    async with trio.open_nursery() as nursery:
        async with open_event_store(initialized) as store, store.subscribe("s") as live:
            await nursery.start(consume, live)
            await trio.sleep(0.1)  # waiting for events
        with trio.fail_after(5):
            await done.wait()
    assert isinstance(outcome[0], es.EventStoreClosedError)


async def test_missing_database_is_named_not_unavailable(server_url: str) -> None:
    name = f"nodb_{uuid.uuid4().hex[:8]}"
    config = EventStoreConfig(url=url_for(server_url, name), timeout=5.0)
    with pytest.raises(es.DatabaseNotFoundError) as caught:
        async with open_event_store(config):
            pass  # pragma: no cover
    error = caught.value
    assert not isinstance(error, es.StorageUnavailableError)  # retrying will not help
    assert isinstance(error, LookupError)
    assert error.database == name
    assert name in str(error)
    assert "trio-eventstore create" in str(error)
    with pytest.raises(es.DatabaseNotFoundError):
        await admin.init(config)


async def test_expected_version_errors_carry_their_facts(store: EventStore) -> None:
    await store.append_to_stream("s", NO_STREAM, [_event(0), _event(1)])
    with pytest.raises(es.WrongExpectedVersionError) as wrong:
        await store.append_to_stream("s", 5, [_event()])
    assert (wrong.value.stream_uuid, wrong.value.expected, wrong.value.current) == ("s", 5, 2)
    assert str(wrong.value) == "stream 's' is at version 2, expected 5"
    with pytest.raises(es.StreamExistsError) as exists:
        await store.append_to_stream("s", NO_STREAM, [_event()])
    assert (exists.value.stream_uuid, exists.value.expected, exists.value.current) == (
        "s",
        NO_STREAM,
        2,
    )
    with pytest.raises(es.StreamNotFoundError) as missing:
        await store.append_to_stream("none", STREAM_EXISTS, [_event()])
    assert missing.value.stream_uuid == "none"
    with pytest.raises(es.StreamNotFoundError) as unread:
        await store.read_stream_forward("none")
    assert unread.value.stream_uuid == "none"
    with pytest.raises(es.WrongExpectedVersionError) as wrong_delete:
        await store.delete_stream("s", 1)
    assert (wrong_delete.value.expected, wrong_delete.value.current) == (1, 2)
    await store.delete_stream("s", 2)
    with pytest.raises(es.StreamDeletedError) as deleted:
        await store.read_stream_forward("s")
    assert deleted.value.stream_uuid == "s"
    with pytest.raises(es.StreamDeletedError) as deleted_again:
        await store.append_to_stream("s", ANY_VERSION, [_event()])
    assert deleted_again.value.stream_uuid == "s"


async def test_event_errors_carry_their_ids(store: EventStore) -> None:
    event_id = uuid.uuid4()
    await store.append_to_stream("a", ANY_VERSION, [_event(event_id=event_id)])
    with pytest.raises(es.DuplicateEventError) as duplicate:
        await store.append_to_stream("b", ANY_VERSION, [_event(event_id=event_id)])
    assert duplicate.value.stream_uuid == "b"
    assert duplicate.value.event_id == event_id
    with pytest.raises(es.DuplicateEventError) as linked_twice:
        await store.link_to_stream("a", ANY_VERSION, [event_id])
    assert (linked_twice.value.stream_uuid, linked_twice.value.event_id) == ("a", event_id)
    ghost = uuid.uuid4()
    with pytest.raises(es.EventNotFoundError) as missing:
        await store.link_to_stream("c", ANY_VERSION, [event_id, ghost])
    assert missing.value.event_ids == (ghost,)
    with pytest.raises(es.SnapshotNotFoundError) as no_snapshot:
        await store.read_snapshot("a")
    assert no_snapshot.value.source_uuid == "a"


async def test_subscription_errors_carry_their_names(store: EventStore) -> None:
    async with store.subscribe_to_all_streams("proj"):
        with pytest.raises(es.SubscriptionAlreadyExistsError) as exists:
            async with store.subscribe_to_all_streams("proj"):
                pass  # pragma: no cover
        assert (exists.value.stream_uuid, exists.value.subscription_name) == ("$all", "proj")
        with pytest.raises(es.SubscriptionAlreadyExistsError) as active:
            await store.delete_subscription("$all", "proj")
        assert (active.value.stream_uuid, active.value.subscription_name) == ("$all", "proj")
    async with store.subscribe_to_stream("s", "pool", concurrency_limit=1):
        with pytest.raises(es.TooManySubscribersError) as too_many:
            async with store.subscribe_to_stream("s", "pool", concurrency_limit=1):
                pass  # pragma: no cover
        assert (too_many.value.subscription_name, too_many.value.concurrency_limit) == ("pool", 1)
    with pytest.raises(es.SubscriptionNotFoundError) as not_found:
        await store.delete_subscription("s", "nope")
    assert (not_found.value.stream_uuid, not_found.value.subscription_name) == ("s", "nope")


ERRORS = [
    es.WrongExpectedVersionError(stream_uuid="s", expected=ANY_VERSION, current=3),
    es.StreamExistsError(stream_uuid="s", current=3),
    es.StreamNotFoundError(stream_uuid="s"),
    es.StreamDeletedError(stream_uuid="s"),
    es.EventNotFoundError(event_ids=[uuid.UUID(int=1)]),
    es.DuplicateEventError(stream_uuid="s", event_id=uuid.UUID(int=2)),
    es.SnapshotNotFoundError(source_uuid="s"),
    es.SubscriptionAlreadyExistsError(stream_uuid="$all", subscription_name="p"),
    es.SubscriptionNotFoundError(stream_uuid="$all", subscription_name="p"),
    es.TooManySubscribersError(stream_uuid="$all", subscription_name="p", concurrency_limit=2),
    es.DatabaseNotFoundError(database="x"),
    es.InsufficientPrivilegeError("denied", role="app", privilege="CREATE on schema 'x'"),
    es.AccessRejectedError(host="127.0.0.1", user="u", database="d", encryption="no encryption"),
    es.TLSError("the server's certificate was not accepted"),
    es.CheckpointFailedError(
        stream_uuid="s", subscription_name="p", checkpoint=7, last_persisted=3
    ),
    es.DatabaseError("boom", sqlstate="XX000", constraint_name="c"),
    es.EventStoreClosedError(),
    es.StreamNotFoundError("an old-style message"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_errors_pickle_with_their_fields(error: es.EventStoreError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)


# A call in flight (in the caller's own task, outside the store's nursery) when the
# store's block exits: it is waiting for the server, which a table lock holds up.
async def hold_table_locks(
    config: EventStoreConfig, mode: str, lock_now: trio.Event, locked: trio.Event
) -> None:
    """Once ``lock_now`` is set, lock the streams and events tables in ``mode`` (then
    set ``locked``) until cancelled. Connected before the store opens: on a loop of its
    own, not the store's."""
    async with open_connection(config) as blocker:
        await lock_now.wait()
        await blocker.execute("BEGIN")
        for table in ("streams", "events"):
            await blocker.execute(f'LOCK TABLE "{config.schema}".{table} IN {mode} MODE')
        locked.set()
        await trio.sleep_forever()


IN_FLIGHT_CALLS: dict[str, tuple[str, Callable[[EventStore], Awaitable[object]]]] = {
    "read": ("ACCESS EXCLUSIVE", lambda s: s.read_stream_forward("s")),
    "lone append": ("EXCLUSIVE", lambda s: s.append_to_stream("s", ANY_VERSION, [_event()])),
    "big append": (
        "EXCLUSIVE",
        lambda s: s.append_to_stream("s", ANY_VERSION, [_event(n) for n in range(150)]),
    ),
}


@pytest.mark.parametrize("group_commit", [True, False])
@pytest.mark.parametrize("name", sorted(IN_FLIGHT_CALLS))
async def test_a_call_in_flight_when_the_store_closes_raises_closed_at_once(
    initialized: EventStoreConfig, name: str, group_commit: bool
) -> None:
    """Before, the call waited for its statement's timeout on the closed asyncio loop,
    and then the cancellation crashed Trio (`TrioInternalError`)."""
    mode, call = IN_FLIGHT_CALLS[name]
    config = initialized.with_changes(timeout=3.0, group_commit=group_commit)
    outcome: list[BaseException] = []
    done = trio.Event()

    lock_now, locked = trio.Event(), trio.Event()

    async def lock_tables() -> None:
        await hold_table_locks(config, mode, lock_now, locked)

    async def caller(store: EventStore) -> None:
        try:
            await call(store)
        except Exception as exc:
            outcome.append(exc)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lock_tables)
        await trio.sleep(0.2)
        async with open_event_store(config) as store:
            await store.append_to_stream("s", NO_STREAM, [_event()])
            lock_now.set()
            await locked.wait()
            nursery.start_soon(caller, store)
            await trio.sleep(0.3)  # sent, and held up by the lock
            assert not done.is_set()
            closing = trio.current_time()
        with trio.fail_after(2):  # not the statement's timeout (3 s): at once
            await done.wait()
        assert trio.current_time() - closing < 2
        nursery.cancel_scope.cancel()
    (error,) = outcome
    assert isinstance(error, es.EventStoreClosedError), repr(error)
    assert "closed" in str(error)


@pytest.mark.parametrize("group_commit", [True, False])
async def test_calls_waiting_for_a_connection_when_the_store_closes_write_nothing(
    initialized: EventStoreConfig, group_commit: bool
) -> None:
    """Calls waiting for a pooled connection when the store's block exits raise
    `EventStoreClosedError` and write nothing. Before, each took the slot that the closing
    store's connection freed, opened a new connection and ran its append after the block
    had exited (it returned a version, or deadlocked with a DROP SCHEMA run after it)."""
    config = initialized.with_changes(timeout=5.0, pool_size=1, group_commit=group_commit)
    outcomes: dict[str, object] = {}
    lock_now, locked = trio.Event(), trio.Event()

    unlock = trio.CancelScope()

    async def lock_tables() -> None:
        with unlock:
            await hold_table_locks(config, "EXCLUSIVE", lock_now, locked)

    async def caller(store: EventStore, stream: str) -> None:
        try:
            outcomes[stream] = await store.append_to_stream(stream, NO_STREAM, [_event()])
        except Exception as exc:
            outcomes[stream] = exc

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lock_tables)
            async with open_event_store(config) as store:
                await store.append_to_stream("s", NO_STREAM, [_event()])
                lock_now.set()
                await locked.wait()
                nursery.start_soon(caller, store, "held")  # holds the only connection
                await trio.sleep(0.3)
                for stream in ("w1", "w2", "w3"):  # wait for it
                    nursery.start_soon(caller, store, stream)
                await trio.sleep(0.3)
            await trio.sleep(0.3)
            unlock.cancel()  # the lock goes: what was sent may commit now
    for stream in ("w1", "w2", "w3"):
        assert isinstance(outcomes[stream], es.EventStoreClosedError), outcomes
    async with open_event_store(config) as store:
        for stream in ("w1", "w2", "w3"):
            with pytest.raises(es.StreamNotFoundError):
                await store.stream_info(stream)


async def test_acks_the_store_close_missed_but_its_final_checkpoint_got_raise_nothing(
    initialized: EventStoreConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's close reported a subscription's acks unpersisted (here: simulated,
    after persisting them, as when its attempt failed and a later one got them): the
    session's end finds them persisted, and the consumer's block outside the store's
    must not report them lost."""
    real_flush_at_close = Driver.flush_at_close

    async def failed_flush(driver: Driver) -> None:
        fsm = driver.fsm
        await real_flush_at_close(driver)
        driver.closing_failure = driver.checkpoint_failed(fsm, "simulated")

    monkeypatch.setattr(Driver, "flush_at_close", failed_flush)
    acked = trio.Event()
    left: list[BaseException | None] = []

    async def consume(store: EventStore, task_status: Any) -> None:
        try:
            async with store.subscribe_to_stream("s", "p", checkpoint_threshold=100) as sub:
                await sub.wait_subscribed()
                task_status.started()
                with contextlib.suppress(es.EventStoreClosedError):
                    async for batch in sub:
                        sub.ack(batch)
                        acked.set()
        except BaseException as exc:
            left.append(exc)
            raise
        left.append(None)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, open_event_store(initialized) as store:
            await store.append_to_stream("s", ANY_VERSION, [_event(1)])
            await nursery.start(consume, store)
            await acked.wait()
    assert left == [None]
    async with open_event_store(initialized) as store:  # and they are persisted
        await store.append_to_stream("s", ANY_VERSION, [_event(2)])
        async with store.subscribe_to_stream("s", "p") as sub:
            batch = await sub.__anext__()
            assert [e.event_number for e in batch.events] == [2]


async def test_a_persistent_subscription_outside_the_store_raises_closed_and_keeps_acks(
    initialized: EventStoreConfig,
) -> None:
    """A consumer task outside the store's block: when the store closes, its iteration
    raises `EventStoreClosedError` (as a transient subscription's does), and the
    acknowledgements below the checkpoint threshold are persisted by the store's close
    (its block's exit raises nothing: nothing was lost)."""
    outcome: list[BaseException] = []
    acked: list[int] = []
    all_acked = trio.Event()

    async def consume(store: EventStore, task_status: Any) -> None:
        async with store.subscribe_to_stream("s", "p", checkpoint_threshold=100) as sub:
            await sub.wait_subscribed()
            task_status.started()
            try:
                async for batch in sub:
                    acked.extend(e.event_number for e in batch.events)
                    sub.ack(batch)
                    if len(acked) == 3:
                        all_acked.set()
            except Exception as exc:
                outcome.append(exc)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, open_event_store(initialized) as store:
            await store.append_to_stream("s", ANY_VERSION, [_event(n) for n in range(3)])
            await nursery.start(consume, store)
            await all_acked.wait()
        assert acked == [1, 2, 3]
        assert len(outcome) == 1
        assert isinstance(outcome[0], es.EventStoreClosedError)
        # The acknowledgements were persisted: a fresh subscriber gets only what follows.
        async with open_event_store(initialized) as store:
            await store.append_to_stream("s", ANY_VERSION, [_event(3)])
            async with store.subscribe_to_stream("s", "p") as sub:
                batch = await sub.__anext__()
                assert [e.event_number for e in batch.events] == [4]
