"""Services of a test's or a benchmark's own, to break on purpose without touching shared ones.

- :class:`RedisServer`: a ``redis-server`` on a free port of 127.0.0.1 (no persistence), to
  pause (SIGSTOP), resume, kill and start again on the same port. Signals go to its PID only.
- :class:`PostgresDatabase`: a database created on a PostgreSQL server, to refuse connections
  (``ALLOW_CONNECTIONS false`` and its sessions terminated), allow again, and drop. Only that
  database is ever refused or has its sessions terminated.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from testbed.net import HOST, free_port


class RedisServer:
    """A private ``redis-server``; ``start()`` again after ``kill()`` comes back on the same port."""

    def __init__(self, port: int | None = None, *, log: Path | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self.log_path = log
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    def start(self, timeout: float = 10.0) -> None:
        """Start it and wait until it answers PING."""
        import redis

        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        log: IO[bytes] | int = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", HOST, "--save", "",
                 "--appendonly", "no", "--daemonize", "no"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        finally:
            if not isinstance(log, int):
                log.close()  # the child has its own copy
        self.paused = False
        deadline = time.monotonic() + timeout
        while True:
            client = redis.Redis(host=HOST, port=self.port, socket_timeout=0.2)
            try:
                client.ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.kill()
                    raise RuntimeError(f"redis-server did not start on :{self.port}") from None
                time.sleep(0.02)
            finally:
                client.close()

    def pause(self) -> None:
        """Freeze it (SIGSTOP): connections stay open, nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """Kill it at once (SIGKILL; a paused one is resumed first so it can die)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
        self.paused = False

    stop = kill


class PostgresDatabase:
    """A database of its own on ``server_url``'s server: created (afresh) now, dropped by ``drop()``."""

    def __init__(self, server_url: str, name: str) -> None:
        self.server_url = server_url
        self.name = name
        self.url = urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
        self.refusing = False
        self._admin("DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        self._admin("CREATE DATABASE {db}")

    def _admin(self, statement: str, params: tuple[Any, ...] = ()) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.server_url, autocommit=True, connect_timeout=10) as db:
            db.execute(sql.SQL(statement).format(db=sql.Identifier(self.name)), params)

    def refuse(self) -> None:
        """Refuse new connections and end the open ones."""
        self.refusing = True
        self._admin("ALTER DATABASE {db} ALLOW_CONNECTIONS false")
        self._admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (self.name,),
        )

    def allow(self) -> None:
        self._admin("ALTER DATABASE {db} ALLOW_CONNECTIONS true")
        self.refusing = False

    def query(self, statement: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url, connect_timeout=3) as db:
            return db.execute(statement).fetchall()

    def drop(self) -> None:
        """Drop it (allowing connections first if it was refusing them)."""
        if self.refusing:
            self.allow()
        self._admin("DROP DATABASE IF EXISTS {db} WITH (FORCE)")
