"""Opening a store: startup failures come out of the `async with` as one typed error."""

from __future__ import annotations

import functools
import urllib.parse

import pytest
import trio

import trio_eventstore as es
from trio_eventstore import EventStoreConfig, admin, open_event_store
from trio_eventstore._tempcluster import free_port

from .helpers import url_for

# A guard against hangs, far above any configured timeout; never a speed assertion.
HANG_GUARD = 60


async def test_stopped_server_raises_storage_unavailable() -> None:
    config = EventStoreConfig(url=f"postgresql://postgres:pw@127.0.0.1:{free_port()}/x", timeout=2)
    with trio.fail_after(HANG_GUARD), pytest.raises(es.StorageUnavailableError) as info:
        async with open_event_store(config):
            pytest.fail("opened a store on a stopped server")
    assert isinstance(info.value, trio.BrokenResourceError)
    assert "pw" not in str(info.value).replace("postgres", "")


async def test_silent_server_times_out_with_configured_timeout() -> None:
    """A server that accepts TCP but never answers: the connect timeout applies."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    port = listener.getsockname()[1]
    config = EventStoreConfig(url=f"postgresql://postgres@127.0.0.1:{port}/x", timeout=0.5)
    with trio.fail_after(HANG_GUARD), pytest.raises(es.StorageUnavailableError):
        async with open_event_store(config):
            pytest.fail("opened a store on a silent server")
    listener.close()


async def test_wrong_password_raises_authentication_error(server_url: str) -> None:
    parts = urllib.parse.urlsplit(server_url)
    if parts.password is None:
        pytest.skip("TRIO_EVENTSTORE_TEST_URL has no password to get wrong")
    wrong = "not-the-password-xyz"
    netloc = f"{parts.username}:{wrong}@{parts.hostname}:{parts.port}"
    config = EventStoreConfig(url=urllib.parse.urlunsplit(parts._replace(netloc=netloc)))
    with trio.fail_after(HANG_GUARD), pytest.raises(es.AuthenticationError) as info:
        async with open_event_store(config):
            pytest.fail("opened a store with a wrong password")
    assert isinstance(info.value, es.StorageUnavailableError)
    assert wrong not in str(info.value)
    assert wrong not in repr(info.value)


async def test_uninitialised_schema(config: EventStoreConfig) -> None:
    await admin.create(config)
    try:
        with trio.fail_after(HANG_GUARD), pytest.raises(es.SchemaNotInitializedError, match="init"):
            async with open_event_store(config):
                pytest.fail("opened an uninitialised schema")
    finally:
        await admin.drop(config)


async def test_missing_database(test_database: str) -> None:
    config = EventStoreConfig(url=url_for(test_database, "no_such_database_here"))
    with trio.fail_after(HANG_GUARD), pytest.raises(es.EventStoreError, match="does not exist"):
        async with open_event_store(config):
            pytest.fail("opened a missing database")


async def test_wrong_column_data_type(initialized: EventStoreConfig) -> None:
    jsonb = initialized.with_changes(column_data_type="jsonb")
    with pytest.raises(es.SchemaMismatchError, match="bytea"):
        async with open_event_store(jsonb):
            pytest.fail("opened a bytea store as jsonb")


async def test_newer_schema_version_refused(initialized: EventStoreConfig) -> None:
    from trio_eventstore._pg import open_connection
    from trio_eventstore._sql import quote_ident

    async with open_connection(initialized) as conn:
        await conn.execute(
            f"INSERT INTO {quote_ident(initialized.schema)}.schema_migrations "
            "(major_version, minor_version, patch_version) VALUES (9, 0, 0)"
        )
    with pytest.raises(es.SchemaMismatchError, match=r"9\.0\.0"):
        async with open_event_store(initialized):
            pytest.fail("opened a schema newer than the library")
    with pytest.raises(es.SchemaMismatchError, match="newer"):
        await admin.migrate(initialized)


async def test_user_errors_pass_through_unwrapped(initialized: EventStoreConfig) -> None:
    with pytest.raises(KeyError):
        async with open_event_store(initialized):
            raise KeyError("mine")


async def test_init_callable_applied(initialized: EventStoreConfig) -> None:
    seen: list[EventStoreConfig] = []

    def init(config: EventStoreConfig) -> EventStoreConfig:
        seen.append(config)
        return config.with_changes(pool_size=2)

    async with open_event_store(initialized.with_changes(init=init)) as store:
        assert store.config.pool_size == 2
        assert store.statistics().pool_size == 2
    assert len(seen) == 1


async def test_init_callable_must_return_config(initialized: EventStoreConfig) -> None:
    bad = initialized.with_changes(init=lambda config: None)
    with pytest.raises(TypeError, match="init"):
        async with open_event_store(bad):
            pass


async def test_config_type_checked() -> None:
    with pytest.raises(TypeError, match="EventStoreConfig"):
        async with open_event_store("postgresql://x/y"):  # type: ignore[arg-type]
            pass


async def test_shared_connection_pool(initialized: EventStoreConfig) -> None:
    shared = initialized.with_changes(shared_connection_pool="bank", pool_size=3)
    async with open_event_store(shared) as first:
        async with open_event_store(shared) as second:
            assert first._db._pool is second._db._pool
            await second.stream_info("$all")
        # The first store still works after the second closed.
        await first.stream_info("$all")
    async with open_event_store(shared):
        for other in (
            shared.with_changes(pool_size=4),
            shared.with_changes(queue_target=shared.queue_target * 2),
            shared.with_changes(queue_interval=shared.queue_interval * 2),
        ):
            with pytest.raises(ValueError, match="shared_connection_pool"):
                async with open_event_store(other):
                    pass


async def test_shared_pool_outlives_its_opener(initialized: EventStoreConfig) -> None:
    """The store that opened a shared pool waits for the others before closing it."""
    shared = initialized.with_changes(shared_connection_pool="p")
    second_open = trio.Event()
    first_closed = trio.Event()
    order: list[str] = []

    async def second() -> None:
        async with open_event_store(shared) as store:
            second_open.set()
            await trio.sleep(0.2)
            await store.stream_info("$all")
            order.append("second used the pool")

    async with trio.open_nursery() as nursery:
        async with open_event_store(shared):
            nursery.start_soon(second)
            await second_open.wait()
        first_closed.set()
        order.append("first closed")
    assert order == ["second used the pool", "first closed"]


async def test_a_url_of_several_hosts_with_ports_reaches_the_one_that_answers(
    initialized: EventStoreConfig,
) -> None:
    """``host1:port1,host2:port2``, as the driver takes it (tried in turn): the first
    address has no server, the second is ours. Appends (the store's own protocol path)
    and reads (the driver's) both get there."""
    assert initialized.url is not None
    parts = urllib.parse.urlsplit(initialized.url)
    userinfo, _, address = parts.netloc.rpartition("@")
    several = parts._replace(netloc=f"{userinfo}@127.0.0.1:{free_port()},{address}")
    config = initialized.with_changes(url=urllib.parse.urlunsplit(several))
    async with open_event_store(config) as store:
        await store.append_to_stream("s", es.NO_STREAM, [es.EventData({"a": 1}, event_type="T")])
        [event] = await store.read_stream_forward("s")
        assert event.data == {"a": 1}


async def test_another_service_on_the_port_is_not_called_a_tls_refusal() -> None:
    """A server that is not PostgreSQL (here it greets as SSH does) answers the TLS
    request with bytes no PostgreSQL server sends: under the default ssl_mode (prefer),
    which requires no TLS, that is not a TLS problem, and the message says to check
    the host and port."""

    async def greet(stream: trio.SocketStream) -> None:
        await stream.send_all(b"SSH-2.0-OpenSSH_9.2\r\n")
        await trio.sleep(HANG_GUARD)

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(
            functools.partial(trio.serve_tcp, greet, 0, host="127.0.0.1")
        )
        port = listener.socket.getsockname()[1]
        url = f"postgresql://postgres:pw@127.0.0.1:{port}/x"
        with trio.fail_after(HANG_GUARD), pytest.raises(es.StorageUnavailableError) as info:
            async with open_event_store(EventStoreConfig(url=url, timeout=5)):
                pytest.fail("opened a store on another service")
        assert not isinstance(info.value, es.TLSError)
        assert "is this PostgreSQL's host and port?" in str(info.value)
        required = EventStoreConfig(url=url, timeout=5, ssl_mode="require")
        with trio.fail_after(HANG_GUARD), pytest.raises(es.TLSError) as tls:
            async with open_event_store(required):
                pytest.fail("opened a store on another service")
        assert "check the host and port" in str(tls.value)
        nursery.cancel_scope.cancel()
