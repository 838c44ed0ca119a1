"""`bench.bare_io`, the calls/s floor: served as the gateway is, each call does the same I/O as
a call with a budget (two Redis scripts, a hold and a ledger row in PostgreSQL, the upstream
call) and answers with the upstream's body."""

from __future__ import annotations

import os
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import redis

from bench.bare_io import TABLES
from testbed.fake_upstream import FakeUpstream
from testbed.gateway import Gateway
from testbed.services import PostgresDatabase

# The PostgreSQL server the suite runs on (scripts/test's PG_URL), through its maintenance
# database: PG_URL's own need not exist (Django's tests use test_<its name>).
POSTGRES_SERVER = urlunsplit(
    urlsplit(os.environ.get("PG_URL", "postgres://postgres@127.0.0.1:5432/postgres"))._replace(path="/postgres")
)


@pytest.fixture
def database() -> Iterator[PostgresDatabase]:
    """A database of the test's own with the floor's tables."""
    created = PostgresDatabase(POSTGRES_SERVER, f"llmgateway_bare_io_{os.getpid()}")
    try:
        with psycopg.connect(created.url, autocommit=True) as connection:
            for statement in TABLES:
                connection.execute(statement)  # type: ignore[arg-type]
        yield created
    finally:
        created.drop()


def test_each_call_runs_both_scripts_writes_one_settled_row_and_relays_the_answer(
    database: PostgresDatabase, fake_upstream: FakeUpstream
) -> None:
    redis_url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    counters = redis.Redis.from_url(redis_url)
    counters.delete("{bare-io}limits", "{bare-io}give-back")
    env = {
        **os.environ,
        "BARE_IO_UPSTREAM": fake_upstream.base_url,
        "BARE_IO_REDIS": redis_url,
        "BARE_IO_POSTGRES": database.url,
    }
    with Gateway(env, app="bench.bare_io:application", timeout=30) as server:
        answers = [
            httpx.post(
                f"{server.base_url}/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "stream": False},
            )
            for _ in range(3)
        ]

    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert all(answer.json()["choices"][0]["message"]["content"] for answer in answers)
    assert int(counters.get("{bare-io}limits") or 0) == int(counters.get("{bare-io}give-back") or 0) == 3
    [(rows, distinct, fewest_tokens)] = database.query(
        "SELECT count(*), count(DISTINCT request_id), min(tokens) FROM bare_io_ledger"
    )
    [(holds,)] = database.query("SELECT count(*) FROM bare_io_holds")
    assert (rows, distinct, holds) == (3, 3, 0)
    assert fewest_tokens > 0
    counters.delete("{bare-io}limits", "{bare-io}give-back")
    counters.close()
