"""The API fuzz at length: `.venv/bin/python -m bench.fuzz [--requests 100000]`.

Runs the suite's fuzz test (tests/api/test_fuzz.py: generated requests against a real Granian,
no 5xx, every error OpenAI-shaped with a request id, every 200 a completion or a stream that
ends) with as many requests as asked instead of the suite's 2,000, and prints how many it sent,
how long it took and whether any failed. The test database is SQLite unless DATABASE_URL is set
(then PostgreSQL, as the suite uses it). A failure prints Hypothesis's reproduction blob: add the
request as an `@example` of the test so every later run tries it first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000, help="generated requests to send (default 100,000)")
    arguments = parser.parse_args()
    env = {**os.environ, "FUZZ_EXAMPLES": str(arguments.requests)}
    env.setdefault("DATABASE_URL", "")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "--hypothesis-show-statistics", "tests/api/test_fuzz.py"],
        cwd=ROOT,
        env=env,
        check=False,
    )
    elapsed = time.monotonic() - started
    outcome = "no failure" if result.returncode == 0 else "FAILED (see above)"
    print(f"fuzz: {arguments.requests:,} generated requests in {elapsed:.0f} s ({arguments.requests / elapsed:,.0f}/s): {outcome}")
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
