"""Benchmark the rate limiter: decision latency (p50/p99) and decisions per second.

    .venv/bin/python -m bench.limiter [--seconds 5] [--concurrency 1,50] [--json out.json]
    .venv/bin/python -m bench.limiter --redis-cluster redis://127.0.0.1:17000/0   # also a cluster

Runs each scenario against the Redis backend (one Lua round trip per decision, default
timeouts), a Redis Cluster when ``--redis-cluster`` names one of its nodes (the limiter's cluster
client, as REDIS_CLUSTER=true builds it; the groups spread over every master) and the in-process
backend for comparison, at each concurrency given. Concurrency 1
is the latency of one decision; at 50 concurrent callers in one process the latency is mostly
time queued behind the others' decisions (Little's law: callers / decisions per second), and
decisions/s is the figure to read. Limits are set high enough that nothing
is rejected, so the numbers are the cost of a decision, not of a rejection. Keys are spread
over ``--groups`` groups (users); every key written is deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from infra.redis import async_client
from limits import InProcessLimiter, Limiter, LimiterError, LimitSpec, RedisLimiter

HUGE = 1_000_000_000

SCENARIOS: dict[str, list[LimitSpec]] = {
    "token_bucket": [LimitSpec("rpm", "token_bucket", HUGE, 60.0)],
    "rpm+tpm": [
        LimitSpec("rpm", "token_bucket", HUGE, 60.0),
        LimitSpec("tpm", "token_bucket", HUGE, 60.0, cost=750),
    ],
    "sliding_window": [LimitSpec("rpw", "sliding_window", HUGE, 60.0)],
}


@dataclass(frozen=True)
class Result:
    backend: str
    scenario: str
    concurrency: int
    seconds: float
    decisions: int
    errors: int
    decisions_per_second: float
    p50_ms: float
    p99_ms: float
    max_ms: float


async def _measure(
    limiter: Limiter,
    specs: list[LimitSpec],
    *,
    backend: str,
    scenario: str,
    seconds: float,
    concurrency: int,
    groups: int,
) -> Result:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        nonlocal errors
        group = f"user{index % groups}"
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                await limiter.acquire(specs, group=group)
            except LimiterError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        for index in range(concurrency):
            tasks.create_task(worker(index))
    elapsed = time.perf_counter() - began
    latencies.sort()
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive") if latencies else []
    return Result(
        backend=backend,
        scenario=scenario,
        concurrency=concurrency,
        seconds=round(elapsed, 3),
        decisions=len(latencies),
        errors=errors,
        decisions_per_second=round(len(latencies) / elapsed, 1),
        p50_ms=round(quantiles[49] * 1000, 3) if quantiles else 0.0,
        p99_ms=round(quantiles[98] * 1000, 3) if quantiles else 0.0,
        max_ms=round(latencies[-1] * 1000, 3) if latencies else 0.0,
    )


async def _delete_prefix(url: str, prefix: str, *, cluster: bool = False) -> None:
    # on a cluster, SCAN visits every master and DEL is split by slot
    client = async_client(url, cluster=cluster, timeout=5.0)
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.delete(*batch)
                batch.clear()
        if batch:
            await client.delete(*batch)
    finally:
        await client.aclose()


async def _warm_up(limiter: Limiter, specs: list[LimitSpec]) -> None:
    """Connect (on a cluster: read its topology) and load the script, outside the measurement;
    a few tries, as the first call may take longer than the backend's 100 ms deadline."""
    for attempt in range(5):
        try:
            await limiter.acquire(specs, group="warmup")
            return
        except LimiterError:
            if attempt == 4:
                raise


async def run(args: argparse.Namespace) -> list[Result]:
    prefix = f"bench:limiter:{uuid.uuid4().hex[:8]}"
    factories: dict[str, Callable[[int], Limiter]] = {
        "redis": lambda concurrency: RedisLimiter.from_url(
            args.redis_url, prefix=prefix, max_connections=concurrency
        ),
        "redis-cluster": lambda concurrency: RedisLimiter.from_url(
            args.redis_cluster, prefix=prefix, max_connections=concurrency, cluster=True
        ),
        "inprocess": lambda concurrency: InProcessLimiter(),
    }
    backends = [] if args.no_redis else ["redis"]
    backends += ["redis-cluster"] if args.redis_cluster else []
    backends.append("inprocess")
    results: list[Result] = []
    try:
        for backend in backends:
            for concurrency in args.concurrency:
                for scenario, specs in SCENARIOS.items():
                    limiter = factories[backend](concurrency)
                    try:
                        await _warm_up(limiter, specs)
                        results.append(
                            await _measure(
                                limiter,
                                specs,
                                backend=backend,
                                scenario=scenario,
                                seconds=args.seconds,
                                concurrency=concurrency,
                                groups=args.groups,
                            )
                        )
                    finally:
                        await limiter.aclose()
                    _print_row(results[-1])
    finally:
        if "redis" in backends:
            await _delete_prefix(args.redis_url, prefix)
        if "redis-cluster" in backends:
            await _delete_prefix(args.redis_cluster, prefix, cluster=True)
    return results


HEADER = (
    f"{'backend':<13} {'scenario':<15} {'conc':>5} {'decisions':>10} {'errors':>7} "
    f"{'dec/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
)


def _print_row(r: Result) -> None:
    print(
        f"{r.backend:<13} {r.scenario:<15} {r.concurrency:>5} {r.decisions:>10} {r.errors:>7} "
        f"{r.decisions_per_second:>10.1f} {r.p50_ms:>8.3f} {r.p99_ms:>8.3f} {r.max_ms:>8.3f}",
        flush=True,
    )


def _counts(value: str) -> list[int]:
    try:
        counts = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {value!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("counts must be >= 1")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.limiter", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each scenario")
    parser.add_argument(
        "--concurrency",
        type=_counts,
        default=[1, 50],
        help="concurrent callers, comma-separated for several runs (default 1,50)",
    )
    parser.add_argument("--groups", type=int, default=100, help="distinct groups (users)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis to use")
    parser.add_argument(
        "--redis-cluster", metavar="URL", help="also a Redis Cluster, through this node (any one)"
    )
    parser.add_argument("--no-redis", action="store_true", help="no single Redis (only in-process, and the cluster if given)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.groups < 1:
        parser.error("--seconds and --groups must be positive")

    print(HEADER, flush=True)
    results = asyncio.run(run(args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump([asdict(r) for r in results], out, indent=2)
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
