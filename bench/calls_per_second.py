"""Short non-stream calls per second through the full path, in one command.

    python -m bench.calls_per_second [--workers 2] [--rounds 3] [--seconds 5] [--concurrency 64] [--json FILE]

What "the full path" is here: Granian (``--interface asgi``, ``--workers`` processes) serving the
gateway on a fresh PostgreSQL database (``llmgateway_cps_<pid>``, created, migrated and dropped
by the run), its limits in Redis (``--redis``, a prefix of its own), an API key for each of
``--users`` users (1 by default; the clients spread over them), each user with a monthly budget
(``setquota --monthly-budget 1000``, so every call takes a budget hold and settles it with its
ledger row), and the fake upstream (``testbed.upstream_host``, its own process)
answering a non-stream chat completion at once with ``--tokens`` tokens.

The client is a closed loop of ``--concurrency`` keep-alive connections in this process, each
sending its next ``"stream": false`` request when the answer to the last one has arrived
(a raw asyncio HTTP/1.1 client, no aiohttp: about half a millisecond of CPU per call here,
which the report shows as ``client_cpu_ms_per_call``). The first ``--warmup`` seconds of a turn are left out: calls/s
counts the answers that arrived inside its measured window, and p50/p99 are of the requests sent
in it. The same load goes straight to the fake upstream ("direct"), for a ceiling, through
``bench.bare_io`` ("bare I/O": the same Redis, PostgreSQL and upstream round trips per call in a
bare ASGI app on the same workers, no Django, no batching), for a floor of what these parts cost
on this machine whatever the gateway does (``--no-bare-io`` skips it), and through the gateway.
The three take turns, ``--rounds`` times: a VM whose speed drifts within a minute moves the
three alike, so each figure is the median of its turns, and ``gateway_vs_bare_io`` the median of
the turns' ratios (``turns`` has each turn's calls/s).

After the load the run checks the ledger: once it stops changing (bounded wait), it must hold
exactly one ``billing_usagerecord`` row per call the client saw answered, and no budget hold
(``billing_reservation``) may be left.

Everything shares the machine's cores: on 2 cores the gateway's figure is bounded by what the
client and the fake upstream leave it, which ``gateway_cpu_ms_per_call`` makes visible, and on
a shared machine by what other work leaves (``others_cpu_percent``; ``--wait-quiet`` waits for
an idle machine first). ``--monthly-budget none`` runs the same load for a user without a
budget (no hold, no account lock), to see what admission costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.bare_io import TABLES as BARE_IO_TABLES
from bench.common import (
    BENCH_LIMITS,
    ROOT,
    batch_figures,
    batch_totals,
    figures_of_turns,
    percentile,
    rounded,
    without_proxies,
)
from bench.common import with_database as _with_database
from testbed.gateway import SERVE_ARGS, Gateway
from testbed.samplers import CpuWindow, MachineCpuWindow
from testbed.samplers import wait_quiet as _wait_quiet
from testbed.upstream_host import UpstreamHost as Upstream

HOST = "127.0.0.1"
PATH = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
USER = "bench-cps"


def _log(message: str) -> None:
    print(f"[cps] {message}", file=sys.stderr, flush=True)


# -- the client -----------------------------------------------------------------------------------


class _Answer(asyncio.Protocol):
    """One keep-alive connection; ``ask()`` sends a request and resolves when its answer is read."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bool]] | None = None
        self.buffer = b""
        self.length: int | None = None
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def ask(self, payload: bytes) -> asyncio.Future[tuple[int, bool]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.buffer, self.length, self.status = b"", None, 0
        self.transport.write(payload)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.length is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[:end].lower(), self.buffer[end + 4 :]
            self.status = int(head[9:12])
            start = head.find(b"\r\ncontent-length:")
            if start < 0:  # chunked or until close: not what a non-stream answer is
                self._done(ok=False)
                return
            stop = head.find(b"\r\n", start + 2)
            self.length = int(head[start + 17 : stop if stop > 0 else None])
        if len(self.buffer) >= self.length:
            self._done(ok=self.status == 200 and b'"choices"' in self.buffer)

    def _done(self, *, ok: bool) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.status, ok))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((-1, False))


