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

- upstream calls: chat completions the fake upstream received (read in full), each with the
  gateway's request id (its ``X-Client-Request-Id`` header: the ledger row's ``request_id``);
- ledger rows, reconciled with those calls by id: ids the upstream received without a row
  (missing), ids with more than one row or received more than once (duplicates), calls without
  an id; and rows whose id the upstream never received: "abandoned while being sent" when the
  row is ``cancelled`` with no TTFT and 0 completion tokens (the client hung up while the
  gateway was sending the request; it cannot know whether the request arrived, so it keeps the
  row), anything else listed as unexplained;
- holds left (``billing_reservation`` rows) and slots leaked (entries of the
  ``<LIMITS_REDIS_PREFIX>:*:lease:*`` sorted sets);
- clients that saw ``[DONE]``, or any 200, whose ``x-request-id`` has no ledger row;
- the answers' status counts (200/429/503/500; a 503 must carry ``Retry-After``), each 500
  with the gateway log's lines about it;
- the outbox: its peak depth (all workers: the ``livesum`` gauge of ``/metrics``), the rows it
  deferred, and when it drained, counted from the end of the database outage;
- when the ledger reconciled by id with the outbox empty for good, counted from the end of the
  database outage and from the end of the load;
- how long ``[DONE]`` came after each full stream's last content chunk (it waits for the call's
  end: its row, and the give-backs), split by the fault the wait met (the database outage, the
  Redis pause, neither), each against its bound: ``GATEWAY_LEDGER_WRITE_TIMEOUT``, plus
  ``LIMITS_REDIS_TIMEOUT`` for the Redis pause.

Choices that may look odd:

- The clients run in this process's event loop, not in ``bench._loadgen``: about 15 requests a
  second is light, and each client needs its own behaviour and the response's ``x-request-id``.
- The database and Redis are read with psycopg and redis-py (in threads), never through Django.
- Outbox depth comes from ``/metrics`` (``METRICS_TOKEN`` is set for the run): ``/readyz``
  answers for whichever worker takes the connection, so it is polled too but only as a
  cross-check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from bench.common import HOST, ROOT, percentile
from bench.common import log as _log
from bench.common import rounded as _round
from testbed.gateway import Gateway
from testbed.services import PostgresDatabase, RedisServer
from testbed.upstream_host import UpstreamHost

CHAT_PATH = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
USER = "chaos"
PREFIX = "llmgw:chaos"
ADMISSION, MIDSTREAM, FULL = "admission", "midstream", "full"
BEHAVIOURS = (ADMISSION, MIDSTREAM, FULL)
DEFAULT_POSTGRES = "postgres://postgres@127.0.0.1:5432/postgres"
WRITE_TIMEOUT = 1  # GATEWAY_LEDGER_WRITE_TIMEOUT, seconds
REDIS_TIMEOUT = 2.0  # LIMITS_REDIS_TIMEOUT's default, seconds (the environment's value wins)
BOUND_SLACK = 0.5  # seconds a [DONE] may come past its bound before it counts as over
LEDGER_SQL = "SELECT request_id, status, ttft_us, completion_tokens FROM billing_usagerecord"

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


