"""The failure policy against a real, private redis-server that the tests kill, freeze and
restart: decisions never hang, fail-open keeps deciding in-process, fail-closed refuses, and
the limiter returns to Redis once it is back and the breaker's reset timeout has passed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import redis

from limits import (
    CircuitBreaker,
    Decision,
    InProcessLimiter,
    LimiterBackendError,
    LimiterUnavailable,
    LimitSpec,
    RedisLimiter,
    ResilientLimiter,
)
from limits._keys import key_for
from testbed.services import RedisServer

TIMEOUT = 0.05  # the Redis backend's per-call deadline under test
NEVER_HANGS = 1.0  # generous bound on any single decision: the point is "never hangs"
RESET = 0.3  # breaker reset timeout
SPEC = LimitSpec("rpm", "token_bucket", limit=1_000_000, period_seconds=1e7)  # ~no refill
GROUP = "g"


@dataclass
class Load:
    """Fires decisions back to back in a task and records how each one went."""

    limiter: ResilientLimiter
    outcomes: list[tuple[str, float]] = field(default_factory=list)  # (outcome, seconds)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                decision: Decision = await self.limiter.acquire([SPEC], group=GROUP)
                outcome = "allowed" if decision.allowed else "rejected"
            except LimiterUnavailable:
                outcome = "unavailable"
            self.outcomes.append((outcome, time.monotonic() - started))
            await asyncio.sleep(0.002)

    def since(self, index: int) -> list[str]:
        return [outcome for outcome, _ in self.outcomes[index:]]


async def _until(predicate: Callable[[], bool], *, within: float) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.01)


def _tokens_in_redis(server: RedisServer) -> float | None:
    client = redis.Redis.from_url(server.url)
    try:
        value = client.hget(key_for("t", GROUP, "tb", SPEC.key), "t")
    finally:
        client.close()
    return None if value is None else float(value)


@pytest.fixture
async def events() -> list[tuple[str, str]]:
    return []


@pytest.fixture
async def make_limiter(
    redis_server: RedisServer, events: list[tuple[str, str]]
) -> AsyncIterator[Callable[[bool], ResilientLimiter]]:
    made: list[ResilientLimiter] = []

    def make(fail_open: bool) -> ResilientLimiter:
        limiter = ResilientLimiter(
            RedisLimiter.from_url(redis_server.url, prefix="t", timeout=TIMEOUT),
            InProcessLimiter(),
            fail_open=fail_open,
            breaker=CircuitBreaker(failure_threshold=3, reset_timeout=RESET),
            on_fallback=lambda operation, reason: events.append((operation, reason)),
        )
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.aclose()


async def test_fail_open_keeps_deciding_through_a_redis_crash_and_returns_to_redis(
    redis_server: RedisServer,
    make_limiter: Callable[[bool], ResilientLimiter],
    events: list[tuple[str, str]],
) -> None:
    limiter = make_limiter(True)
    load = Load(limiter)
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(load.run(stop))
        try:
            await _until(lambda: len(load.outcomes) >= 20, within=5)
            assert _tokens_in_redis(redis_server) is not None  # decisions came from Redis
            assert events == []

            redis_server.kill()
            killed_at = len(load.outcomes)
            await _until(lambda: limiter.breaker.state == "open", within=5)
            await _until(lambda: len(load.outcomes) >= killed_at + 50, within=5)
            health = await limiter.health()

            redis_server.start()  # same port, empty memory
            await _until(lambda: limiter.breaker.state == "closed", within=5)
            recovered_at, fallbacks_before = len(load.outcomes), len(events)
            tokens_before = _tokens_in_redis(redis_server)
            await _until(lambda: len(load.outcomes) >= recovered_at + 20, within=5)
        finally:
            stop.set()

    assert set(load.since(killed_at)) == {"allowed"}  # no caller ever saw the outage
    assert max(seconds for _, seconds in load.outcomes) < NEVER_HANGS
    assert health["state"] == "degraded"
    assert health["breaker"] in {"open", "half_open"}
    assert health["primary"] is None  # Redis is not even pinged while the breaker is open
    assert {reason for _, reason in events} == {"error", "breaker_open"}
    assert {operation for operation, _ in events} == {"acquire"}
    # back on Redis: its bucket is charged again and the fallback is no longer used
    tokens_after = _tokens_in_redis(redis_server)
    assert tokens_before is not None and tokens_after is not None
    assert tokens_after < tokens_before
    assert len(events) == fallbacks_before
    assert (await limiter.health())["state"] == "ok"


async def test_fail_closed_refuses_quickly_while_redis_is_down(
    redis_server: RedisServer,
    make_limiter: Callable[[bool], ResilientLimiter],
    events: list[tuple[str, str]],
) -> None:
    limiter = make_limiter(False)
    load = Load(limiter)
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(load.run(stop))
        try:
            await _until(lambda: len(load.outcomes) >= 20, within=5)
            redis_server.kill()
            await _until(lambda: limiter.breaker.state == "open", within=5)
            open_at = len(load.outcomes)
            await _until(lambda: len(load.outcomes) >= open_at + 50, within=5)
            health = await limiter.health()

            redis_server.start()
            await _until(lambda: limiter.breaker.state == "closed", within=5)
            recovered_at = len(load.outcomes)
            await _until(lambda: len(load.outcomes) >= recovered_at + 20, within=5)
        finally:
            stop.set()

    assert set(load.since(open_at)[:50]) == {"unavailable"}
    assert set(load.since(recovered_at)) == {"allowed"}
    assert max(seconds for _, seconds in load.outcomes) < NEVER_HANGS
    assert health["state"] == "degraded"
    assert health["fail_open"] is False
    assert ("acquire", "breaker_open") in events


async def test_a_frozen_redis_costs_at_most_the_timeout_per_decision(
    redis_server: RedisServer,
    make_limiter: Callable[[bool], ResilientLimiter],
    events: list[tuple[str, str]],
) -> None:
    """SIGSTOP: connections stay open but nothing answers. Only the deadline saves us."""
    limiter = make_limiter(True)
    for _ in range(5):
        await limiter.acquire([SPEC], group=GROUP)

    redis_server.pause()
    try:
        durations = []
        for _ in range(20):
            started = time.monotonic()
            decision = await limiter.acquire([SPEC], group=GROUP)
            durations.append(time.monotonic() - started)
            assert decision.allowed
        breaker_state = limiter.breaker.state
    finally:
        redis_server.resume()

    assert max(durations) < NEVER_HANGS
    # only the 3 calls before the breaker opened waited for the deadline; the rest went
    # straight to the fallback without touching Redis
    assert events == [("acquire", "error")] * 3 + [("acquire", "breaker_open")] * 17
    assert breaker_state == "open"


async def test_the_bare_redis_backend_raises_instead_of_hanging(
    redis_server: RedisServer,
) -> None:
    limiter = RedisLimiter.from_url(redis_server.url, prefix="t", timeout=TIMEOUT)
    try:
        await limiter.acquire([SPEC], group=GROUP)
        redis_server.pause()
        started = time.monotonic()
        with pytest.raises(LimiterBackendError, match="timed out"):
            await limiter.acquire([SPEC], group=GROUP)
        elapsed = time.monotonic() - started
        health = await limiter.health()
        redis_server.resume()
        redis_server.kill()
        with pytest.raises(LimiterBackendError, match="backend failed"):
            await limiter.acquire([SPEC], group=GROUP)
    finally:
        await limiter.aclose()  # the fixture thaws and kills the server

    assert elapsed < NEVER_HANGS
    assert health["state"] == "down"
