"""The I/O of a short non-stream call through the gateway, and nothing else: a floor for calls/s.

    BARE_IO_UPSTREAM=http://127.0.0.1:PORT/v1 BARE_IO_REDIS=redis://... BARE_IO_POSTGRES=postgres://... \
        granian --interface asgi --workers 2 bench.bare_io:application

Each `POST` does, in the gateway's order, what a call with a budget asks of the machine: one Redis
script before the upstream call (the rate limits) and one after (their give-back), one
PostgreSQL write before (the budget hold) and one after (the ledger row, the hold deleted in the
same statement), and the upstream call itself, its body forwarded and its answer sent back. No
Django, no authentication, no validation, no token count, no batching: `bench.calls_per_second`
drives it as it drives the gateway, so the two calls/s figures side by side say how much of the
gateway's cost is its own work rather than the I/O any gateway with these parts must do. The
tables it writes (`TABLES`) are created by the caller in a database of its own.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import aiohttp
import orjson
import psycopg_pool
import redis.asyncio as aioredis

TABLES = (
    "CREATE TABLE bare_io_holds (request_id uuid PRIMARY KEY)",
    "CREATE TABLE bare_io_ledger (id bigserial PRIMARY KEY, request_id uuid UNIQUE, tokens integer)",
)
_INCREMENT = "return redis.call('INCR', KEYS[1])"
_HOLD = "INSERT INTO bare_io_holds (request_id) VALUES (%s)"
_RECORD = (
    "WITH settled AS (DELETE FROM bare_io_holds WHERE request_id = %s) "
    "INSERT INTO bare_io_ledger (request_id, tokens) VALUES (%s, %s)"
)


class _Parts:
    """The clients one worker shares between its calls."""

    def __init__(self) -> None:
        self.upstream = os.environ["BARE_IO_UPSTREAM"].rstrip("/") + "/chat/completions"
        self.session = aiohttp.ClientSession()
        self.redis = aioredis.Redis.from_url(os.environ["BARE_IO_REDIS"])
        self.postgres = psycopg_pool.AsyncConnectionPool(os.environ["BARE_IO_POSTGRES"], min_size=2, max_size=8, open=False)
        self.script = ""

    async def open(self) -> None:
        await self.postgres.open(wait=True)
        self.script = await self.redis.script_load(_INCREMENT)

    async def close(self) -> None:
        await self.session.close()
        await self.redis.aclose()
        await self.postgres.close()

    async def call(self, body: bytes) -> bytes:
        request_id = uuid.uuid4()
        await self.redis.evalsha(self.script, 1, "{bare-io}limits")
        async with self.postgres.connection() as connection:
            await connection.execute(_HOLD, [request_id])
        async with self.session.post(self.upstream, data=body, headers={"content-type": "application/json"}) as response:
            answer = await response.read()
        tokens = orjson.loads(answer).get("usage", {}).get("total_tokens", 0)
        async with self.postgres.connection() as connection:
            await connection.execute(_RECORD, [request_id, request_id, tokens])
        await self.redis.evalsha(self.script, 1, "{bare-io}give-back")
        return answer


_parts: _Parts | None = None


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _parts
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _parts = _Parts()
                await _parts.open()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if _parts is not None:
                    await _parts.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    assert _parts is not None
    answer = await _parts.call(body) if scope["method"] == "POST" else b"{}"  # GET: is it up?
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})
