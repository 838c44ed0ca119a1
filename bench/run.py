"""Benchmark the gateway as production serves it, against a fast fake upstream, in one command.

    scripts/bench [--quick] [--workers N] [--tokens N] [--phases streaming,memory,storm,limiter,chaos,admin]

One invocation starts, on 127.0.0.1 only:

- the fake upstream (``testbed.fake_upstream.FakeUpstream``) in a helper process that the run
  steers between phases (``testbed.upstream_host``): pacing, faults, per-request records;
- the gateway: Granian ``--interface asgi`` as the README recommends serving it (one worker per
  CPU sharing Redis when a Redis answers, else the embedded default's one worker; ``--workers``
  and ``REDIS_URL`` override), on a fresh temporary SQLite
  database (migrated, with one API key), ``OPENAI_BASE_URL`` pointing at the fake upstream;
- the load generator, a raw asyncio SSE client in its own process(es) (``bench._loadgen``), which
  reports its own CPU.

Every figure about the gateway is set against the same load sent straight to the fake upstream in
the same invocation ("direct"): added TTFT is the gateway's percentile minus the direct one, and
throughput is a ratio. It prints a table with the targets beside the figures and writes the whole
result as JSON to ``bench/results/latest.json``. See ``bench/README.md`` for what each row means.

Choices that may look odd:

- Load is closed-loop (each client sends its next request when its stream ends) on keep-alive
  connections, as SDK clients do. A run lasts ``duration`` seconds; requests sent in the first
  ``warmup`` seconds are left out of TTFT, and throughput counts the streams that ended inside
  the window, so ramp-up and drain do not dilute it.
- The memory phases restart the gateway, so what they measure is the growth of a process that has
  only been warmed up, not memory freed by earlier phases and reused (which would flatter it).
- CPU shares are percentages of one core over the measured window (``psutil``). What other
  processes used meanwhile is shown too (machine busy time minus ours): on a shared machine the
  figures are pessimistic, and ``--wait-quiet`` waits for an idle machine before starting.
- The disconnect storm paces its streams slowly (``storm_delay_ms``) so the gateway is not
  saturated: it measures the disconnect path, not the event loop's backlog.
- Per-key limits are raised (``BENCH_LIMITS``) because one key carries all the load; the limiter
  still decides every call, as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import datetime as dt
import http.client
import json
import math
import os
import platform
import resource
import secrets
import select
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HOST = "127.0.0.1"
MODEL = "gpt-4o-mini"
BODY: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say something."}],
    "stream": True,
    "stream_options": {"include_usage": True},
}
CHAT_PATH = "/v1/chat/completions"
PHASES = ("streaming", "memory", "storm", "accuracy", "limiter", "chaos", "admin")
GATEWAY_PHASES = ("streaming", "memory", "storm", "accuracy")  # these share the run's gateway
BENCH_LIMITS = {
    "LIMITS_KEY_RPM": str(10**9),
    "LIMITS_KEY_TPM": str(10**12),
    "LIMITS_KEY_MAX_CONCURRENT": str(10**6),
}
LAUNCH_MARGIN = 0.5  # seconds between spawning a load generator and its agreed start

# The targets, printed beside the figures.
TARGET_ADDED_TTFT_P50_ONE_CLIENT_MS = 1.5
TARGET_ADDED_TTFT_P99_100_STREAMS_MS = 3.0
TARGET_THROUGHPUT_RATIO_100_STREAMS = 0.9
TARGET_RSS_PER_IDLE_STREAM_KB = 50.0
TARGET_SLOW_READERS_GROWTH_MB = 32.0
TARGET_DISCONNECT_P99_MS = 20.0
TARGET_LIMITER_P99_MS = 1.0


@dataclass(frozen=True)
class Plan:
    """How big each phase is; ``--quick`` picks a smaller one."""

    delays_ms: tuple[float, ...] = (0.0, 20.0)
    concurrencies: tuple[int, ...] = (1, 10, 100, 1000)
    # (delay ms, concurrency) -> seconds of load; others use default_duration.
    durations: dict[tuple[float, int], float] = field(
        default_factory=lambda: {
            (0.0, 1): 3.0,
            (0.0, 10): 3.0,
            (0.0, 100): 4.0,
            (0.0, 1000): 5.0,
            (20.0, 1): 4.0,
            (20.0, 10): 4.0,
            (20.0, 100): 6.0,
            (20.0, 1000): 7.0,
        }
    )
    default_duration: float = 3.0
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

    def duration(self, delay_ms: float, concurrency: int) -> float:
        return self.durations.get((delay_ms, concurrency), self.default_duration)


QUICK = Plan(
    concurrencies=(1, 100),
    durations={(20.0, 1): 2.0, (20.0, 100): 2.0},
    default_duration=1.0,
    drain=5.0,
    idle_streams=100,
    slow_clients=50,
    slow_settle_max=5.0,
    storm_clients=100,
    limiter_seconds=0.2,
)


# -- small helpers --------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile ``q`` (0..100) of already sorted values."""
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    rank = (len(sorted_values) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return float(sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low))


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _fmt(value: float | None, spec: str = ".2f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def _wait_quiet(limit: float, busy_below: float = 25.0) -> None:
    """Wait (at most ``limit`` s) until the machine's CPU is busy below ``busy_below``% of a core."""
    began = time.monotonic()
    while time.monotonic() - began < limit:
        window = MachineCpuWindow()
        window.start()
        time.sleep(2.0)
        busy = window.stop() or 0.0
        if busy < busy_below:
            _log(
                f"machine quiet ({busy:.0f}% of a core busy) after {time.monotonic() - began:.0f} s"
            )
            return
        _log(f"waiting for a quiet machine: {busy:.0f}% of a core busy")
    _log(f"the machine is still busy after {limit:.0f} s; measuring anyway")


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _read_json_line(stream: IO[str], timeout: float, what: str) -> dict[str, Any]:
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TimeoutError(f"{what} said nothing within {timeout:.0f} s")
    line = stream.readline()
    if not line:
        raise RuntimeError(f"{what} exited without answering")
    return json.loads(line)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _cpu_seconds(processes: Sequence[psutil.Process]) -> tuple[float, float]:
    """User and system CPU seconds of ``processes`` so far."""
    user = system = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            user += times.user
            system += times.system
    return user, system


class CpuWindow:
    """CPU used by some processes between ``start()`` and ``stop()``, as % of one core."""

    def __init__(self, processes: Sequence[psutil.Process]) -> None:
        self.processes = list(processes)
        self._cpu = (0.0, 0.0)
        self._wall = 0.0
        self.percent: float | None = None
        self.system_percent: float | None = None  # the part spent in the kernel

    def start(self) -> None:
        self._cpu, self._wall = _cpu_seconds(self.processes), time.monotonic()

    def stop(self) -> float | None:
        wall = time.monotonic() - self._wall
        if wall > 0:
            user, system = _cpu_seconds(self.processes)
            self.system_percent = 100 * (system - self._cpu[1]) / wall
            self.percent = 100 * (user - self._cpu[0]) / wall + self.system_percent
        return self.percent


class MachineCpuWindow(CpuWindow):
    """CPU busy on the whole machine (all cores) over the window, as % of one core."""

    def __init__(self) -> None:
        super().__init__([])
        self._busy_at_start = 0.0

    def start(self) -> None:
        self._busy_at_start, self._wall = self._busy(), time.monotonic()

    def stop(self) -> float | None:
        wall = time.monotonic() - self._wall
        if wall > 0:
            self.percent = 100 * (self._busy() - self._busy_at_start) / wall
        return self.percent

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()  # Linux: user already includes guest time
        return (
            times.user
            + times.nice
            + times.system
            + getattr(times, "irq", 0.0)
            + getattr(times, "softirq", 0.0)
        )


# -- the processes --------------------------------------------------------------------------------


class Upstream:
    """The fake upstream in its helper process, answering one JSON command per line."""

    def __init__(self, env: dict[str, str], log: IO[bytes]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "testbed.upstream_host"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        assert self.process.stdout is not None
        hello = _read_json_line(self.process.stdout, 20, "the fake upstream")
        self.base_url: str = hello["base_url"]
        self.port = int(self.base_url.rsplit(":", 1)[1].split("/", 1)[0])
        self.psutil = psutil.Process(self.process.pid)

    def command(self, op: str, **fields: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        answer = _read_json_line(self.process.stdout, 30, "the fake upstream")
        if not answer.get("ok"):
            raise RuntimeError(f"fake upstream refused {op}: {answer.get('error')}")
        return answer

    def configure(self, **attrs: Any) -> None:
        defaults = {"ttft": 0.0, "fault": None, "fault_after_tokens": 3, "max_records": 0}
        self.command("set", attrs={**defaults, **attrs})

    def records(self, prefix: str) -> list[dict[str, Any]]:
        return self.command("records", user_prefix=prefix)["records"]

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                assert self.process.stdin is not None
                self.process.stdin.close()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def without_proxies(env: dict[str, str]) -> dict[str, str]:
    """`env` for a process that talks to loopback only: no proxy may be picked up by its HTTP clients."""
    for name in PROXY_VARIABLES:
        env.pop(name, None)
    return env


class Gateway:
    """Granian serving ``llmgateway.asgi:application`` as ``scripts/serve`` does."""

    def __init__(self, env: dict[str, str], workers: int, log_path: Path) -> None:
        self.port = _free_port()
        self.workers = workers
        self.log = log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "granian", "--interface", "asgi",
                "--host", HOST, "--port", str(self.port), "--workers", str(workers),
                "--log-level", "warning",
                # As scripts/serve: HTTP/1 only (with `auto` Granian waits without limit for a
                # new connection's first bytes) and a 10 s limit on reading request headers.
                "--http", "1", "--http1-header-read-timeout", "10000",
                "llmgateway.asgi:application",
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.psutil = psutil.Process(self.process.pid)
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the gateway exited with {self.process.returncode}; see {log_path}"
                )
            if self._answers() and len(self.worker_processes()) >= workers:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start within 60 s; see {log_path}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=2)
        try:
            connection.request("GET", "/v1/models")
            connection.getresponse().read()
            return True
        except OSError:
            return False
        finally:
            connection.close()

    def worker_processes(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return self.psutil.children(recursive=True)
        return []

    def all_processes(self) -> list[psutil.Process]:
        return [self.psutil, *self.worker_processes()]

    def worker_rss(self) -> int:
        total = 0
        for process in self.worker_processes():
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        return total

    def worker_threads_and_fds(self) -> tuple[int, int]:
        threads = fds = 0
        for process in self.worker_processes():
            with contextlib.suppress(psutil.Error):
                threads += process.num_threads()
                fds += process.num_fds()
        return threads, fds

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


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


def _with_database(url: str, name: str) -> str:
    """``url`` (postgres://user@host:port/anything) pointing at database ``name`` instead."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class LoadGen:
    """One load-generator process running one job."""

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
            return _read_json_line(self.process.stdout, timeout, "the load generator")
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


# -- the benchmark --------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, plan: Plan, workdir: Path) -> None:
        self.args = args
        self.plan = plan
        self.workdir = workdir
        self.db_path = workdir / "bench.sqlite3"
        # With --postgres, a throwaway database on that server instead of SQLite.
        self.pg_server: str | None = args.postgres
        self.pg_name = f"llmgateway_bench_{os.getpid()}"
        self.database_url = (
            _with_database(self.pg_server, self.pg_name)
            if self.pg_server
            else f"sqlite:///{self.db_path}"
        )
        self.tokens: int = args.tokens
        self.env = self._environment()
        self.upstream: Upstream | None = None
        self.gateway: Gateway | None = None
        self.api_key = ""
        self.gateway_requests = 0  # chat requests sent to the gateway, for the ledger check
        self.results: dict[str, Any] = {}
        self._logs: list[IO[bytes]] = []

    def _environment(self) -> dict[str, str]:
        env = without_proxies(dict(os.environ))
        # Per-key limits high enough that nothing is refused (one key carries all the load), but
        # still checked, so each request pays for its limiter decisions as in production. A
        # limit set in the environment wins.
        for name, value in BENCH_LIMITS.items():
            env.setdefault(name, value)
        # Each run's database starts its key ids at 1: its limits must not meet an earlier run's.
        env.setdefault("LIMITS_REDIS_PREFIX", f"llmgw:bench:{self.workdir.name}")
        # The gateway refuses to serve (DEBUG off) on the public development key, and the run's
        # var/ is fresh, so it has no kept key: one per run, unless the environment sets one.
        env.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(50))
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "OPENAI_API_KEY": "sk-bench-upstream",
                "LOG_LEVEL": "WARNING",
                "LLMGATEWAY_VAR_DIR": str(self.workdir / "var"),
                "DJANGO_SETTINGS_MODULE": "llmgateway.settings",
                "NO_PROXY": "127.0.0.1,localhost",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            }
        )
        return env

    # -- setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        if self.pg_server:
            self._postgres(f'CREATE DATABASE "{self.pg_name}"')
            self._pg_created = True
        log = (self.workdir / "upstream.log").open("ab")
        self._logs.append(log)
        self.upstream = Upstream(self.env, log)
        self.env["OPENAI_BASE_URL"] = self.upstream.base_url
        _log(f"fake upstream on {self.upstream.base_url}")
        manage = [sys.executable, "manage.py"]
        subprocess.run([*manage, "migrate", "--noinput", "-v0"], cwd=ROOT, env=self.env, check=True)
        self.api_key = self._create_key("bench", "--name", "benchmark")
        self.start_gateway()

    def _settle_ledger(self, limit: float = 15.0) -> dict[str, int]:
        """Wait (bounded) until every chat request sent so far has its usage row."""
        deadline = time.monotonic() + limit
        while True:
            rows, _ = self._ledger()
            if rows >= self.gateway_requests or time.monotonic() > deadline:
                return {"rows": rows, "gateway_requests": self.gateway_requests}
            time.sleep(0.2)

    def start_gateway(self) -> None:
        if self.gateway is not None:
            # Calls still being recorded would be cut short by the restart, and the loss would
            # look like the gateway's: let them land first, and keep the count.
            self.results.setdefault("ledger_before_restarts", []).append(self._settle_ledger())
            self.gateway.stop()
            self.gateway = None
        started = time.monotonic()
        self.gateway = Gateway(self.env, self.args.workers, self.workdir / "gateway.log")
        _log(
            f"gateway on :{self.gateway.port}, {self.args.workers} worker(s), up in {time.monotonic() - started:.1f} s"
        )
        self.warm_up()

    def warm_up(self) -> None:
        """Load the lazy parts (tokenizer, SDK client, pools) before anything is measured."""
        assert self.upstream is not None
        self.upstream.configure(tokens=self.tokens, inter_token_delay=0.0)
        self.load(target="gateway", concurrency=10, duration=1.0, warmup=0.0, stagger=0.0)

    def teardown(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        if self.upstream is not None:
            self.upstream.stop()
        for log in self._logs:
            log.close()
        if getattr(self, "_pg_created", False):
            try:
                self._postgres(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)')
            except Exception as error:  # leave it, say so
                _log(f"could not drop database {self.pg_name}: {error}")

    # -- load ---------------------------------------------------------------------------------

    def _target(self, target: str) -> tuple[int, dict[str, str]]:
        assert self.upstream is not None and self.gateway is not None
        if target == "direct":
            return self.upstream.port, {}
        return self.gateway.port, {"authorization": f"Bearer {self.api_key}"}

    def load(
        self, *, target: str, concurrency: int, duration: float, warmup: float, stagger: float
    ) -> dict[str, Any]:
        """Run one closed-loop load against ``target`` and merge the load generators' results."""
        assert self.upstream is not None and self.gateway is not None
        port, headers = self._target(target)
        procs = max(1, min(self.args.client_procs, concurrency))
        start_at = time.monotonic() + LAUNCH_MARGIN
        shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
        generators = [
            LoadGen(
                {
                    "kind": "load",
                    "host": HOST,
                    "port": port,
                    "path": CHAT_PATH,
                    "headers": headers,
                    "body": BODY,
                    "concurrency": share,
                    "start_at": start_at,
                    "duration": duration,
                    "warmup": warmup,
                    "stagger": stagger,
                    "drain": self.plan.drain,
                    "stall_gap": self.plan.stall_gap,
                    "expect_tokens": self.tokens,
                },
                self.env,
            )
            for share in shares
        ]
        windows = {
            "gateway": CpuWindow(self.gateway.all_processes()),
            "upstream": CpuWindow([self.upstream.psutil]),
            "loadgen": CpuWindow([psutil.Process(g.process.pid) for g in generators]),
            "machine": MachineCpuWindow(),
        }
        time.sleep(max(0.0, start_at - time.monotonic()))
        for window in windows.values():
            window.start()
        time.sleep(duration)
        for window in windows.values():
            window.stop()
        parts = [g.read(duration + self.plan.drain + 60) for g in generators]
        for g in generators:
            g.finish()
        merged = _merge_load(parts)
        merged["gateway_cpu_pct"] = _round(windows["gateway"].percent, 1)
        merged["gateway_sys_cpu_pct"] = _round(windows["gateway"].system_percent, 1)
        merged["upstream_cpu_pct"] = _round(windows["upstream"].percent, 1)
        merged["machine_cpu_pct"] = _round(windows["machine"].percent, 1)
        ours = [windows[name].percent for name in ("gateway", "upstream", "loadgen")]
        machine = windows["machine"].percent
        merged["other_cpu_pct"] = (
            None if machine is None or None in ours else round(max(0.0, machine - sum(ours)), 1)  # type: ignore[arg-type]
        )
        if target == "gateway":
            self.gateway_requests += merged["requests"]
            merged["quiesce_s"] = self.quiesce()
        return merged

    def quiesce(self, limit: float = 20.0) -> float | None:
        """Wait until the gateway is idle (< 5% of a core over 0.5 s); return the wait, None if never.

        Streams a load generator gave up on may still be running (and being recorded) in the
        gateway; the next run must not pay for them.
        """
        assert self.gateway is not None
        began = time.monotonic()
        while time.monotonic() - began < limit:
            window = CpuWindow(self.gateway.all_processes())
            window.start()
            time.sleep(0.5)
            if (window.stop() or 0.0) < 5.0:
                return round(time.monotonic() - began, 2)
        _log(f"the gateway is still busy {limit:.0f} s after the load stopped")
        return None

    def phase_streaming(self) -> None:
        assert self.upstream is not None
        rows = []
        for delay_ms in self.plan.delays_ms:
            self.upstream.configure(tokens=self.tokens, inter_token_delay=delay_ms / 1000)
            for concurrency in self.plan.concurrencies:
                duration = self.plan.duration(delay_ms, concurrency)
                stagger = 0.0 if concurrency <= 10 else (0.5 if concurrency <= 100 else 1.0)
                stagger = min(stagger, duration / 4)
                warmup = min(duration / 3, stagger + 0.5)
                row: dict[str, Any] = {
                    "delay_ms": delay_ms,
                    "concurrency": concurrency,
                    "duration_s": duration,
                }
                for target in ("direct", "gateway"):
                    result = self.load(
                        target=target,
                        concurrency=concurrency,
                        duration=duration,
                        warmup=warmup,
                        stagger=stagger,
                    )
                    row[target] = _summarize_load(result)
                    _log(
                        f"{delay_ms:g} ms x {concurrency:>4} {target:<7}: "
                        f"TTFT p50 {_fmt(row[target]['ttft_p50_ms'], '.3f')} ms, "
                        f"{_fmt(row[target]['tokens_per_s'], '.0f')} tok/s, "
                        f"cpu gw {_fmt(result['gateway_cpu_pct'], '.0f')}% up {_fmt(result['upstream_cpu_pct'], '.0f')}% "
                        f"lg {_fmt(row[target]['loadgen_cpu_pct'], '.0f')}%, errors {result['error_count']}"
                    )
                row.update(_compare(row["direct"], row["gateway"]))
                rows.append(row)
        self.results["streaming"] = rows

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
            values.append(self.gateway.worker_rss())
            time.sleep(interval)
        return sorted(values)[len(values) // 2]

    def _wait_upstream_closed(
        self, prefix: str, closed: list[list[Any]], timeout: float
    ) -> dict[str, Any]:
        """Wait until the upstream saw every ``prefix`` request's connection close; time each one."""
        assert self.upstream is not None
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
            "close_p50_ms": _round(percentile(latencies, 50)),
            "close_p99_ms": _round(percentile(latencies, 99)),
            "close_max_ms": _round(latencies[-1] if latencies else None),
            "upstream_chunks_sent": _spread([r["content_chunks_sent"] for r in records]),
            "upstream_bytes_written": _spread([r["bytes_written"] for r in records]),
            "upstream_write_blocked": sum(bool(r["write_blocked"]) for r in records),
        }

    def phase_memory(self) -> None:
        assert self.upstream is not None and self.gateway is not None
        memory: dict[str, Any] = {}

        # RSS per idle open stream: each stream got its first token, then the upstream stalls.
        self.start_gateway()
        n = self.plan.idle_streams
        before = self._settled_rss()
        threads_before, fds_before = self.gateway.worker_threads_and_fds()
        self.upstream.command("clear")
        self.upstream.configure(
            tokens=self.tokens, fault="stall", fault_after_tokens=1, max_records=100_000
        )
        generator, ready = self._hold(n=n, prefix="idle-", ready_tokens=1, stagger=0.5)
        time.sleep(1.0)
        during = self._settled_rss()
        threads_during, fds_during = self.gateway.worker_threads_and_fds()
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
        _log(f"idle streams: {ready['ready']}/{n} open, {memory['idle']['per_stream_kb']} KB each")

        # RSS growth with clients that stop reading an endless stream.
        self.start_gateway()
        n = self.plan.slow_clients
        before = self._settled_rss()
        self.upstream.command("clear")
        self.upstream.configure(tokens=self.tokens, fault="endless", max_records=100_000)
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
        overall = CpuWindow(self.gateway.all_processes())
        overall.start()
        while time.monotonic() - paused_at < self.plan.slow_settle_max:
            window = CpuWindow(self.gateway.all_processes())
            window.start()
            time.sleep(0.5)
            cpu_busy.append(window.stop() or 0.0)
            samples.append((time.monotonic() - paused_at, self.gateway.worker_rss()))
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
            "gateway_cpu_pct_while_paused": _round(cpu_paused, 1),
            "gateway_cpu_pct_last_second": _round(max(cpu_busy[-2:]) if cpu_busy else None, 1),
            "kernel_queues": kernel,
            # Bytes the gateway relayed to the clients (read, or parked in its send buffers), and
            # the RSS it grew per MB of them: ~0 when memory is bounded by the relay's queue.
            "relayed_to_clients_mb": relayed,
            "growth_per_relayed_mb": _round((after - before) / 2**20 / relayed, 3)
            if relayed
            else None,
            "close": closing,
        }
        _log(f"slow readers: +{memory['slow_readers']['growth_mb']} MB (settled: {settled})")
        self.results["memory"] = memory

    # -- disconnect storm ---------------------------------------------------------------------

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Read the gateway's database directly (``?`` placeholders)."""
        if self.pg_server:
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

        assert self.pg_server is not None
        with psycopg.connect(self.pg_server, autocommit=True, connect_timeout=10) as db:
            db.execute(statement)  # type: ignore[arg-type]

    def phase_storm(self) -> None:
        """Many clients leave mid-stream at the same instant; time until the upstream sees each go.

        The streams are paced (``storm_delay_ms`` between tokens) so the gateway carries them
        without saturating its loop: the figure is then the disconnect path's latency, not the
        loop's backlog. The gateway's CPU in the second before the storm is reported to show it.
        """
        assert self.upstream is not None
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
        before = CpuWindow(self.gateway.all_processes())
        before.start()
        time.sleep(1.0)
        before.stop()
        after = CpuWindow(self.gateway.all_processes())
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
            "gateway_cpu_pct_before": _round(before.percent, 1),
            "gateway_cpu_pct_during": _round(after.percent, 1),
        }
        _log(
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
        assert self.upstream is not None
        self.upstream.configure(tokens=3, inter_token_delay=0.0)
        plan = self.plan
        rows = []
        for algorithm in ("sliding_window", "token_bucket"):
            key = self._create_key(f"accuracy-{algorithm}", "--rpm", str(plan.accuracy_rpm))
            env = {**self.env, "LIMITS_RPM_ALGORITHM": algorithm}
            if cluster:
                env |= {"REDIS_URL": cluster, "REDIS_CLUSTER": "true"}
            gateways: list[Gateway] = []
            try:
                for index in range(plan.accuracy_gateways):
                    gateways.append(Gateway(env, 1, self.workdir / f"accuracy-{index}.log"))
                started = time.monotonic()
                answers = asyncio.run(
                    _hammer([g.port for g in gateways], key, plan.accuracy_requests)
                )
                elapsed = time.monotonic() - started
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
                }
            )
            _log(
                f"accuracy {algorithm}: {admitted} admitted of {plan.accuracy_requests} "
                f"(limit {plan.accuracy_rpm}, at most {allowed}) in {elapsed:.2f} s"
            )
        self.results["accuracy"] = {"status": "ok", "rows": rows}

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

    # -- the whole run ------------------------------------------------------------------------

    def ledger_check(self) -> None:
        self.results["ledger"] = self._settle_ledger()

    def phase_chaos(self) -> None:
        """Issue 10's acceptance scenario in a world of its own (``bench/chaos.py``)."""
        from bench import chaos  # imports this module's process classes: see its docstring

        try:
            self.results["chaos"] = chaos.run_chaos(
                env=self.env,
                workdir=self.workdir / "chaos",
                quick=self.args.quick,
                postgres_url=self.pg_server,
                keep=self.args.keep,
            )
        except Exception as error:  # the other phases' figures are still worth writing
            _log(f"chaos: failed: {type(error).__name__}: {error}")
            self.results["chaos"] = {"status": "failed", "reason": f"{type(error).__name__}: {error}"}

    def phase_admin(self) -> None:
        """Issue 11's acceptance: the console and every admin list on a 1,000,000-row ledger in
        PostgreSQL (``bench/admin_pages.py``, in a process of its own: it sets Django up on a
        database of its own). ``--quick`` fills 100,000 rows."""
        from bench import admin_pages

        server = self.pg_server or admin_pages.DEFAULT_SERVER
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

    def run(self, phases: Sequence[str]) -> dict[str, Any]:
        began = time.monotonic()
        self.results["meta"] = _meta(self.args, self.plan)
        if any(phase in GATEWAY_PHASES for phase in phases):
            self.setup()
            for phase in ("streaming", "memory", "storm"):
                if phase in phases:
                    _log(f"phase {phase}")
                    getattr(self, f"phase_{phase}")()
            self.ledger_check()
            assert self.gateway is not None
            self.gateway.stop()  # the limiter benchmarks get a quiet machine
        if "accuracy" in phases:
            _log("phase accuracy")
            self.phase_accuracy()
        if "limiter" in phases:
            _log("phase limiter")
            self.phase_limiter()
        if "chaos" in phases:
            _log("phase chaos")
            self.phase_chaos()
        if "admin" in phases:
            _log("phase admin")
            self.phase_admin()
        self.results["meta"]["elapsed_s"] = round(time.monotonic() - began, 1)
        gateway_log = self.workdir / "gateway.log"
        log = gateway_log.read_text(errors="replace") if gateway_log.exists() else ""
        error_lines = [line for line in log.splitlines() if line.startswith(("ERROR", "CRITICAL"))]
        exceptions = [
            line
            for line in log.splitlines()
            if line and not line.startswith(" ") and "Error: " in line
        ]
        self.results["meta"]["gateway_log"] = {
            "tracebacks": log.count("Traceback"),
            "errors": len(error_lines),
            "first_error": (error_lines[:1] or [""])[0][:200],
            "exceptions": dict(Counter(line[:200] for line in exceptions).most_common(5)),
        }
        self.results["targets"] = _targets(self.results)
        return self.results


