"""Small helpers the benchmark's modules share: paths, the environment, percentiles, formatting."""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from testbed.net import HOST

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
__all__ = ["HOST", "ROOT", "RESULTS", "BENCH_LIMITS"]

# Per-key limits high enough that nothing is refused (one key carries all the load), but still
# checked, so each request pays for its limiter decisions as in production.
BENCH_LIMITS = {
    "LIMITS_KEY_RPM": str(10**9),
    "LIMITS_KEY_TPM": str(10**12),
    "LIMITS_KEY_MAX_CONCURRENT": str(10**6),
}
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def without_proxies(env: dict[str, str]) -> dict[str, str]:
    """`env` for a process that talks to loopback only: no proxy may be picked up by its HTTP clients."""
    for name in PROXY_VARIABLES:
        env.pop(name, None)
    return env


def process_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without proxies, with the repository on ``PYTHONPATH``."""
    env = without_proxies(dict(os.environ))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def with_database(url: str, name: str) -> str:
    """``url`` (postgres://user@host:port/anything) pointing at database ``name`` instead."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile ``q`` (0..100) of already sorted values."""
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    rank = (len(sorted_values) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return float(sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low))


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def fmt(value: float | None, spec: str = ".2f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Counts over all turns; every other number is the median of the turns'.
SUMMED_OVER_TURNS = ("calls_in_window", "answered")


def figures_of_turns(turns: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """One load's figures over its turns: counts and errors added up, the rest the median of
    the turns' (`None` where no turn had it)."""
    figures: dict[str, Any] = {}
    for key in keys:
        if key == "errors":
            errors: Counter[str] = Counter()
            for turn in turns:
                errors.update(turn["errors"])
            figures[key] = dict(errors)
        elif key in SUMMED_OVER_TURNS:
            figures[key] = sum(turn[key] for turn in turns)
        else:
            values = [turn[key] for turn in turns if turn.get(key) is not None]
            figures[key] = rounded(statistics.median(values)) if values else None
    return figures


# The gateway's group-committing writers (`llmgateway_batch_*` in its metrics), as the figures name them.
BATCH_WRITERS = {"llmgateway-budget-holds": "hold", "llmgateway-ledger-writer": "ledger", "llmgateway-limiter-scripts": "limiter"}


def batch_totals(metrics_dir: Path) -> dict[str, tuple[float, float, float]]:
    """Each writer's batches, their items and the seconds their writes took, so far, from the
    gateway workers' multiprocess metrics (`infra.group_commit`)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    totals: dict[str, list[float]] = {}
    names = {"llmgateway_batch_items_count": 0, "llmgateway_batch_items_sum": 1, "llmgateway_batch_seconds_sum": 2}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in names and sample.labels.get("writer") in BATCH_WRITERS:
                totals.setdefault(sample.labels["writer"], [0.0, 0.0, 0.0])[names[sample.name]] = sample.value
    return {writer: (batches, items, seconds) for writer, (batches, items, seconds) in totals.items()}


def batch_figures(before: Mapping[str, tuple[float, float, float]], after: Mapping[str, tuple[float, float, float]]) -> dict[str, float | None]:
    """Each writer's mean items per batch and ms per batch between two `batch_totals`."""
    figures: dict[str, float | None] = {}
    for writer, short in BATCH_WRITERS.items():
        if writer not in after:
            continue
        batches, items, seconds = (now - then for now, then in zip(after[writer], before.get(writer, (0.0, 0.0, 0.0)), strict=True))
        figures[f"{short}_batch_items"] = rounded(items / batches, 1) if batches else None
        figures[f"{short}_batch_ms"] = rounded(1000 * seconds / batches, 2) if batches else None
    return figures
