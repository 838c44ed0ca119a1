"""Benchmark the gateway as it is served, against a fast fake upstream, in one command.

    scripts/bench [--quick] [--serving embedded,production] [--phases ...] [--wait-quiet S]

One invocation measures both serving configurations, each against the same load sent straight to
the fake upstream in the same run ("direct"):

- ``embedded``: the default ``scripts/serve`` gives you: one Granian worker, SQLite, the
  in-process limiter;
- ``production``: the README's recommendation: one worker per core (at least 2) sharing Redis
  (``REDIS_URL``, else ``redis://127.0.0.1:6379/0`` if it answers, under a prefix of the run's
  own), on PostgreSQL (a throwaway database on ``--postgres``'s server) when one answers.

On 127.0.0.1 only it starts the fake upstream in its own process (``testbed.upstream_host``), the
gateway under Granian (``testbed.gateway``), and for each load a load generator process
(``bench._loadgen``) that reports its own CPU. It saves every raw measurement as JSON
(``bench/results/latest.json``) and prints the report, which ``python -m bench.report FILE``
draws again from a saved file: the detail tables and every row of the targets table
(``bench/targets.py``) against its goal, per configuration.

Choices that may look odd:

- Load is closed-loop (each client sends its next request when its stream ends) on keep-alive
  connections, as SDK clients do. Requests sent in the first ``warmup`` seconds are left out of
  TTFT, and throughput counts the streams that ended inside the window, so ramp-up and drain do
  not dilute it.
- Streams are 100 tokens of OpenAI-shaped chunks, and at 20 ms the fake upstream writes one
  chunk per write (TCP_NODELAY), so the gateway reads one chunk per read, as from OpenAI; the
  load generator counts its reads, and the report shows chunks per read, direct and through the
  gateway.
- The memory and storm phases restart the gateway, so what they measure is the growth of a
  process that has only been warmed up, not memory freed by earlier phases and reused.
- CPU shares are percentages of one core over the measured window. What other processes used
  meanwhile is shown too (machine busy time minus ours): on a shared machine the figures are
  pessimistic, and ``--wait-quiet`` waits for an idle machine before each configuration.
- The disconnect storm paces its streams slowly (``storm_delay_ms``) so the gateway is not
  saturated: it measures the disconnect path, not the event loop's backlog.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

from bench.common import (
    BENCH_LIMITS,
    HOST,
    RESULTS,
    ROOT,
    fmt,
    log,
    percentile,
    rounded,
    with_database,
)
from bench.common import process_env as _process_env
from bench.stages import LOAD_HEADER
from testbed.gateway import APPLICATION, SERVE_ARGS, Gateway
from testbed.samplers import CpuWindow, MachineCpuWindow, machine_busy, wait_quiet
from testbed.upstream_host import UpstreamHost, read_json_line

MODEL = "gpt-4o-mini"
BODY: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say something."}],
    "stream": True,
    "stream_options": {"include_usage": True},
}
CHAT_PATH = "/v1/chat/completions"
PHASES = ("streaming", "memory", "storm", "accuracy", "limiter", "calls", "chaos", "admin")
SERVING_PHASES = ("streaming", "memory", "storm")  # these run once per serving configuration
LAUNCH_MARGIN = 0.5  # seconds between spawning a load generator and its agreed start
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES = "postgres://postgres@127.0.0.1:5432/postgres"


@dataclass(frozen=True)
class Load:
    """One closed-loop load, run direct and through the gateway; ``key`` names it in the JSON."""

    key: str
    delay_ms: float
    concurrency: int
    duration: float
    tokens: int = 100
    one_worker: bool = False  # through a one-worker gateway whatever the configuration's workers

    @property
    def stagger(self) -> float:
        """Seconds over which the clients start (so they do not all start in one loop turn)."""
        spread = 0.0 if self.concurrency <= 10 else (0.5 if self.concurrency <= 100 else 1.5)
        return min(spread, self.duration / 4)

    @property
    def warmup(self) -> float:
        """Seconds at the start left out of TTFT and throughput: the stagger, plus one stream."""
        stream = self.delay_ms * max(self.tokens - 1, 0) / 1000
        return min(self.duration / 2, self.stagger + max(0.5, stream))


@dataclass(frozen=True)
class Plan:
    """How big each phase is; ``--quick`` picks a smaller one."""

    loads: tuple[Load, ...] = (
        Load("0ms-1", 0.0, 1, 3.0),
        Load("0ms-10", 0.0, 10, 3.0),
        Load("20ms-100", 20.0, 100, 8.0),
        Load("20ms-1000", 20.0, 1000, 10.0),
        Load("20ms-300-1w", 20.0, 300, 8.0, one_worker=True),
        # The cost of one relayed chunk: the slope between 10- and 110-token streams.
        Load("chunks-10-1w", 20.0, 50, 4.0, tokens=10, one_worker=True),
        # Its window holds about three of its 2.2 s streams, so that its CPU figure is steady.
        Load("chunks-110-1w", 20.0, 50, 10.0, tokens=110, one_worker=True),
    )
    drain: float = 20.0
    stall_gap: float = 5.0
    idle_streams: int = 200
    slow_clients: int = 100
    slow_read_bytes: int = 64 * 1024
    slow_settle_max: float = 30.0
    storm_clients: int = 500
    storm_delay_ms: float = 500.0
    limiter_seconds: float = 1.0
    accuracy_gateways: int = 3
    accuracy_rpm: int = 60
    accuracy_requests: int = 200
    calls_seconds: float = 5.0  # each turn's (bench.calls_per_second --seconds)
    calls_rounds: int = 3


QUICK = Plan(
    loads=(
        Load("0ms-1", 0.0, 1, 1.5),
        Load("0ms-10", 0.0, 10, 1.5),
        Load("20ms-100", 20.0, 100, 4.0),
        Load("20ms-300-1w", 20.0, 300, 4.0, one_worker=True),
        Load("chunks-10-1w", 20.0, 50, 2.0, tokens=10, one_worker=True),
        Load("chunks-110-1w", 20.0, 50, 4.0, tokens=110, one_worker=True),
    ),
    drain=5.0,
    idle_streams=100,
    slow_clients=50,
    slow_settle_max=5.0,
    storm_clients=100,
    limiter_seconds=0.2,
    calls_seconds=3.0,
    calls_rounds=1,
)


@dataclass(frozen=True)
class Serving:
    """A way of serving the gateway that the run measures."""

    name: str
    workers: int
    redis_url: str | None = None  # None: the in-process limiter
    postgres_server: str | None = None  # None: SQLite
    why_not: str | None = None  # set when it cannot run here

    def describe(self) -> str:
        limiter = "Redis" if self.redis_url else "in-process limiter"
        database = "PostgreSQL" if self.postgres_server else "SQLite"
        return f"{self.workers} worker{'s' if self.workers > 1 else ''}, {limiter}, {database}"


def _redis_answers(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _postgres_answers(url: str) -> bool:
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=3, autocommit=True) as db:
            db.execute("SELECT 1")
        return True
    except Exception:  # any reason: no PostgreSQL here
        return False


def servings(args: argparse.Namespace) -> list[Serving]:
    """The configurations asked for (``--serving``), each as this machine can serve it."""
    chosen = []
    for name in args.serving:
        if name == "embedded":
            chosen.append(Serving("embedded", 1))
            continue
        redis_url = os.environ.get("REDIS_URL") or LOCAL_REDIS_URL
        postgres = args.postgres or DEFAULT_POSTGRES
        workers = args.workers or max(2, os.cpu_count() or 1)
        serving = Serving(
            "production",
            workers,
            redis_url,
            postgres if _postgres_answers(postgres) else None,
        )
        if not _redis_answers(redis_url):
            serving = replace(serving, why_not=f"no Redis answers at {redis_url}")
        chosen.append(serving)
    return chosen


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _socket_queues(port: int, side: str) -> dict[str, float] | None:
    """Bytes waiting in the kernel on established TCP sockets with this local (``sport``) or
    remote (``dport``) port, from ``ss``: Recv-Q (unread) and Send-Q (unsent or unacked)."""
    try:
        out = subprocess.run(
            ["ss", "-tnH", "state", "established", f"( {side} = :{port} )"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    sockets = recv = send = 0
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit():
            sockets += 1
            recv += int(fields[0])
            send += int(fields[1])
    return {
        "sockets": sockets,
        "recv_q_mb": round(recv / 2**20, 2),
        "send_q_mb": round(send / 2**20, 2),
    }


class LoadGen:
    """One load-generator process (``python -m bench._loadgen``) running one job."""

    def __init__(self, job: dict[str, Any], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench._loadgen"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        try:
            return read_json_line(self.process.stdout, timeout, "the load generator")
        except BaseException:
            self.kill()
            raise

    def tell(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def finish(self) -> None:
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# -- one serving configuration ------------------------------------------------------------------


class ServingRun:
    """The phases of one serving configuration: its database, its gateway, its figures."""

    def __init__(
        self,
        serving: Serving,
        *,
        args: argparse.Namespace,
        plan: Plan,
        upstream: UpstreamHost,
        workdir: Path,
    ) -> None:
        self.serving = serving
        self.args = args
        self.plan = plan
        self.upstream = upstream
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.db_path = workdir / "bench.sqlite3"
        self.pg_name = f"llmgateway_bench_{serving.name}_{os.getpid()}"
        self.database_url = (
            with_database(serving.postgres_server, self.pg_name)
            if serving.postgres_server
            else f"sqlite:///{self.db_path}"
        )
        self.env = self._environment()
        self.gateway: Gateway | None = None
        self.gateway_workers = serving.workers
        self.api_key = ""
        self.gateway_requests = 0  # chat requests sent to the gateway, for the ledger check
        self.results: dict[str, Any] = {"serving": asdict(self.serving)}
        self._pg_created = False

    def _environment(self) -> dict[str, str]:
        env = _process_env()
        for name in ("REDIS_URL", "PROMETHEUS_MULTIPROC_DIR"):
            env.pop(name, None)
        # A limit set in the environment wins over the benchmark's.
        for name, value in BENCH_LIMITS.items():
            env.setdefault(name, value)
        # A load that overloads the gateway fails upstream calls (first-token timeouts); the
        # circuit breaker they open would refuse the next load's calls (502) and spoil its row.
        env.setdefault("UPSTREAM_BREAKER_FAILURES", str(10**6))
        # Each run's database starts its key ids at 1: its limits must not meet an earlier run's.
        env.setdefault("LIMITS_REDIS_PREFIX", f"llmgw:bench:{self.workdir.parent.name}:{self.serving.name}")
        # The gateway refuses to serve (DEBUG off) on the public development key, and the run's
        # var/ is fresh, so it has no kept key: one per run, unless the environment sets one.
        env.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(50))
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "OPENAI_API_KEY": "sk-bench-upstream",
                "OPENAI_BASE_URL": self.upstream.base_url,
                "LOG_LEVEL": "WARNING",
                "LLMGATEWAY_VAR_DIR": str(self.workdir / "var"),
                "LEDGER_OUTBOX_DIR": str(self.workdir / "outbox"),
                "DJANGO_SETTINGS_MODULE": "llmgateway.settings",
                "NO_PROXY": "127.0.0.1,localhost",
            }
        )
        if self.serving.redis_url:
            env["REDIS_URL"] = self.serving.redis_url
        if self.serving.workers > 1:
            metrics = self.workdir / "prometheus"
            metrics.mkdir(exist_ok=True)
            env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
        return env

    # -- setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        if self.serving.postgres_server:
            self._postgres(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)')
            self._postgres(f'CREATE DATABASE "{self.pg_name}"')
            self._pg_created = True
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v0"],
            cwd=ROOT,
            env=self.env,
            check=True,
        )
        self.api_key = self._create_key("bench", "--name", "benchmark")

    def teardown(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        if self._pg_created:
            if self.args.keep:
                log(f"kept database {self.pg_name}")
                return
            try:
                self._postgres(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)')
            except Exception as error:  # leave it, say so
                log(f"could not drop database {self.pg_name}: {error}")

    def _create_key(self, username: str, *options: str) -> str:
        """A new API key from `manage.py createapikey` (which prints it alone on its last line)."""
        created = subprocess.run(
            [sys.executable, "manage.py", "createapikey", username, *options],
            cwd=ROOT,
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        )
        return created.stdout.strip().splitlines()[-1]

    def _settle_ledger(self, limit: float = 15.0) -> dict[str, int]:
        """Wait (bounded) until every chat request sent so far has its usage row."""
        deadline = time.monotonic() + limit
        while True:
            rows, _ = self._ledger()
            if rows >= self.gateway_requests or time.monotonic() > deadline:
                return {"rows": rows, "gateway_requests": self.gateway_requests}
            time.sleep(0.2)

    def start_gateway(self, workers: int | None = None) -> Gateway:
        """(Re)start the gateway with ``workers`` (default: the configuration's) and warm it up."""
        if self.gateway is not None:
            # Calls still being recorded would be cut short by the restart, and the loss would
            # look like the gateway's: let them land first, and keep the count.
            self.results.setdefault("ledger_before_restarts", []).append(self._settle_ledger())
            self.gateway.stop()
            self.gateway = None
        self.gateway_workers = workers or self.serving.workers
        started = time.monotonic()
        self.gateway = Gateway(
            self.env,
            workers=self.gateway_workers,
            granian_args=SERVE_ARGS,
            log=self.workdir / "gateway.log",
            app=self.args.app,
        )
        log(
            f"{self.serving.name}: gateway on :{self.gateway.port}, {self.gateway_workers} worker(s), "
            f"up in {time.monotonic() - started:.1f} s"
        )
        self.warm_up()
        return self.gateway

    def warm_up(self) -> None:
        """Load the lazy parts (tokenizer, SDK client, pools) before anything is measured."""
        self.upstream.configure(tokens=100, inter_token_delay=0.0)
        self.load(Load("warm-up", 0.0, 10, 1.0), target="gateway")

    # -- load ---------------------------------------------------------------------------------

    def load(self, spec: Load, *, target: str) -> dict[str, Any]:
        """Run one closed-loop load against ``target`` ("direct" or "gateway"): the load
        generator's raw result, with the CPU of every process involved over the window."""
        assert self.gateway is not None
        if target == "direct":
            port, headers = self.upstream.port, {}
        else:
            # The load's name goes with each call, for the stage marks (bench/stage_marks.py).
            headers = {"authorization": f"Bearer {self.api_key}", LOAD_HEADER: spec.key}
            port = self.gateway.port
        start_at = time.monotonic() + LAUNCH_MARGIN
        generator = LoadGen(
            {
                "kind": "load",
                "host": HOST,
                "port": port,
                "path": CHAT_PATH,
                "headers": headers,
                "body": BODY,
                "concurrency": spec.concurrency,
                "start_at": start_at,
                "duration": spec.duration,
                "warmup": spec.warmup,
                "stagger": spec.stagger,
                "drain": self.plan.drain,
                "stall_gap": self.plan.stall_gap,
                "expect_tokens": spec.tokens,
            },
            self.env,
        )
        # CPU over the measured window only (after the warm-up), like the throughput.
        machine_window = MachineCpuWindow()
        windows = {
            "gateway": CpuWindow(self.gateway.pids()),
            "upstream": CpuWindow([self.upstream.pid]),
            "loadgen": CpuWindow([generator.process.pid]),
            "machine": machine_window,
        }
        time.sleep(max(0.0, start_at + spec.warmup - time.monotonic()))
        for window in windows.values():
            window.start()
        time.sleep(max(0.0, start_at + spec.duration - time.monotonic()))
        for window in windows.values():
            window.stop()
        result = generator.read(spec.duration + self.plan.drain + 60)
        generator.finish()
        cpu = {name: rounded(window.percent, 1) for name, window in windows.items()}
        cpu["gateway_sys"] = rounded(windows["gateway"].system_percent, 1)
        cpu["steal"] = rounded(machine_window.steal_percent, 1)
        ours = [windows[name].percent for name in ("gateway", "upstream", "loadgen")]
        machine = windows["machine"].percent
        cpu["other"] = (
            None
            if machine is None or any(value is None for value in ours)
            else round(max(0.0, machine - sum(v or 0.0 for v in ours)), 1)
        )
        result["cpu_pct"] = cpu
        result["cpu_window_s"] = round(spec.duration - spec.warmup, 3)
        if target == "gateway":
            self.gateway_requests += result["requests"]
            result["gateway_workers"] = self.gateway_workers
            result["quiesce_s"] = self.quiesce()
        return result

    def quiesce(self, limit: float = 20.0) -> float | None:
        """Wait until the gateway is idle (< 5% of a core over 0.5 s); return the wait, None if never.

        Streams a load generator gave up on may still be running (and being recorded) in the
        gateway; the next run must not pay for them.
        """
        assert self.gateway is not None
        began = time.monotonic()
        while time.monotonic() - began < limit:
            window = CpuWindow(self.gateway.pids())
            window.start()
            time.sleep(0.5)
            if (window.stop() or 0.0) < 5.0:
                return round(time.monotonic() - began, 2)
        log(f"the gateway is still busy {limit:.0f} s after the load stopped")
        return None

    def phase_streaming(self) -> None:
        """Every load of the plan, direct then through the gateway, back to back."""
        rows: dict[str, Any] = {}
        loads = [spec for spec in self.plan.loads if spec.key in self.args.loads or not self.args.loads]
        # The configuration's own workers first, then the one-worker loads on a one-worker gateway.
        for one_worker in (False, True):
            batch = [spec for spec in loads if spec.one_worker == one_worker]
            if not batch:
                continue
            workers = 1 if one_worker else self.serving.workers
            if self.gateway is None or self.gateway_workers != workers:
                self.start_gateway(workers)
            for spec in batch:
                self.upstream.configure(tokens=spec.tokens, inter_token_delay=spec.delay_ms / 1000)
                row: dict[str, Any] = {"load": asdict(spec), "warmup_s": spec.warmup, "stagger_s": spec.stagger}
                for target in ("direct", "gateway"):
                    result = self.load(spec, target=target)
                    row[target] = result
                    ttft = sorted(result["ttft_ms"])
                    window = result["window_s"] or 1.0
                    log(
                        f"{self.serving.name} {spec.key:<13} {target:<7}: TTFT p50 "
                        f"{fmt(percentile(ttft, 50), '.3f')} ms, {result.get('received_tokens', 0) / window:.0f} tok/s, "
                        f"cpu gw {fmt(result['cpu_pct']['gateway'], '.0f')}% up {fmt(result['cpu_pct']['upstream'], '.0f')}% "
                        f"lg {fmt(result['cpu_pct']['loadgen'], '.0f')}% other {fmt(result['cpu_pct']['other'], '.0f')}%, "
                        f"errors {result['error_count']}"
                    )
                rows[spec.key] = row
        self.results["streaming"] = rows

    # -- memory -------------------------------------------------------------------------------

    # -- memory -------------------------------------------------------------------------------

    def _hold(self, *, n: int, prefix: str, **job: Any) -> tuple[LoadGen, dict[str, Any]]:
        assert self.gateway is not None
        generator = LoadGen(
            {
                "kind": "hold",
                "host": HOST,
                "port": self.gateway.port,
                "path": CHAT_PATH,
                "headers": {"authorization": f"Bearer {self.api_key}"},
                "body": BODY,
                "n": n,
                "user_prefix": prefix,
                **job,
            },
            self.env,
        )
        self.gateway_requests += n
        ready = generator.read(float(job.get("ready_timeout", 30)) + 30)
        return generator, ready

    def _settled_rss(self, samples: int = 3, interval: float = 0.3) -> int:
        assert self.gateway is not None
        values = []
        for _ in range(samples):
            values.append(self.gateway.rss_bytes(workers_only=True))
            time.sleep(interval)
        return sorted(values)[len(values) // 2]

    def _wait_upstream_closed(
        self, prefix: str, closed: list[list[Any]], timeout: float
    ) -> dict[str, Any]:
        """Wait until the upstream saw every ``prefix`` request's connection close; time each one."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.upstream.records(prefix)
            if records and all(r["closed_at"] is not None for r in records):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        by_user = {r["user"]: r for r in records}
        latencies = []
        left_open = 0
        never_reached = 0
        for user, closed_at in closed:
            record = by_user.get(user)
            if record is None:
                never_reached += 1
            elif record["closed_at"] is None:
                left_open += 1
            else:
                latencies.append((record["closed_at"] - closed_at) * 1000)
        latencies.sort()
        return {
            "clients": len(closed),
            "upstream_requests": len(records),
            "never_reached_upstream": never_reached,
            "left_open": left_open,
            "close_p50_ms": rounded(percentile(latencies, 50)),
            "close_p99_ms": rounded(percentile(latencies, 99)),
            "close_max_ms": rounded(latencies[-1] if latencies else None),
            "upstream_chunks_sent": _spread([r["content_chunks_sent"] for r in records]),
            "upstream_bytes_written": _spread([r["bytes_written"] for r in records]),
            "upstream_write_blocked": sum(bool(r["write_blocked"]) for r in records),
        }

    def phase_memory(self) -> None:
        memory: dict[str, Any] = {}

        # RSS per idle open stream: each stream got its first token, then the upstream stalls.
        self.start_gateway()
        n = self.plan.idle_streams
        before = self._settled_rss()
        threads_before, fds_before = self.gateway.threads_and_fds()
        self.upstream.command("clear")
        self.upstream.configure(
            tokens=100, fault="stall", fault_after_tokens=1, max_records=100_000
        )
        generator, ready = self._hold(n=n, prefix="idle-", ready_tokens=1, stagger=0.5)
        time.sleep(1.0)
        during = self._settled_rss()
        threads_during, fds_during = self.gateway.threads_and_fds()
        generator.tell("close")
        result = generator.read(30)
        generator.finish()
        closing = self._wait_upstream_closed("idle-", result["closed"], timeout=10)
        memory["idle"] = {
            "streams": n,
            "ready": ready["ready"],
            "ended_early": ready["ended_early"],
            "rss_before_mb": round(before / 2**20, 2),
            "rss_during_mb": round(during / 2**20, 2),
            "per_stream_kb": round((during - before) / max(1, ready["ready"]) / 1024, 2),
            "worker_threads": [threads_before, threads_during],
            "worker_fds": [fds_before, fds_during],
            "close": closing,
        }
        log(f"idle streams: {ready['ready']}/{n} open, {memory['idle']['per_stream_kb']} KB each")

        # RSS growth with clients that stop reading an endless stream.
        self.start_gateway()
        n = self.plan.slow_clients
        before = self._settled_rss()
        self.upstream.command("clear")
        self.upstream.configure(tokens=100, fault="endless", max_records=100_000)
        generator, ready = self._hold(
            n=n,
            prefix="slow-",
            ready_tokens=1,
            read_bytes=self.plan.slow_read_bytes,
            pause=True,
            rcvbuf=64 * 1024,
            stagger=0.5,
        )
        paused_at = time.monotonic()
        samples: list[tuple[float, int]] = []
        # Settled: the relay has stopped (the gateway used < 10% of a core over the last 1 s)
        # and RSS moved less than 1 MB over the last 2 s. Until the kernel's socket buffers
        # (gateway -> client send buffers, up to tcp_wmem's max each) are full, a gateway with
        # working back-pressure still relays, so "RSS flat for a moment" alone is not enough.
        settled = False
        cpu_busy: list[float] = []  # % of a core per 0.5 s sample
        overall = CpuWindow(self.gateway.pids())
        overall.start()
        while time.monotonic() - paused_at < self.plan.slow_settle_max:
            window = CpuWindow(self.gateway.pids())
            window.start()
            time.sleep(0.5)
            cpu_busy.append(window.stop() or 0.0)
            samples.append((time.monotonic() - paused_at, self.gateway.rss_bytes(workers_only=True)))
            recent = [rss for t, rss in samples if t >= samples[-1][0] - 2.0]
            if (
                samples[-1][0] >= 3.0
                and max(recent) - min(recent) < 2**20
                and max(cpu_busy[-2:]) < 10.0
            ):
                settled = True
                break
        cpu_paused = overall.stop()
        after = samples[-1][1]
        # Where the relayed bytes wait: gateway -> clients, and upstream -> gateway (both ends).
        kernel = {
            "gateway_to_clients": _socket_queues(self.gateway.port, "sport"),
            "upstream_to_gateway_upstream_side": _socket_queues(self.upstream.port, "sport"),
            "upstream_to_gateway_gateway_side": _socket_queues(self.upstream.port, "dport"),
        }
        to_clients = kernel["gateway_to_clients"]
        relayed = (
            round(to_clients["send_q_mb"] + n * self.plan.slow_read_bytes / 2**20, 1)
            if to_clients
            else None
        )
        generator.tell("close")
        result = generator.read(30)
        generator.finish()
        closing = self._wait_upstream_closed("slow-", result["closed"], timeout=10)
        memory["slow_readers"] = {
            "clients": n,
            "ready": ready["ready"],
            "ended_early": ready["ended_early"],
            "read_bytes_before_pause": self.plan.slow_read_bytes,
            "rss_before_mb": round(before / 2**20, 2),
            "rss_after_mb": round(after / 2**20, 2),
            "growth_mb": round((after - before) / 2**20, 2),
            "settled": settled,
            "observed_s": round(samples[-1][0], 1),
            "rss_samples_mb": [[round(t, 1), round(rss / 2**20, 1)] for t, rss in samples],
            "gateway_cpu_pct_while_paused": rounded(cpu_paused, 1),
            "gateway_cpu_pct_last_second": rounded(max(cpu_busy[-2:]) if cpu_busy else None, 1),
            "kernel_queues": kernel,
            # Bytes the gateway relayed to the clients (read, or parked in its send buffers), and
            # the RSS it grew per MB of them: ~0 when memory is bounded by the relay's queue.
            "relayed_to_clients_mb": relayed,
            "growth_per_relayed_mb": rounded((after - before) / 2**20 / relayed, 3)
            if relayed
            else None,
            "close": closing,
        }
        log(f"slow readers: +{memory['slow_readers']['growth_mb']} MB (settled: {settled})")
        self.results["memory"] = memory

    # -- disconnect storm ---------------------------------------------------------------------

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Read the gateway's database directly (``?`` placeholders)."""
        if self.serving.postgres_server:
            import psycopg

            with psycopg.connect(self.database_url, connect_timeout=10) as db:
                return db.execute(sql.replace("?", "%s"), params).fetchall()  # type: ignore[arg-type]
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=10)) as db:
            return db.execute(sql, params).fetchall()

    def _ledger(self) -> tuple[int, int]:
        ((count, last),) = self._query(
            "SELECT count(*), coalesce(max(id), 0) FROM billing_usagerecord"
        )
        return int(count), int(last)

    def _ledger_since(self, last_id: int) -> dict[str, int]:
        rows = self._query(
            "SELECT status, count(*) FROM billing_usagerecord WHERE id > ? GROUP BY status",
            (last_id,),
        )
        return {status: int(count) for status, count in rows}

    def _postgres(self, statement: str) -> None:
        import psycopg

        assert self.serving.postgres_server is not None
        with psycopg.connect(self.serving.postgres_server, autocommit=True, connect_timeout=10) as db:
            db.execute(statement)  # type: ignore[arg-type]

    def phase_storm(self) -> None:
        """Many clients leave mid-stream at the same instant; time until the upstream sees each go.

        The streams are paced (``storm_delay_ms`` between tokens) so the gateway carries them
        without saturating its loop: the figure is then the disconnect path's latency, not the
        loop's backlog. The gateway's CPU in the second before the storm is reported to show it.
        """
        self.start_gateway()
        assert self.gateway is not None
        n = self.plan.storm_clients
        _, last_id = self._ledger()
        self.upstream.command("clear")
        # Streams that would last minutes, so every one is mid-stream when its client leaves.
        self.upstream.configure(
            tokens=100_000, inter_token_delay=self.plan.storm_delay_ms / 1000, max_records=100_000
        )
        generator, ready = self._hold(n=n, prefix="storm-", ready_tokens=2, stagger=1.0)
        before = CpuWindow(self.gateway.pids())
        before.start()
        time.sleep(1.0)
        before.stop()
        after = CpuWindow(self.gateway.pids())
        after.start()
        generator.tell("close")  # every client closes its socket, in one loop
        result = generator.read(30)
        generator.finish()
        closing = self._wait_upstream_closed("storm-", result["closed"], timeout=10)
        after.stop()
        deadline = time.monotonic() + 15
        while True:
            rows = self._ledger_since(last_id)
            if sum(rows.values()) >= n or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.results["storm"] = {
            "clients": n,
            "delay_ms": self.plan.storm_delay_ms,
            "ready": ready["ready"],
            "ended_early": ready["ended_early"],
            "ready_after_s": ready["ready_after_s"],
            **closing,
            "ledger_rows": sum(rows.values()),
            "ledger_rows_by_status": rows,
            "gateway_cpu_pct_before": rounded(before.percent, 1),
            "gateway_cpu_pct_during": rounded(after.percent, 1),
        }
        log(
            f"storm: p50 {closing['close_p50_ms']} ms, p99 {closing['close_p99_ms']} ms, "
            f"left open {closing['left_open']}, ledger {sum(rows.values())}/{n}"
        )

    # -- limiter accuracy across processes ------------------------------------------------------

    def phase_accuracy(self) -> None:
        """One key with a per-minute limit, hammered at once through several gateway processes
        that share Redis: admitted must be the limit, plus (token bucket) what refilled while the
        burst lasted, and never more. Each rejection must carry Retry-After. With
        ``--redis-cluster`` the gateways share that Redis Cluster instead (REDIS_CLUSTER=true)."""
        cluster = self.args.redis_cluster
        if not (self.env.get("REDIS_URL") or cluster):
            self.results["accuracy"] = {
                "status": "n/a",
                "reason": "needs REDIS_URL: the in-process limiter is exact only within one process",
            }
            return
        self.upstream.configure(tokens=3, inter_token_delay=0.0)
        plan = self.plan
        rows = []
        for algorithm in ("sliding_window", "token_bucket"):
            key = self._create_key(f"accuracy-{algorithm}", "--rpm", str(plan.accuracy_rpm))
            # The gateways' metrics in a directory of their own, so that one scrape adds up
            # theirs alone: how many decisions they took without Redis (the failure policy).
            metrics_dir = self.workdir / f"accuracy-{algorithm}-prometheus"
            shutil.rmtree(metrics_dir, ignore_errors=True)
            metrics_dir.mkdir()
            metrics_token = secrets.token_urlsafe(16)
            env = {
                **self.env,
                "LIMITS_RPM_ALGORITHM": algorithm,
                "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                "METRICS_TOKEN": metrics_token,
            }
            if cluster:
                env |= {"REDIS_URL": cluster, "REDIS_CLUSTER": "true"}
            gateways: list[Gateway] = []
            try:
                for index in range(plan.accuracy_gateways):
                    gateways.append(Gateway(env, log=self.workdir / f"accuracy-{index}.log"))
                started = time.monotonic()
                answers = asyncio.run(
                    _hammer([g.port for g in gateways], key, plan.accuracy_requests)
                )
                elapsed = time.monotonic() - started
                without_redis = _counter_total(gateways[0].port, metrics_token, "llmgateway_redis_fallbacks_total")
            finally:
                for gateway in gateways:
                    gateway.stop()
            statuses = Counter(status for status, _ in answers)
            admitted = statuses.get(200, 0)
            # A bucket of `rpm` refills at rpm/60 per second while the burst lasts; the sliding
            # window admits exactly `rpm` in any 60 s.
            refill = int(elapsed * plan.accuracy_rpm / 60) + 1 if algorithm == "token_bucket" else 0
            allowed = plan.accuracy_rpm + refill
            rows.append(
                {
                    "algorithm": algorithm,
                    "redis": "cluster" if cluster else "single",
                    "gateways": plan.accuracy_gateways,
                    "rpm": plan.accuracy_rpm,
                    "requests": plan.accuracy_requests,
                    "burst_s": round(elapsed, 3),
                    "admitted": admitted,
                    "rejected_429": statuses.get(429, 0),
                    "other": sum(n for status, n in statuses.items() if status not in (200, 429)),
                    "allowed_max": allowed,
                    "over_admitted": max(0, admitted - allowed),
                    "under_admitted": max(0, plan.accuracy_rpm - admitted),
                    "429_without_retry_after": sum(
                        1 for status, retry_after in answers if status == 429 and not retry_after
                    ),
                    # Decided in-process because Redis did not answer in time (LIMITS_FAIL_OPEN):
                    # each may admit a request the shared count would have refused.
                    "decided_without_redis": without_redis,
                }
            )
            log(
                f"accuracy {algorithm}: {admitted} admitted of {plan.accuracy_requests} "
                f"(limit {plan.accuracy_rpm}, at most {allowed}) in {elapsed:.2f} s, "
                f"{without_redis} decided without Redis"
            )
        self.results["accuracy"] = {"status": "ok", "rows": rows}




