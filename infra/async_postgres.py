"""PostgreSQL on the event loop, for the group-committed batches (the ledger's, the budget holds').

A batch is a few round trips of prepared statements. Run in Django's database threads
(`infra.db`), it is handed to a thread and its outcome handed back to the loop, and after each of
its round trips the thread waits for the GIL, which the loop holds while it serves the other
calls: under load, a batch that takes 2-3 ms in an idle process took 14-17 ms. On the loop, a
round trip is an await like any other I/O. SQLite keeps its batches in the database threads.

A batch writer runs one batch at a time, so each has one `LoopConnection`: a psycopg
`AsyncConnection` opened when first needed, with Django's own connection parameters (the same
database, OPTIONS, adapters and `prepare_threshold`; not the OPTIONS Django applies itself once
connected, `isolation_level` and `assume_role`, which the gateway does not set: the batches run
READ COMMITTED, as Django's default), in autocommit (a batch opens its own transaction). Before
each use it gets the check the threads' pool gives (`infra.postgres_pool`): a round trip only if
the server wrote to it while it sat idle. A connection broken, or left mid-statement or
mid-transaction by a batch (a cancellation), is closed, and the next batch opens a new one. Opening one waits at most
`DATABASE_POOL_TIMEOUT` seconds, as a database step in a thread waits for a pooled connection.
Errors are raised as Django's (`django.db.utils`), as in a thread.

A connection belongs to an event loop (a test suite runs one loop per test): on another loop the
old one is closed and a new one opened. `aclose_connections()` closes the running loop's (the
lifespan's shutdown).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from django.db import DEFAULT_DB_ALIAS, connections
from psycopg_pool import AsyncConnectionPool

from infra.postgres_pool import has_pending_input

DEFAULT_CONNECT_TIMEOUT = 2.0  # seconds, when the settings give no pool timeout


def on_postgres(using: str = DEFAULT_DB_ALIAS) -> bool:
    """Whether the batches run on the loop: the database is PostgreSQL."""
    return connections[using].vendor == "postgresql"


def _connect_timeout(using: str) -> float:
    pool = connections[using].settings_dict.get("OPTIONS", {}).get("pool")
    return float(pool.get("timeout", DEFAULT_CONNECT_TIMEOUT)) if isinstance(pool, dict) else DEFAULT_CONNECT_TIMEOUT


class LoopConnection:
    """One PostgreSQL connection of the event loop, for one task at a time (see module)."""

    def __init__(self, name: str, *, using: str = DEFAULT_DB_ALIAS) -> None:
        self.name = name
        self.using = using
        self._connection: psycopg.AsyncConnection[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_use = False
        _all.add(self)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """The connection, checked and in autocommit. Kept when what ran on it failed but left
        it idle (a refused statement, its transaction rolled back); closed when it left it
        mid-statement or mid-transaction (a cancellation), or broken."""
        if self._in_use:
            raise RuntimeError(f"the {self.name} connection serves one task at a time")
        self._in_use = True
        try:
            with connections[self.using].wrap_database_errors:
                connection = await self._usable()
                try:
                    yield connection
                except BaseException:
                    if connection.broken or connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                        self._connection = None
                        await connection.close()
                    raise
        finally:
            self._in_use = False

    async def _usable(self) -> psycopg.AsyncConnection[Any]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._forget()
            self._loop = loop
        timeout = _connect_timeout(self.using)
        connection, self._connection = self._connection, None
        if connection is not None and not (connection.closed or connection.broken or has_pending_input(connection)):
            self._connection = connection
        elif connection is not None:
            try:
                async with asyncio.timeout(timeout):
                    await AsyncConnectionPool.check_connection(connection)
                self._connection = connection
            except (psycopg.Error, TimeoutError):
                await connection.close()
        if self._connection is None:
            parameters = connections[self.using].get_connection_params()
            parameters.pop("cursor_factory", None)  # Django's, for its sync cursors
            try:
                async with asyncio.timeout(timeout):
                    self._connection = await psycopg.AsyncConnection.connect(**parameters, autocommit=True)
            except TimeoutError as error:  # raised as Django's OperationalError, as a refusal is
                raise psycopg.OperationalError(f"no connection to the database within {timeout} s") from error
        return self._connection

    def _forget(self) -> None:
        """Drop a connection of another (closed) event loop: its socket needs no loop to close."""
        if self._connection is not None:
            self._connection.pgconn.finish()
            self._connection = None

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and self._loop is asyncio.get_running_loop():
            await connection.close()
        elif connection is not None:
            connection.pgconn.finish()


_all: weakref.WeakSet[LoopConnection] = weakref.WeakSet()


async def aclose_connections() -> None:
    """Close every `LoopConnection`'s connection (the lifespan's shutdown)."""
    for each in list(_all):
        await each.aclose()
