"""The project is self-contained: nothing in it reads files outside the repository.

A fresh clone on a machine with nothing beside it must pass its tests (``.ci/run`` runs
them from such a clone); this test catches the usual ways a source points outside the
checkout, before CI does.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("trio_eventstore", "tests", "property_tests", "bench", "examples", ".ci")
SCANNED_FILES = (
    "conftest.py",
    "tasks.py",
    "Makefile",
    "pyproject.toml",
    "README.md",
    "CHANGELOG.md",
)
SKIPPED_PARTS = {"__pycache__", ".hypothesis", ".pytest_cache", ".mypy_cache", ".ruff_cache"}

OUTSIDE = [
    (re.compile(r"shared[/\\]+reference"), "the reference data is in tests/reference"),
    (re.compile(r"\.\.[/\\]+shared"), "a sibling folder of the checkout"),
    (re.compile(r"/\s*['\"]shared['\"]"), "a path through a 'shared' folder"),
    (re.compile(r"['\"]\.\.['\"]"), "a '..' path component"),
    (re.compile(r"\bos\.pardir\b"), "os.pardir"),
    (re.compile(r"\bTRIO_EVENTSTORE_REFERENCE\b"), "reference data from elsewhere"),
]
PARENTS = re.compile(r"\.parents\[(\d+)\]")


def _scanned() -> list[Path]:
    files = [ROOT / name for name in SCANNED_FILES if (ROOT / name).is_file()]
    for folder in SCANNED_DIRS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and not SKIPPED_PARTS.intersection(path.parts):
                files.append(path)
    # This file holds the patterns and examples of what they catch.
    files.remove(Path(__file__).resolve())
    return files


def _problems(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return []
    return _problems_in(text, path.relative_to(ROOT))


def _problems_in(text: str, relative: Path) -> list[str]:
    depth = len(relative.parts) - 1  # parents[depth] of this file is the repository root
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for pattern, why in OUTSIDE:
            if pattern.search(line):
                found.append(f"{relative}:{number}: {why}: {line.strip()}")
        for match in PARENTS.finditer(line):
            if int(match.group(1)) > depth:
                found.append(f"{relative}:{number}: a parent of the checkout: {line.strip()}")
    return found


def test_the_scan_covers_the_sources() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in _scanned()}
    assert {"tests/helpers.py", "tests/test_interop.py", "conftest.py", ".ci/run"} <= names
    assert "tests/reference/elixir-schema-catalog.json" in names


#: Lines the scan must flag, built from pieces so that this file does not hold them.
_SIBLING = "sha" + "red"
_OUTSIDE = [
    f'REFERENCE = Path(__file__).resolve().parents[2] / "{_SIBLING}" / "reference"',
    f"data = open('../{_SIBLING}/reference/x.sql')",
    'p = ROOT / ".." / "data"',
    f"Design: `../{_SIBLING}/DESIGN.md`",
]


@pytest.mark.parametrize("line", _OUTSIDE)
def test_the_scan_finds_paths_outside(line: str) -> None:
    assert _problems_in(line + "\n", Path("tests", "helpers.py"))


def test_no_source_points_outside_the_repository() -> None:
    problems = [problem for path in _scanned() for problem in _problems(path)]
    assert not problems, "\n".join(problems)


def test_reference_data_is_in_the_repository() -> None:
    from .helpers import REFERENCE

    assert REFERENCE.resolve().is_relative_to(ROOT)
    for name in (
        "elixir-schema-catalog.json",
        "elixir-sample-db.sql",
        "elixir-sample-readback.txt",
        "elixir-notifications.txt",
        "README.md",
    ):
        assert (REFERENCE / name).is_file(), name
