"""``python -m tests.faultrun [--duration SECONDS] [--seed N] [--folder DIR]``: one fault
run (`tests.faultrun.harness.fault_run`); exits 1 when a check fails."""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from .harness import fault_run


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faultrun")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of faults")
    parser.add_argument("--seed", type=int, default=None, help="repeat a run's schedule")
    parser.add_argument("--folder", type=Path, default=None, help="keep the logs here")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    report = fault_run(args.duration, seed, args.folder)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