# -- results --------------------------------------------------------------------------------------


def _merge_load(parts: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"ttft_ms": [], "overhead_ms": [], "errors": {}}
    for part in parts:
        for key, value in part.items():
            if key in ("ttft_ms", "overhead_ms"):
                merged[key].extend(value)
            elif key == "errors":
                for message, count in value.items():
                    merged["errors"][message] = merged["errors"].get(message, 0) + count
            elif key in {"max_gap_s", "window_s", "wall_s"}:
                merged[key] = max(merged.get(key, 0.0), value)
            elif isinstance(value, int | float):
                merged[key] = merged.get(key, 0) + value
    merged["loadgen_cpu_pct"] = (
        round(100 * merged["cpu_s"] / merged["wall_s"], 1) if merged.get("wall_s") else None
    )
    return merged


def _spread(values: list[float]) -> dict[str, float | None]:
    values = sorted(values)
    return {"p50": percentile(values, 50), "max": values[-1] if values else None}


def _summarize_load(result: dict[str, Any]) -> dict[str, Any]:
    ttft = sorted(result["ttft_ms"])
    overhead = sorted(result["overhead_ms"])
    window = result["window_s"] or 1.0
    return {
        "requests": result["requests"],
        "completed": result["completed"],
        "errors": result["error_count"],
        "error_kinds": result["errors"],
        "short_streams": result["short"],
        "stalled": result["unfinished"] + result["gap_stalled"],
        "max_gap_s": result["max_gap_s"],
        "ttft_samples": len(ttft),
        "ttft_p50_ms": _round(percentile(ttft, 50), 4),
        "ttft_p95_ms": _round(percentile(ttft, 95), 4),
        "ttft_p99_ms": _round(percentile(ttft, 99), 4),
        # The gateway's x-gateway-overhead-ms header: its own view of the time it added.
        "self_reported_overhead_p50_ms": _round(percentile(overhead, 50), 4),
        "self_reported_overhead_p99_ms": _round(percentile(overhead, 99), 4),
        "streams_per_s": round(result["window_streams"] / window, 1),
        "tokens_per_s": round(result["window_tokens"] / window, 1),
        "gateway_cpu_pct": result["gateway_cpu_pct"],
        "gateway_sys_cpu_pct": result.get("gateway_sys_cpu_pct"),
        # Gateway CPU per stream that ended in the window (both rates over the run's window).
        "gateway_cpu_ms_per_stream": _round(
            10 * result["gateway_cpu_pct"] / (result["window_streams"] / window)
            if result.get("gateway_cpu_pct") and result["window_streams"]
            else None,
            2,
        ),
        "upstream_cpu_pct": result["upstream_cpu_pct"],
        "loadgen_cpu_pct": result["loadgen_cpu_pct"],
        "machine_cpu_pct": result["machine_cpu_pct"],
        "other_cpu_pct": result["other_cpu_pct"],
        "quiesce_s": result.get("quiesce_s"),
        "connects": result["connects"],
    }


