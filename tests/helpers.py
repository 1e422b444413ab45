"""Helpers shared by the tests and property tests."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

#: Data written by the real Elixir EventStore 1.4.8 (provenance: reference/README.md).
REFERENCE = Path(__file__).resolve().parent / "reference"


def url_for(server_url: str, database: str) -> str:
    """``server_url`` with another database."""
    parts = urllib.parse.urlsplit(server_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))