async def drive(
    port: int,
    headers: Sequence[Mapping[str, str]],
    body: dict[str, Any],
    *,
    concurrency: int,
    warmup: float,
    seconds: float,
) -> dict[str, Any]:
    """Closed-loop load for ``warmup + seconds``; figures from the last ``seconds``. Client
    ``i`` sends its requests with ``headers[i % len(headers)]`` (a key of its own user)."""
    raw = json.dumps(body, separators=(",", ":")).encode()
    lines = [
        f"POST {PATH} HTTP/1.1",
        f"host: {HOST}:{port}",
        "content-type: application/json",
        f"content-length: {len(raw)}",
    ]
    payloads = [
        ("\r\n".join([*lines, *(f"{k}: {v}" for k, v in each.items())]) + "\r\n\r\n").encode() + raw
        for each in headers
    ]
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    window_from, window_to = start + warmup, start + warmup + seconds
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    answered = in_window = 0

    async def client(payload: bytes) -> None:
        nonlocal answered, in_window
        connection: _Answer | None = None
        while time.monotonic() < window_to:
            if connection is None:
                _, connection = await loop.create_connection(_Answer, HOST, port)
            sent = time.monotonic()
            try:
                async with asyncio.timeout(30):
                    status, ok = await connection.ask(payload)
            except TimeoutError:
                status, ok = -2, False
            now = time.monotonic()
            if status == 200:
                answered += 1  # the gateway answered: it owes a ledger row
            if not ok:
                errors[f"HTTP {status}" if status > 0 else "connection lost or timed out"] += 1
                assert connection.transport is not None
                connection.transport.close()
                connection = None
                continue
            if window_from <= now <= window_to:
                in_window += 1
            if sent >= window_from and now <= window_to:
                latencies.append((now - sent) * 1000)
        if connection is not None and connection.transport is not None:
            connection.transport.close()

    cpu = time.process_time()
    await asyncio.gather(*(client(payloads[index % len(payloads)]) for index in range(concurrency)))
    client_cpu = time.process_time() - cpu
    latencies.sort()
    return {
        "calls_per_second": round(in_window / seconds, 1),
        "calls_in_window": in_window,
        "answered": answered,
        "p50_ms": rounded(percentile(latencies, 50)),
        "p99_ms": rounded(percentile(latencies, 99)),
        "errors": dict(errors),
        "client_cpu_ms_per_call": rounded(1000 * client_cpu / max(answered, 1)),
    }


