"""The chaos phase: streams with client hang-ups through a PostgreSQL outage and a Redis pause.

    scripts/bench --phases chaos          (also part of the default run)

Issue 10's acceptance scenario, on 127.0.0.1 only. It starts its own world, so nothing it does
can reach a shared service: a redis-server on a free port, a PostgreSQL database of its own
(created on the bench's server, ``--postgres`` or the local one, and dropped at the end), the fake
upstream in its helper process, and the gateway (Granian, 2 workers, ``LEDGER_OUTBOX_DIR`` in the
run's directory, ``GATEWAY_LEDGER_WRITE_TIMEOUT=1``). One API key has a concurrency limit
(``--max-concurrent``) and its user a monthly budget, so every admitted call takes a slot (a
lease in Redis) and a budget hold (a ``billing_reservation`` row).

Then ``requests`` streamed calls arrive open-loop over ``load_seconds``, each client picking one of
three behaviours at random: hang up during admission (close the socket 0-40 ms after sending the
request, before reading anything; half with a RST, half with a FIN), hang up mid-stream (after
1-8 content chunks), or read to the end. The upstream streams ``tokens`` chunks, its pacing redrawn
between 20 and 50 ms every half second (a request keeps the pacing it started with). While that
runs, the database refuses connections for ``outage_seconds`` (``ALTER DATABASE ...
ALLOW_CONNECTIONS false`` and ``pg_terminate_backend`` of its sessions, undone in a ``finally``),
and later the redis-server is frozen (SIGSTOP, then SIGCONT, by the PID this module started).

When the load has ended it waits until everything reconciles, or nothing has moved for
``settle_quiet`` seconds with no call in progress and the outbox empty, or ``settle_limit``
seconds have passed, and reports:

- upstream calls: chat completions the fake upstream received (read in full);
- ledger rows, and duplicate ``request_id`` s among them; rows cancelled before any chunk
  (where a difference between rows and upstream calls sits);
- holds left (``billing_reservation`` rows) and slots leaked (entries of the
  ``<LIMITS_REDIS_PREFIX>:*:lease:*`` sorted sets);
- clients that saw ``[DONE]``, or any 200, whose ``x-request-id`` has no ledger row;
- the outbox: its peak depth (all workers: the ``livesum`` gauge of ``/metrics``), the rows it
  deferred, and when it drained, counted from the end of the database outage;
- when the ledger equalled the upstream calls with the outbox empty for good, counted from the
  end of the database outage and from the end of the load;
- how long ``[DONE]`` came after each full stream's last content chunk (it waits for the call's
  end: its row, and the give-backs).

Choices that may look odd:

- The clients run in this process's event loop, not in ``bench._loadgen``: about 15 requests a
  second is light, and each client needs its own behaviour and the response's ``x-request-id``.
- The database and Redis are read with psycopg and redis-py (in threads), never through Django.
- Outbox depth comes from ``/metrics`` (``METRICS_TOKEN`` is set for the run): ``/readyz``
  answers for whichever worker takes the connection, so it is polled too but only as a
  cross-check.
- ``bench.run`` imports this module when the phase runs, and this module imports the process
  classes from ``bench.run``: under ``python -m bench.run`` that module is loaded a second time
  as ``bench.run`` (definitions only), which is cheaper than moving them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from bench.run import HOST, ROOT, Gateway, Upstream, _free_port, _log, _round, percentile

CHAT_PATH = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
USER = "chaos"
PREFIX = "llmgw:chaos"
ADMISSION, MIDSTREAM, FULL = "admission", "midstream", "full"
BEHAVIOURS = (ADMISSION, MIDSTREAM, FULL)
DEFAULT_POSTGRES = "postgres://postgres@127.0.0.1:5432/postgres"
WRITE_TIMEOUT = 1  # GATEWAY_LEDGER_WRITE_TIMEOUT, seconds

CONTENT = b'"delta":{"content":"'
DONE = b"data: [DONE]"
ERROR = b'data: {"error"'
END = b"\r\n0\r\n\r\n"
HEAD_END = b"\r\n\r\n"


@dataclass(frozen=True)
class ChaosPlan:
    """How big the phase is; ``--quick`` picks a smaller one. Times are seconds from the start."""

    requests: int = 500
    load_seconds: float = 32.0
    tokens: int = 40
    delay_ms: tuple[float, float] = (20.0, 50.0)
    repace_every: float = 0.5
    max_tokens: int = 64
    max_concurrent: int = 40
    monthly_budget_usd: str = "1000"
    workers: int = 2
    postgres_at: float = 8.0
    redis_at: float = 19.0
    outage_seconds: float = 5.0
    hangup_ms: tuple[float, float] = (0.0, 40.0)
    midstream_chunks: tuple[int, int] = (1, 8)
    client_timeout: float = 60.0
    settle_limit: float = 60.0
    settle_quiet: float = 5.0
    poll_every: float = 0.25


QUICK_CHAOS = ChaosPlan(
    requests=150,
    load_seconds=12.0,
    postgres_at=3.0,
    redis_at=7.5,
    outage_seconds=3.0,
    settle_limit=30.0,
)


# -- availability ---------------------------------------------------------------------------------


def postgres_server(url: str | None) -> str:
    return url or DEFAULT_POSTGRES


def unavailable(postgres_url: str) -> str | None:
    """Why the phase cannot run here (no PostgreSQL answering, no redis-server), or None."""
    if shutil.which("redis-server") is None:
        return "no redis-server binary on PATH"
    try:
        import psycopg

        with psycopg.connect(postgres_url, connect_timeout=3, autocommit=True) as db:
            db.execute("SELECT 1")
    except Exception as error:  # any reason: say it and skip
        first = str(error).strip().splitlines()[:1] or [type(error).__name__]
        return f"no PostgreSQL answers at {_redact(postgres_url)} ({first[0][:120]}); pass --postgres URL"
    return None


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


# -- the services this phase owns -----------------------------------------------------------------


class PrivateRedis:
    """A redis-server of this phase's own on a free port; paused and stopped by its PID only."""

    def __init__(self, log: Path) -> None:
        import redis

        self.port = _free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", HOST,
             "--save", "", "--appendonly", "no"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.paused = False
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(host=HOST, port=self.port, socket_timeout=0.2).ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on :{self.port}") from None
                time.sleep(0.05)

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
        self.paused = False

    def slots_taken(self, prefix: str) -> int:
        """Concurrency leases held: entries of every ``<prefix>:*:lease:*`` sorted set."""
        import redis

        client = redis.Redis(host=HOST, port=self.port, socket_timeout=5)
        try:
            return sum(
                int(client.zcard(name)) for name in client.scan_iter(match=f"{prefix}:*:lease:*")
            )
        finally:
            client.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.resume()
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class PostgresDatabase:
    """A database of this phase's own on the bench's server: created, refused, allowed, dropped.

    Only this database is ever refused (``ALLOW_CONNECTIONS``) or has its sessions terminated.
    """

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
        try:
            if self.refusing:
                self.allow()
            self._admin("DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        except Exception as error:  # leave it, say so
            _log(f"chaos: could not drop database {self.name}: {error}")


# -- clients ----------------------------------------------------------------------------------


@dataclass
class Client:
    """One client: what it was told to do, and what it saw."""

    index: int
    behaviour: str
    at: float  # seconds after the load's start
    rst: bool  # hang up with a RST (SO_LINGER 0) rather than a FIN
    hangup_after_s: float = 0.0
    hangup_after_chunks: int = 0
    status: int | None = None
    request_id: str | None = None
    contents: int = 0
    done: bool = False
    error_event: bool = False
    error_code: str | None = None  # an error answer's code (or type)
    ended: str = ""  # "hung up", "complete", "eof", "timeout", or a transport error
    sent_at: float = 0.0
    last_content_at: float = 0.0  # when the last content chunk seen arrived
    done_at: float = 0.0  # when [DONE] arrived
    finished_at: float = 0.0


def _clients(plan: ChaosPlan, rng: random.Random) -> list[Client]:
    gap = plan.load_seconds / plan.requests
    clients = []
    for index in range(plan.requests):
        behaviour = rng.choice(BEHAVIOURS)
        clients.append(
            Client(
                index=index,
                behaviour=behaviour,
                at=index * gap + rng.uniform(0, gap),
                rst=rng.random() < 0.5,
                hangup_after_s=rng.uniform(*plan.hangup_ms) / 1000,
                hangup_after_chunks=rng.randint(*plan.midstream_chunks),
            )
        )
    return clients


def _hang_up(writer: asyncio.StreamWriter, rst: bool) -> None:
    if rst:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.close()


def _head_fields(head: bytes) -> tuple[int, str | None, bool, int | None]:
    """Status, x-request-id, chunked, content-length of a response head."""
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError):
        status = -1
    request_id = None
    chunked = False
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip()
        if name == b"x-request-id":
            request_id = value.decode("latin-1")
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"content-length":
            with contextlib.suppress(ValueError):
                length = int(value)
    return status, request_id, chunked, length