def slots_taken(redis_url: str, prefix: str) -> int:
    """Concurrency leases held: entries of every ``<prefix>:*:lease:*`` sorted set."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        return sum(int(client.zcard(name)) for name in client.scan_iter(match=f"{prefix}:*:lease:*"))
    finally:
        client.close()


def drop_database(database: PostgresDatabase) -> None:
    try:
        database.drop()
    except Exception as error:  # leave it, say so
        _log(f"chaos: could not drop database {database.name}: {error}")


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
    retry_after: str | None = None  # an answer's Retry-After header
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


def _head_fields(head: bytes) -> tuple[int, str | None, bool, int | None, str | None]:
    """Status, x-request-id, chunked, content-length, retry-after of a response head."""
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError):
        status = -1
    request_id = retry_after = None
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
        elif name == b"retry-after":
            retry_after = value.decode("latin-1")
    return status, request_id, chunked, length, retry_after


def _error_code(body: bytes) -> str | None:
    try:
        error = json.loads(body)["error"]
        return str(error.get("code") or error.get("type"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# -- reconciliation ---------------------------------------------------------------------------

LedgerRow = tuple[str, str, int | None, int]  # request_id, status, ttft_us, completion_tokens


def _abandoned(row: LedgerRow) -> bool:
    """The row of a call abandoned while its request was being sent: cancelled, no chunk, no
    completion token. The gateway keeps it (it cannot know whether the request arrived)."""
    _, status, ttft_us, completion_tokens = row
    return status == "cancelled" and ttft_us is None and completion_tokens == 0


@dataclass(frozen=True)
class Reconciliation:
    """The ledger against the upstream's calls, by request id (``X-Client-Request-Id``)."""

    upstream_calls: int
    ledger_rows: int
    missing: list[str]  # ids the upstream received that have no row
    ledger_duplicates: int  # rows beyond the first for one request_id
    upstream_repeats: int  # receipts beyond the first of one id (one call served twice)
    upstream_without_id: int  # calls that reached the upstream without an id
    abandoned: int  # rows the upstream never saw, each cancelled with no TTFT, 0 completion tokens
    unexplained: list[LedgerRow]  # rows the upstream never saw that are anything else

    @property
    def exact(self) -> bool:
        return (
            not self.missing
            and self.ledger_duplicates == 0
            and self.upstream_repeats == 0
            and self.upstream_without_id == 0
            and not self.unexplained
        )


def reconcile(upstream_ids: list[str | None], ledger: list[LedgerRow]) -> Reconciliation:
    received = Counter(i for i in upstream_ids if i)
    rows = Counter(row[0] for row in ledger)
    unseen = [row for row in ledger if row[0] not in received]
    return Reconciliation(
        upstream_calls=len(upstream_ids),
        ledger_rows=len(ledger),
        missing=sorted(set(received) - set(rows)),
        ledger_duplicates=sum(n - 1 for n in rows.values()),
        upstream_repeats=sum(n - 1 for n in received.values()),
        upstream_without_id=sum(not i for i in upstream_ids),
        abandoned=sum(_abandoned(row) for row in unseen),
        unexplained=[row for row in unseen if not _abandoned(row)],
    )


