from __future__ import annotations

import pathlib
import urllib.parse

import pytest

from trio_eventstore import EventStoreConfig
from trio_eventstore._config import SessionKeepalive, session_keepalive

URL = "postgresql://alice:s3cr%40t@db.example:6543/bank"


def test_url_parts() -> None:
    config = EventStoreConfig(url=URL)
    assert config.database_name == "bank"
    params = config.connect_params()
    assert params["dsn"] == URL
    assert params["database"] == "bank"


def test_postgres_scheme_accepted() -> None:
    assert EventStoreConfig(url="postgres://localhost/x").database_name == "x"


def test_explicit_fields_override_url() -> None:
    config = EventStoreConfig(url=URL, database="other", password="pw", port=5433)
    params = config.connect_params()
    assert (params["database"], params["password"], params["port"]) == ("other", "pw", 5433)


def test_fields_without_url() -> None:
    config = EventStoreConfig(host="h", username="u", password="p", database="d")
    assert config.connect_params() == {
        "host": "h",
        "port": 5432,
        "user": "u",
        "password": "p",
        "database": "d",
    }


@pytest.mark.parametrize(
    "config",
    [
        EventStoreConfig(url=URL),
        EventStoreConfig(
            url="postgresql://u:plainpw@h/d", session_mode_url="postgres://u:sesspw@h/d"
        ),
        EventStoreConfig(database="d", password="fieldpw"),
        # The driver reads passwords from the query too.
        EventStoreConfig(url="postgresql://u@h/d?sslmode=require&password=querypw"),
        EventStoreConfig(url="postgresql://u@h/d?pass%77ord=querypw&sslpassword=keypw"),
    ],
)
def test_passwords_never_in_repr(config: EventStoreConfig) -> None:
    text = repr(config) + str(config)
    for secret in ("s3cr", "plainpw", "sesspw", "fieldpw", "querypw", "keypw"):
        assert secret not in text
    assert "***" in text or "password" not in text


def test_redact_scrubs_raw_and_quoted_password() -> None:
    config = EventStoreConfig(url=URL)
    assert config.redact("x s3cr@t y s3cr%40t") == "x *** y ***"


def test_redact_scrubs_passwords_given_in_the_query() -> None:
    config = EventStoreConfig(url="postgresql://u@h/d?password=q%2Bpw&sslpassword=k+pw")
    assert config.redact("q+pw q%2Bpw k pw k+pw") == "*** *** *** ***"
    assert repr(config).count("***") == 2


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw@h/d\x00",
        "postgresql://u:pw@h/d%00",
        "postgresql://u%00:pw@h/d",
        "postgresql://u:pw@h/d?application_name=a%00",
        "postgresql://u:pw\ud800@h/d",  # a lone surrogate: no UTF-8 for it
        "postgresql://u:pw@[bad/d",  # an unclosed IPv6 address
        "postgresql://u:pw@h]/d",
    ],
)
def test_urls_postgres_cannot_take_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="url: ") as refused:
        EventStoreConfig(url=url)
    assert "pw" not in str(refused.value)


def test_an_unencoded_at_sign_in_the_password_is_refused() -> None:
    # The driver would connect to host "cret@h" with password "s".
    with pytest.raises(ValueError, match="%40") as refused:
        EventStoreConfig(url="postgresql://u:s@cret@h/d")
    assert "cret" not in str(refused.value)
    assert EventStoreConfig(url="postgresql://u:s%40cret@h/d").connect_params()["dsn"]