def _error_code(body: bytes) -> str | None:
    try:
        error = json.loads(body)["error"]
        return str(error.get("code") or error.get("type"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# -- the phase --------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds after the load's start
    rows: int | None
    upstream: int | None
    outbox: float | None  # summed over the workers (/metrics)
    active: float | None = None  # upstream calls in progress, summed over the workers


@dataclass
class Timeline:
    start: float = 0.0
    postgres: list[float] = field(default_factory=list)  # refused, allowed (monotonic)
    redis: list[float] = field(default_factory=list)  # paused, resumed
    load_ended: float = 0.0
    samples: list[Sample] = field(default_factory=list)


class Chaos:
    """One run of the phase: ``setup()``, the load with its faults, the wait, ``teardown()``."""

    def __init__(
        self, *, env: dict[str, str], workdir: Path, plan: ChaosPlan, postgres_url: str, keep: bool
    ) -> None:
        self.plan = plan
        self.keep = keep
        self.workdir = workdir
        self.postgres_url = postgres_url
        self.base_env = env
        self.seed = int.from_bytes(os.urandom(4), "big")
        self.rng = random.Random(self.seed)
        self.metrics_token = os.urandom(16).hex()
        self.redis: PrivateRedis | None = None
        self.database: PostgresDatabase | None = None
        self.upstream: Upstream | None = None
        self.gateway: Gateway | None = None
        self._upstream_log: IO[bytes] | None = None
        self._upstream_lock = threading.Lock()
        self.timeline = Timeline()
        self.key = ""
        self.env: dict[str, str] = {}

    # -- setup and teardown ---------------------------------------------------------------

    def setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis = PrivateRedis(self.workdir / "redis.log")
        self.database = PostgresDatabase(self.postgres_url, f"llmgateway_chaos_{os.getpid()}")
        metrics_dir = self.workdir / "prometheus"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir()
        self.env = {
            **self.base_env,
            "DATABASE_URL": self.database.url,
            "REDIS_URL": self.redis.url,
            "LIMITS_REDIS_PREFIX": PREFIX,
            "LEDGER_OUTBOX_DIR": str(self.workdir / "outbox"),
            "GATEWAY_LEDGER_WRITE_TIMEOUT": str(WRITE_TIMEOUT),
            "LLMGATEWAY_VAR_DIR": str(self.workdir / "var"),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "METRICS_TOKEN": self.metrics_token,
            "LOG_LEVEL": "INFO",  # the outbox's "wrote N deferred rows" and one JSON line per call
        }
        self._upstream_log = (self.workdir / "upstream.log").open("ab")
        self.upstream = Upstream(self.env, self._upstream_log)
        self.env["OPENAI_BASE_URL"] = self.upstream.base_url
        self._upstream("set", attrs={"tokens": self.plan.tokens, "inter_token_delay": self._pacing(),
                                     "ttft": 0.0, "fault": None, "max_records": 1_000_000})  # fmt: skip
        self._manage("migrate", "--noinput", "-v0")
        self.key = self._manage(
            "createapikey",
            USER,
            "--name",
            "chaos",
            "--max-concurrent",
            str(self.plan.max_concurrent),
        ).splitlines()[-1]  # printed alone on the last line
        self._manage("setquota", USER, "--monthly-budget", self.plan.monthly_budget_usd)
        started = time.monotonic()
        self.gateway = Gateway(self.env, self.plan.workers, self.workdir / "gateway.log")
        _log(
            f"chaos: gateway on :{self.gateway.port} ({self.plan.workers} workers, up in "
            f"{time.monotonic() - started:.1f} s), redis :{self.redis.port}, database {self.database.name}"
        )

    def _manage(self, *arguments: str) -> str:
        """Run a management command against this phase's database; its stdout, or raise with
        the last line it wrote to stderr."""
        done = subprocess.run(
            [sys.executable, "manage.py", *arguments],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [""])[-1]
            raise RuntimeError(f"manage.py {arguments[0]} exited {done.returncode}: {last[:200]}")
        return done.stdout.strip()

    def teardown(self) -> None:
        """Undo both faults first, then stop what this phase started (each step whatever the
        others did), and drop its database unless kept."""
        redis, database = self.redis, self.database
        steps: list[Callable[[], None]] = []
        if redis is not None:
            steps.append(redis.resume)
        if database is not None and database.refusing:
            steps.append(database.allow)
        if self.gateway is not None:
            steps.append(self.gateway.stop)
        if self.upstream is not None:
            steps.append(self.upstream.stop)
        if self._upstream_log is not None:
            steps.append(self._upstream_log.close)
        if redis is not None:
            steps.append(redis.stop)
        if database is not None:
            steps.append(self._kept if self.keep else database.drop)
        for step in steps:
            try:
                step()
            except Exception as error:  # keep stopping the rest
                _log(f"chaos: teardown step failed: {type(error).__name__}: {error}")

    def _kept(self) -> None:
        assert self.database is not None
        _log(f"chaos: kept database {self.database.url} (drop it when done)")

    def _upstream(self, op: str, **fields: Any) -> dict[str, Any]:
        assert self.upstream is not None
        with self._upstream_lock:  # one command at a time on its pipe
            return self.upstream.command(op, **fields)

    def _pacing(self) -> float:
        return round(self.rng.uniform(*self.plan.delay_ms)) / 1000

    # -- reading the state ----------------------------------------------------------------

    def _rows(self) -> int | None:
        assert self.database is not None
        try:
            return int(self.database.query("SELECT count(*) FROM billing_usagerecord")[0][0])
        except Exception:
            return None  # refused: the outage

    def _upstream_calls(self) -> int:
        """Requests the fake upstream has read so far (it serves this phase only)."""
        return int(self._upstream("stats")["requests"])

    async def _metrics(self, client: Any) -> dict[str, float]:
        response = await client.get(
            "/metrics", headers={"Authorization": f"Bearer {self.metrics_token}"}
        )
        values: dict[str, float] = {}
        for line in response.text.splitlines():
            for name in (
                "llmgateway_ledger_outbox_depth",
                "llmgateway_ledger_outbox_deferred_total",
                "llmgateway_active_streams",
            ):
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return values

    async def _readyz(self, client: Any, times: int = 4) -> list[dict[str, Any]]:
        """``/readyz`` on fresh connections (each answers for the worker that took it)."""
        answers = []
        for _ in range(times):
            with contextlib.suppress(Exception):
                response = await client.get("/readyz", headers={"Connection": "close"})
                answers.append(response.json())
        return answers

    async def _sample(self, client: Any) -> Sample:
        now = time.monotonic() - self.timeline.start
        rows, upstream = await asyncio.gather(
            asyncio.to_thread(self._rows), asyncio.to_thread(self._upstream_calls)
        )
        try:
            metrics = await self._metrics(client)
        except Exception:
            metrics = {}
        sample = Sample(
            t=round(now, 3),
            rows=rows,
            upstream=upstream,
            outbox=metrics.get("llmgateway_ledger_outbox_depth"),
            active=metrics.get("llmgateway_active_streams"),
        )
        self.timeline.samples.append(sample)
        return sample

    # -- the load -------------------------------------------------------------------------

    async def _client(self, client: Client, body: bytes) -> None:
        assert self.gateway is not None
        await asyncio.sleep(max(0.0, self.timeline.start + client.at - time.monotonic()))
        head = (
            f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {HOST}:{self.gateway.port}\r\n"
            f"Authorization: Bearer {self.key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.plan.client_timeout):
                reader, writer = await asyncio.open_connection(HOST, self.gateway.port)
                writer.write(head + body)
                await writer.drain()
                client.sent_at = time.monotonic() - self.timeline.start
                if client.behaviour == ADMISSION:
                    await asyncio.sleep(client.hangup_after_s)
                    client.ended = "hung up"
                    return
                await self._read(client, reader)
        except TimeoutError:
            client.ended = "timeout"
        except Exception as error:  # a reset, a refused connection: what this client saw
            client.ended = type(error).__name__
        finally:
            client.finished_at = time.monotonic() - self.timeline.start
            if writer is not None:
                _hang_up(writer, client.rst if client.ended == "hung up" else False)

    async def _read(self, client: Client, reader: asyncio.StreamReader) -> None:
        buffer = bytearray()
        body_at: int | None = None
        chunked, length = False, None
        while True:
            data = await reader.read(65536)
            if not data:
                client.ended = "eof"
                return
            buffer += data
            if body_at is None:
                end = buffer.find(HEAD_END)
                if end < 0:
                    continue
                body_at = end + len(HEAD_END)
                client.status, client.request_id, chunked, length = _head_fields(
                    bytes(buffer[:end])
                )
            body = buffer[body_at:]
            now = time.monotonic() - self.timeline.start
            contents = body.count(CONTENT)
            if contents > client.contents:
                client.contents, client.last_content_at = contents, now
            if not client.done and DONE in body:
                client.done, client.done_at = True, now
            client.error_event = ERROR in body
            if client.behaviour == MIDSTREAM and client.contents >= client.hangup_after_chunks:
                client.ended = "hung up"
                return
            if (chunked and body.endswith(END)) or (length is not None and len(body) >= length):
                client.ended = "complete"
                if client.status != 200:
                    client.error_code = _error_code(bytes(body))
                return

    async def _conduct(self) -> None:
        """Redraw the upstream's pacing, and run both faults on schedule (always undone)."""
        assert self.database is not None and self.redis is not None
        plan, timeline = self.plan, self.timeline
        steps = [
            (plan.postgres_at, "postgres", self.database.refuse, timeline.postgres),
            (
                plan.postgres_at + plan.outage_seconds,
                "postgres back",
                self.database.allow,
                timeline.postgres,
            ),
            (plan.redis_at, "redis", self.redis.pause, timeline.redis),
            (plan.redis_at + plan.outage_seconds, "redis back", self.redis.resume, timeline.redis),
        ]
        steps.sort(key=lambda step: step[0])
        next_pacing = 0.0
        try:
            while steps or next_pacing < plan.load_seconds:
                elapsed = time.monotonic() - timeline.start
                while steps and steps[0][0] <= elapsed:
                    _, what, action, marks = steps.pop(0)
                    await asyncio.to_thread(action)
                    marks.append(time.monotonic())
                    _log(f"chaos: {what} at {time.monotonic() - timeline.start:.1f} s")
                if elapsed >= next_pacing and next_pacing < plan.load_seconds:
                    await asyncio.to_thread(
                        self._upstream, "set", attrs={"inter_token_delay": self._pacing()}
                    )
                    next_pacing += plan.repace_every
                await asyncio.sleep(0.02)
        finally:
            if self.redis.paused:
                self.redis.resume()
                timeline.redis.append(time.monotonic())
            if self.database.refusing:
                await asyncio.to_thread(self.database.allow)
                timeline.postgres.append(time.monotonic())

    async def _watch(self, client: Any, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._sample(client)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.plan.poll_every):
                    await stop.wait()

    async def _drive(self, clients: list[Client]) -> dict[str, Any]:
        import httpx

        assert self.gateway is not None and self.redis is not None and self.database is not None
        plan, timeline = self.plan, self.timeline
        bodies = {
            c.index: json.dumps(
                {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "stream": True,
                 "stream_options": {"include_usage": True}, "max_tokens": plan.max_tokens, "user": f"{USER}-{c.index}"},
                separators=(",", ":"),
            ).encode()
            for c in clients
        }  # fmt: skip
        async with httpx.AsyncClient(
            base_url=f"http://{HOST}:{self.gateway.port}", timeout=5
        ) as http:
            timeline.start = time.monotonic() + 0.2
            stop = asyncio.Event()
            async with asyncio.TaskGroup() as group:
                group.create_task(self._watch(http, stop))
                try:
                    async with asyncio.TaskGroup() as load:
                        load.create_task(self._conduct())
                        for c in clients:
                            load.create_task(self._client(c, bodies[c.index]))
                finally:
                    timeline.load_ended = time.monotonic()
                    stop.set()
            _log(
                f"chaos: load ended at {timeline.load_ended - timeline.start:.1f} s; waiting for the ledger"
            )
            return await self._settle(http)

    async def _settle(self, http: Any) -> dict[str, Any]:
        """Poll until rows = upstream calls with the outbox empty, no hold and no slot; or until
        nothing has moved for ``settle_quiet`` seconds with no call in progress and the outbox
        empty (it will not reconcile then); at most ``settle_limit`` seconds."""
        assert self.redis is not None and self.database is not None
        deadline = time.monotonic() + self.plan.settle_limit
        holds = slots = -1
        readyz: list[dict[str, Any]] = []
        first: dict[str, float] = {}
        metrics: dict[str, float] = {}
        state: tuple[Any, ...] = ()
        unchanged_since = time.monotonic()
        while True:
            sample = await self._sample(http)
            holds_rows = await asyncio.to_thread(self._holds)
            holds = -1 if holds_rows is None else holds_rows
            slots = await asyncio.to_thread(self.redis.slots_taken, PREFIX)
            readyz = await self._readyz(http)
            now = time.monotonic()
            checks = {
                "ledger": sample.rows is not None and sample.rows == sample.upstream,
                "outbox": sample.outbox == 0
                and bool(readyz)
                and all(r.get("outbox") == 0 for r in readyz),
                "holds": holds == 0,
                "slots": slots == 0,
            }
            for name, ok in checks.items():
                if ok:
                    first.setdefault(name, now)
                else:
                    first.pop(name, None)
            if (new_state := (sample.rows, sample.upstream, holds, slots)) != state:
                state, unchanged_since = new_state, now
            quiet = (
                checks["outbox"]
                and sample.active == 0
                and now - unchanged_since >= self.plan.settle_quiet
            )
            if all(checks.values()) or quiet or now > deadline:
                stop = "reconciled" if all(checks.values()) else ("stable" if quiet else "deadline")
                break
            await asyncio.sleep(self.plan.poll_every)
        with contextlib.suppress(Exception):
            metrics = await self._metrics(http)
        return {"holds": holds, "slots": slots, "readyz": readyz, "settled": stop,
                "first_ok": first, "metrics": metrics}  # fmt: skip

    def _holds(self) -> int | None:
        assert self.database is not None
        try:
            return int(self.database.query("SELECT count(*) FROM billing_reservation")[0][0])
        except Exception:
            return None

    # -- the whole phase ------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        began = time.monotonic()
        try:
            self.setup()
            clients = _clients(self.plan, self.rng)
            settled = asyncio.run(self._drive(clients))
            result = self._report(clients, settled)
        finally:
            self.teardown()
        result["elapsed_s"] = round(time.monotonic() - began, 1)
        result["gateway_log"] = _log_summary(self.workdir / "gateway.log")
        return result

    def _report(self, clients: list[Client], settled: dict[str, Any]) -> dict[str, Any]:
        assert self.database is not None
        plan, timeline = self.plan, self.timeline
        records = self._upstream("records", user_prefix=f"{USER}-")["records"]
        by_status = self.database.query(
            "SELECT status, error_kind, count(*) FROM billing_usagerecord GROUP BY status, error_kind ORDER BY 3 DESC"
        )
        ((rows, duplicates),) = self.database.query(
            "SELECT count(*), count(*) - count(DISTINCT request_id) FROM billing_usagerecord"
        )
        ledger_ids = {
            str(r[0]) for r in self.database.query("SELECT request_id FROM billing_usagerecord")
        }
        # Calls cancelled before the upstream's first chunk: where rows and upstream calls can
        # part (the request may not have reached the upstream when the call was stopped).
        ((cancelled_before_chunk,),) = self.database.query(
            "SELECT count(*) FROM billing_usagerecord WHERE status = 'cancelled' AND ttft_us IS NULL"
        )
        ok = [c for c in clients if c.status == 200]
        # Where a mismatch sits: rows and upstream calls of the clients that saw no 200 (those
        # that hung up during admission, or got an error), which carry no x-request-id.
        ok_ids = {c.request_id for c in ok}
        ok_users = {f"{USER}-{c.index}" for c in ok}
        rows_without_200 = len(ledger_ids - ok_ids)
        upstream_without_200 = sum(r["user"] not in ok_users for r in records)
        done_without_row = [c.request_id for c in ok if c.done and c.request_id not in ledger_ids]
        ok_without_row = [c.request_id for c in ok if c.request_id not in ledger_ids]
        upstream_calls = len(records)
        postgres_back = timeline.postgres[1] if len(timeline.postgres) > 1 else None

        def rel(mark: float | None) -> float | None:
            return None if mark is None else round(mark - timeline.start, 2)

        def since(mark: float | None, at: float | None) -> float | None:
            return None if at is None or mark is None else round(at - mark, 2)

        def final_streak(holds: Any) -> float | None:
            """When the last run of samples that all hold (to the end) began, monotonic."""
            began = None
            for sample in timeline.samples:
                if holds(sample):
                    began = sample.t if began is None else began
                else:
                    began = None
            return None if began is None else timeline.start + began

        drained = final_streak(lambda s: s.outbox == 0)
        matched = final_streak(
            lambda s: s.outbox == 0 and s.rows is not None and s.rows == s.upstream
        )
        first_ok = settled["first_ok"]
        peak = max((s.outbox for s in timeline.samples if s.outbox is not None), default=None)
        deferred = settled["metrics"].get("llmgateway_ledger_outbox_deferred_total")
        statuses: dict[str, dict[str, int]] = {}
        for behaviour in BEHAVIOURS:
            mine = [c for c in clients if c.behaviour == behaviour]
            statuses[behaviour] = dict(
                Counter(
                    (f"{c.status} {c.error_code}" if c.error_code else str(c.status))
                    if c.status is not None
                    else f"no answer ({c.ended})"
                    for c in mine
                ).most_common()
            )
        # [DONE] waits for the ledger row (committed, or durably in the outbox): how long after
        # the stream's last content chunk it came.
        done_waits = sorted(c.done_at - c.last_content_at for c in clients if c.done)
        reconciled = (
            settled["settled"] == "reconciled"
            and rows == upstream_calls
            and duplicates == 0
            and settled["holds"] == 0
            and settled["slots"] == 0
            and not done_without_row
            and not ok_without_row
        )
        return {
            "status": "ok",
            "seed": self.seed,
            "plan": asdict(plan),
            "clients": dict(Counter(c.behaviour for c in clients)),
            "client_statuses": statuses,
            "clients_done": sum(c.done for c in clients),
            "clients_error_event": sum(c.error_event for c in clients),
            "clients_timed_out": sum(c.ended == "timeout" for c in clients),
            "done_wait_s": {
                "p50": _round(percentile(done_waits, 50)),
                "p99": _round(percentile(done_waits, 99)),
                "max": _round(done_waits[-1] if done_waits else None),
                "over_write_timeout": sum(w > WRITE_TIMEOUT + 0.5 for w in done_waits),
            },
            "faults": {
                "postgres_refused_s": [rel(m) for m in timeline.postgres],
                "redis_paused_s": [rel(m) for m in timeline.redis],
            },
            "load_s": rel(timeline.load_ended),
            "upstream_calls": upstream_calls,
            "upstream_requests_all": self._upstream_calls(),  # = upstream_calls unless something else called it
            "upstream_completed": sum(bool(r["completed"]) for r in records),
            "upstream_client_disconnected": sum(bool(r["client_disconnected"]) for r in records),
            "ledger_rows": int(rows),
            "ledger_by_status": {f"{s}{'/' + k if k else ''}": int(n) for s, k, n in by_status},
            "duplicate_request_ids": int(duplicates),
            "rows_cancelled_before_first_chunk": int(cancelled_before_chunk),
            "holds_left": settled["holds"],
            "slots_leaked": settled["slots"],
            "rows_of_clients_without_200": rows_without_200,
            "upstream_calls_of_clients_without_200": upstream_without_200,
            "done_without_row": len(done_without_row),
            "ok_without_row": len(ok_without_row),
            "missing_request_ids": ok_without_row[:10],
            "outbox_peak": peak,
            "outbox_deferred_total": deferred,
            # Each: when the final run of samples where it held began (polled every
            # poll_every seconds), counted from the mark named.
            "outbox_drained_after_postgres_s": since(postgres_back, drained),
            "reconciled_after_postgres_s": since(postgres_back, matched),
            "reconciled_after_load_s": since(timeline.load_ended, matched),
            "slots_free_after_load_s": since(timeline.load_ended, first_ok.get("slots")),
            "holds_gone_after_load_s": since(timeline.load_ended, first_ok.get("holds")),
            "readyz": settled["readyz"][:1],
            "settled": settled["settled"],
            "reconciled": reconciled,
            "samples": [asdict(s) for s in timeline.samples],
            "client_log": [
                [
                    c.index,
                    c.behaviour,
                    round(c.at, 3),
                    c.status,
                    c.contents,
                    c.done,
                    c.ended,
                    round(c.last_content_at, 3),
                    round(c.done_at, 3),
                    round(c.finished_at, 3),
                ]
                for c in clients
            ],  # fmt: skip
        }


_NOISE = re.compile(r"[0-9a-f]{8}-[0-9a-f-]{27}|\b[0-9a-f]{32}\b|\d+(\.\d+)?")


def _log_summary(path: Path) -> dict[str, Any]:
    """Counts of the gateway log's WARNING/ERROR lines by message shape, and its tracebacks."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    levels: Counter[str] = Counter()
    shapes: Counter[str] = Counter()
    for line in text.splitlines():
        level = line.split(" ", 1)[0]
        if level in ("WARNING", "ERROR", "CRITICAL"):
            levels[level] += 1
            shapes[f"{level} {_NOISE.sub('N', line.split(' ', 1)[1])[:160]}"] += 1
    deferred_writes = len(re.findall(r"ledger outbox: wrote (\d+) deferred rows", text))
    return {
        "levels": dict(levels),
        "tracebacks": text.count("Traceback"),
        "outbox_write_batches": deferred_writes,
        "top": dict(shapes.most_common(8)),
    }


# -- entry points for bench.run ---------------------------------------------------------------


def run_chaos(
    *, env: dict[str, str], workdir: Path, quick: bool, postgres_url: str | None, keep: bool = False
) -> dict[str, Any]:
    """Run the phase, or return why it was skipped. ``keep`` keeps its database."""
    server = postgres_server(postgres_url)
    reason = unavailable(server)
    if reason is not None:
        _log(f"chaos: skipped: {reason}")
        return {"status": "skipped", "reason": reason}
    return Chaos(
        env=env,
        workdir=workdir,
        plan=QUICK_CHAOS if quick else ChaosPlan(),
        postgres_url=server,
        keep=keep,
    ).run()


def _f(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def render(chaos: dict[str, Any]) -> list[str]:
    if chaos.get("status") != "ok":
        return [f"Chaos: {chaos.get('status')} ({chaos.get('reason')})", ""]
    plan, faults, waits = chaos["plan"], chaos["faults"], chaos["done_wait_s"]
    pg, rd = faults["postgres_refused_s"] + [None, None], faults["redis_paused_s"] + [None, None]
    log = chaos.get("gateway_log") or {}
    clients = chaos["clients"]
    settled = {
        "reconciled": "reconciled",
        "stable": "stable, NOT reconciled",
        "deadline": "still moving at the deadline",
    }[chaos["settled"]]
    return [
        f"Chaos: {plan['requests']} streams over {plan['load_seconds']:g} s ({plan['workers']} workers), "
        f"PostgreSQL refused {_f(pg[0])}-{_f(pg[1])} s, Redis paused {_f(rd[0])}-{_f(rd[1])} s; "
        f"took {chaos.get('elapsed_s')} s",
        f"  clients: {clients.get(ADMISSION, 0)} hang up during admission, {clients.get(MIDSTREAM, 0)} "
        f"mid-stream, {clients.get(FULL, 0)} read to the end; answers: "
        + "; ".join(f"{b} {s}" for b, s in chaos["client_statuses"].items())
        + f"; [DONE] {chaos['clients_done']}, SSE error events {chaos['clients_error_event']}, "
        f"timed out {chaos['clients_timed_out']}",
        f"  after the load ({settled}): upstream calls {chaos['upstream_calls']}, ledger rows "
        f"{chaos['ledger_rows']} {chaos['ledger_by_status']}, duplicate request_ids "
        f"{chaos['duplicate_request_ids']}, holds left {chaos['holds_left']}, slots leaked "
        f"{chaos['slots_leaked']}; 200s without a row {chaos['ok_without_row']} ([DONE] without a row "
        f"{chaos['done_without_row']}); rows cancelled before any chunk "
        f"{chaos['rows_cancelled_before_first_chunk']}",
        f"  outbox: peak {_f(chaos['outbox_peak'], '.0f')} rows, {_f(chaos['outbox_deferred_total'], '.0f')} "
        f"deferred, drained {_f(chaos['outbox_drained_after_postgres_s'], '.2f')} s after PostgreSQL came "
        f"back; ledger = upstream calls {_f(chaos['reconciled_after_postgres_s'], '.2f')} s after "
        f"PostgreSQL came back ({_f(chaos['reconciled_after_load_s'], '.2f')} s after the load ended); "
        f"slots free {_f(chaos['slots_free_after_load_s'], '.2f')} s after the load ended",
        f"  [DONE] after the stream's last content chunk: p50 {_f(waits['p50'], '.3f')} / p99 "
        f"{_f(waits['p99'], '.3f')} / max {_f(waits['max'], '.3f')} s; {waits['over_write_timeout']} "
        f"streams waited over {WRITE_TIMEOUT + 0.5:g} s (GATEWAY_LEDGER_WRITE_TIMEOUT={WRITE_TIMEOUT} s)",
        f"  gateway log: {log.get('levels', {})}, tracebacks {log.get('tracebacks', 0)}",
        "",
    ]


def target(chaos: dict[str, Any] | None) -> tuple[str, str, str, bool | None]:
    """(name, measured, target, ok) for the table of targets."""
    name = "chaos: rows = upstream calls, dup/holds/slots left"
    wanted = "=, 0/0/0"
    if not chaos or chaos.get("status") != "ok":
        status = (chaos or {}).get("status", "not run")
        return name, f"{status}: {(chaos or {}).get('reason', '')[:40]}", wanted, None
    measured = (
        f"{chaos['ledger_rows']}/{chaos['upstream_calls']}, {chaos['duplicate_request_ids']}/"
        f"{chaos['holds_left']}/{chaos['slots_leaked']}"
        + ("" if chaos["settled"] != "deadline" else " (still moving)")
    )
    return name, measured, wanted, bool(chaos["reconciled"])
