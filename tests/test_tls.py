"""TLS against a TLS-only cluster: ``verify-full`` with the right CA works on every
connection (pool, LISTEN, locks, admin tasks, ``session_mode_url``), the URL way and the
``ssl_*`` fields way; a wrong CA, a missing file and a server without TLS are refused with
`TLSError`; client certificates authenticate; pg_hba.conf refusals say what they are."""

from __future__ import annotations

import gc
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio

import trio_eventstore as es
from trio_eventstore import ANY_VERSION, EventData, EventStoreConfig, admin, open_event_store
from trio_eventstore._pg import open_connection
from trio_eventstore._tempcluster import temp_cluster

from .helpers import url_for
from .tls import Certificates, make_certificates

HANG_GUARD = 60  # seconds: a guard against hangs, never a speed assertion
CLIENT = "tls_client"  # authenticates with its certificate only

HBA = [
    "local all all trust",
    "hostnossl refused all 127.0.0.1/32 reject",  # a database no plain connection may use
    f"hostssl all {CLIENT} 127.0.0.1/32 cert",
    "hostssl all all 127.0.0.1/32 scram-sha-256",
    # no other hostnossl line: any other connection without TLS has no entry
]


@attrs.frozen
class TLSServer:
    url: str  # the superuser, password only: no TLS parameters
    certs: Certificates

    def tls_query(self, *, ca: Path | None = None, client: bool = False) -> dict[str, str]:
        query = {"sslmode": "verify-full", "sslrootcert": str(ca or self.certs.ca)}
        if client:
            query |= {"sslcert": str(self.certs.client_cert), "sslkey": str(self.certs.client_key)}
        return query


@pytest.fixture(scope="module")
def tls_server() -> Iterator[TLSServer]:
    with tempfile.TemporaryDirectory(prefix="trio-eventstore-certs-") as folder:
        certs = make_certificates(Path(folder), CLIENT)
        settings = {
            "ssl": "on",
            "ssl_cert_file": "server.crt",
            "ssl_key_file": "server.key",
            "ssl_ca_file": "ca.crt",
        }
        with temp_cluster(settings=settings, hba=HBA, files=certs.server_files()) as cluster:
            server = TLSServer(cluster.url(), certs)
            # The superuser connects with TLS (prefer, the default) and its password.
            trio.run(_execute, server.url, f"CREATE ROLE {CLIENT} LOGIN CREATEDB")
            yield server


async def _execute(url: str, sql: str) -> None:
    async with open_connection(EventStoreConfig(url=url)) as conn:
        await conn.execute(sql)


def _with_query(url: str, query: dict[str, str]) -> str:
    return urllib.parse.urlunsplit(
        urllib.parse.urlsplit(url)._replace(query=urllib.parse.urlencode(query))
    )


def client_config(server: TLSServer, way: str, database: str) -> EventStoreConfig:
    """``tls_client`` with its certificate, ``verify-full``: in the URLs or in the fields.
    ``session_mode_url`` (LISTEN, locks) is the same server: only its TLS settings tell
    whether they reach those connections too."""
    netloc = urllib.parse.urlsplit(server.url).netloc.rsplit("@", 1)[1]
    plain = f"postgresql://{CLIENT}@{netloc}/{database}"
    common = {"schema": "tls", "notification_poll_interval": 60.0, "timeout": 10.0}
    if way == "url":
        url = _with_query(plain, server.tls_query(client=True))
        return EventStoreConfig(url=url, session_mode_url=url, **common)  # type: ignore[arg-type]
    certs = server.certs
    return EventStoreConfig(
        url=plain,
        session_mode_url=plain,
        ssl_mode="verify-full",
        ssl_root_cert=certs.ca,  # a Path, or a str
        ssl_cert=str(certs.client_cert),
        ssl_key=str(certs.client_key),
        **common,  # type: ignore[arg-type]
    )


async def ssl_connections(server: TLSServer, database: str) -> list[tuple[str, bool, str]]:
    """(application_name, ssl, client certificate's subject) of the store's connections."""
    async with open_connection(
        EventStoreConfig(url=_with_query(url_for(server.url, database), server.tls_query()))
    ) as conn:
        rows = await conn.fetch(
            "SELECT a.application_name, s.ssl, coalesce(s.client_dn, '') AS dn"
            " FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
            " WHERE a.application_name LIKE 'trio-eventstore %' AND a.usename = $1",
            CLIENT,
        )
    return sorted((r["application_name"], r["ssl"], r["dn"]) for r in rows)


@pytest.mark.parametrize("way", ["url", "fields"])
async def test_verify_full_with_a_client_certificate_on_every_connection(
    tls_server: TLSServer, way: str
) -> None:
    database = f"tls_{way}"
    config = client_config(tls_server, way, database)
    with trio.fail_after(HANG_GUARD):
        await admin.create(config)  # the maintenance database, then the store's
        await admin.init(config)
        async with (
            open_event_store(config) as store,
            open_event_store(config) as other,
            store.subscribe_to_stream("s", "projection") as sub,  # its lock
        ):
            await sub.wait_subscribed()
            # Appended by another store: only a notification (LISTEN) wakes `store`.
            await other.append_to_stream("s", ANY_VERSION, [EventData({"n": 1}, event_type="E")])
            async for batch in sub:
                assert [e.data for e in batch.events] == [{"n": 1}]
                sub.ack(batch)
                break
            connections = await ssl_connections(tls_server, database)
        await admin.drop(config.with_changes(schema="public"))
    kinds = {name.split()[1] for name, _, _ in connections}
    assert {"pool", "listener", "locks"} <= kinds, connections
    assert all(tls and dn == f"/CN={CLIENT}" for _, tls, dn in connections), connections