def _compare(direct: dict[str, Any], gateway: dict[str, Any]) -> dict[str, Any]:
    added = {}
    for q in ("p50", "p95", "p99"):
        d, g = direct[f"ttft_{q}_ms"], gateway[f"ttft_{q}_ms"]
        added[f"added_ttft_{q}_ms"] = None if d is None or g is None else round(g - d, 4)
    ratio = gateway["tokens_per_s"] / direct["tokens_per_s"] if direct["tokens_per_s"] else None
    return {**added, "throughput_ratio": _round(ratio)}


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
        "workers": args.workers,
        "limiter": "redis" if os.environ.get("REDIS_URL") else "in-process",
        "database": "postgresql" if args.postgres else "sqlite",
        "client_procs": args.client_procs,
        "tokens_per_stream": args.tokens,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "gateway_env": {
            k: v
            for k, v in os.environ.items()
            if k.startswith(("GATEWAY_", "LIMITS_", "BILLING_", "DATABASE_")) or k == "REDIS_URL"
        },
        "bench_limits": BENCH_LIMITS,
        "plan": {
            "delays_ms": plan.delays_ms,
            "concurrencies": plan.concurrencies,
            "idle_streams": plan.idle_streams,
            "slow_clients": plan.slow_clients,
            "storm_clients": plan.storm_clients,
        },
    }


