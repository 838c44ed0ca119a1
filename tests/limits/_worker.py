"""The body of one OS process in the cross-process exactness test (spawned, own event loop).

Kept importable (not a test module) because ``multiprocessing`` with spawn imports it by name.
"""

from __future__ import annotations

import asyncio
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

from limits import LimiterError, LimitSpec, RedisLimiter


def run(
    *,
    url: str,
    prefix: str,
    group: str,
    specs: list[LimitSpec],
    calls: int,
    phases: int,
    barrier: Barrier,
    results: Queue,
    cluster: bool = False,
) -> None:
    """For each phase: pass the barrier twice (ready, then go), fire ``calls`` concurrent
    acquire() per spec and report ``(phase, key, admitted, errors)`` per spec."""
    asyncio.run(
        _main(
            url=url,
            cluster=cluster,
            prefix=prefix,
            group=group,
            specs=specs,
            calls=calls,
            phases=phases,
            barrier=barrier,
            results=results,
        )
    )


async def _main(
    *,
    url: str,
    cluster: bool,
    prefix: str,
    group: str,
    specs: list[LimitSpec],
    calls: int,
    phases: int,
    barrier: Barrier,
    results: Queue,
) -> None:
    # atomicity is under test here, not latency: a generous timeout avoids spurious errors
    limiter = RedisLimiter.from_url(
        url, prefix=prefix, timeout=5.0, max_connections=100, cluster=cluster
    )
    try:
        await limiter.health()  # open a connection before the start line
        for phase in range(phases):
            barrier.wait()  # ready: the parent reads Redis TIME between the two
            barrier.wait()  # go
            for spec, outcome in zip(specs, await _fire(limiter, specs, group, calls), strict=True):
                admitted, errors = outcome
                results.put((phase, spec.key, admitted, errors))
    finally:
        await limiter.aclose()


async def _fire(
    limiter: RedisLimiter, specs: list[LimitSpec], group: str, calls: int
) -> list[tuple[int, int]]:
    async def one(spec: LimitSpec) -> bool | None:
        try:
            return (await limiter.acquire([spec], group=group)).allowed
        except LimiterError:
            return None

    outcomes = await asyncio.gather(*(one(spec) for _ in range(calls) for spec in specs))
    per_spec = [outcomes[i :: len(specs)] for i in range(len(specs))]
    return [(o.count(True), o.count(None)) for o in per_spec]
