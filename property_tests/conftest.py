"""Fixtures of the property tests (the Hypothesis profiles are in the root conftest.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import trio

from trio_eventstore import EventStoreConfig, admin


@pytest.fixture
def store_config(test_database: str) -> Iterator[EventStoreConfig]:
    """An initialised schema for a whole property test (examples reset it)."""
    config = EventStoreConfig(
        url=test_database, schema=f"p_{uuid.uuid4().hex[:12]}", enable_hard_deletes=True
    )
    trio.run(admin.create, config)
    trio.run(admin.init, config)
    yield config
    trio.run(admin.drop, config)