@pytest.mark.parametrize("way", ["url", "fields"])
async def test_a_wrong_ca_is_refused(tls_server: TLSServer, way: str) -> None:
    if way == "url":
        config = EventStoreConfig(
            url=_with_query(tls_server.url, tls_server.tls_query(ca=tls_server.certs.wrong_ca))
        )
    else:
        config = EventStoreConfig(
            url=tls_server.url, ssl_mode="verify-full", ssl_root_cert=tls_server.certs.wrong_ca
        )
    with trio.fail_after(HANG_GUARD), pytest.raises(es.TLSError, match="certificate") as info:
        async with open_event_store(config):
            pytest.fail("opened a store whose server the CA did not sign")
    assert not isinstance(info.value, es.StorageUnavailableError)  # retrying cannot help
    with pytest.raises(es.TLSError):
        await admin.create(config)  # the maintenance connection too
    password = urllib.parse.urlsplit(tls_server.url).password
    assert password
    assert password not in str(info.value)


async def test_a_certificate_file_that_cannot_be_read_is_named(tls_server: TLSServer) -> None:
    config = EventStoreConfig(
        url=tls_server.url, ssl_mode="verify-full", ssl_root_cert="/no/such/ca.crt"
    )
    with pytest.raises(es.TLSError, match=r"ssl_root_cert \(sslrootcert\) '/no/such/ca.crt'"):
        async with open_event_store(config):
            pytest.fail("opened a store without its CA file")


async def test_the_client_certificate_is_what_authenticates(tls_server: TLSServer) -> None:
    config = client_config(tls_server, "fields", "postgres").with_changes(
        ssl_cert=None, ssl_key=None
    )
    with pytest.raises(es.AuthenticationError, match="certificate") as info:
        await admin.create(config)
    assert not isinstance(info.value, es.AccessRejectedError)


# asyncpg can leave the socket of a connection the server refused during startup for the
# garbage collector (an "unclosed transport" ResourceWarning): collected here, inside the
# test that caused it, rather than in whichever test runs when the collector next runs.
_REFUSED_STARTUP = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def _collect_refused_sockets() -> None:
    gc.collect()


@_REFUSED_STARTUP[0]
@_REFUSED_STARTUP[1]
async def test_a_pg_hba_reject_line_is_reported_as_such(tls_server: TLSServer) -> None:
    password = urllib.parse.urlsplit(tls_server.url).password
    assert password
    config = EventStoreConfig(url=url_for(tls_server.url, "refused"), ssl_mode="disable")
    with trio.fail_after(HANG_GUARD), pytest.raises(es.AccessRejectedError) as info:
        async with open_event_store(config):
            pytest.fail("opened a store that pg_hba.conf rejects")
    error = info.value
    assert isinstance(error, es.AuthenticationError)
    assert (error.host, error.user, error.database) == ("127.0.0.1", "postgres", "refused")
    assert error.encryption == "no encryption"
    assert "pg_hba.conf" in str(error)
    assert "password" not in str(error).replace("before checking any password", "")
    assert password not in str(error) + repr(error)
    _collect_refused_sockets()


@_REFUSED_STARTUP[0]
@_REFUSED_STARTUP[1]
async def test_no_pg_hba_entry_is_reported_as_such(tls_server: TLSServer) -> None:
    config = EventStoreConfig(url=url_for(tls_server.url, "postgres"), ssl_mode="disable")
    with pytest.raises(es.AccessRejectedError, match=r"no pg_hba\.conf entry") as info:
        await admin.create(config)
    assert (info.value.user, info.value.encryption) == ("postgres", "no encryption")
    # With TLS the same role and database are admitted.
    assert (await admin.create(config.with_changes(ssl_mode="require"))).task == "create"
    _collect_refused_sockets()


async def test_tls_required_from_a_server_without_it(server_url: str) -> None:
    config = EventStoreConfig(url=server_url, ssl_mode="require")
    with pytest.raises(es.TLSError, match="does not accept TLS"):
        async with open_event_store(config):
            pytest.fail("opened a store without TLS under ssl_mode=require")


def _event(n: int) -> EventData:
    return EventData({"n": n}, event_type="E")


async def test_a_tls_connection_the_server_ended_while_idle_is_not_used(
    tls_server: TLSServer,
) -> None:
    """The server ends an idle TLS connection of the direct protocol (`_wire`): the next
    append takes another connection instead of failing on it (as without TLS)."""
    database = "tls_idle"
    config = client_config(tls_server, "fields", database)
    with trio.fail_after(HANG_GUARD):
        await admin.create(config)
        await admin.init(config)
        try:
            async with open_event_store(config) as store:
                await store.append_to_stream("s", ANY_VERSION, [_event(1)])
                pool = store._db._pool
                assert len(pool._idle_wire) == 1
                idle = pool._idle_wire[0]
                assert isinstance(idle._stream, trio.SSLStream)  # TLS, straight from Trio
                assert idle.idle_and_open()
                await _execute(
                    url_for(tls_server.url, database),
                    f"SELECT pg_terminate_backend({idle.backend_pid})",
                )
                await trio.sleep(0.2)  # its FATAL message and its end reach the socket
                await store.append_to_stream("s", ANY_VERSION, [_event(2)])
                assert idle.closed
                assert [e.data for e in await store.read_stream_forward("s")] == [
                    {"n": 1},
                    {"n": 2},
                ]
        finally:
            await admin.drop(config.with_changes(schema="public"))