@pytest.mark.parametrize(
    ("url", "fixed"),
    [
        ("postgresql://u:Kq#Wz@h:5432/d", "postgresql://u:Kq%23Wz@h:5432/d"),
        ("postgresql://u:Kq#Wz@h/d", "postgresql://u:Kq%23Wz@h/d"),
        # (the driver would connect to host "u", port 9071)
        ("postgresql://u:9071#Wz@h/d", "postgresql://u:9071%23Wz@h/d"),
        ("postgresql://u#Kq:Wz@h/d", "postgresql://u%23Kq:Wz@h/d"),
        ("postgresql://u:Kq?Wz@h:5432/d", "postgresql://u:Kq%3FWz@h:5432/d"),
        ("postgresql://u:Kq?Wz@h/d?sslmode=require", "postgresql://u:Kq%3FWz@h/d?sslmode=require"),
        ("postgresql://u:Kq?W=z@h:5432/d", "postgresql://u:Kq%3FW=z@h:5432/d"),
        ("postgresql://u:Kq/Wz@h/d", "postgresql://u:Kq%2FWz@h/d"),
        ("postgresql://u:Kq/Wz@h:5432/d", "postgresql://u:Kq%2FWz@h:5432/d"),
    ],
)
def test_an_unencoded_hash_question_mark_or_slash_in_the_password_is_refused(
    url: str, fixed: str
) -> None:
    # URL parsers end the address at "#" (a fragment), "?" (a query) or "/" (the path):
    # the password would be cut short and what follows it taken for a port ("not a
    # number").
    char, encoded = next(
        (c, e)
        for c, e in (("#", "%23"), ("?", "%3F"), ("/", "%2F"))
        if c in url.split("@")[0][len("postgresql://") :]
    )
    with pytest.raises(ValueError, match=f"'\\{char}'.*percent-encode.*{encoded}") as refused:
        EventStoreConfig(url=url)
    message = str(refused.value)
    assert "port" not in message
    assert message.count(encoded) == 1  # named once, not again among the others
    for secret in ("Kq", "Wz", "W=z", "9071"):
        assert secret not in message
    assert EventStoreConfig(url=fixed).connect_params()["dsn"] == fixed


def test_several_hosts_each_with_its_port() -> None:
    EventStoreConfig(url="postgresql://u:p@h1:5432,h2:5433/d")
    EventStoreConfig(url="postgresql://u:p@[::1]:5432,h2/d?target_session_attrs=read-write")
    for bad in ("h1:5432,h2:54x3", "h1:5432,h2:99999"):
        with pytest.raises(ValueError, match="port"):
            EventStoreConfig(url=f"postgresql://u:p@{bad}/d")


def test_a_query_or_fragment_after_the_address_is_not_taken_for_a_password() -> None:
    # A user name with "@" in the query is the driver's business, not a cut password.
    EventStoreConfig(url="postgresql://h?user=me@corp", database="d")
    EventStoreConfig(url="postgresql://h:5432?user=me@corp", database="d")
    EventStoreConfig(url="postgresql://u:pw@h/d#note")


@pytest.mark.parametrize("query", ["bad", "&password=pw", "a=1&&b=2"])
def test_a_malformed_query_is_refused_when_configured(query: str) -> None:
    # (The driver refuses it too, but only when connecting.)
    with pytest.raises(ValueError, match="query") as refused:
        EventStoreConfig(url=f"postgresql://u@h/d?{query}")
    assert "pw" not in str(refused.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"url": "mysql://h/d"}, "url"),
        ({"url": "postgresql://h:99999/d"}, "url"),
        ({"url": "postgresql://h/"}, "url"),
        ({}, "database"),
        ({"database": "d", "port": 0}, "port"),
        ({"database": "d", "host": ""}, "host"),
        ({"url": "postgresql://h/d", "username": ""}, "username"),
        ({"database": "d", "schema": ""}, "schema"),
        ({"database": "d", "schema": "x" * 57}, "schema"),
        ({"database": "d", "column_data_type": "json"}, "column_data_type"),
        ({"database": "d", "pool_size": 0}, "pool_size"),
        ({"database": "d", "timeout": 0}, "timeout"),
        ({"database": "d", "timeout": float("nan")}, "timeout"),
        ({"database": "d", "queue_target": -1}, "queue_target"),
        ({"database": "d", "queue_interval": float("inf")}, "queue_interval"),
        ({"database": "d", "subscription_retry_interval": 0}, "subscription_retry_interval"),
        ({"database": "d", "subscription_standby_interval": 0}, "subscription_standby_interval"),
        ({"database": "d", "subscription_lease_timeout": -1}, "subscription_lease_timeout"),
        ({"database": "d", "subscription_hibernate_after": -0.1}, "subscription_hibernate_after"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        EventStoreConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"database": "d", "pool_size": "10"}, "pool_size"),
        ({"database": "d", "pool_size": True}, "pool_size"),
        ({"database": "d", "timeout": "15"}, "timeout"),
        ({"database": "d", "schema": 1}, "schema"),
        ({"database": "d", "enable_hard_deletes": "yes"}, "enable_hard_deletes"),
        ({"database": "d", "init": 3}, "init"),
    ],
)
def test_wrong_types_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(TypeError, match=field):
        EventStoreConfig(**kwargs)  # type: ignore[arg-type]


