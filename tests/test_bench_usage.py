"""`python -m bench` says how to use it, instead of starting a ten-minute run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_help_prints_the_usage() -> None:
    result = bench("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m bench")


def test_an_unknown_option_is_refused_with_the_usage() -> None:
    result = bench("--quick")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: python -m bench")
