"""Driver error translation: every asyncpg / OS error becomes an `EventStoreError`
here, once (`translate_error`), with passwords scrubbed from messages; `_translated`
is the one place on the asyncio side where it happens."""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import urllib.parse
from collections.abc import Awaitable
from typing import TypeVar

import asyncpg
import trio

from .._config import EventStoreConfig
from .._errors import (
    AccessRejectedError,
    AuthenticationError,
    DatabaseError,
    DatabaseNotFoundError,
    EventStoreError,
    InsufficientPrivilegeError,
    StorageUnavailableError,
    TLSError,
)

__all__ = ["translate_error"]

T = TypeVar("T")


_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57")  # connection, resources, operator intervention

#: The server's message for SQLSTATE 3D000 (a server that translates its messages
#: gets the configured database's name instead).
_MISSING_DATABASE = re.compile(r'database "(.*)" does not exist')

#: The server's messages for a connection that pg_hba.conf refuses (SQLSTATE 28000).
_PG_HBA = re.compile(
    r'(?:no pg_hba\.conf entry|pg_hba\.conf rejects connection) for host "(?P<host>[^"]*)", '
    r'user "(?P<user>[^"]*)", database "(?P<database>[^"]*)"(?:, (?P<enc>[^"]*encryption))?'
)


def _tls_required(config: EventStoreConfig) -> bool:
    """Whether the connection's ``sslmode`` (the config's, else the URL's, else
    ``PGSSLMODE``, else ``prefer``) refuses a server without TLS."""
    mode = config.ssl_mode
    if mode is None and config.url:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(config.url).query)
        mode = query.get("sslmode", [None])[-1]
    if mode is None:
        mode = os.environ.get("PGSSLMODE")
    return mode in ("require", "verify-ca", "verify-full")


def translate_error(exc: BaseException, config: EventStoreConfig | None = None) -> EventStoreError:
    """The `EventStoreError` for a driver or OS error (passwords scrubbed)."""
    if isinstance(exc, EventStoreError):
        return exc
    message = str(exc) or type(exc).__name__
    if config is not None:
        message = config.redact(message)
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        hba = _PG_HBA.search(str(exc))
        if hba is not None:
            host, user, database, encryption = hba.group("host", "user", "database", "enc")
            return AccessRejectedError(
                f"the server's pg_hba.conf refused this connection before checking any "
                f"password (host {host!r}, user {user!r}, database {database!r}, "
                f"{encryption}): no line admits this host, user, database and encryption, "
                f"or a reject line matches [{message}]",
                host=host,
                user=user,
                database=database,
                encryption=encryption,
            )
        if "pg_hba.conf" in message:
            return AccessRejectedError(
                f"the server's pg_hba.conf refused this connection: {message}"
            )
    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return AuthenticationError(f"authentication failed: {message}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TLSError(
            f"the server's certificate was not accepted ({exc.verify_message}): it must chain "
            "to ssl_root_cert (sslrootcert) and, under verify-full, name the host connected to"
        )
    if isinstance(exc, ssl.SSLError):
        if "PEM lib" in message:  # loading the client's key, before any handshake
            return TLSError(
                "the client certificate or key (ssl_cert, ssl_key) could not be loaded: a "
                "wrong or missing ssl_password (sslpassword) for an encrypted key, or a file "
                f"that is not PEM [{message}]"
            )
        return TLSError(f"the TLS handshake failed: {message}")
    if isinstance(exc, ConnectionError) and "rejected SSL upgrade" in str(exc):
        # asyncpg's words for a refusal ("N") where TLS is required, and for an answer
        # that no PostgreSQL server gives (another service on that port) in any mode.
        if config is not None and not _tls_required(config):
            return StorageUnavailableError(
                "the server did not answer as PostgreSQL does (is this PostgreSQL's host "
                f"and port?): {message}"
            )
        return TLSError(
            "the server does not accept TLS connections, which ssl_mode requires (or it is "
            f"not a PostgreSQL server: check the host and port): {message}"
        )
    if isinstance(exc, asyncpg.ClientConfigurationError) and (
        "ssl" in message.lower() or "certificate" in message.lower()
    ):
        return TLSError(message)
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None)
        if sqlstate == "42501":  # insufficient_privilege
            return InsufficientPrivilegeError(
                message,
                detail=getattr(exc, "detail", None),
                role=config.effective_username if config is not None else None,
            )
        if sqlstate is not None and sqlstate[:2] in _UNAVAILABLE_SQLSTATE_CLASSES:
            return StorageUnavailableError(f"database unavailable ({sqlstate}): {message}")
        if sqlstate == "3D000":  # invalid_catalog_name
            named = _MISSING_DATABASE.search(str(exc))
            if named is not None:
                return DatabaseNotFoundError(database=named.group(1))
            return DatabaseNotFoundError(database=config.database_name if config else None)
        return DatabaseError(
            message,
            sqlstate=sqlstate,
            constraint_name=getattr(exc, "constraint_name", None),
            detail=getattr(exc, "detail", None),
        )
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return StorageUnavailableError("the database did not answer in time")
    if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
        # Trio's socket and TLS streams: the OS's or the TLS layer's error is the cause
        # (a reset while connecting, during a server restart; an alert from a server
        # refusing the client certificate).
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError) or (
            isinstance(cause, ssl.SSLError) and "ALERT" in (cause.reason or "")
        ):
            return translate_error(cause, config)  # refused: retrying will not help
        if cause is not None and not isinstance(cause, ssl.SSLError):
            message = config.redact(str(cause)) if config is not None else str(cause)
        return StorageUnavailableError(f"database connection failed: {message}")
    if isinstance(
        exc, OSError | asyncpg.InterfaceError | asyncpg.InternalClientError | ConnectionError
    ):
        return StorageUnavailableError(f"database connection failed: {message}")
    return DatabaseError(f"{type(exc).__name__}: {message}")


def _is_driver_error(exc: BaseException) -> bool:
    return isinstance(
        exc,
        asyncpg.PostgresError
        | asyncpg.InterfaceError
        | asyncpg.InternalClientError
        | OSError
        | TimeoutError
        | asyncio.TimeoutError,
    )


async def _translated(aw: Awaitable[T], config: EventStoreConfig | None) -> T:
    """``await aw``, with driver and OS errors translated (the only place they are)."""
    try:
        return await aw
    except Exception as exc:
        if _is_driver_error(exc):
            raise translate_error(exc, config) from exc
        raise
