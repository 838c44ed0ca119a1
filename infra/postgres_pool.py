"""The check the PostgreSQL connection pool runs on a connection as it hands it out.

psycopg_pool's own check (`ConnectionPool.check_connection`, what Django installs for
`CONN_HEALTH_CHECKS`) sends an empty query: a round trip to the server for every database step
the gateway takes, healthy connection or not. A server that ends a connection (a restart,
`pg_terminate_backend`, an idle-session timeout) writes to it first: an error message, then the
end of the stream. So a connection with something to read while it sat idle in the pool gets the
full check, and is replaced if that fails; one with nothing to read is handed out as it is.

Settings import this module, so it imports nothing of Django.
"""

from __future__ import annotations

import select
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool


def has_pending_input(connection: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Whether the server has written to this idle connection (poll, no wait)."""
    poller = select.poll()
    poller.register(connection.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def check_idle_connection(connection: psycopg.Connection) -> None:
    """Raise if a connection handed out by the pool is not usable (the pool then replaces it);
    a round trip only for one the server has written to, or one psycopg knows is broken."""
    if connection.closed or connection.broken or has_pending_input(connection):
        ConnectionPool.check_connection(connection)
