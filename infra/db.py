"""Database access from async code: a small, shared set of worker threads, never one per stream.

Django's ASGI handler gives each request its own thread for `thread_sensitive` ORM calls, and a
connection opened there lives until the request ends: a stream would hold a connection for its
whole life (and pay for a new thread and connection on every request). The gateway's async path
instead runs its ORM work with `db_task`, in a few shared worker threads of its own, where
connections are reused: persistent on SQLite, checked out of the pool and straight back on
PostgreSQL. A connection that saw an error is checked before it is used again.

On PostgreSQL the group-committed batches (the ledger's, the budget holds') run on the event
loop instead (`infra.async_postgres`); only their rarer parts come here: prices not cached yet, a
batch across midnight, the row-by-row writes of a refused batch.

Those threads are not the event loop's default executor: when the database stalls, each of them
waits for a connection (up to the pool's timeout), and the other work the gateway does in
threads (counting a long prompt's tokens, syncing the ledger outbox's journal) must not queue
behind them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections

# Threads for database work (DATABASE_THREADS); more than the pool's connections would only wait.
_executor = ThreadPoolExecutor(max_workers=getattr(settings, "DATABASE_THREADS", 8), thread_name_prefix="llmgateway-db")


def _discard_broken_connections() -> None:
    for connection in connections.all(initialized_only=True):
        if connection.errors_occurred and not connection.in_atomic_block:
            connection.close_if_unusable_or_obsolete()


def release_connections() -> None:
    """Hand pooled connections back to the pool (outside transactions); keep the others open."""
    for connection in connections.all(initialized_only=True):
        if connection.in_atomic_block:
            continue
        pooled = bool(connection.settings_dict.get("OPTIONS", {}).get("pool"))
        persistent = connection.settings_dict.get("CONN_MAX_AGE") is None
        if pooled or not persistent:
            connection.close()


def db_task[**P, R](function: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """The async twin of a sync database function, run in the database threads."""

    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        _discard_broken_connections()
        try:
            return function(*args, **kwargs)
        finally:
            release_connections()

    return sync_to_async(run, thread_sensitive=False, executor=_executor)
