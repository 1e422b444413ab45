"""Every example runs (against the test server, as EVENTSTORE_URL)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import url_for

FOLDER = Path(__file__).resolve().parents[1] / "examples"
EXAMPLES = sorted(p for p in FOLDER.glob("*.py") if not p.name.startswith(("test_", "_")))
EXAMPLE_TESTS = sorted(FOLDER.glob("test_*.py"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(example: Path, server_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_")}
    env["EVENTSTORE_URL"] = url_for(server_url, "examples")
    for _ in range(2):  # and runs again on the same database
        result = subprocess.run(
            [sys.executable, str(example)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "an example says what it did"


@pytest.mark.parametrize("example", EXAMPLE_TESTS, ids=[p.stem for p in EXAMPLE_TESTS])
def test_example_test_passes(example: Path, server_url: str) -> None:
    """The example consumer tests pass with the kit's own fixtures."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_")}
    env["TRIO_EVENTSTORE_TEST_URL"] = server_url
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(example)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
        cwd=example.parent,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_examples_use_only_the_public_api() -> None:
    for path in FOLDER.glob("*.py"):
        assert not re.search(r"\btrio_eventstore\._", path.read_text()), path.name
