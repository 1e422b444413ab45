"""Connection URLs: the checks `EventStoreConfig` runs on them (pure), their TLS
parameters, and their redaction (passwords never shown)."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping

from ._types import check_text

__all__ = [
    "SSL_MODES",
    "TLS_PARAMS",
    "check_url",
    "optional_path",
    "redact_query",
    "redact_url",
    "secret_values",
    "tls_files",
    "url_repr",
    "with_tls_params",
]


def _is_secret(name: str) -> bool:
    """Whether a query parameter may hold a secret: the driver reads ``password`` and
    ``sslpassword``; any name holding "password" is hidden too (``??password=``, after
    a stray ``?``, is still the user's password)."""
    return "password" in urllib.parse.unquote_plus(name).lower()


def secret_values(query: str) -> list[str]:
    """The values of the query's secret parameters, as written."""
    found = []
    for field in query.split("&"):
        name, sep, value = field.partition("=")
        if sep and value and _is_secret(name):
            found.append(value)
    return found


def redact_query(query: str) -> str:
    fields = []
    for field in query.split("&"):
        name, sep, _ = field.partition("=")
        if sep and _is_secret(name):
            field = f"{name}=***"
        fields.append(field)
    return "&".join(fields)


#: The libpq TLS parameters, by the config field that overrides each.
TLS_PARAMS = {
    "ssl_mode": "sslmode",
    "ssl_root_cert": "sslrootcert",
    "ssl_cert": "sslcert",
    "ssl_key": "sslkey",
}

#: libpq's sslmode values, weakest first.
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def redact_url(url: str | None) -> str | None:
    if url is None:
        return None
    parts = urllib.parse.urlsplit(url)
    # No driver reads a fragment, but what follows a stray "#" (a query, a password)
    # is still the user's text: hidden whole.
    fragment = "***" if parts.fragment else ""
    if parts.password is None and not secret_values(parts.query) and not fragment:
        return url
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = redact_query(parts.query)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query, fragment=fragment))


def optional_path(value: str | os.PathLike[str] | None) -> str | None:
    """A file name given as a str or a path (attrs converter)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value  # not a file name: __attrs_post_init__ names the field


def with_tls_params(url: str | None, params: Mapping[str, str]) -> str | None:
    """``url`` with the libpq TLS ``params`` set in its query (replacing its own values
    of them); a URL of only those parameters when there is no ``url``."""
    if not params:
        return url
    parts = urllib.parse.urlsplit(url or "postgresql://")
    kept = [
        (key, value)
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if key not in params
    ]
    query = urllib.parse.urlencode([*kept, *params.items()])
    if url is None:
        return f"postgresql://?{query}"
    return urllib.parse.urlunsplit(parts._replace(query=query))


def tls_files(url: str | None) -> list[tuple[str, str]]:
    """The ``(parameter, file name)`` of each certificate or key file a URL names."""
    if url is None:
        return []
    query = urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query, keep_blank_values=True)
    wanted = ("sslrootcert", "sslcert", "sslkey")
    return [(key, value) for key, value in query if key in wanted and value]


def url_repr(url: str | None) -> str:
    return repr(redact_url(url))


def check_url(name: str, url: str | None) -> None:
    if url is None:
        return
    if not isinstance(url, str):
        raise TypeError(f"{name}: expected a str, got {type(url).__name__}")
    check_text(name, url)
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # an unbalanced "[" or "]" in the host (an IPv6 address)
        raise ValueError(f"{name}: not a valid URL ({exc})") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(
            f"{name}: expected a postgresql:// or postgres:// URL, got scheme {parts.scheme!r}"
        )
    _check_address_not_cut(name, parts)
    if not _port_parses(parts):
        raise ValueError(f"{name}: the port is not a number between 0 and 65535")
    if parts.netloc.count("@") > 1:
        # The driver would take what follows the first "@" for the host.
        raise ValueError(f"{name}: write an '@' in the user name or password as %40")
    if parts.query:
        try:
            urllib.parse.parse_qsl(parts.query, strict_parsing=True)  # as the driver does
        except ValueError:
            raise ValueError(
                f"{name}: the query is not name=value parameters joined by '&'"
            ) from None
    if "\x00" in urllib.parse.unquote(parts.netloc + parts.path + parts.query):
        raise ValueError(f"{name}: holds a NUL character (%00), which PostgreSQL cannot take")


def _check_address_not_cut(name: str, parts: urllib.parse.SplitResult) -> None:
    """Refuse a ``#`` or ``?`` written as such in the user name or password: URL parsers
    (the driver's too) end the address there, taking the rest for a fragment or a query,
    and the password's first part for a port. The message never shows the password."""
    if "@" in parts.netloc:
        return
    if "@" in parts.fragment:
        char = "#"
    elif "@" in parts.query and not parts.path and _query_holds_the_address(parts):
        char = "?"
    elif "@" in parts.path.partition("/")[2].partition("/")[0] and not _port_parses(parts):
        char = "/"  # "user:pa/ss@host/db": the address ends at the "/", the port is "pa"
    else:
        return
    others = ", ".join(f"'{c}' as {e}" for c, e in _URL_ESCAPES.items() if c != char)
    raise ValueError(
        f"{name}: a '{char}' in the user name or password ends the URL's address there; "
        f"percent-encode it: '{char}' as {_URL_ESCAPES[char]} (and {others})"
    )


#: What to percent-encode in a URL's user name or password.
_URL_ESCAPES = {"@": "%40", ":": "%3A", "/": "%2F", "?": "%3F", "#": "%23", "%": "%25"}


def _query_holds_the_address(parts: urllib.parse.SplitResult) -> bool:
    """Whether the query of a URL whose address has no ``@`` begins with the rest of a
    password and the address (``?ss@host:5432/db``) rather than parameters (a driver's
    ``?user=me@corp``): the port before it is not a number, or an ``@`` comes before
    any ``=``."""
    return not _port_parses(parts) or "=" not in parts.query.split("@", 1)[0]


def _port_parses(parts: urllib.parse.SplitResult) -> bool:
    """Whether the URL's port, or each host's (``h1:5432,h2:5433``: several hosts, which
    the driver tries in turn), is a number from 0 to 65535 (or absent)."""
    hosts = parts.netloc.rpartition("@")[2]
    for host in hosts.split(",") if "," in hosts else [None]:
        try:
            if host is None:
                parts.port  # noqa: B018 - raises ValueError for a bad port
            else:
                urllib.parse.urlsplit(f"//{host}").port  # noqa: B018 - the same, for one
        except ValueError:
            return False
    return True
