"""A batch writer's connection on the event loop (`infra.async_postgres.LoopConnection`): one
connection batch after batch, replaced when the server ended it, closed when a batch failed on
it, one per event loop, and Django's errors."""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections.abc import Iterator

import psycopg
import pytest
from django.db import DataError, OperationalError, connection

from infra.async_postgres import LoopConnection

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="the batches run on the loop on PostgreSQL only"),
]

GONE_WITHIN = 5.0  # seconds for a terminated backend's goodbye to reach its client


@pytest.fixture
def loop_connection() -> Iterator[LoopConnection]:
    made = LoopConnection("test")
    yield made
    asyncio.run(made.aclose())


async def backend_pid(loop_connection: LoopConnection) -> int:
    async with loop_connection.connection() as on_loop:
        cursor = await on_loop.execute("SELECT pg_backend_pid()")
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])


def backends_alive(*pids: int) -> set[int]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", [list(pids)])
        return {pid for (pid,) in cursor.fetchall()}


def test_one_connection_serves_batch_after_batch_and_one_the_server_ended_is_replaced(loop_connection) -> None:
    async def main() -> tuple[int, int, int]:
        first, second = await backend_pid(loop_connection), await backend_pid(loop_connection)
        await asyncio.to_thread(terminate, first)
        assert loop_connection._connection is not None
        await asyncio.to_thread(wait_for_goodbye, loop_connection._connection.fileno())
        return first, second, await backend_pid(loop_connection)  # no error: replaced before use

    first, second, after = asyncio.run(main())

    assert first == second
    assert after != first


def test_a_refused_statement_raises_djangos_error_and_the_connection_serves_the_next_batch(loop_connection) -> None:
    async def main() -> tuple[int, int]:
        before = await backend_pid(loop_connection)
        with pytest.raises(DataError):  # psycopg's DivisionByZero, as Django raises it
            async with loop_connection.connection() as on_loop, on_loop.transaction():
                await on_loop.execute("SELECT 1 / 0")
        return before, await backend_pid(loop_connection)

    before, after = asyncio.run(main())

    assert after == before


def test_a_batch_cancelled_mid_transaction_leaves_its_connection_closed(loop_connection) -> None:
    async def main() -> tuple[int, int]:
        before = await backend_pid(loop_connection)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2), loop_connection.connection() as on_loop:
                await on_loop.execute("BEGIN")
                await on_loop.execute("SELECT pg_sleep(5)")
        return before, await backend_pid(loop_connection)

    before, after = asyncio.run(main())

    assert after != before
    deadline = time.monotonic() + GONE_WITHIN
    while backends_alive(before) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not backends_alive(before)


def test_the_connection_serves_one_task_at_a_time(loop_connection) -> None:
    async def main() -> None:
        async with loop_connection.connection():
            with pytest.raises(RuntimeError, match="one task at a time"):
                async with loop_connection.connection():
                    pass

    asyncio.run(main())


def test_each_event_loop_gets_its_own_connection_and_the_old_one_is_closed(loop_connection) -> None:
    first = asyncio.run(backend_pid(loop_connection))
    second = asyncio.run(backend_pid(loop_connection))

    assert second != first
    deadline = time.monotonic() + GONE_WITHIN
    while backends_alive(first) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backends_alive(first, second) == {second}


def test_a_database_that_refuses_connections_fails_at_once_with_djangos_error(loop_connection, monkeypatch) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    monkeypatch.setitem(connection.settings_dict, "PORT", port)
    started = time.monotonic()

    with pytest.raises(OperationalError):
        asyncio.run(backend_pid(loop_connection))

    assert time.monotonic() - started < 2.0


def test_a_database_that_does_not_answer_fails_within_the_pool_timeout_with_djangos_error(loop_connection, monkeypatch) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setitem(connection.settings_dict, "PORT", silent.getsockname()[1])
        monkeypatch.setitem(connection.settings_dict["OPTIONS"]["pool"], "timeout", 0.3)
        started = time.monotonic()

        with pytest.raises(OperationalError, match="within 0.3 s"):
            asyncio.run(backend_pid(loop_connection))

        assert 0.3 <= time.monotonic() - started < 2.0


def wait_for_goodbye(fileno: int) -> None:
    poller = select.poll()
    poller.register(fileno, select.POLLIN)
    assert poller.poll(GONE_WITHIN * 1000), "the terminated backend's connection never became readable"


def terminate(backend: int) -> None:
    parameters = connection.get_connection_params()
    parameters.pop("cursor_factory", None)
    with psycopg.connect(**parameters, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", [backend]).fetchone() == (True,)