def test_hibernate_zero_allowed_and_ints_become_floats() -> None:
    config = EventStoreConfig(database="d", subscription_hibernate_after=0, timeout=3)
    assert config.subscription_hibernate_after == 0.0
    assert isinstance(config.timeout, float)


def test_failover_defaults_and_the_keepalives_they_imply() -> None:
    """Standbys try every second; a holder stops within 1 + 5 s of silence; the server
    drops a silent session after 6 + 5 x 1 s (later, so never two holders at once)."""
    config = EventStoreConfig(database="d")
    assert (config.subscription_standby_interval, config.subscription_lease_timeout) == (1, 5)
    assert session_keepalive(config) == SessionKeepalive(
        idle=6, interval=1, count=5, user_timeout_ms=11_000
    )
    slow = EventStoreConfig(
        database="d", subscription_standby_interval=2.5, subscription_lease_timeout=0.5
    )
    keepalive = session_keepalive(slow)
    assert (keepalive.idle, keepalive.count) == (3, 1)
    assert keepalive.idle + keepalive.count * keepalive.interval > 2.5 + 0.5
    from_env = EventStoreConfig.from_env(
        environ={
            "EVENTSTORE_DATABASE": "d",
            "EVENTSTORE_SUBSCRIPTION_STANDBY_INTERVAL": "0.5",
            "EVENTSTORE_SUBSCRIPTION_LEASE_TIMEOUT": "3",
        }
    )
    assert (from_env.subscription_standby_interval, from_env.subscription_lease_timeout) == (
        0.5,
        3.0,
    )


def test_frozen() -> None:
    config = EventStoreConfig(database="d")
    with pytest.raises(AttributeError):
        config.schema = "x"  # type: ignore[misc]


def test_from_env() -> None:
    env = {
        "EVENTSTORE_URL": URL,
        "EVENTSTORE_SCHEMA": "example",
        "EVENTSTORE_POOL_SIZE": "3",
        "EVENTSTORE_TIMEOUT": "2.5",
        "EVENTSTORE_ENABLE_HARD_DELETES": "true",
        "EVENTSTORE_COLUMN_DATA_TYPE": "jsonb",
        "OTHER": "ignored",
    }
    config = EventStoreConfig.from_env(environ=env, pool_size=4)
    assert (config.schema, config.pool_size, config.timeout) == ("example", 4, 2.5)
    assert config.enable_hard_deletes is True
    assert config.column_data_type == "jsonb"


def test_from_env_prefix_and_bad_value_names_variable() -> None:
    with pytest.raises(ValueError, match="APP_POOL_SIZE"):
        EventStoreConfig.from_env("APP_", environ={"APP_DATABASE": "d", "APP_POOL_SIZE": "ten"})
    with pytest.raises(ValueError, match="APP_ENABLE_HARD_DELETES"):
        EventStoreConfig.from_env(
            "APP_", environ={"APP_DATABASE": "d", "APP_ENABLE_HARD_DELETES": "maybe"}
        )


def test_from_env_loads_the_serializer_or_says_why_not() -> None:
    from trio_eventstore import JsonSerializer

    def env(target: str) -> dict[str, str]:
        return {"EVENTSTORE_DATABASE": "d", "EVENTSTORE_SERIALIZER": target}

    config = EventStoreConfig.from_env(environ=env("trio_eventstore:JsonSerializer"))
    assert isinstance(config.serializer, JsonSerializer)
    with pytest.raises(ValueError, match=r"EVENTSTORE_SERIALIZER.*no_such_module"):
        EventStoreConfig.from_env(environ=env("no_such_module:x"))
    with pytest.raises(ValueError, match=r"EVENTSTORE_SERIALIZER.*expected a Serializer"):
        EventStoreConfig.from_env(environ=env("trio_eventstore:ALL_STREAMS"))
    # An explicit serializer wins (and the variable is not even imported).
    mine = JsonSerializer(strict=True)
    config = EventStoreConfig.from_env(environ=env("no_such_module:x"), serializer=mine)
    assert config.serializer is mine


