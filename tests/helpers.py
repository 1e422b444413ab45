"""Helpers shared by the tests and property tests."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import attrs

from trio_eventstore import EventStoreConfig, admin

#: Data written by the real Elixir EventStore 1.4.8 (provenance: reference/README.md).
REFERENCE = Path(__file__).resolve().parent / "reference"


def url_for(server_url: str, database: str) -> str:
    """``server_url`` with another database."""
    parts = urllib.parse.urlsplit(server_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


@attrs.frozen
class Role:
    """A login role with no privileges of its own (an application's role)."""

    name: str
    password: str = attrs.field(repr=False)

    async def use(self, config: EventStoreConfig) -> EventStoreConfig:
        """``config``'s store, granted to this role (`admin.grant`, as the owner), and
        the config that connects as this role."""
        await admin.grant(config, self.name)
        return config.with_changes(username=self.name, password=self.password)