@dataclass
class Target:
    name: str
    measured: str
    target: str
    ok: bool | None  # None: not measured

    @property
    def status(self) -> str:
        return "n/a" if self.ok is None else ("PASS" if self.ok else "MISS")


def _row(results: dict[str, Any], delay_ms: float, concurrency: int) -> dict[str, Any] | None:
    for row in results.get("streaming", []):
        if row["delay_ms"] == delay_ms and row["concurrency"] == concurrency:
            return row
    return None


def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    targets: list[Target] = []

    row = _row(results, 0.0, 1)
    value = row["added_ttft_p50_ms"] if row else None
    targets.append(
        Target(
            "added TTFT p50, 1 client (0 ms between tokens)",
            f"{_fmt(value, '.3f')} ms",
            f"<= {TARGET_ADDED_TTFT_P50_ONE_CLIENT_MS} ms",
            None if value is None else value <= TARGET_ADDED_TTFT_P50_ONE_CLIENT_MS,
        )
    )
    row = _row(results, 20.0, 100)
    value = row["added_ttft_p99_ms"] if row else None
    targets.append(
        Target(
            "added TTFT p99, 100 streams, 20 ms between tokens",
            f"{_fmt(value, '.3f')} ms",
            f"<= {TARGET_ADDED_TTFT_P99_100_STREAMS_MS} ms",
            None if value is None else value <= TARGET_ADDED_TTFT_P99_100_STREAMS_MS,
        )
    )
    value = row["throughput_ratio"] if row else None
    targets.append(
        Target(
            "throughput vs direct, 100 streams, 20 ms",
            f"{_fmt(value, '.3f')}x",
            f">= {TARGET_THROUGHPUT_RATIO_100_STREAMS}x",
            None if value is None else value >= TARGET_THROUGHPUT_RATIO_100_STREAMS,
        )
    )
    for delay in (0.0, 20.0):
        row = _row(results, delay, 1000)
        if row is None:
            targets.append(
                Target(f"1,000 streams, {delay:g} ms: stalled / errors", "n/a", "0 / 0", None)
            )
            continue
        g = row["gateway"]
        targets.append(
            Target(
                f"1,000 streams, {delay:g} ms: stalled / errors",
                f"{g['stalled']} / {g['errors']} (max gap {g['max_gap_s']:.2f} s)",
                "0 / 0",
                g["stalled"] == 0 and g["errors"] == 0,
            )
        )
    idle = results.get("memory", {}).get("idle")
    value = idle["per_stream_kb"] if idle else None
    targets.append(
        Target(
            f"RSS per idle open stream (N={idle['ready'] if idle else '?'})",
            f"{_fmt(value, '.1f')} KB",
            f"<= {TARGET_RSS_PER_IDLE_STREAM_KB:g} KB",
            None if value is None else value <= TARGET_RSS_PER_IDLE_STREAM_KB,
        )
    )
    slow = results.get("memory", {}).get("slow_readers")
    value = slow["growth_mb"] if slow else None
    targets.append(
        Target(
            f"RSS growth, {slow['clients'] if slow else 100} non-reading clients"
            + ("" if not slow or slow["settled"] else " (NOT settled)"),
            f"{_fmt(value, '.1f')} MB",
            f"<= {TARGET_SLOW_READERS_GROWTH_MB:g} MB",
            None if value is None else value <= TARGET_SLOW_READERS_GROWTH_MB and slow["settled"],
        )
    )
    storm = results.get("storm")
    if storm:
        p99 = storm["close_p99_ms"]
        targets.append(
            Target(
                f"disconnect -> upstream close p50/p99, left open (N={storm['clients']})",
                f"{_fmt(storm['close_p50_ms'], '.1f')}/{_fmt(p99, '.1f')} ms, {storm['left_open']} open",
                f"p99 <= {TARGET_DISCONNECT_P99_MS:g} ms, 0 open",
                p99 is not None
                and p99 <= TARGET_DISCONNECT_P99_MS
                and storm["left_open"] == 0
                and storm["never_reached_upstream"] == 0,
            )
        )
        targets.append(
            Target(
                "ledger rows written for the storm",
                f"{storm['ledger_rows']} / {storm['clients']}",
                "= requests",
                storm["ledger_rows"] == storm["clients"],
            )
        )
    else:
        targets.append(
            Target(
                "disconnect -> upstream close p99, left open",
                "n/a",
                f"p99 <= {TARGET_DISCONNECT_P99_MS:g} ms",
                None,
            )
        )
    accuracy = results.get("accuracy")
    if accuracy and accuracy.get("status") == "ok":
        rows = accuracy["rows"]
        exact = all(
            r["over_admitted"] == 0
            and r["under_admitted"] == 0
            and r["other"] == 0
            and r["429_without_retry_after"] == 0
            for r in rows
        )
        targets.append(
            Target(
                f"limiter accuracy, {rows[0]['gateways']} gateway processes sharing "
                + ("a Redis Cluster" if rows[0].get("redis") == "cluster" else "Redis"),
                ", ".join(f"{r['algorithm']} {r['admitted']}/{r['rpm']} (max {r['allowed_max']})" for r in rows),
                "0 over-admitted",
                exact,
            )
        )
    elif accuracy:
        targets.append(
            Target("limiter accuracy across gateway processes", "n/a", "0 over-admitted", None)
        )
    limiter = results.get("limiter")
    if limiter and limiter.get("status") == "ok":
        # The target is one decision's latency: the one-caller rows. With many callers in one
        # process, latency is mostly queueing behind the others (the table shows those rows).
        single = min(r["concurrency"] for r in limiter["rows"])
        for backend in dict.fromkeys(r["backend"] for r in limiter["rows"]):
            rows = [
                r for r in limiter["rows"] if r["backend"] == backend and r["concurrency"] == single
            ]
            worst = max(rows, key=lambda r: r["p99_ms"])
            targets.append(
                Target(
                    f"limiter decision p99, {backend}, {single} caller (worst: {worst['scenario']})",
                    f"{worst['p99_ms']:.3f} ms",
                    f"<= {TARGET_LIMITER_P99_MS:g} ms",
                    worst["p99_ms"] <= TARGET_LIMITER_P99_MS,
                )
            )
    else:
        reason = (limiter or {}).get("reason", "not run")
        targets.append(
            Target(
                f"limiter decision p99 ({reason[:60]})",
                "n/a",
                f"<= {TARGET_LIMITER_P99_MS:g} ms",
                None,
            )
        )
    if "chaos" in results:
        from bench import chaos

        targets.append(Target(*chaos.target(results["chaos"])))
    if "admin" in results:
        from bench import admin_pages

        admin = results["admin"]
        if admin.get("status") == "ok":
            targets.append(Target(*admin_pages.target(admin)))
        else:
            targets.append(Target(f"admin pages p50 ({admin.get('reason', 'not run')[:60]})", "n/a", f"< {admin_pages.BOUND_MS:g} ms", None))
    return [
        {"name": t.name, "measured": t.measured, "target": t.target, "status": t.status}
        for t in targets
    ]


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    dirty = f" (+{meta['git_dirty_files']} modified files)" if meta["git_dirty_files"] else ""
    lines = [
        f"llmgateway benchmark {meta['started']}, git {meta['git']}{dirty}; gateway: Granian ASGI, "
        f"{meta['workers']} worker(s), {meta.get('limiter', '?')} limiter, {meta['database']}; {meta['tokens_per_stream']} tokens/stream; "
        f"{meta['cpus']} CPUs; {'QUICK run, ' if meta['quick'] else ''}took {meta.get('elapsed_s', '?')} s",
        "",
    ]
    streaming = results.get("streaming")
    if streaming:
        lines += [
            "Time to first token, ms (closed loop; added = gateway percentile - direct percentile)",
            f"{'delay':>5} {'conc':>5} | {'direct p50/p99':>17} | {'gateway p50/p95/p99':>26} | "
            f"{'added p50/p95/p99':>26} | {'samples d/g':>11} | {'gw header p50/p99':>17}",
        ]
        for row in streaming:
            d, g = row["direct"], row["gateway"]
            lines.append(
                f"{row['delay_ms']:>3g}ms {row['concurrency']:>5} | "
                f"{_fmt(d['ttft_p50_ms'], '.3f'):>8}/{_fmt(d['ttft_p99_ms'], '.3f'):<8} | "
                f"{_fmt(g['ttft_p50_ms'], '.2f'):>8}/{_fmt(g['ttft_p95_ms'], '.2f'):>8}/{_fmt(g['ttft_p99_ms'], '.2f'):<8} | "
                f"{_fmt(row['added_ttft_p50_ms'], '.2f'):>8}/{_fmt(row['added_ttft_p95_ms'], '.2f'):>8}/"
                f"{_fmt(row['added_ttft_p99_ms'], '.2f'):<8} | {d['ttft_samples']:>5}/{g['ttft_samples']:<5} | "
                f"{_fmt(g['self_reported_overhead_p50_ms'], '.2f'):>8}/{_fmt(g['self_reported_overhead_p99_ms'], '.2f')}"
            )
        lines += [
            "",
            "Throughput (streams that ended inside the window) and health; CPU in % of one core over the window",
            f"{'delay':>5} {'conc':>5} | {'direct tok/s':>12} {'gw tok/s':>9} {'ratio':>6} {'gw str/s':>8} | "
            f"{'stalled':>7} {'errors':>6} {'max gap s':>9} | {'gw CPU ms/stream':>16} | "
            f"{'gateway run: gw(sys)/up/lg/other':>32} | {'direct run: up/lg/other':>23}",
        ]
        for row in streaming:
            d, g = row["direct"], row["gateway"]
            lines.append(
                f"{row['delay_ms']:>3g}ms {row['concurrency']:>5} | "
                f"{_fmt(d['tokens_per_s'], '.0f'):>12} {_fmt(g['tokens_per_s'], '.0f'):>9} "
                f"{_fmt(row['throughput_ratio'], '.3f'):>6} {_fmt(g['streams_per_s'], '.1f'):>8} | "
                f"{g['stalled']:>7} {g['errors']:>6} {g['max_gap_s']:>9.2f} | "
                f"{_fmt(g['gateway_cpu_ms_per_stream'], '.2f'):>16} | "
                f"{_fmt(g['gateway_cpu_pct'], '.0f'):>14}({_fmt(g['gateway_sys_cpu_pct'], '.0f')})/"
                f"{_fmt(g['upstream_cpu_pct'], '.0f')}/"
                f"{_fmt(g['loadgen_cpu_pct'], '.0f')}/{_fmt(g['other_cpu_pct'], '.0f'):<6} | "
                f"{_fmt(d['upstream_cpu_pct'], '.0f'):>13}/{_fmt(d['loadgen_cpu_pct'], '.0f')}/{_fmt(d['other_cpu_pct'], '.0f'):<5}"
            )
        errors: dict[str, int] = {}
        for row in streaming:
            for message, count in row["gateway"]["error_kinds"].items():
                errors[message] = errors.get(message, 0) + count
        if errors:
            lines.append(
                "  gateway errors: "
                + "; ".join(f"{count} x {message}" for message, count in errors.items())
            )
        lines.append("")
    memory = results.get("memory")
    if memory:
        idle, slow = memory["idle"], memory["slow_readers"]
        kernel = slow.get("kernel_queues") or {}
        to_clients = kernel.get("gateway_to_clients") or {}
        from_upstream = [
            kernel.get(k) or {}
            for k in ("upstream_to_gateway_upstream_side", "upstream_to_gateway_gateway_side")
        ]
        lines += [
            "Memory (RSS of the gateway worker processes)",
            f"  idle open streams: {idle['ready']}/{idle['streams']} open (first token received, upstream stalled): "
            f"RSS {idle['rss_before_mb']} -> {idle['rss_during_mb']} MB = {idle['per_stream_kb']} KB per stream; "
            f"worker threads {idle['worker_threads'][0]} -> {idle['worker_threads'][1]}, "
            f"fds {idle['worker_fds'][0]} -> {idle['worker_fds'][1]}; when the clients left, the upstream saw its "
            f"connections close within p99 {_fmt(idle['close']['close_p99_ms'], '.1f')} ms, {idle['close']['left_open']} left open",
            f"  non-reading clients: {slow['ready']}/{slow['clients']} stopped reading after "
            f"{slow['read_bytes_before_pause'] // 1024} KB of an endless stream: RSS {slow['rss_before_mb']} -> "
            f"{slow['rss_after_mb']} MB (+{slow['growth_mb']} MB, {'settled' if slow['settled'] else 'NOT settled'} "
            f"after {slow['observed_s']} s); gateway CPU meanwhile {_fmt(slow['gateway_cpu_pct_while_paused'], '.0f')}% "
            f"(last second {_fmt(slow.get('gateway_cpu_pct_last_second'), '.0f')}%); "
            f"upstream wrote p50 {_fmt((slow['close']['upstream_bytes_written']['p50'] or 0) / 2**20, '.1f')} MB/stream; "
            f"relayed to the clients {slow.get('relayed_to_clients_mb')} MB (RSS +{_fmt(slow.get('growth_per_relayed_mb'), '.2f')} MB "
            f"per MB relayed); kernel queues gateway->clients {to_clients.get('send_q_mb', 'n/a')} MB, upstream->gateway "
            f"{sum(q.get('send_q_mb', 0) + q.get('recv_q_mb', 0) for q in from_upstream):.1f} MB; "
            f"after close: {slow['close']['left_open']} upstream connections left open",
            "",
        ]
    storm = results.get("storm")
    if storm:
        lines += [
            f"Disconnect storm: {storm['ready']}/{storm['clients']} streams mid-stream ({storm['delay_ms']:g} ms/token; "
            f"gateway CPU before {_fmt(storm['gateway_cpu_pct_before'], '.0f')}%), all clients closed at once; the "
            f"upstream saw the close after p50 {_fmt(storm['close_p50_ms'], '.1f')} / p99 "
            f"{_fmt(storm['close_p99_ms'], '.1f')} / max {_fmt(storm['close_max_ms'], '.1f')} ms; left open "
            f"{storm['left_open']}, never reached upstream {storm['never_reached_upstream']}; ledger rows "
            f"{storm['ledger_rows']} {storm['ledger_rows_by_status']}; gateway CPU meanwhile "
            f"{_fmt(storm['gateway_cpu_pct_during'], '.0f')}%",
            "",
        ]
    accuracy = results.get("accuracy")
    if accuracy:
        if accuracy.get("status") == "ok":
            shared = "a Redis Cluster" if accuracy["rows"][0].get("redis") == "cluster" else "Redis"
            lines.append(f"Limiter accuracy (one key, gateway processes sharing {shared}, every request at once)")
            for r in accuracy["rows"]:
                lines.append(
                    f"  {r['algorithm']:<15} {r['gateways']} gateways, {r['rpm']} RPM, {r['requests']} requests "
                    f"in {r['burst_s']:.2f} s: admitted {r['admitted']} (at most {r['allowed_max']}), "
                    f"429 {r['rejected_429']} ({r['429_without_retry_after']} without Retry-After), other {r['other']}"
                )
        else:
            lines.append(f"Limiter accuracy: n/a ({accuracy.get('reason')})")
        lines.append("")
    limiter = results.get("limiter")
    if limiter:
        if limiter.get("status") == "ok":
            lines.append(f"Limiter (bench/limiter.py, {limiter['seconds']:g} s per scenario)")
            for r in limiter["rows"]:
                lines.append(
                    f"  {r['backend']:<10} {r['scenario']:<15} conc {r['concurrency']:>3}: "
                    f"p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, {r['decisions_per_s']:,.0f} decisions/s, errors {r['errors']}"
                )
        else:
            lines.append(f"Limiter: n/a ({limiter.get('reason')})")
        lines.append("")
    if "chaos" in results:
        from bench import chaos

        lines += chaos.render(results["chaos"])
    admin = results.get("admin")
    if admin:
        from bench import admin_pages

        lines += [*admin_pages.table(admin), ""] if admin.get("status") == "ok" else [f"Admin pages: n/a ({admin.get('reason')})", ""]
    ledger = results.get("ledger")
    if ledger:
        restarts = ", ".join(
            f"{r['rows']}/{r['gateway_requests']}"
            for r in results.get("ledger_before_restarts", [])
        )
        lines.append(
            f"Ledger: {ledger['rows']} usage rows for {ledger['gateway_requests']} chat requests sent to the gateway"
            + (f" (rows/requests before each gateway restart: {restarts})" if restarts else "")
        )
    log = meta.get("gateway_log") or {}
    if log.get("errors") or log.get("tracebacks"):
        lines.append(
            f"Gateway log: {log['errors']} ERROR lines, {log['tracebacks']} tracebacks; first: {log.get('first_error', '')}"
        )
    others = sorted(
        value
        for row in results.get("streaming", [])
        for value in (row["gateway"]["other_cpu_pct"], row["direct"]["other_cpu_pct"])
        if value is not None
    )
    if others and (median := percentile(others, 50) or 0.0) > 20:
        lines.append(
            f"WARNING: other processes on this machine used a median {median:.0f}% of a core during the "
            "streaming runs (column 'other'): the figures are pessimistic. Rerun on a quiet machine."
        )
    lines.append("")
    lines.append(f"{'Target':<62} {'measured':<36} {'target':<22} status")
    for t in results["targets"]:
        lines.append(f"{t['name']:<62} {t['measured']:<36} {t['target']:<22} {t['status']}")
    return "\n".join(lines)


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


LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"


def _redis_answers(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _choose_serving(args: argparse.Namespace) -> None:
    """Serve as the README recommends: one worker per CPU sharing Redis (limits must be shared
    by the workers), or the embedded default (one worker, in-process limiter) without Redis.
    An explicit --workers or REDIS_URL wins."""
    redis_url = os.environ.get("REDIS_URL")
    if not redis_url and args.workers != 1 and _redis_answers(LOCAL_REDIS_URL):
        redis_url = os.environ["REDIS_URL"] = LOCAL_REDIS_URL
    if args.workers is None:
        args.workers = (os.cpu_count() or 1) if redis_url else 1
    if not redis_url and args.workers > 1:
        _log("WARNING: several workers without Redis: each enforces its own copy of every limit")
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="llmgateway-bench-metrics-")
        atexit.register(shutil.rmtree, metrics_dir, True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    _log(
        f"serving: {args.workers} worker(s), limiter {'Redis ' + redis_url if redis_url else 'in-process'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of about a minute: short phases, no 1,000-stream rows",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Granian worker processes (default: as the README recommends, one per CPU with "
        "Redis; 1 when no Redis answers, the embedded default)",
    )
    parser.add_argument(
        "--tokens", type=int, default=50, help="content tokens per stream (default 50)"
    )
    parser.add_argument(
        "--client-procs", type=int, default=1, help="load-generator processes per run (default 1)"
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)} (default: all)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS / "latest.json",
        help="where to write the JSON results",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for the machine's CPU to be nearly idle (shared machines)",
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        default=None,
        help="run the gateway on a throwaway database created (and dropped) on this PostgreSQL server, "
        "e.g. postgres://postgres@127.0.0.1:5432/postgres; default: a temporary SQLite file. The "
        "chaos phase always uses PostgreSQL: this server, else that example URL",
    )
    parser.add_argument(
        "--redis-cluster",
        metavar="URL",
        default=None,
        help="the accuracy phase's gateways share this Redis Cluster (any one node; REDIS_CLUSTER=true) "
        "instead of REDIS_URL, e.g. redis://127.0.0.1:17000/0 (scripts/services starts one)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (database, logs) and the chaos phase's PostgreSQL database",
    )
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if (
        unknown
        or (args.workers is not None and args.workers < 1)
        or args.tokens < 1
        or args.client_procs < 1
    ):
        parser.error(
            f"bad arguments (unknown phases: {sorted(unknown)})"
            if unknown
            else "counts must be >= 1"
        )

    _choose_serving(args)
    _raise_fd_limit()
    if args.wait_quiet > 0:
        _wait_quiet(args.wait_quiet)
    workdir = Path(tempfile.mkdtemp(prefix="llmgateway-bench-", dir="/tmp"))
    bench = Bench(args, QUICK if args.quick else Plan(), workdir)
    try:
        results = bench.run(phases)
    finally:
        bench.teardown()
        if args.keep:
            _log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    print(f"\nJSON: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
