"""Fault fixtures: a PostgreSQL that refuses connections, a private Redis to pause, a gateway
with its own ledger outbox, and clients that stream or hang up."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from django.db import connection

from testbed.services import RedisServer
from tests.conftest import Gateway
from tests.gating.conftest import clean_redis  # noqa: F401 - a fixture


class PostgresFault:
    """Make the test database refuse connections, cut the connections of the gateway under test
    (found by their `application_name`: start it with `env()`), then allow connections again.

    Issued from a connection to the `postgres` database. Other processes' open connections stay
    up (the session's shared gateway, the test's own), but new ones are refused meanwhile.
    """

    def __init__(self) -> None:
        settings = connection.settings_dict
        self.database = settings["NAME"]
        self.admin = psycopg.connect(
            host=settings.get("HOST") or "127.0.0.1",
            port=settings.get("PORT") or 5432,
            user=settings.get("USER") or "postgres",
            dbname="postgres",
            autocommit=True,
        )
        self.refusing = False
        self.application_name = f"llmgateway-fault-{os.getpid()}-{time.monotonic_ns()}"

    def env(self) -> dict[str, str]:
        """The environment that names the gateway under test's connections (libpq's PGAPPNAME)."""
        return {"PGAPPNAME": self.application_name}

    def refuse(self) -> None:
        self.refusing = True
        with self.admin.cursor() as cursor:
            cursor.execute(f'ALTER DATABASE "{self.database}" ALLOW_CONNECTIONS false')
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
                [self.database, self.application_name],
            )

    def allow(self) -> None:
        if self.refusing:
            with self.admin.cursor() as cursor:
                cursor.execute(f'ALTER DATABASE "{self.database}" ALLOW_CONNECTIONS true')
            self.refusing = False
        connection.close()
        close_pool = getattr(connection, "close_pool", None)
        if close_pool is not None:
            close_pool()  # its connections were cut


@pytest.fixture
def postgres_fault(transactional_db: None) -> Iterator[PostgresFault]:
    if connection.vendor != "postgresql":
        pytest.fail("the PostgreSQL fault needs the tests on PostgreSQL (DATABASE_URL; scripts/test sets it)")
    fault = PostgresFault()
    try:
        yield fault
    finally:
        fault.allow()
        fault.admin.close()


@pytest.fixture
def pausable_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, to pause (SIGSTOP) and resume."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def outbox_dir(tmp_path: Path) -> Path:
    return tmp_path / "outbox"


def wait_until(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.05, what: str = "the condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s (last: {value!r})")
        time.sleep(interval)


async def stream_call(
    client: httpx.AsyncClient, gateway: Gateway, key: str, body: dict[str, Any], *, started: asyncio.Event | None = None
) -> dict[str, Any]:
    """One streamed call: its status, x-request-id, content chunks and how it ended."""
    result: dict[str, Any] = {"status": None, "request_id": None, "contents": 0, "done": False, "error": None}
    async with client.stream(
        "POST", f"{gateway.api_url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, json={**body, "stream": True}
    ) as response:
        result["status"] = response.status_code
        result["request_id"] = response.headers.get("x-request-id")
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                result["done"] = True
            elif line.startswith('data: {"error"'):
                result["error"] = line
            elif '"content":' in line:
                result["contents"] += 1
                if started is not None:
                    started.set()
    return result


def hang_up_during_admission(gateway: Gateway, key: str, body: bytes, after_seconds: float) -> None:
    """Send a complete request, then close the socket `after_seconds` later without reading."""
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(request)
        time.sleep(after_seconds)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST, like a killed client


def streams_through_a_fault(
    gateway: Gateway, key: str, body: dict[str, Any], *, count: int, fault: Callable[[], Awaitable[None]]
) -> list[Any]:
    """Start `count` streams; once every one has its first token, run `fault`; return how each
    stream ended (its `stream_call` result, or the exception that cut it)."""

    async def run() -> list[Any]:
        started = [asyncio.Event() for _ in range(count)]
        async with httpx.AsyncClient(timeout=60) as client:
            calls = [asyncio.create_task(stream_call(client, gateway, key, body, started=event)) for event in started]
            await asyncio.gather(*(event.wait() for event in started))
            await fault()
            return await asyncio.gather(*calls, return_exceptions=True)

    return asyncio.run(run())
