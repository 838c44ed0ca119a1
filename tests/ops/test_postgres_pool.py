"""The pool's check of a PostgreSQL connection as it hands it out (`infra.postgres_pool`): a dead
connection is replaced before a database step uses it, and a healthy one costs no round trip."""

from __future__ import annotations

import os
import select
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from infra.postgres_pool import check_idle_connection, has_pending_input

# The suite's PostgreSQL server (scripts/test's PG_URL), through its maintenance database.
POSTGRES_SERVER = urlunsplit(
    urlsplit(os.environ.get("PG_URL", "postgres://postgres@127.0.0.1:5432/postgres"))._replace(path="/postgres")
)
GONE_WITHIN = 5.0  # seconds for a terminated backend's goodbye to reach its client


@pytest.fixture
def pool() -> Iterator[ConnectionPool]:
    with ConnectionPool(POSTGRES_SERVER, min_size=1, max_size=1, check=check_idle_connection, timeout=5) as opened:
        yield opened


@pytest.fixture
def round_trip_checks(monkeypatch: pytest.MonkeyPatch) -> list[psycopg.Connection]:
    """The connections psycopg_pool's own check (an empty query) was run on."""
    checked: list[psycopg.Connection] = []
    own_check = ConnectionPool.check_connection

    def recorded(connection: psycopg.Connection) -> None:
        checked.append(connection)
        own_check(connection)

    monkeypatch.setattr(ConnectionPool, "check_connection", staticmethod(recorded))
    return checked


def terminate(backend_pid: int) -> None:
    with psycopg.connect(POSTGRES_SERVER, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", [backend_pid]).fetchone() == (True,)


def wait_for_goodbye(connection: psycopg.Connection) -> None:
    poller = select.poll()
    poller.register(connection.fileno(), select.POLLIN)
    assert poller.poll(GONE_WITHIN * 1000), "the terminated backend's connection never became readable"


def test_a_healthy_connection_is_handed_out_again_without_a_round_trip(
    pool: ConnectionPool, round_trip_checks: list[psycopg.Connection]
) -> None:
    for _ in range(3):
        with pool.connection() as connection:
            assert connection.execute("SELECT 1").fetchone() == (1,)

    assert round_trip_checks == []


def test_a_connection_whose_backend_was_terminated_is_replaced_before_it_is_used(
    pool: ConnectionPool, round_trip_checks: list[psycopg.Connection]
) -> None:
    with pool.connection() as connection:
        dead = connection
        terminate(connection.info.backend_pid)
        wait_for_goodbye(connection)

    with pool.connection() as connection:
        assert connection is not dead
        assert connection.execute("SELECT 1").fetchone() == (1,)  # the step that follows works
    assert round_trip_checks == [dead]  # the full check found it dead


def test_the_check_refuses_a_connection_the_server_ended_and_one_closed_here() -> None:
    ended = psycopg.connect(POSTGRES_SERVER, autocommit=True)
    closed = psycopg.connect(POSTGRES_SERVER, autocommit=True)
    try:
        assert not has_pending_input(ended)
        terminate(ended.info.backend_pid)
        wait_for_goodbye(ended)
        closed.close()

        for connection in (ended, closed):
            with pytest.raises(psycopg.OperationalError):
                check_idle_connection(connection)
    finally:
        ended.close()
