"""The Redis backend on its production clock (Redis TIME) and its storage effects."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis

from limits import LimitSpec, RedisLimiter, acquire_waiting
from limits._keys import key_for, spec_keys
from testbed.services import RedisServer

from .conftest import async_client, is_cluster


@pytest.fixture
async def limiter(redis_url: str, prefix: str) -> AsyncIterator[RedisLimiter]:
    limiter = RedisLimiter.from_url(redis_url, prefix=prefix, timeout=10.0, cluster=is_cluster(redis_url))
    yield limiter
    await limiter.aclose()


async def test_waiters_are_admitted_at_the_sustained_rate_on_redis_time(
    limiter: RedisLimiter,
) -> None:
    """Ten concurrent waiters on a 5-token bucket refilling 10 tokens/s: all get in, and the
    last cannot get in before 0.5 s (5 tokens at 10/s) after the first; a lower bound only,
    so a slow machine cannot fail it."""
    spec = LimitSpec("upstream", "token_bucket", limit=5, period_seconds=0.5)
    group = f"g{uuid.uuid4().hex[:8]}"

    started = time.monotonic()
    async with asyncio.timeout(10):
        decisions = await asyncio.gather(
            *(acquire_waiting(limiter, [spec], group=group, max_wait=5.0) for _ in range(10))
        )
    elapsed = time.monotonic() - started

    assert all(d.allowed for d in decisions)
    assert elapsed >= 0.5 - 0.01


async def test_keys_carry_ttls_a_little_past_their_last_use(
    limiter: RedisLimiter, redis_url: str, prefix: str
) -> None:
    group = "g1"
    bucket = LimitSpec("rpm", "token_bucket", limit=10, period_seconds=10.0, cost=5)
    window = LimitSpec("rpw", "sliding_window", limit=10, period_seconds=20.0)
    started = time.monotonic()
    await limiter.acquire([bucket, window], group=group)
    await limiter.acquire_lease("streams", limit=2, lease_id="a", ttl_seconds=30, group=group)
    await limiter.block("upstream", 40.0, group=group)

    client = async_client(redis_url)
    try:
        ttl = {
            part_key: await client.pttl(key_for(prefix, group, *part_key))
            for part_key in [
                ("tb", "rpm"),
                ("sw", "rpw"),
                ("swn", "rpw"),
                ("lease", "streams"),
                ("block", "upstream"),
            ]
        }
    finally:
        await client.aclose()
    since_set_ms = (time.monotonic() - started) * 1000

    def set_to(expected_ms: int, key: tuple[str, str]) -> bool:
        """The key's TTL was `expected_ms` when the limiter set it (it has been running since)."""
        return expected_ms - since_set_ms - 1 <= ttl[key] <= expected_ms

    # bucket: 5 tokens missing at 1/s -> 5 s to full, plus a 1 s margin
    assert set_to(6_000, ("tb", "rpm")), (ttl, since_set_ms)
    assert set_to(21_000, ("sw", "rpw")), (ttl, since_set_ms)
    assert set_to(21_000, ("swn", "rpw")), (ttl, since_set_ms)
    assert set_to(31_000, ("lease", "streams")), (ttl, since_set_ms)
    assert set_to(41_000, ("block", "upstream")), (ttl, since_set_ms)


async def test_all_keys_of_a_call_share_the_group_hash_tag(limiter: RedisLimiter) -> None:
    specs = [LimitSpec("rpm", "token_bucket", 1, 1.0), LimitSpec("tpm", "sliding_window", 1, 1.0)]
    keys = [k for spec in specs for k in spec_keys(limiter.prefix, "user:7", spec)]

    assert {redis.cluster.key_slot(k.encode()) for k in keys} == {redis.cluster.key_slot(b"user:7")}


async def test_scripts_are_reloaded_after_redis_forgets_them(redis_server: RedisServer) -> None:
    limiter = RedisLimiter.from_url(redis_server.url, prefix="t", timeout=1.0)
    spec = LimitSpec("rpm", "token_bucket", limit=3, period_seconds=60.0)
    try:
        assert (await limiter.acquire([spec], group="g")).allowed
        flusher = redis.Redis.from_url(redis_server.url)
        flusher.script_flush()
        flusher.close()

        decision = await limiter.acquire([spec], group="g")
    finally:
        await limiter.aclose()

    assert decision.allowed
    assert decision.states[0].remaining == 1