# -- the whole run --------------------------------------------------------------------------------


class Run:
    """One ``scripts/bench`` invocation: the fake upstream, each serving configuration in turn,
    then the phases that run once (limiter, ledger calls/s, chaos, admin)."""

    def __init__(self, args: argparse.Namespace, plan: Plan, workdir: Path) -> None:
        self.args = args
        self.plan = plan
        self.workdir = workdir
        self.env = _process_env(BENCH_LIMITS)
        # The once-per-run phases serve the gateway too (chaos): it refuses the development key,
        # and lists the openai provider's models only with a key.
        self.env.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(50))
        self.env.update(
            {
                "OPENAI_API_KEY": "sk-bench-upstream",
                "DJANGO_SETTINGS_MODULE": "llmgateway.settings",
                "NO_PROXY": "127.0.0.1,localhost",
            }
        )
        self.results: dict[str, Any] = {}
        self._logs: list[IO[bytes]] = []

    def run(self, phases: Sequence[str]) -> dict[str, Any]:
        began = time.monotonic()
        self.results["meta"] = _meta(self.args, self.plan)
        configs: dict[str, Any] = {}
        self.results["configs"] = configs
        if any(phase in SERVING_PHASES or phase == "accuracy" for phase in phases):
            log_file = (self.workdir / "upstream.log").open("ab")
            self._logs.append(log_file)
            upstream = UpstreamHost(self.env, log_file)
            log(f"fake upstream on {upstream.base_url}")
            try:
                for serving in servings(self.args):
                    if serving.why_not:
                        log(f"{serving.name}: skipped ({serving.why_not})")
                        configs[serving.name] = {"serving": asdict(serving)}
                        continue
                    configs[serving.name] = self._serving(serving, phases, upstream)
            finally:
                upstream.stop()
        if "limiter" in phases:
            log("phase limiter")
            self.phase_limiter()
        if "calls" in phases:
            log("phase calls (ledger: short non-stream calls/s)")
            self.phase_calls()
        if "chaos" in phases:
            log("phase chaos")
            self.phase_chaos()
        if "admin" in phases:
            log("phase admin")
            self.phase_admin()
        self.results["meta"]["elapsed_s"] = round(time.monotonic() - began, 1)
        return self.results

    def _serving(self, serving: Serving, phases: Sequence[str], upstream: UpstreamHost) -> dict[str, Any]:
        if self.args.wait_quiet > 0:
            self.results["meta"].setdefault("quiet_waits", {})[serving.name] = round(wait_quiet(self.args.wait_quiet), 1)
        log(f"serving {serving.name}: {serving.describe()}")
        began = time.monotonic()
        run = ServingRun(serving, args=self.args, plan=self.plan, upstream=upstream, workdir=self.workdir / serving.name)
        try:
            run.setup()
            run.results["machine_busy_before_pct"] = round(machine_busy(1.0), 1)
            for phase in SERVING_PHASES:
                if phase in phases:
                    log(f"{serving.name}: phase {phase}")
                    getattr(run, f"phase_{phase}")()
            if "accuracy" in phases and serving.redis_url:
                log(f"{serving.name}: phase accuracy")
                run.phase_accuracy()
            run.results["ledger"] = run._settle_ledger()
            run.results["gateway_log"] = _log_summary(run.workdir / "gateway.log")
        finally:
            run.teardown()
        run.results["elapsed_s"] = round(time.monotonic() - began, 1)
        return run.results

    def phase_calls(self) -> None:
        """The ledger writer's figure: ``bench/calls_per_second.py`` (full path: PostgreSQL,
        Redis, 2 workers), fed back from its ``--json``; n/a when it is missing or fails."""
        if not (ROOT / "bench" / "calls_per_second.py").exists():
            self.results["calls"] = {"status": "n/a", "reason": "bench/calls_per_second.py is missing"}
            return
        out = self.workdir / "calls_per_second.json"
        command = [sys.executable, "-m", "bench.calls_per_second", "--json", str(out),
                   "--seconds", str(self.plan.calls_seconds), "--rounds", str(self.plan.calls_rounds)]  # fmt: skip
        if self.args.postgres:
            command += ["--postgres", self.args.postgres]
        redis_url = os.environ.get("REDIS_URL") or LOCAL_REDIS_URL  # as the production serving's
        command += ["--redis", redis_url]
        try:
            done = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            self.results["calls"] = {"status": "n/a", "reason": "bench.calls_per_second timed out"}
            return
        if not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            self.results["calls"] = {"status": "n/a", "reason": f"exit {done.returncode}: {tail[0][:200]}"}
            return
        self.results["calls"] = {"status": "ok", "exit": done.returncode, **json.loads(out.read_text())}

    def teardown(self) -> None:
        for log_file in self._logs:
            log_file.close()

    # -- limiter ------------------------------------------------------------------------------

    def phase_limiter(self) -> None:
        script = ROOT / "bench" / "limiter.py"
        if not script.exists():
            self.results["limiter"] = {"status": "n/a", "reason": "bench/limiter.py is missing"}
            return
        out = self.workdir / "limiter.json"
        seconds = self.plan.limiter_seconds
        attempts = [[], ["--no-redis"]]
        reason = ""
        for extra in attempts:
            out.unlink(missing_ok=True)
            command = [
                sys.executable,
                "-m",
                "bench.limiter",
                "--seconds",
                str(seconds),
                "--json",
                str(out),
                *extra,
            ]
            try:
                done = subprocess.run(
                    command,
                    cwd=ROOT,
                    env=self.env,
                    capture_output=True,
                    text=True,
                    timeout=24 * seconds + 60,
                )
            except subprocess.TimeoutExpired:
                reason = f"{' '.join(command[1:])} timed out"
                continue
            if done.returncode != 0 or not out.exists():
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
                reason = f"exit {done.returncode}: {tail[0][:200]}"
                continue
            try:
                rows = json.loads(out.read_text())
                parsed = [
                    {
                        "backend": str(r["backend"]),
                        "scenario": str(r["scenario"]),
                        "concurrency": int(r.get("concurrency", 0)),
                        "decisions_per_s": float(r["decisions_per_second"]),
                        "p50_ms": float(r["p50_ms"]),
                        "p99_ms": float(r["p99_ms"]),
                        "errors": int(r.get("errors", 0)),
                    }
                    for r in rows
                ]
            except (ValueError, KeyError, TypeError) as error:
                reason = f"unreadable --json output: {error}"
                continue
            self.results["limiter"] = {
                "status": "ok",
                "seconds": seconds,
                "args": extra,
                "rows": parsed,
            }
            return
        self.results["limiter"] = {"status": "n/a", "reason": reason}

    def phase_chaos(self) -> None:
        """Issue 10's acceptance scenario in a world of its own (``bench/chaos.py``)."""
        from bench import chaos

        try:
            self.results["chaos"] = chaos.run_chaos(
                env=self.env,
                workdir=self.workdir / "chaos",
                quick=self.args.quick,
                postgres_url=self.args.postgres,
                keep=self.args.keep,
            )
        except Exception as error:  # the other phases' figures are still worth writing
            log(f"chaos: failed: {type(error).__name__}: {error}")
            self.results["chaos"] = {"status": "failed", "reason": f"{type(error).__name__}: {error}"}

    def phase_admin(self) -> None:
        """Issue 11's acceptance: the console and every admin list on a 1,000,000-row ledger in
        PostgreSQL (``bench/admin_pages.py``, in a process of its own: it sets Django up on a
        database of its own). ``--quick`` fills 100,000 rows."""
        from bench import admin_pages

        server = self.args.postgres or admin_pages.DEFAULT_SERVER
        out = self.workdir / "admin_pages.json"
        command = [sys.executable, "-m", "bench.admin_pages", "--postgres", server, "--output", str(out)]
        if self.args.quick:
            command += ["--rows", "100000", "--runs", "3"]
        if self.args.keep:
            command.append("--keep")
        try:
            done = subprocess.run(command, cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            self.results["admin"] = {"status": "n/a", "reason": "bench.admin_pages timed out after 1,800 s"}
            return
        sys.stderr.write(done.stderr)
        if not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            self.results["admin"] = {"status": "n/a", "reason": f"exit {done.returncode}: {tail[0][:200]}"}
            return
        self.results["admin"] = {"status": "ok", **json.loads(out.read_text())}

# -- results --------------------------------------------------------------------------------------


def _spread(values: list[float]) -> dict[str, float | None]:
    values = sorted(values)
    return {
        "p50": percentile(values, 50),
        "max": values[-1] if values else None,
        "total": sum(values),
    }


def _log_summary(path: Path) -> dict[str, Any]:
    """ERROR lines and tracebacks in a gateway log."""
    text = path.read_text(errors="replace") if path.exists() else ""
    lines = text.splitlines()
    errors = [line for line in lines if line.startswith(("ERROR", "CRITICAL"))]
    exceptions = [line for line in lines if line and not line.startswith(" ") and "Error: " in line]
    return {
        "tracebacks": text.count("Traceback"),
        "errors": len(errors),
        "first_error": (errors[:1] or [""])[0][:200],
        "exceptions": dict(Counter(line[:200] for line in exceptions).most_common(5)),
    }


def _meta(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    def git(*command: str) -> str:
        try:
            return subprocess.run(
                ["git", *command], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git("rev-parse", "--short", "HEAD"),
        "git_dirty_files": len(dirty.splitlines()),
        "quick": args.quick,
        "app": args.app,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "gateway_env": {
            k: v
            for k, v in os.environ.items()
            if k.startswith(("GATEWAY_", "LIMITS_", "BILLING_", "DATABASE_")) or k == "REDIS_URL"
        },
        "bench_limits": BENCH_LIMITS,
        "plan": asdict(plan),
    }


async def _hammer(ports: Sequence[int], key: str, count: int) -> list[tuple[int, bool]]:
    """`count` chat completions at once, round-robin over the gateways: (status, has Retry-After).
    Status 0 is a transport error."""
    import httpx

    body = {**BODY, "stream": False, "max_tokens": 3}
    body.pop("stream_options", None)
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def one(index: int) -> tuple[int, bool]:
            try:
                response = await client.post(
                    f"http://{HOST}:{ports[index % len(ports)]}{CHAT_PATH}",
                    headers={"Authorization": f"Bearer {key}"},
                    json=body,
                )
            except httpx.HTTPError:
                return 0, False
            return response.status_code, "retry-after" in response.headers

        return list(await asyncio.gather(*(one(index) for index in range(count))))


def _counter_total(port: int, token: str, name: str) -> int | None:
    """A counter's total over every label and process, from the gateway's /metrics (None if it
    cannot be read)."""
    import httpx

    try:
        response = httpx.get(f"http://{HOST}:{port}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    total = 0.0
    for line in response.text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.split("{")[0] == name:
            total += float(value)
    return int(total)


def _names(text: str, allowed: Sequence[str], what: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(allowed)})")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: short loads, no 1,000-stream row")
    parser.add_argument(
        "--serving",
        type=lambda text: _names(text, ("embedded", "production"), "serving configurations"),
        default=["embedded", "production"],
        help="comma-separated serving configurations to measure (default: embedded,production)",
    )
    parser.add_argument(
        "--phases",
        type=lambda text: _names(text, PHASES, "phases"),
        default=list(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)} (default: all)",
    )
    parser.add_argument(
        "--loads",
        type=lambda text: _names(text, [spec.key for spec in Plan().loads], "loads"),
        default=[],
        help="only these streaming loads (keys as in the JSON, e.g. 20ms-100,0ms-1)",
    )
    parser.add_argument(
        "--tokens", type=int, default=None, help="content tokens per stream for every load (default: each load's own, 100)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="the production configuration's workers (default: one per CPU, at least 2)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json", help="where to save the JSON (default bench/results/latest.json)")
    parser.add_argument(
        "--wait-quiet", type=float, default=0.0, metavar="SECONDS",
        help="before each configuration, wait up to this long for the machine to be nearly idle (shared machines)",
    )  # fmt: skip
    parser.add_argument(
        "--postgres", metavar="URL", default=None,
        help=f"the PostgreSQL server for the production configuration and the chaos, calls and admin phases "
        f"(a throwaway database each; default {DEFAULT_POSTGRES})",
    )  # fmt: skip
    parser.add_argument(
        "--redis-cluster", metavar="URL", default=None,
        help="the accuracy phase's gateways share this Redis Cluster (any one node; REDIS_CLUSTER=true) "
        "instead of REDIS_URL, e.g. redis://127.0.0.1:17000/0 (scripts/services starts one)",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (databases, logs)")
    parser.add_argument(
        "--app",
        default=APPLICATION,
        help="the ASGI application to serve (default: the gateway's own); bench.stage_marks:application "
        "marks where each call's time goes (see bench/stage_marks.py)",
    )
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be >= 1")
    plan = QUICK if args.quick else Plan()
    if args.loads:
        plan = replace(plan, loads=tuple(spec for spec in Plan().loads if spec.key in args.loads))
    if args.tokens:
        plan = replace(plan, loads=tuple(replace(spec, tokens=args.tokens) for spec in plan.loads))

    _raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="llmgateway-bench-", dir="/tmp"))
    bench = Run(args, plan, workdir)
    try:
        results = bench.run(args.phases)
    finally:
        bench.teardown()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    log(f"saved {args.output}")
    from bench import report

    return report.main([str(args.output)])  # drawn from the saved file, as bench.report draws it


if __name__ == "__main__":
    sys.exit(main())
