"""On a single Redis, the decisions of calls that ask at once share round trips, and each still
gets its own answer: its own reply, its own error, its own deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis

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
    # One round trip each would be 40 reads; asked in one turn of the loop, they go together.
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


async def test_decisions_on_a_frozen_redis_end_at_their_deadline_and_never_wedge_the_limiter(
    redis_server: RedisServer,
) -> None:
    """SIGSTOP, under a client without socket timeouts: only the limiter's deadlines end the
    round trip that never comes back, so the scripts queued behind it are sent, and fail, in
    their turn, and closing the limiter does not wait on it."""
    limiter = RedisLimiter(aioredis.Redis.from_url(redis_server.url), prefix="t", timeout=TIMEOUT, owns_client=True)
    assert (await limiter.acquire([BUCKET], group="g")).allowed
    redis_server.pause()
    try:
        first_wave = await asyncio.gather(*(timed_acquire(limiter) for _ in range(20)))
        second_wave = await asyncio.gather(*(timed_acquire(limiter) for _ in range(20)))
        closing_started = time.monotonic()
        await limiter.aclose()
        closing = time.monotonic() - closing_started
    finally:
        redis_server.resume()

    for seconds, error in [*first_wave, *second_wave]:
        assert isinstance(error, LimiterBackendError)
        assert seconds < NEVER_HANGS
    assert closing < NEVER_HANGS


async def timed_acquire(limiter: RedisLimiter) -> tuple[float, BaseException | None]:
    """How long one decision took, and the limiter error it raised, if any."""
    started = time.monotonic()
    try:
        await limiter.acquire([BUCKET], group="g")
    except LimiterBackendError as error:
        return time.monotonic() - started, error
    return time.monotonic() - started, None
