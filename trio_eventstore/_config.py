"""`EventStoreConfig`: connection and behaviour settings, validated at construction."""

from __future__ import annotations

import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs

from ._serialization import JsonSerializer, Serializer, load_serializer
from ._types import check_text
from ._urls import (
    SSL_MODES,
    TLS_PARAMS,
    check_url,
    optional_path,
    secret_values,
    url_repr,
    with_tls_params,
)

__all__ = [
    "MAX_SCHEMA_BYTES",
    "EventStoreConfig",
    "SessionKeepalive",
    "session_keepalive",
]

#: Postgres truncates identifiers at 63 bytes, and the NOTIFY channel is
#: "<schema>.events", which must fit too.
MAX_SCHEMA_BYTES = 63 - len(".events")

ColumnDataType = Literal["bytea", "jsonb"]


def _positive_duration(name: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number of seconds, got {type(value).__name__}")
    seconds = float(value)
    if (
        math.isnan(seconds)
        or math.isinf(seconds)
        or seconds < 0
        or (seconds == 0 and not allow_zero)
    ):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: must be a finite number of seconds {bound}, got {value!r}")
    return seconds


_DURATIONS = (
    "notification_poll_interval",
    "queue_target",
    "queue_interval",
    "timeout",
    "subscription_retry_interval",
    "subscription_standby_interval",
    "subscription_lease_timeout",
)


@attrs.frozen(kw_only=True)
class EventStoreConfig:
    """Where the store lives and how it behaves. Durations are in seconds.

    Ports the Elixir EventStore configuration (`config :my_app, MyApp.EventStore, ...`).

    Args:
        url: ``postgresql://user:password@host:port/database``; explicit ``host``,
            ``port``, ``username``, ``password`` and ``database`` override its parts.
        schema: the Postgres schema holding the store's tables (default ``public``).
        column_data_type: ``"bytea"`` or ``"jsonb"`` for event data and metadata;
            fixed when the schema is initialised.
        serializer: how event data is encoded (default: a new `JsonSerializer`).
        pool_size: connections in the pool.
        queue_target, queue_interval: admission control when the pool is busy, as in
            DBConnection: a caller waits for a connection; if during a whole
            ``queue_interval`` no caller got one within ``queue_target``, the pool is
            overloaded and callers then wait at most ``2 * queue_target`` before
            `StorageUnavailableError`, until a caller is served within ``queue_target``
            again. Otherwise a caller waits up to ``timeout`` for a connection.
        timeout: the default timeout of each query (a unit of several statements gets
            this much per statement), and of connecting.
        shared_connection_pool: stores opened with the same name share one pool.
        subscription_retry_interval: the longest a subscription waits before it tries
            again after a database error (retries back off from 0.1 s up to this, and
            come at once when the store's lock connection reconnects).
        subscription_standby_interval: how often subscriptions whose lock another node
            holds try it again: all of a store's standbys in one query. It is also how
            often the lock connection of a store holding subscriptions is checked.
        subscription_lease_timeout: how long the lock connection may stay silent: when
            it does not answer a query in this time, the store drops it and its
            subscriptions stop delivering at once (so a holder cut off from the database
            stops within ``subscription_standby_interval + subscription_lease_timeout``).
            The server is told (TCP keepalives) to drop a silent lock or LISTEN session,
            releasing its locks, only after ``subscription_lease_timeout`` more.
        subscription_hibernate_after: idle time after which a subscription drops its
            buffers (0 disables hibernation).
        balance_subscriptions: spread subscriptions over the stores that run the same
            set: each holds about its fair share (``ceil(subscriptions / stores)``) and
            hands the surplus over (after flushing its checkpoint) when another store
            joins. ``False`` (default): whoever takes a lock first keeps it; the others
            stand by.
        session_mode_url: a URL for connections that need session semantics (LISTEN,
            advisory locks), when ``url`` points at PgBouncer in transaction mode.
        enable_hard_deletes: allow ``delete_stream(..., hard=True)``.
        notification_poll_interval: how often subscriptions re-read stream positions
            even without a notification (a safety net; set it low where LISTEN cannot
            work, e.g. PgBouncer in transaction mode without ``session_mode_url``).
        statement_cache_size: prepared statements cached per connection; 0 behind
            PgBouncer in transaction mode (before PgBouncer 1.21).
        group_commit: appends from concurrent callers are written together, by one
            writer task, in one statement and one commit each round (each caller still
            gets its own outcome); a lone append goes out at once. ``False``: each
            append runs on its own pooled connection.
        replica_appends: the group-commit writer appends on connections of its own
            (at most 4, beside the pool) that run with PostgreSQL's
            ``session_replication_role = replica``, so that the per-row foreign-key
            checks, which the store's own row locks make redundant for appends, are
            skipped (the store sends the notifications the skipped trigger would
            send). Needs the privilege to set it (a superuser, or ``GRANT SET ON
            PARAMETER session_replication_role``, PostgreSQL 15 or later) and
            ``group_commit``; the store refuses to open if the schema's tables carry
            triggers, foreign keys, rules or deferrable constraints of their own.
        init: called with this config when the store opens; returns the config to use
            (the Elixir ``init/1`` callback).
        ssl_mode: libpq's ``sslmode``: ``"disable"``, ``"allow"``, ``"prefer"``,
            ``"require"``, ``"verify-ca"`` or ``"verify-full"`` (check the server's
            certificate and that it names the host).
        ssl_root_cert: the CA certificate(s) that the server's certificate must chain to
            (libpq's ``sslrootcert``).
        ssl_cert, ssl_key: the client certificate and its private key, for servers that
            authenticate clients by certificate (libpq's ``sslcert``, ``sslkey``).

    The ``ssl_*`` fields apply to every connection (pool, LISTEN, locks, admin tasks,
    ``session_mode_url``) and override the same parameters given in the URLs' query
    (``?sslmode=verify-full&sslrootcert=...``), which work too. File names are read when
    connecting.
    """

    url: str | None = attrs.field(default=None, repr=url_repr)
    host: str | None = None
    port: int | None = None
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    database: str | None = None
    schema: str = "public"
    column_data_type: ColumnDataType = "bytea"
    serializer: Serializer = attrs.field(factory=JsonSerializer)
    pool_size: int = 10
    queue_target: float = 0.05
    queue_interval: float = 1.0
    timeout: float = 15.0
    shared_connection_pool: str | None = None
    subscription_retry_interval: float = 60.0
    subscription_standby_interval: float = 1.0
    subscription_lease_timeout: float = 5.0
    subscription_hibernate_after: float = 15.0
    balance_subscriptions: bool = False
    session_mode_url: str | None = attrs.field(default=None, repr=url_repr)
    enable_hard_deletes: bool = False
    notification_poll_interval: float = 5.0
    statement_cache_size: int = 100
    group_commit: bool = True
    replica_appends: bool = False
    init: Callable[[EventStoreConfig], EventStoreConfig] | None = attrs.field(
        default=None, repr=False
    )
    ssl_mode: str | None = None
    ssl_root_cert: str | None = attrs.field(default=None, converter=optional_path)
    ssl_cert: str | None = attrs.field(default=None, converter=optional_path)
    ssl_key: str | None = attrs.field(default=None, converter=optional_path)

    def __attrs_post_init__(self) -> None:
        check_url("url", self.url)
        check_url("session_mode_url", self.session_mode_url)
        for name in ("host", "username", "password", "database", "shared_connection_pool"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name}: expected a str, got {type(value).__name__}")
        for name, default in (("host", "the url's, or localhost"), ("username", "the url's")):
            if getattr(self, name) == "":  # an unset environment variable, most likely
                raise ValueError(f"{name}: must not be empty (None for {default})")
        if self.port is not None:
            if isinstance(self.port, bool) or not isinstance(self.port, int):
                raise TypeError(f"port: expected an int, got {type(self.port).__name__}")
            if not 0 < self.port < 65536:
                raise ValueError(f"port: must be between 1 and 65535, got {self.port}")
        if self.url is None and not self.database:
            raise ValueError("database: required when no url is given")
        if self.url is not None and not (
            self.database or urllib.parse.urlsplit(self.url).path.strip("/")
        ):
            raise ValueError("url: names no database (expected postgresql://host/DATABASE)")
        if not isinstance(self.schema, str):
            raise TypeError(f"schema: expected a str, got {type(self.schema).__name__}")
        if not self.schema or "\x00" in self.schema:
            raise ValueError("schema: must be a non-empty name without NUL characters")
        check_text("schema", self.schema)
        if len(self.schema.encode()) > MAX_SCHEMA_BYTES:
            raise ValueError(
                f"schema: at most {MAX_SCHEMA_BYTES} bytes, so that the notification channel "
                f"'<schema>.events' fits Postgres's 63-byte limit; got {len(self.schema.encode())}"
            )
        if self.column_data_type not in ("bytea", "jsonb"):
            raise ValueError(
                f"column_data_type: must be 'bytea' or 'jsonb', got {self.column_data_type!r}"
            )
        if isinstance(self.pool_size, bool) or not isinstance(self.pool_size, int):
            raise TypeError(f"pool_size: expected an int, got {type(self.pool_size).__name__}")
        if self.pool_size < 1:
            raise ValueError(f"pool_size: must be >= 1, got {self.pool_size}")
        if isinstance(self.statement_cache_size, bool) or not isinstance(
            self.statement_cache_size, int
        ):
            raise TypeError("statement_cache_size: expected an int")
        if self.statement_cache_size < 0:
            raise ValueError("statement_cache_size: must be >= 0")
        for name in _DURATIONS:
            object.__setattr__(self, name, _positive_duration(name, getattr(self, name)))
        object.__setattr__(
            self,
            "subscription_hibernate_after",
            _positive_duration(
                "subscription_hibernate_after", self.subscription_hibernate_after, allow_zero=True
            ),
        )
        if not isinstance(self.serializer, Serializer):
            raise TypeError(
                "serializer: expected a Serializer (event_type_of, serialize, deserialize, "
                f"serialize_metadata, deserialize_metadata), got {type(self.serializer).__name__}"
            )
        for flag in _BOOL_FIELDS:
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag}: expected a bool")
        if self.replica_appends and not self.group_commit:
            raise ValueError(
                "replica_appends: needs group_commit=True (the connections that skip the "
                "checks are the group-commit writer's): drop group_commit=False, or set "
                "replica_appends=False"
            )
        if self.replica_appends and self.session_mode_url is not None:
            raise ValueError(
                "replica_appends: not behind PgBouncer in transaction mode "
                "(session_mode_url is set): its connections need a session setting"
            )
        if self.init is not None and not callable(self.init):
            raise TypeError("init: expected a callable taking and returning an EventStoreConfig")
        for name in TLS_PARAMS:
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise TypeError(f"{name}: expected a str, got {type(value).__name__}")
            if not value or "\x00" in value:
                raise ValueError(f"{name}: must be a non-empty name without NUL characters")
        if self.ssl_mode is not None and self.ssl_mode not in SSL_MODES:
            raise ValueError(
                f"ssl_mode: must be one of {', '.join(SSL_MODES)}; got {self.ssl_mode!r}"
            )

    # -- derived values --------------------------------------------------------------

    @property
    def database_name(self) -> str:
        """The database the store lives in."""
        if self.database:
            return self.database
        assert self.url is not None  # checked in __attrs_post_init__
        return urllib.parse.unquote(urllib.parse.urlsplit(self.url).path.strip("/"))

    @property
    def effective_username(self) -> str | None:
        """The role the store connects as (``username``, else the URL's user), when named."""
        if self.username:
            return self.username
        if self.url is not None:
            user = urllib.parse.urlsplit(self.url).username
            return urllib.parse.unquote(user) if user else None
        return None

    def connect_params(
        self, *, database: str | None = None, session_mode: bool = False
    ) -> dict[str, Any]:
        """Keyword arguments for the driver's connect (internal; holds the password)."""
        url = self.session_mode_url if session_mode and self.session_mode_url else self.url
        url = with_tls_params(
            url,
            {
                theirs: getattr(self, ours)
                for ours, theirs in TLS_PARAMS.items()
                if getattr(self, ours)
            },
        )
        params: dict[str, Any] = {}
        if url is not None:
            params["dsn"] = url
        for ours, theirs in (
            ("host", "host"),
            ("port", "port"),
            ("username", "user"),
            ("password", "password"),
        ):
            value = getattr(self, ours)
            if value is not None:
                params[theirs] = value
        if url is None:
            params.setdefault("host", "localhost")
            params.setdefault("port", 5432)
        params["database"] = database if database is not None else self.database_name
        return params

    def redact(self, text: str) -> str:
        """`text` with every password this config knows replaced by ``***``."""
        for secret in self._secrets():
            text = text.replace(secret, "***")
        return text

    def _secrets(self) -> list[str]:
        found = [self.password] if self.password else []
        for url in (self.url, self.session_mode_url):
            if url:
                parts = urllib.parse.urlsplit(url)
                if parts.password:
                    found += [parts.password, urllib.parse.unquote(parts.password)]
                fragment = parts.fragment.replace("?", "&")  # a query after a stray "#"
                for value in secret_values(parts.query) + secret_values(fragment):
                    found += [value, urllib.parse.unquote_plus(value)]
        return sorted(set(found), key=len, reverse=True)

    def with_changes(self, **changes: Any) -> EventStoreConfig:
        """A copy with some fields changed (validated again)."""
        return attrs.evolve(self, **changes)

    # -- environment -----------------------------------------------------------------

    @classmethod
    def from_env(
        cls,
        prefix: str = "EVENTSTORE_",
        *,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> EventStoreConfig:
        """Build a config from environment variables named ``<prefix><FIELD>``.

        ``EVENTSTORE_URL``, ``EVENTSTORE_SCHEMA``, ``EVENTSTORE_POOL_SIZE``,
        ``EVENTSTORE_ENABLE_HARD_DELETES`` (true/false), ... ; keyword ``overrides`` win.
        ``EVENTSTORE_SERIALIZER=package.module:name`` imports the serializer (see
        `load_serializer`); ``init`` cannot come from the environment. An empty
        ``EVENTSTORE_HOST`` or ``EVENTSTORE_USERNAME`` counts as unset.
        Raises ValueError naming the variable when a value cannot be parsed.
        """
        env = os.environ if environ is None else environ
        kwargs: dict[str, Any] = {}
        for field in attrs.fields(cls):
            if field.name in ("serializer", "init"):
                continue
            var = prefix + field.name.upper()
            if var not in env:
                continue
            raw = env[var]
            if raw == "" and field.name in ("host", "username"):
                continue  # set but empty (``HOST=${HOST}`` with HOST unset): as if unset
            try:
                kwargs[field.name] = _parse_env_value(field.name, raw)
            except ValueError as exc:
                raise ValueError(f"{var}: {exc}") from None
        var = prefix + "SERIALIZER"
        if var in env and "serializer" not in overrides:
            try:
                kwargs["serializer"] = load_serializer(env[var])
            except ValueError as exc:
                raise ValueError(f"{var}: {exc}") from None
        kwargs.update(overrides)
        return cls(**kwargs)


@attrs.frozen
class SessionKeepalive:
    """TCP keepalive settings of the lock and LISTEN sessions (both ends)."""

    idle: int  # seconds of silence before the first probe
    interval: int  # seconds between probes
    count: int  # unanswered probes before the session is dropped
    user_timeout_ms: int  # sent data unacknowledged this long drops the session too


def session_keepalive(config: EventStoreConfig) -> SessionKeepalive:
    """The keepalive settings derived from the lease settings.

    A holder stops delivering at most ``standby_interval + lease_timeout`` after its lock
    connection last got an answer (its next check is sent within ``standby_interval``
    and waits ``lease_timeout``); a server drops a silent session after ``idle + count *
    interval`` seconds, ``lease_timeout`` later at the earliest, so that a standby can
    never take a lock while the cut-off holder still delivers.
    """
    idle = math.ceil(config.subscription_standby_interval + config.subscription_lease_timeout)
    count = max(1, math.ceil(config.subscription_lease_timeout))
    return SessionKeepalive(
        idle=idle, interval=1, count=count, user_timeout_ms=(idle + count) * 1000
    )


_INT_FIELDS = {"port", "pool_size", "statement_cache_size"}
_FLOAT_FIELDS = set(_DURATIONS) | {"subscription_hibernate_after"}
_BOOL_FIELDS = ("enable_hard_deletes", "group_commit", "balance_subscriptions", "replica_appends")


def _parse_env_value(name: str, raw: str) -> object:
    if name in _INT_FIELDS:
        if not re.fullmatch(r"\s*\d+\s*", raw):
            raise ValueError(f"expected a whole number, got {raw!r}")
        return int(raw)
    if name in _FLOAT_FIELDS:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"expected a number of seconds, got {raw!r}") from None
    if name in _BOOL_FIELDS:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected true or false, got {raw!r}")
    return raw
