"""Exactness across OS processes against the real Redis (and the local Redis Cluster), on Redis
TIME.

Three spawned processes, each with its own event loop and connection pool, fire 200
concurrent acquire() calls in total at one key: exactly `limit` are admitted, never one more.
Then, a measured interval later, exactly the refilled number is admitted.
"""

from __future__ import annotations

import math
import multiprocessing
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from limits import LimitSpec
from limits._keys import key_for

from . import _worker
from .conftest import is_cluster, sync_client

PROCESSES = 3
CALLS_PER_PROCESS = 67  # 201 calls in all per key


def _as_float(value: bytes | str | None) -> float:
    assert value is not None
    return float(value)


def _redis_now_ms(client: redis.Redis | redis.RedisCluster) -> float:
    seconds, micros = client.time()
    return seconds * 1000.0 + micros / 1000.0


def _admissible(tokens_at_start: float, span_ms: float) -> tuple[int, int]:
    """How many calls a burst can admit from a 1 token/s bucket holding ``tokens_at_start``
    when it fires, if its charges span at most ``span_ms`` of Redis time: at least the whole
    tokens present, at most those plus what refilled meanwhile. The two are equal (the count is
    exact) whenever the burst is shorter than the refill of the next token; on a heavily loaded
    machine the burst can be slower, and then only the upper bound (no over-admission) holds."""
    return math.floor(tokens_at_start), math.floor(tokens_at_start + span_ms / 1_000)


# On the single Redis only: spawning the processes is most of its ~10 s, and the same script's
# exactness on a cluster, on every node, is test_redis_cluster's (two limiters, their own clients).
@pytest.mark.parametrize("redis_url", ["redis"], indirect=True)
def test_three_processes_admit_exactly_the_limit_then_exactly_the_refill(
    redis_url: str, prefix: str
) -> None:
    group = f"g{uuid.uuid4().hex[:8]}"
    bucket = LimitSpec("rpm", "token_bucket", limit=60, period_seconds=60.0)  # 1 token / s
    window = LimitSpec("rpw", "sliding_window", limit=60, period_seconds=60.0)
    bucket_key = key_for(prefix, group, "tb", "rpm")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES + 1, timeout=60)
    results = ctx.Queue()
    processes = [
        ctx.Process(
            target=_worker.run,
            kwargs=dict(
                url=redis_url,
                cluster=is_cluster(redis_url),
                prefix=prefix,
                group=group,
                specs=[bucket, window],
                calls=CALLS_PER_PROCESS,
                phases=2,
                barrier=barrier,
                results=results,
            ),
        )
        for _ in range(PROCESSES)
    ]
    client = sync_client(redis_url)

    def bucket_state() -> tuple[float, float]:
        """(tokens, ms of the last charge) as stored in Redis."""
        tokens, last_charge_ms = (_as_float(v) for v in client.hmget(bucket_key, ["t", "ts"]))
        return tokens, last_charge_ms

    for process in processes:
        process.start()
    try:
        # phase 0: everyone fires at once at a fresh (full) bucket
        barrier.wait()  # ready
        released_ms = _redis_now_ms(client)
        barrier.wait()  # go
        first = [results.get(timeout=60) for _ in range(PROCESSES * 2)]
        tokens, last_charge_ms = bucket_state()
        first_bounds = _admissible(60.0, last_charge_ms - released_ms)

        # phase 1: fire when Redis TIME says the bucket holds 3.5 tokens, half a token away
        # from either neighbouring count (a fraction may have refilled during phase 0)
        fire_at_ms = last_charge_ms + (3.5 - tokens) * 1_000
        deadline = time.monotonic() + 10
        barrier.wait()  # ready
        while (released_ms := _redis_now_ms(client)) < fire_at_ms:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        tokens_at_release = tokens + (released_ms - last_charge_ms) / 1_000
        barrier.wait()  # go
        second = [results.get(timeout=60) for _ in range(PROCESSES * 2)]
        second_bounds = _admissible(tokens_at_release, bucket_state()[1] - released_ms)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        client.close()

    def admitted(outcomes: list[tuple[int, str, int, int]], key: str) -> int:
        return sum(a for _, k, a, _ in outcomes if k == key)

    assert all(errors == 0 for *_, errors in first + second)
    assert first_bounds[0] == 60
    assert first_bounds[0] <= admitted(first, "rpm") <= first_bounds[1]  # normally == 60
    assert admitted(first, "rpw") == 60  # exact whatever the load: nothing expires for 60 s
    assert second_bounds[0] == 3
    assert second_bounds[0] <= admitted(second, "rpm") <= second_bounds[1]  # normally == 3
    assert admitted(second, "rpw") == 0  # a window frees nothing until its entries expire
    assert all(process.exitcode == 0 for process in processes)


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    yield
    for child in multiprocessing.active_children():
        child.kill()