# -- the run ------------------------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="llmgateway-cps-", dir="/tmp"))
        self.metrics_dir = self.workdir / "metrics"
        self.db_name = f"llmgateway_cps_{os.getpid()}"
        self.database_url = _with_database(args.postgres, self.db_name)
        self.env = without_proxies(dict(os.environ))
        for name, value in BENCH_LIMITS.items():
            self.env.setdefault(name, value)
        self.env.update(
            {
                "DATABASE_URL": self.database_url,
                "REDIS_URL": args.redis,
                "LIMITS_REDIS_PREFIX": f"llmgw:cps:{os.getpid()}:{secrets.token_hex(4)}",
                "OPENAI_API_KEY": "sk-bench-upstream",
                "LOG_LEVEL": "WARNING",
                "LLMGATEWAY_VAR_DIR": str(self.workdir / "var"),
                "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
                "DJANGO_SETTINGS_MODULE": "llmgateway.settings",
                "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
                "NO_PROXY": "127.0.0.1,localhost",
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
                ),
            }
        )
        self.metrics_dir.mkdir()
        self.upstream: Upstream | None = None
        self.gateway: Gateway | None = None
        self.created = False
        self.logs: list[Any] = []

    def _postgres(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.args.postgres, autocommit=True, connect_timeout=10) as db:
            db.execute(statement)  # type: ignore[arg-type]

    def _query(self, sql: str, *, fetch: bool = True) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=10) as db:
            cursor = db.execute(sql)  # type: ignore[arg-type]
            return cursor.fetchall() if fetch else []

    def service_pids(self) -> tuple[list[int], int]:
        """The PostgreSQL backends connected to the run's database, and the Redis server's PID."""
        import redis

        backends = self._query("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        client = redis.Redis.from_url(self.args.redis)
        try:
            return [pid for (pid,) in backends], int(client.info("server")["process_id"])
        finally:
            client.close()

    def _manage(self, *command: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *command],
            cwd=ROOT,
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        )
        return done.stdout

    def setup(self) -> list[str]:
        """The database, the fake upstream and the gateway; returns an API key of each user."""
        self._postgres(f'CREATE DATABASE "{self.db_name}"')
        self.created = True
        self._manage("migrate", "--noinput", "-v0")
        for statement in BARE_IO_TABLES:
            self._query(statement, fetch=False)
        keys = []
        for user in [USER] if self.args.users == 1 else [f"{USER}-{index}" for index in range(self.args.users)]:
            keys.append(self._manage("createapikey", user, "--name", "calls-per-second").strip().splitlines()[-1])
            if self.args.monthly_budget != "none":  # every call then takes a hold and settles it
                self._manage("setquota", user, "--monthly-budget", self.args.monthly_budget)
        log = (self.workdir / "upstream.log").open("ab")
        self.logs.append(log)
        self.upstream = Upstream(self.env, log)
        self.upstream.configure(tokens=self.args.tokens, inter_token_delay=0.0)
        self.env["OPENAI_BASE_URL"] = self.upstream.base_url
        self.gateway = Gateway(
            self.env, workers=self.args.workers, granian_args=SERVE_ARGS, log=self.workdir / "gateway.log"
        )
        return keys

    def bare_io(self) -> Gateway:
        """``bench.bare_io`` served as the gateway is, on the run's database, Redis and upstream."""
        assert self.upstream is not None
        env = {
            **self.env,
            "BARE_IO_UPSTREAM": self.upstream.base_url,
            "BARE_IO_REDIS": self.args.redis,
            "BARE_IO_POSTGRES": self.database_url,
        }
        return Gateway(
            env,
            workers=self.args.workers,
            granian_args=SERVE_ARGS,
            log=self.workdir / "bare_io.log",
            app="bench.bare_io:application",
        )

    def ledger(self, answered: int, limit: float = 30.0) -> dict[str, Any]:
        """Wait (bounded) for the ledger to hold every answered call, then count it and the holds."""
        deadline = time.monotonic() + limit
        while True:
            ((rows, distinct),) = self._query(
                "SELECT count(*), count(DISTINCT request_id) FROM billing_usagerecord"
            )
            if rows >= answered or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        ((holds,),) = self._query("SELECT count(*) FROM billing_reservation")
        return {
            "rows": rows,
            "distinct_request_ids": distinct,
            "answered": answered,
            "holds_left": holds,
            "ok": rows == distinct == answered and holds == 0,
        }

    def teardown(self) -> None:
        for part in (self.gateway, self.upstream):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop()
        for log in self.logs:
            log.close()
        if self.created:
            try:
                self._postgres(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
            except Exception as error:
                _log(f"could not drop database {self.db_name}: {error}")
        if self.args.keep:
            _log(f"kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


async def _measured(
    args: argparse.Namespace,
    run: Run,
    server: Gateway,
    headers: Sequence[Mapping[str, str]],
    body: dict[str, Any],
) -> dict[str, Any]:
    """`drive` against `server`, with the CPU of the server, the upstream, PostgreSQL's backends
    on the run's database, Redis and the machine over the measured window."""
    assert run.upstream is not None
    window = CpuWindow(server.pids())
    upstream_window = CpuWindow([run.upstream.pid])
    machine_window = MachineCpuWindow()
    services: dict[str, CpuWindow] = {}
    batches: list[dict[str, tuple[float, float, float]]] = []
    loop_start = time.monotonic()

    async def cpu_at_window() -> None:
        await asyncio.sleep(max(0.0, loop_start + args.warmup - time.monotonic()))
        # The backends connected by now: the pools have grown to the load in the warmup.
        postgres_pids, redis_pid = await asyncio.to_thread(run.service_pids)
        services.update(postgres=CpuWindow(postgres_pids), redis=CpuWindow([redis_pid]))
        windows = (window, upstream_window, machine_window, *services.values())
        for started in windows:
            started.start()
        batches.append(await asyncio.to_thread(batch_totals, run.metrics_dir))
        await asyncio.sleep(args.seconds)
        for stopped in windows:
            stopped.stop()
        batches.append(await asyncio.to_thread(batch_totals, run.metrics_dir))

    watcher = asyncio.ensure_future(cpu_at_window())
    try:
        result = await drive(server.port, headers, body, concurrency=args.concurrency, warmup=args.warmup, seconds=args.seconds)
    finally:
        await watcher
    cps = result["calls_per_second"] or 0.0

    def per_call(percent: float | None) -> float | None:
        return rounded(10 * percent / cps) if cps and percent is not None else None

    result["server_cpu_percent"] = rounded(window.percent, 1)
    result["server_cpu_ms_per_call"] = per_call(window.percent)
    result["postgres_cpu_ms_per_call"] = per_call(services["postgres"].percent)
    result["redis_cpu_ms_per_call"] = per_call(services["redis"].percent)
    result["upstream_cpu_percent"] = rounded(upstream_window.percent, 1)
    result["machine_cpu_percent"] = rounded(machine_window.percent, 1)
    # What the rest of the machine used meanwhile (PostgreSQL, Redis and this client are part of
    # it): on a shared machine, the share the server could not have.
    result["others_cpu_percent"] = rounded(
        (machine_window.percent or 0.0) - (window.percent or 0.0) - (upstream_window.percent or 0.0), 1
    )
    # CPU the hypervisor gave to other guests meanwhile: calls/s falls with it, CPU per call not.
    result["steal_cpu_percent"] = rounded(machine_window.steal_percent, 1)
    result.update(batch_figures(*batches))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.calls_per_second", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="Granian worker processes (default 2)"
    )
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="measured seconds of each turn of each load (default 5)"
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of load before each turn's window (default 2)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="turns each load takes, the direct, bare I/O and gateway loads one after another (default 3)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=64, help="closed-loop clients (default 64)"
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=4,
        help="completion tokens the fake upstream answers (default 4)",
    )
    parser.add_argument(
        "--postgres",
        default="postgres://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL server to create the run's database on",
    )
    parser.add_argument(
        "--redis",
        default="redis://127.0.0.1:6379/11",
        help="Redis for the gateway's limits (default db 11)",
    )
    parser.add_argument(
        "--monthly-budget",
        default="1000",
        help="the key's user's monthly budget in USD (default 1000: every call takes a budget "
        "hold); 'none' for no budget (no hold, no account lock: to see what admission costs)",
    )
    parser.add_argument(
        "--users",
        type=int,
        default=1,
        help="users with a key (and budget) each, the clients spread over them (default 1: every "
        "call is the same account's; more puts several accounts in a batch of holds)",
    )
    parser.add_argument("--no-direct", action="store_true", help="skip the direct baseline")
    parser.add_argument(
        "--no-bare-io", action="store_true", help="skip the bare I/O floor (bench.bare_io)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the result as JSON here"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for an idle machine (shared machines)",
    )
    args = parser.parse_args(argv)

    if args.wait_quiet > 0:
        _wait_quiet(args.wait_quiet)
    run = Run(args)
    body = {
        "model": MODEL,
        "stream": False,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "Say something short."}],
    }
    result: dict[str, Any] = {
        "settings": {
            k: getattr(args, k)
            for k in ("workers", "rounds", "seconds", "warmup", "concurrency", "users", "tokens", "monthly_budget")
        },
        "cpus": os.cpu_count(),
    }
    try:
        keys = run.setup()
        authorized = [{"authorization": f"Bearer {key}"} for key in keys]
        assert run.upstream is not None and run.gateway is not None
        upstream, gateway = run.upstream, run.gateway
        turns: dict[str, list[dict[str, Any]]] = {"direct": [], "bare_io": [], "gateway": []}
        with contextlib.ExitStack() as servers:
            bare = None if args.no_bare_io else servers.enter_context(run.bare_io())
            for turn in range(1, args.rounds + 1):
                if not args.no_direct:
                    _log(f"turn {turn}/{args.rounds}: direct to the fake upstream ...")
                    turns["direct"].append(
                        asyncio.run(drive(upstream.port, [{}], body, concurrency=args.concurrency, warmup=1.0, seconds=args.seconds))
                    )
                if bare is not None:
                    _log(f"turn {turn}/{args.rounds}: bare I/O ({args.workers} workers) ...")
                    turns["bare_io"].append(asyncio.run(_measured(args, run, bare, [{}], body)))
                _log(f"turn {turn}/{args.rounds}: through the gateway ({args.workers} workers) ...")
                measured = asyncio.run(_measured(args, run, gateway, authorized, body))
                measured["gateway_cpu_percent"] = measured.pop("server_cpu_percent")
                measured["gateway_cpu_ms_per_call"] = measured.pop("server_cpu_ms_per_call")
                turns["gateway"].append(measured)
        if turns["direct"]:
            result["direct"] = figures_of_turns(turns["direct"], ("calls_per_second", "p50_ms", "p99_ms", "errors"))
        if turns["bare_io"]:
            result["bare_io"] = figures_of_turns(
                turns["bare_io"],
                (
                    "calls_per_second", "p50_ms", "p99_ms", "errors", "server_cpu_ms_per_call",
                    "postgres_cpu_ms_per_call", "redis_cpu_ms_per_call", "machine_cpu_percent",
                ),  # fmt: skip
            )
        result["gateway"] = figures_of_turns(turns["gateway"], tuple(turns["gateway"][0]))
        result["turns"] = [
            {
                name: each["calls_per_second"]
                for name, each in (("direct", direct), ("bare_io", floor), ("gateway", through))
                if each is not None
            }
            for direct, floor, through in itertools.zip_longest(turns["direct"], turns["bare_io"], turns["gateway"])
        ]
        if turns["bare_io"]:
            ratios = [
                through["calls_per_second"] / floor["calls_per_second"]
                for floor, through in zip(turns["bare_io"], turns["gateway"], strict=True)
                if floor["calls_per_second"]
            ]
            result["gateway_vs_bare_io"] = rounded(statistics.median(ratios)) if ratios else None
        result["ledger"] = run.ledger(result["gateway"]["answered"])
    finally:
        run.teardown()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if result.get("ledger", {}).get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
