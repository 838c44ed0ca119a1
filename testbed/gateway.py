"""The gateway served by Granian (``--interface asgi``) as ``scripts/serve`` serves it.

One class for the tests (a session's gateway, a gateway with a setting of one test's own) and
for the benchmarks (the run's gateway, several gateways sharing Redis). It runs
``python -m granian ... llmgateway.asgi:application`` (or a wrapper of it) from the
repository's root with the caller's environment, on a free port of 127.0.0.1, waits until
``GET /v1/models`` answers and every worker listens, and stops it with SIGTERM (SIGKILL after
15 s).

Every worker must be listening before the gateway is handed over: on Linux each Granian worker
binds its own ``SO_REUSEPORT`` socket and the kernel spreads new connections over the sockets
that exist, so keep-alive connections opened while one worker was still starting would all stay
on the first, and a "two workers" figure would be one worker's.

Worker processes and their memory are read from ``/proc`` (Linux), so the tests need no
``psutil``; :mod:`testbed.samplers` measures CPU.
"""

from __future__ import annotations

import http.client
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from testbed.net import HOST, free_port

ROOT = Path(__file__).resolve().parent.parent

APPLICATION = "llmgateway.asgi:application"

# As scripts/serve: HTTP/1 only (with `auto` Granian waits without limit for a new connection's
# first bytes), a 10 s limit on reading request headers, 64 KB of Granian buffer per connection.
SERVE_ARGS = ("--http", "1", "--http1-header-read-timeout", "10000", "--http1-buffer-size", "65536")


def _children(pid: int) -> list[int]:
    try:
        return [
            int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        ]
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return []


def _status_field(pid: int, field: str) -> int:
    """A number from /proc/PID/status (``VmRSS`` is in kB), 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class Gateway:
    """A Granian process serving the gateway; ``with Gateway(env) as gateway: ...`` stops it."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        workers: int = 1,
        granian_args: Sequence[str] = (),
        log: Path | None = None,
        timeout: float = 60.0,
        app: str = APPLICATION,
    ) -> None:
        """Start it and wait (``timeout`` seconds) until it answers with all ``workers`` up.

        Its output goes to ``log`` (appended), else to this process's stdout and stderr. ``app``
        is the ASGI application Granian serves (``module:attribute``): the gateway's own, or a
        wrapper of it that measures it (``bench.stage_marks:application``).
        """
        self.port = free_port()
        self.workers = workers
        self.base_url = f"http://{HOST}:{self.port}"
        self.api_url = f"{self.base_url}/v1"
        self._log: IO[bytes] | None = log.open("ab") if log is not None else None
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "granian", "--interface", "asgi", "--host", HOST,
                "--port", str(self.port), "--workers", str(workers), "--log-level", "warning",
                *granian_args, app,
            ],
            cwd=ROOT,
            env=dict(env),
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log is not None else None,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not (self._answers() and self.listening_sockets() >= workers):
            if self.process.poll() is not None:
                self._close_log()
                raise RuntimeError(
                    f"the gateway exited with {self.process.returncode}"
                    + (f"; see {log}" if log else "")
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"the gateway did not start within {timeout:g} s"
                    + (f"; see {log}" if log else "")
                )
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.process.pid

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

    def listening_sockets(self) -> int:
        """Sockets listening on the gateway's port (one per worker once all are up), from
        /proc/net/tcp."""
        local = f"0100007F:{self.port:04X}"  # 127.0.0.1, as the kernel writes it
        listening = 0
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[3] == "0A":  # 0A: TCP_LISTEN
                listening += 1
        return listening

    def worker_pids(self) -> list[int]:
        """The worker processes Granian forked (and theirs), from /proc."""
        found: list[int] = []
        pending = _children(self.pid)
        while pending:
            pid = pending.pop()
            found.append(pid)
            pending.extend(_children(pid))
        return found

    def pids(self) -> list[int]:
        """Granian's main process and its workers."""
        return [self.pid, *self.worker_pids()]

    def rss_bytes(self, *, workers_only: bool = False) -> int:
        """Resident memory of the server and its workers (of the workers alone if asked)."""
        pids = self.worker_pids() if workers_only else self.pids()
        return sum(_status_field(pid, "VmRSS") for pid in pids) * 1024

    def threads_and_fds(self) -> tuple[int, int]:
        """Threads and open file descriptors of the workers, summed."""
        threads = fds = 0
        for pid in self.worker_pids():
            threads += _status_field(pid, "Threads")
            try:
                fds += sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
            except (FileNotFoundError, PermissionError):
                pass
        return threads, fds

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
