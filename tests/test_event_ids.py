"""Default event ids: time-ordered UUIDs, version 7 (RFC 9562)."""

from __future__ import annotations

import itertools
import time
import uuid

import pytest

import trio_eventstore._types as types
from trio_eventstore import EventData, new_event_id


def _ms(event_id: uuid.UUID) -> int:
    return event_id.int >> 80


def test_an_event_without_an_id_gets_a_version_7_uuid_of_now() -> None:
    before = time.time_ns() // 1_000_000
    event_id = EventData({"a": 1}, event_type="T").event_id
    after = time.time_ns() // 1_000_000
    assert event_id.version == 7
    assert event_id.variant == uuid.RFC_4122
    assert before <= _ms(event_id) <= after + 1


def test_ids_increase_and_never_repeat() -> None:
    ids = [new_event_id() for _ in range(20_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(b.bytes > a.bytes for a, b in itertools.pairwise(ids))


def test_ids_still_increase_in_one_millisecond_and_when_the_clock_steps_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1_900_000_000_000 * 1_000_000]
    monkeypatch.setattr(time, "time_ns", lambda: clock[0])
    # the generator's state is restored afterwards (or later ids would be dated 2030)
    monkeypatch.setattr(types, "_last_id_ms", 0)
    monkeypatch.setattr(types, "_id_counter", 0)
    ids = [new_event_id() for _ in range(5_000)]  # more than the 4,096 a millisecond holds
    clock[0] -= 10_000 * 1_000_000  # ten seconds back
    ids += [new_event_id() for _ in range(100)]
    assert all(b.bytes > a.bytes for a, b in itertools.pairwise(ids))
    assert {i.version for i in ids} == {7}
    assert _ms(ids[0]) == 1_900_000_000_000
    assert _ms(ids[-1]) == 1_900_000_000_001  # the counter ran over into the next one


def test_a_given_id_is_kept() -> None:
    given = uuid.uuid4()
    assert EventData({"a": 1}, event_type="T", event_id=given).event_id == given
    assert EventData({"a": 1}, event_type="T", event_id=str(given)).event_id == given
