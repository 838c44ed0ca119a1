"""Properties of the in-process backend alone: bounded memory, thread safety."""

from __future__ import annotations

import asyncio
import threading

from limits import InProcessLimiter, LimitSpec, ManualClock


async def test_memory_stays_bounded_as_keys_go_idle() -> None:
    clock = ManualClock()
    limiter = InProcessLimiter(clock=clock, sweep_interval=10.0)
    for i in range(2_000):
        await limiter.acquire(
            [
                LimitSpec(f"k{i}", "token_bucket", 10, 1.0),
                LimitSpec(f"w{i}", "sliding_window", 10, 1.0),
            ],
            group="g",
        )
        await limiter.acquire_lease(f"l{i}", limit=1, lease_id="a", ttl_seconds=1.0, group="g")
        await limiter.block(f"b{i}", 1.0, group="g")
    assert (await limiter.health())["keys"] == 8_000

    clock.advance(11.0)  # past every expiry and the sweep interval
    await limiter.acquire([LimitSpec("fresh", "token_bucket", 10, 1.0)], group="g")

    assert (await limiter.health())["keys"] == 1


def test_decisions_are_atomic_across_threads() -> None:
    limiter = InProcessLimiter()
    spec = LimitSpec("rpm", "token_bucket", limit=500, period_seconds=3600.0)
    admitted: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        async def fire() -> list[bool]:
            return [(await limiter.acquire([spec], group="g")).allowed for _ in range(250)]

        results = asyncio.run(fire())
        with lock:
            admitted.extend(results)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert admitted.count(True) == 500
