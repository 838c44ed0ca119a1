from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence

import httpx
import pytest
import redis

from tests.conftest import free_port

TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def clean_redis() -> str:
    """The shared test Redis database, emptied: limit keys from earlier tests must not leak in."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.flushdb()
    client.close()
    return TEST_REDIS_URL


class PrivateRedis:
    """A redis-server of the test's own, on a free port, that the test may stop and restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, socket_timeout=0.2).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("private redis did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()


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