def test_tls_fields_reach_every_connection_and_override_the_urls() -> None:
    config = EventStoreConfig(
        url=URL + "?sslmode=prefer&sslrootcert=/old/ca.crt&application_name=x",
        session_mode_url="postgresql://alice@db.example:5432/bank",
        ssl_mode="verify-full",
        ssl_root_cert=pathlib.Path("/etc/ca.crt"),
        ssl_cert="/etc/client.crt",
        ssl_key="/etc/client.key",
    )
    assert config.ssl_root_cert == "/etc/ca.crt"  # a Path is kept as its str
    for session_mode in (False, True):
        for database in (None, "postgres"):
            params = config.connect_params(database=database, session_mode=session_mode)
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(params["dsn"]).query)
            assert query["sslmode"] == ["verify-full"]
            assert query["sslrootcert"] == ["/etc/ca.crt"]
            assert (query["sslcert"], query["sslkey"]) == (["/etc/client.crt"], ["/etc/client.key"])
    pooled = config.connect_params()["dsn"]
    assert "application_name=x" in pooled  # the URL's other parameters stay
    assert pooled.startswith("postgresql://alice:s3cr%40t@db.example:6543/bank?")


def test_tls_fields_without_url() -> None:
    config = EventStoreConfig(host="h", database="d", ssl_mode="require")
    assert config.connect_params()["dsn"] == "postgresql://?sslmode=require"
    assert config.connect_params()["host"] == "h"
    assert "dsn" not in EventStoreConfig(host="h", database="d").connect_params()


def test_tls_fields_from_env() -> None:
    env = {
        "EVENTSTORE_URL": URL,
        "EVENTSTORE_SSL_MODE": "verify-ca",
        "EVENTSTORE_SSL_ROOT_CERT": "/etc/ca.crt",
        "EVENTSTORE_SSL_CERT": "/etc/client.crt",
        "EVENTSTORE_SSL_KEY": "/etc/client.key",
    }
    config = EventStoreConfig.from_env(environ=env)
    assert (config.ssl_mode, config.ssl_root_cert) == ("verify-ca", "/etc/ca.crt")
    assert (config.ssl_cert, config.ssl_key) == ("/etc/client.crt", "/etc/client.key")
    with pytest.raises(ValueError, match="ssl_mode"):
        EventStoreConfig.from_env(environ={**env, "EVENTSTORE_SSL_MODE": "verify"})


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"ssl_mode": "verify_full"}, ValueError),
        ({"ssl_mode": "VERIFY-FULL"}, ValueError),
        ({"ssl_root_cert": ""}, ValueError),
        ({"ssl_cert": "a\x00b"}, ValueError),
        ({"ssl_key": 3}, TypeError),
        ({"ssl_mode": True}, TypeError),
    ],
)
def test_bad_tls_values_name_the_field(kwargs: dict[str, object], error: type) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        EventStoreConfig(database="d", **kwargs)  # type: ignore[arg-type]


def test_key_passwords_in_url_queries_are_never_shown() -> None:
    config = EventStoreConfig(
        url="postgresql://u@h/d?sslmode=require&sslpassword=k3y%2Fpw&password=qpw",
        session_mode_url="postgresql://u@h/d?sslpassword=zq9x",
    )
    text = repr(config)
    for secret in ("k3y", "qpw", "zq9x"):
        assert secret not in text
    assert "sslmode=require" in text
    assert config.redact("bad k3y/pw and k3y%2Fpw and qpw") == "bad *** and *** and ***"


def test_from_env_an_empty_host_or_username_counts_as_unset() -> None:
    env = {
        "EVENTSTORE_URL": "postgresql://u@db.example/es",
        "EVENTSTORE_HOST": "",
        "EVENTSTORE_USERNAME": "",
    }
    config = EventStoreConfig.from_env(environ=env)
    assert config.host is None
    assert config.username is None
    assert config.connect_params()["dsn"] == "postgresql://u@db.example/es"