# -- the phase --------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds after the load's start
    rows: int | None
    upstream: int | None
    outbox: float | None  # summed over the workers (/metrics)
    active: float | None = None  # upstream calls in progress, summed over the workers
    missing: int | None = None  # upstream calls without their row yet
    exact: bool | None = None  # the ledger reconciles with the upstream by id (None: refused)


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
        self.redis: RedisServer | None = None
        self.database: PostgresDatabase | None = None
        self.upstream: UpstreamHost | None = None
        self.gateway: Gateway | None = None
        self._upstream_log: IO[bytes] | None = None
        self._upstream_lock = threading.Lock()
        self.timeline = Timeline()
        self.key = ""
        self.env: dict[str, str] = {}

    # -- setup and teardown ---------------------------------------------------------------

    def setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(log=self.workdir / "redis.log")
        self.redis.start()
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
        self.redis_timeout = float(self.env.get("LIMITS_REDIS_TIMEOUT") or REDIS_TIMEOUT)
        self._upstream_log = (self.workdir / "upstream.log").open("ab")
        self.upstream = UpstreamHost(self.env, self._upstream_log)
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
        self.gateway = Gateway(
            self.env, workers=self.plan.workers, log=self.workdir / "gateway.log"
        )
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
            steps.append(self._kept if self.keep else lambda: drop_database(database))
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

    def _ledger(self) -> list[LedgerRow] | None:
        assert self.database is not None
        try:
            rows = self.database.query(LEDGER_SQL)
        except Exception:
            return None  # refused: the outage
        return [(str(r[0]), str(r[1]), r[2], int(r[3])) for r in rows]

    def _upstream_ids(self) -> list[str | None]:
        """The request id of each call the fake upstream has read, in order."""
        return self._upstream("request_ids", user_prefix=f"{USER}-")["ids"]

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

    async def _sample(self, client: Any) -> tuple[Sample, Reconciliation | None]:
        now = time.monotonic() - self.timeline.start
        # The ledger first: a row's call, if it reached the upstream, was received before the
        # row was written, so a row never looks unseen because the upstream was read too early.
        ledger = await asyncio.to_thread(self._ledger)
        ids = await asyncio.to_thread(self._upstream_ids)
        matched = None if ledger is None else reconcile(ids, ledger)
        try:
            metrics = await self._metrics(client)
        except Exception:
            metrics = {}
        sample = Sample(
            t=round(now, 3),
            rows=None if ledger is None else len(ledger),
            upstream=len(ids),
            outbox=metrics.get("llmgateway_ledger_outbox_depth"),
            active=metrics.get("llmgateway_active_streams"),
            missing=None if matched is None else len(matched.missing),
            exact=None if matched is None else matched.exact,
        )
        self.timeline.samples.append(sample)
        return sample, matched

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
                client.status, client.request_id, chunked, length, client.retry_after = (
                    _head_fields(bytes(buffer[:end]))
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
        """Poll until the ledger reconciles by id with the outbox empty, no hold and no slot; or
        until nothing has moved for ``settle_quiet`` seconds with no call in progress and the outbox
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
            sample, matched = await self._sample(http)
            holds_rows = await asyncio.to_thread(self._holds)
            holds = -1 if holds_rows is None else holds_rows
            slots = await asyncio.to_thread(slots_taken, self.redis.url, PREFIX)
            readyz = await self._readyz(http)
            now = time.monotonic()
            checks = {
                "ledger": matched is not None and matched.exact,
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
        about = (
            result["missing_request_ids"]
            + [row["request_id"] for row in result["unexplained"]]
            + result["ok_without_row_ids"]
            + [e["request_id"] for e in result["errors_500"] if e["request_id"]]
        )
        result["gateway_log"] = _log_summary(self.workdir / "gateway.log", about)
        return result

    def _report(self, clients: list[Client], settled: dict[str, Any]) -> dict[str, Any]:
        assert self.database is not None
        plan, timeline = self.plan, self.timeline
        ledger = self._ledger()
        if ledger is None:
            raise RuntimeError("the chaos database did not answer after the load")
        records = self._upstream("records", user_prefix=f"{USER}-")["records"]
        matched = reconcile([r["request_id"] for r in records], ledger)
        by_status = self.database.query(
            "SELECT status, error_kind, count(*) FROM billing_usagerecord GROUP BY status, error_kind ORDER BY 3 DESC"
        )
        ledger_ids = {row[0] for row in ledger}
        # Calls cancelled before the upstream's first chunk, whether the upstream got them or not.
        cancelled_before_chunk = sum(row[1] == "cancelled" and row[2] is None for row in ledger)
        ok = [c for c in clients if c.status == 200]
        # Where the abandoned rows sit: rows and upstream calls of the clients that saw no 200
        # (those that hung up during admission, or got an error), which carry no x-request-id.
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
        reconciled_at = final_streak(lambda s: s.outbox == 0 and s.exact)
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
        status_counts = Counter(str(c.status) if c.status is not None else "none" for c in clients)
        errors_500 = [
            {"client": c.index, "behaviour": c.behaviour, "sent_s": round(c.sent_at, 3),
             "code": c.error_code, "request_id": c.request_id}
            for c in clients if c.status == 500
        ]  # fmt: skip
        answers_503 = [c for c in clients if c.status == 503]

        # [DONE] waits for the call's end (its row committed or durably in the outbox, and the
        # give-backs): how long after the stream's last content chunk it came, split by the
        # fault the wait met: a stream is "during" a fault when it was between its last chunk
        # and [DONE] while the fault was on (its last chunk fell in the fault, or just before
        # it with the call's end still to come); "outside" streams met neither.
        def window(marks: list[float]) -> tuple[float, float] | None:
            return (
                (marks[0] - timeline.start, marks[1] - timeline.start) if len(marks) > 1 else None
            )

        windows = {"postgres": window(timeline.postgres), "redis": window(timeline.redis)}
        bounds = {
            "postgres": WRITE_TIMEOUT,
            "redis": WRITE_TIMEOUT + self.redis_timeout,
            "outside": WRITE_TIMEOUT,
        }

        def window_of(client: Client) -> str:
            for name, span in windows.items():
                if (
                    span is not None
                    and client.last_content_at <= span[1]
                    and client.done_at >= span[0]
                ):
                    return name
            return "outside"

        waits: dict[str, list[float]] = {name: [] for name in bounds}
        for c in clients:
            if c.done:
                waits[window_of(c)].append(c.done_at - c.last_content_at)
        done_waits = sorted(w for ws in waits.values() for w in ws)

        def summary(values: list[float], bound: float) -> dict[str, Any]:
            values = sorted(values)
            return {
                "n": len(values),
                "p50": _round(percentile(values, 50)),
                "p99": _round(percentile(values, 99)),
                "max": _round(values[-1] if values else None),
                "bound": bound,
                "over_bound": sum(w > bound + BOUND_SLACK for w in values),
            }

        reconciled = (
            settled["settled"] == "reconciled"
            and matched.exact
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
            "status_counts": dict(status_counts.most_common()),
            "errors_500": errors_500,
            "answers_503": dict(Counter(str(c.error_code) for c in answers_503)),
            "answers_503_without_retry_after": sum(c.retry_after is None for c in answers_503),
            "clients_done": sum(c.done for c in clients),
            "clients_error_event": sum(c.error_event for c in clients),
            "clients_timed_out": sum(c.ended == "timeout" for c in clients),
            "done_wait_s": {
                **summary(done_waits, WRITE_TIMEOUT),
                "by_window": {name: summary(ws, bounds[name]) for name, ws in waits.items()},
            },
            "limits_redis_timeout_s": self.redis_timeout,
            "faults": {
                "postgres_refused_s": [rel(m) for m in timeline.postgres],
                "redis_paused_s": [rel(m) for m in timeline.redis],
            },
            "load_s": rel(timeline.load_ended),
            "upstream_calls": upstream_calls,
            "upstream_requests_all": self._upstream_calls(),  # = upstream_calls unless something else called it
            "upstream_completed": sum(bool(r["completed"]) for r in records),
            "upstream_client_disconnected": sum(bool(r["client_disconnected"]) for r in records),
            "upstream_without_request_id": matched.upstream_without_id,
            "upstream_repeated_request_ids": matched.upstream_repeats,
            "ledger_rows": matched.ledger_rows,
            "ledger_by_status": {f"{s}{'/' + k if k else ''}": int(n) for s, k, n in by_status},
            "missing_rows": len(matched.missing),
            "missing_request_ids": matched.missing[:20],
            "duplicate_request_ids": matched.ledger_duplicates,
            "abandoned_rows": matched.abandoned,
            "unexplained_rows": len(matched.unexplained),
            "unexplained": [
                {"request_id": r[0], "status": r[1], "ttft_us": r[2], "completion_tokens": r[3]}
                for r in matched.unexplained[:20]
            ],
            "rows_cancelled_before_first_chunk": cancelled_before_chunk,
            "holds_left": settled["holds"],
            "slots_leaked": settled["slots"],
            "rows_of_clients_without_200": rows_without_200,
            "upstream_calls_of_clients_without_200": upstream_without_200,
            "done_without_row": len(done_without_row),
            "ok_without_row": len(ok_without_row),
            "ok_without_row_ids": ok_without_row[:10],
            "outbox_peak": peak,
            "outbox_deferred_total": deferred,
            # Each: when the final run of samples where it held began (polled every
            # poll_every seconds), counted from the mark named.
            "outbox_drained_after_postgres_s": since(postgres_back, drained),
            "reconciled_after_postgres_s": since(postgres_back, reconciled_at),
            "reconciled_after_load_s": since(timeline.load_ended, reconciled_at),
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
                    c.request_id,
                ]
                for c in clients
            ],  # fmt: skip
        }


_NOISE = re.compile(r"[0-9a-f]{8}-[0-9a-f-]{27}|\b[0-9a-f]{32}\b|\d+(\.\d+)?")


def _log_summary(path: Path, about: Sequence[str] = ()) -> dict[str, Any]:
    """Counts of the gateway log's WARNING/ERROR lines by message shape, and its tracebacks;
    the lines naming each id in ``about``; each "unhandled error" with its exception(s)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    levels: Counter[str] = Counter()
    shapes: Counter[str] = Counter()
    lines = text.splitlines()
    unhandled: list[dict[str, Any]] = []
    mentions: dict[str, list[str]] = {request_id: [] for request_id in about}
    for number, line in enumerate(lines):
        level = line.split(" ", 1)[0]
        if level in ("WARNING", "ERROR", "CRITICAL"):
            levels[level] += 1
            shapes[f"{level} {_NOISE.sub('N', line.split(' ', 1)[1])[:160]}"] += 1
        if "unhandled error" in line and len(unhandled) < 20:
            unhandled.append({"line": line[:300], "exceptions": _exceptions_after(lines, number)})
        for request_id, found in mentions.items():
            if request_id in line and len(found) < 5:
                found.append(line[:400])
    deferred_writes = len(re.findall(r"ledger outbox: wrote (\d+) deferred rows", text))
    return {
        "levels": dict(levels),
        "tracebacks": text.count("Traceback"),
        "outbox_write_batches": deferred_writes,
        "top": dict(shapes.most_common(8)),
        "unhandled": unhandled,
        "about": mentions,
    }


_LEVELS = ("DEBUG ", "INFO ", "WARNING ", "ERROR ", "CRITICAL ")


def _exceptions_after(lines: list[str], number: int) -> list[str]:
    """The exception lines of the traceback that follows a log line (a chain gives several)."""
    found = []
    for line in lines[number + 1 : number + 400]:
        if line.startswith(_LEVELS):
            break
        if (
            line
            and not line[0].isspace()
            and not line.startswith(("Traceback", "During handling", "The above exception"))
        ):
            found.append(line[:300])
    return found


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


def _statuses(counts: dict[str, int]) -> str:
    """200/429/503/500 always (in that order), then any other status, then the unanswered."""
    order = ["200", "429", "503", "500"]
    order += sorted(k for k in counts if k not in order and k != "none") + ["none"]
    return ", ".join(
        f"{'no answer' if k == 'none' else k} {counts.get(k, 0)}"
        for k in order
        if k in counts or k in ("200", "429", "503", "500")
    )


def _waits(w: dict[str, Any]) -> str:
    return (
        f"{w['n']} streams, p50 {_f(w['p50'], '.3f')} / p99 {_f(w['p99'], '.3f')} / max "
        f"{_f(w['max'], '.3f')} s, {w['over_bound']} over {w['bound'] + BOUND_SLACK:g} s"
    )


def render(chaos: dict[str, Any]) -> list[str]:
    if chaos.get("status") != "ok":
        return [f"Chaos: {chaos.get('status')} ({chaos.get('reason')})", ""]
    plan, faults, waits = chaos["plan"], chaos["faults"], chaos["done_wait_s"]
    pg, rd = faults["postgres_refused_s"] + [None, None], faults["redis_paused_s"] + [None, None]
    log = chaos.get("gateway_log") or {}
    about = log.get("about", {})
    clients = chaos["clients"]
    settled = {
        "reconciled": "reconciled",
        "stable": "stable, NOT reconciled",
        "deadline": "still moving at the deadline",
    }[chaos["settled"]]
    by_window = waits["by_window"]
    lines = [
        f"Chaos: {plan['requests']} streams over {plan['load_seconds']:g} s ({plan['workers']} workers), "
        f"PostgreSQL refused {_f(pg[0])}-{_f(pg[1])} s, Redis paused {_f(rd[0])}-{_f(rd[1])} s; "
        f"took {chaos.get('elapsed_s')} s",
        f"  clients: {clients.get(ADMISSION, 0)} hang up during admission, {clients.get(MIDSTREAM, 0)} "
        f"mid-stream, {clients.get(FULL, 0)} read to the end; answers: "
        + "; ".join(f"{b} {s}" for b, s in chaos["client_statuses"].items())
        + f"; [DONE] {chaos['clients_done']}, SSE error events {chaos['clients_error_event']}, "
        f"timed out {chaos['clients_timed_out']}",
        f"  status counts: {_statuses(chaos['status_counts'])}; 503 codes {chaos['answers_503'] or '{}'}, "
        f"{chaos['answers_503_without_retry_after']} without Retry-After",
        f"  after the load ({settled}): upstream calls {chaos['upstream_calls']} (without a request id "
        f"{chaos['upstream_without_request_id']}, an id received twice {chaos['upstream_repeated_request_ids']}), "
        f"ledger rows {chaos['ledger_rows']} {chaos['ledger_by_status']}",
        f"  by request id: missing {chaos['missing_rows']}, duplicates {chaos['duplicate_request_ids']}, "
        f"abandoned while being sent {chaos['abandoned_rows']} (rows the upstream never received, each "
        f"cancelled with no TTFT and 0 completion tokens), unexplained {chaos['unexplained_rows']}; "
        f"holds left {chaos['holds_left']}, slots leaked {chaos['slots_leaked']}; 200s without a row "
        f"{chaos['ok_without_row']} ([DONE] without a row {chaos['done_without_row']})",
    ]
    for request_id in chaos["missing_request_ids"]:
        lines.append(f"    missing {request_id}: log {about.get(request_id) or 'nothing'}")
    for row in chaos["unexplained"]:
        lines.append(f"    unexplained {row}: log {about.get(row['request_id']) or 'nothing'}")
    for request_id in chaos["ok_without_row_ids"]:
        lines.append(
            f"    200 without a row {request_id}: log {about.get(request_id) or 'nothing'}"
        )
    lines += [
        f"  outbox: peak {_f(chaos['outbox_peak'], '.0f')} rows, {_f(chaos['outbox_deferred_total'], '.0f')} "
        f"deferred, drained {_f(chaos['outbox_drained_after_postgres_s'], '.2f')} s after PostgreSQL came "
        f"back; ledger reconciled by id {_f(chaos['reconciled_after_postgres_s'], '.2f')} s after "
        f"PostgreSQL came back ({_f(chaos['reconciled_after_load_s'], '.2f')} s after the load ended); "
        f"slots free {_f(chaos['slots_free_after_load_s'], '.2f')} s after the load ended",
        f"  [DONE] after the stream's last content chunk (GATEWAY_LEDGER_WRITE_TIMEOUT={WRITE_TIMEOUT} s, "
        f"LIMITS_REDIS_TIMEOUT={chaos['limits_redis_timeout_s']:g} s): all {_waits(waits)}",
        f"    waiting while PostgreSQL refused: {_waits(by_window['postgres'])}",
        f"    waiting while Redis was paused: {_waits(by_window['redis'])}",
        f"    neither: {_waits(by_window['outside'])}",
    ]
    for error in chaos["errors_500"]:
        lines.append(
            f"  500: client {error['client']} ({error['behaviour']}) sent at {error['sent_s']:.2f} s, "
            f"code {error['code']}, x-request-id {error['request_id']}: log "
            f"{about.get(error['request_id'] or '') or 'nothing under its id'}"
        )
    for unhandled in log.get("unhandled", []):
        lines.append(
            f"    log: {unhandled['line'][:160]} <- {' <- '.join(unhandled['exceptions'])[:300]}"
        )
    lines += [f"  gateway log: {log.get('levels', {})}, tracebacks {log.get('tracebacks', 0)}", ""]
    return lines


def target(chaos: dict[str, Any] | None) -> tuple[str, str, str, bool | None]:
    """(name, measured, target, ok) for the table of targets."""
    name = "chaos: by id missing/dup/unexplained, holds/slots"
    wanted = "0/0/0, 0/0"
    if not chaos or chaos.get("status") != "ok":
        status = (chaos or {}).get("status", "not run")
        return name, f"{status}: {(chaos or {}).get('reason', '')[:40]}", wanted, None
    duplicates = chaos["duplicate_request_ids"] + chaos["upstream_repeated_request_ids"]
    unexplained = chaos["unexplained_rows"] + chaos["upstream_without_request_id"]
    measured = (
        f"{chaos['missing_rows']}/{duplicates}/{unexplained}, {chaos['holds_left']}/"
        f"{chaos['slots_leaked']} ({chaos['ledger_rows']} rows, {chaos['upstream_calls']} calls, "
        f"{chaos['abandoned_rows']} abandoned)"
        + ("" if chaos["settled"] != "deadline" else " (still moving)")
    )
    return name, measured, wanted, bool(chaos["reconciled"])
