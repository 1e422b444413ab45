"""Shared by the examples: a database URL from EVENTSTORE_URL, or a throwaway server."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from trio_eventstore.testing import temporary_postgres


@contextlib.contextmanager
def database_url(name: str) -> Iterator[str]:
    """EVENTSTORE_URL when set; otherwise a throwaway PostgreSQL for this run."""
    if os.environ.get("EVENTSTORE_URL"):
        yield os.environ["EVENTSTORE_URL"]
        return
    print("EVENTSTORE_URL is not set: starting a throwaway PostgreSQL ...", flush=True)
    with temporary_postgres(name) as url:
        yield url
