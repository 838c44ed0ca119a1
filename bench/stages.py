"""Read the marks of `bench.stage_marks`: where the calls' time went, stage by stage.

    python -m bench.stages DIR [--load 0ms-1] [--skip 20] [--slowest 5] [--until "first token"]

For each stage (in the order the calls reached them): when it started and how long it took,
the median over all calls, and the mean over the slowest `--slowest` percent of them by the
`--until` mark (by default the first token, as the benchmark's TTFT). Only the calls of `--load`
count (by default those of every named load but the warm-ups), and the first `--skip` of them in each
worker are left out: they meet cold caches and pools. The lines "between stages" are the
time no stage accounts for: the event loop's turns, Django's handler, the code between the
wrapped functions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.common import percentile

POINTS = ("response start", "first body", "first token", "ended")
# Stages that contain the ones after them: the time between stages is counted from their start.
ENCLOSING = ("view",)
# The header `bench.run` names each gateway call's load with ("warm-up", "0ms-1", ...).
LOAD_HEADER = "x-bench-load"
WARM_UP = "warm-up"


def read_marks(directory: Path, *, skip: int, load: str | None = None) -> list[dict[str, float]]:
    """The marks of the calls of `load` (when None, of every named load but the warm-ups: not the
    memory and storm phases' held streams), leaving out the first `skip` of each worker."""
    calls: list[dict[str, float]] = []
    for path in sorted(directory.glob("marks.*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        chosen = [line["marks"] for line in lines if line["load"] == load or (load is None and line["load"] not in (None, WARM_UP))]
        calls.extend(chosen[skip:])
    return calls


def _stages(calls: list[dict[str, float]]) -> list[str]:
    """Stage names (and point marks) in the order of their median start."""
    starts: dict[str, list[float]] = {}
    for call in calls:
        for name, at in call.items():
            stage = name[:-2] if name.endswith((" >", " <")) else name
            if not name.endswith(" <"):
                starts.setdefault(stage, []).append(at)
    return sorted(starts, key=lambda stage: statistics.median(starts[stage]))


def _summary(calls: list[dict[str, float]], stage: str, average: Any) -> tuple[float | None, float | None]:
    start = stage if stage in POINTS else f"{stage} >"
    at = [call[start] for call in calls if start in call]
    took = [call[f"{stage} <"] - call[f"{stage} >"] for call in calls if f"{stage} >" in call and f"{stage} <" in call]
    return (average(at) if at else None, average(took) if took else None)


def _cell(value: float | None) -> str:
    return f"{value:9.3f}" if value is not None else f"{'-':>9}"


def report(calls: list[dict[str, float]], *, slowest: float, until: str) -> str:
    timed = sorted((call for call in calls if until in call), key=lambda call: call[until])
    if not timed:
        return f"no call reached `{until}`"
    slow = timed[int(len(timed) * (1 - slowest / 100)) :]
    values = [call[until] for call in timed]
    p50, p99 = percentile(values, 50), percentile(values, 99)
    assert p50 is not None and p99 is not None
    lines = [
        f"{len(timed)} call(s) reached `{until}`: p50 {p50:.3f} ms, p99 {p99:.3f} ms; "
        f"the slowest {slowest:g}%: {len(slow)} call(s)",
        "",
        f"{'stage':24s} {'all: at':>9} {'took':>9}   {'slowest: at':>11} {'took':>9}   (ms)",
    ]
    previous_end: dict[str, float | None] = {"all": 0.0, "slow": 0.0}
    for stage in _stages(timed):
        at_all, took_all = _summary(timed, stage, statistics.median)
        at_slow, took_slow = _summary(slow, stage, statistics.fmean)
        gaps = []
        for key, at in (("all", at_all), ("slow", at_slow)):
            before = previous_end[key]
            gaps.append(None if at is None or before is None else at - before)
        if any(gap is not None and gap >= 0.05 for gap in gaps):
            lines.append(f"{'  between stages':24s} {'':9} {_cell(gaps[0])}   {'':11} {_cell(gaps[1])}")
        lines.append(f"{stage:24s} {_cell(at_all)} {_cell(took_all)}   {_cell(at_slow):>11} {_cell(took_slow)}")
        for key, at, took in (("all", at_all, took_all), ("slow", at_slow, took_slow)):
            if at is not None:
                previous_end[key] = at if stage in ENCLOSING else at + (took or 0.0)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="the STAGE_MARKS_DIR of a marked run")
    parser.add_argument("--load", help="only the calls of this load (default: every load but the warm-ups)")
    parser.add_argument("--skip", type=int, default=20, help="leave out each worker's first N calls (default 20)")
    parser.add_argument("--slowest", type=float, default=5.0, help="the slowest percent to show apart (default 5)")
    parser.add_argument("--until", default="first token", help='the mark calls are ranked by (default "first token")')
    args = parser.parse_args(argv)
    calls = read_marks(args.directory, skip=args.skip, load=args.load)
    if not calls:
        print(f"no marks in {args.directory} for that load (after skipping {args.skip} per worker)", file=sys.stderr)
        return 1
    print(report(calls, slowest=args.slowest, until=args.until))
    return 0


if __name__ == "__main__":
    sys.exit(main())
