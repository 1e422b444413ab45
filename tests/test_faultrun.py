"""The fault run, short (`tests.faultrun`): writers and subscriber processes under network
faults, PostgreSQL restarts, kills and pool exhaustion lose nothing, write nothing by
halves and deliver in order. ``invoke faults`` runs a long one (``pytest -s`` shows the
figures)."""

from __future__ import annotations

import pytest

from tests.faultrun.harness import fault_run

#: seconds of faults per run (then quiescing and the checks: about 15 s more)
DURATION = 20.0


@pytest.mark.parametrize("seed", [3, 4])
def test_a_short_fault_run_loses_nothing_and_keeps_every_order(seed: int) -> None:
    report = fault_run(DURATION, seed)
    assert report.ok, report.figures()
    assert report.counts["lost"] == 0
    # The run did something: faults landed, appends committed, events were delivered.
    assert report.counts["faults"] > 0, report.figures()
    assert report.counts["appends_ok"] > 0, report.figures()
    assert report.counts["delivered"] > 0, report.figures()
