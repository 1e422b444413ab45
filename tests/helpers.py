"""Helpers shared by the tests and property tests."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

#: shared/reference beside the checkout (or TRIO_EVENTSTORE_REFERENCE).
REFERENCE = Path(
    os.environ.get("TRIO_EVENTSTORE_REFERENCE")
    or Path(__file__).resolve().parents[2] / "shared" / "reference"
)


def url_for(server_url: str, database: str) -> str:
    """``server_url`` with another database."""
    parts = urllib.parse.urlsplit(server_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))
