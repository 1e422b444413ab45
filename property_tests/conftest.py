"""Hypothesis profiles: ``quick`` (default, part of ``make test``) and ``ci`` (longer,
``invoke proptest``). Choose with HYPOTHESIS_PROFILE."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import trio
from hypothesis import HealthCheck, settings

from trio_eventstore import EventStoreConfig, admin

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    "print_blob": True,
}
settings.register_profile("quick", max_examples=25, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("ci", max_examples=300, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("long", max_examples=3000, **_COMMON)  # type: ignore[arg-type]
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))


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
