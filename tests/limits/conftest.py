"""Fixtures for the limiter tests: a backend harness run against Redis and in-process, unique
key prefixes with cleanup, and private redis-server processes to kill and restart."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
import redis
import redis.asyncio as aioredis

from limits import (
    Decision,
    InProcessLimiter,
    Limiter,
    LimitKind,
    LimitSpec,
    ManualClock,
    RedisLimiter,
)

REDIS_URL = os.environ.get("LIMITS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _redis_is_up(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis (scripts/test starts it); its absence is a failure, not a skip."""
    if not _redis_is_up(REDIS_URL):
        pytest.fail(f"no Redis at {REDIS_URL}: start it (scripts/services) before the tests")
    return REDIS_URL


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix unique to this test; every key under it is deleted afterwards."""
    value = f"test:limits:{uuid.uuid4().hex[:12]}"
    yield value
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{value}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@dataclass
class Backend:
    """One limiter plus the clock that drives it, as the shared suite sees it."""

    name: str
    limiter: Limiter
    clock: ManualClock
    group: str = field(default_factory=lambda: f"g{uuid.uuid4().hex[:8]}")

    def spec(
        self,
        key: str,
        *,
        kind: LimitKind = "token_bucket",
        limit: int = 5,
        period: float = 50.0,
        cost: int = 1,
    ) -> LimitSpec:
        return LimitSpec(key=key, kind=kind, limit=limit, period_seconds=period, cost=cost)

    async def acquire(self, *specs: LimitSpec, group: str | None = None) -> Decision:
        return await self.limiter.acquire(specs, group=group or self.group)

    async def remaining(self, spec: LimitSpec) -> int:
        """Peek (cost 0) at what the spec could still take."""
        peek = LimitSpec(spec.key, spec.kind, spec.limit, spec.period_seconds, cost=0)
        decision = await self.limiter.acquire([peek], group=self.group)
        return decision.states[0].remaining


@pytest.fixture(params=["redis", "inprocess"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """The limiter under test, on a `ManualClock` (the Redis scripts take it instead of TIME)."""
    clock = ManualClock()
    if request.param == "inprocess":
        limiter: Limiter = InProcessLimiter(clock=clock)
    else:
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("prefix")
        # a generous timeout: these tests specify semantics, not latency
        limiter = RedisLimiter(
            aioredis.Redis.from_url(url), prefix=prefix, timeout=2.0, clock=clock, owns_client=True
        )
    yield Backend(request.param, limiter, clock)
    await limiter.aclose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A private redis-server this test starts, kills, freezes and restarts on one port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _redis_is_up(self.url):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a frozen process cannot die otherwise
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server on a free port, killed after the test."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: the failure-policy tests need a server to stop")
    server = RedisServer(free_port())
    server.start()
    try:
        yield server
    finally:
        server.kill()
