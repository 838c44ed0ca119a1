from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Sequence

import httpx
import pytest
import redis

from testbed.services import RedisServer

TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def clean_redis() -> str:
    """The shared test Redis database, emptied: limit keys from earlier tests must not leak in."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.flushdb()
    client.close()
    return TEST_REDIS_URL


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, on a free port: it may stop (kill) and start it again."""
    server = RedisServer()
    server.start()
    yield server
    server.kill()


def chat_body(model: str = "sim-fast", **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **extra}


def fire(urls: Sequence[str], key: str | Sequence[str], count: int, *, body: dict | None = None, timeout: float = 30) -> list[httpx.Response]:
    """Send `count` chat completions at once, round-robin over gateways (and keys)."""
    keys = [key] if isinstance(key, str) else list(key)

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{urls[i % len(urls)]}/v1/chat/completions",
                        headers={"Authorization": f"Bearer {keys[i % len(keys)]}"},
                        json=body or chat_body(),
                    )
                    for i in range(count)
                )
            )

    return asyncio.run(run())
