"""On a single Redis, the decisions of calls that ask at once share round trips, and each still
gets its own answer: its own reply, its own error, its own deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis

from limits import LimiterBackendError, LimiterCommandError, LimitSpec, RedisLimiter
from limits._keys import spec_keys
from testbed.services import RedisServer

TIMEOUT = 0.2  # seconds per decision
NEVER_HANGS = 1.0  # seconds: far above TIMEOUT, far below a hang
BUCKET = LimitSpec("rpm", "token_bucket", limit=25, period_seconds=60.0)


@pytest.fixture
async def limiter(redis_server: RedisServer) -> AsyncIterator[RedisLimiter]:
    limiter = RedisLimiter.from_url(redis_server.url, prefix="t", timeout=TIMEOUT)
    yield limiter
    await limiter.aclose()


def reads_processed(client: redis.Redis) -> int:
    """How many times Redis has read from its clients' sockets (this `INFO` was one)."""
    return int(client.info("stats")["total_reads_processed"])


async def test_forty_decisions_asked_at_once_take_a_few_round_trips_and_admit_exactly_the_limit(
    limiter: RedisLimiter, redis_server: RedisServer
) -> None:
    await limiter.acquire([LimitSpec("warm", "token_bucket", 1, 1.0)], group="warm")  # connected
    counter = redis.Redis.from_url(redis_server.url)
    before = reads_processed(counter)

    decisions = await asyncio.gather(*(limiter.acquire([BUCKET], group="g") for _ in range(40)))

    reads = reads_processed(counter) - before - 1  # less the INFO that read the count
    counter.close()
    assert sum(decision.allowed for decision in decisions) == 25
    # One round trip each would be 40 reads: the first goes alone, the rest together.
    assert reads <= 4, reads


async def test_a_script_that_fails_fails_alone_among_those_sent_with_it(
    limiter: RedisLimiter, redis_server: RedisServer
) -> None:
    broken_group = "broken"
    bucket_key = spec_keys(limiter.prefix, broken_group, BUCKET)[0]
    client = redis.Redis.from_url(redis_server.url)
    client.set(bucket_key, "not a bucket")  # the script's HMGET on it fails: WRONGTYPE
    client.close()

    outcomes = await asyncio.gather(
        *(limiter.acquire([BUCKET], group=f"g{index}") for index in range(5)),
        limiter.acquire([BUCKET], group=broken_group),
        *(limiter.acquire([BUCKET], group=f"g{index}") for index in range(5, 10)),
        return_exceptions=True,
    )

    failed = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert len(failed) == 1 and isinstance(outcomes[5], LimiterCommandError), outcomes
    assert all(outcome.allowed for outcome in outcomes if not isinstance(outcome, BaseException))


async def test_scripts_redis_forgot_are_loaded_again_for_every_call_sent_together(
    limiter: RedisLimiter, redis_server: RedisServer
) -> None:
    assert (await limiter.acquire([BUCKET], group="g")).allowed
    client = redis.Redis.from_url(redis_server.url)
    client.script_flush()
    client.close()

    decisions = await asyncio.gather(*(limiter.acquire([BUCKET], group="g") for _ in range(10)))

    assert all(decision.allowed for decision in decisions)
    assert sorted(decision.states[0].remaining for decision in decisions) == list(range(14, 24))


async def test_each_of_many_decisions_waiting_on_a_frozen_redis_ends_at_its_deadline(
    limiter: RedisLimiter, redis_server: RedisServer
) -> None:
    """SIGSTOP: the round trip out never comes back, and those queued behind it must not wait
    for it past their own deadline."""
    assert (await limiter.acquire([BUCKET], group="g")).allowed
    redis_server.pause()
    try:

        async def timed() -> tuple[float, BaseException | None]:
            started = time.monotonic()
            try:
                await limiter.acquire([BUCKET], group="g")
            except LimiterBackendError as error:
                return time.monotonic() - started, error
            return time.monotonic() - started, None

        first = asyncio.create_task(timed())
        await asyncio.sleep(TIMEOUT / 2)  # the first is out; these queue behind it
        outcomes = [await first, *await asyncio.gather(*(timed() for _ in range(20)))]
    finally:
        redis_server.resume()

    assert all(isinstance(error, LimiterBackendError) for _, error in outcomes), outcomes
    assert max(seconds for seconds, _ in outcomes) < NEVER_HANGS
