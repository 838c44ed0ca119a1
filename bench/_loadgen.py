"""The benchmark's load generator: a raw asyncio HTTP/1.1 client for streamed chat completions.

    python -m bench._loadgen     (one JSON job on stdin; JSON lines on stdout)

It runs in its own process, started by ``bench.run``, and reports the CPU it used so a reader can
check that it was not the bottleneck. It is deliberately not httpx or the OpenAI SDK: it parses
only what the benchmark needs, with ``bytes`` methods that run in C, from an ``asyncio.Protocol``
(no stream reader, no per-frame objects):

- the status line and whether the body is chunked or has a Content-Length;
- the first content delta (TTFT) and the number of content deltas, by counting
  ``"delta":{"content":"`` (the role chunk carries ``{"role":...,"content":""}`` and does not match);
- ``data: [DONE]``, an SSE error event, and the end of the chunked body (``\\r\\n0\\r\\n\\r\\n``).

This relies on what both servers it talks to do: compact JSON (the fake upstream and the gateway's
orjson), and SSE frames that use ``\\n`` only, so the chunked terminator cannot occur inside a frame.
A pattern split between two reads is caught by carrying the last bytes of each read over.

Jobs (``kind``):

- ``load``: ``concurrency`` closed-loop clients on keep-alive connections send the same request
  until ``duration`` seconds after ``start_at`` (a ``time.monotonic()`` instant, one clock for every
  process on Linux), then finish their stream, within ``drain`` seconds.
- ``hold``: open ``n`` streams, each with ``user`` set to ``user_prefix + index``; when each has
  seen ``ready_tokens`` content deltas and ``read_bytes`` body bytes it either keeps reading
  (``pause`` false) or stops reading its socket (``pause`` true). Then write ``{"event": "ready"}``
  and, with ``then: "wait"``, wait for any line on stdin before closing them all; with
  ``then: "abort"`` close them all at once straight away. The result lists when each one closed.
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import sys
import time
from collections import Counter
from typing import Any

CONTENT = b'"delta":{"content":"'
DONE = b"data: [DONE]"
ERROR = b'data: {"error"'
END = b"\r\n0\r\n\r\n"
HEAD_END = b"\r\n\r\n"
OVERHEAD = b"\r\nx-gateway-overhead-ms:"
# Longer than every pattern but CONTENT, shorter than CONTENT: a carried tail cannot hold a whole
# CONTENT match (no double count) but holds any other pattern's prefix.
_TAIL = len(CONTENT) - 1
assert _TAIL >= max(len(DONE), len(ERROR), len(END)) - 1

monotonic = time.monotonic

# The measured window of a load job (from, to) and what arrived inside it, from every stream,
# finished or not: a stream longer than the window (a saturated server) still counts its tokens.
WINDOW = [0.0, 0.0]
IN_WINDOW = {"tokens": 0, "reads": 0}


class Response:
    """One response as it arrives; ``future`` is resolved when it has ended, one way or another."""

    __slots__ = (
        "future",
        "sent_at",
        "first_at",
        "done_at",
        "last_at",
        "max_gap",
        "tokens",
        "reads",
        "status",
        "error",
        "saw_done",
        "keep_alive",
        "body_bytes",
        "overhead_ms",
        "watch_tokens",
        "watch_bytes",
        "on_watch",
        "_head",
        "_tail",
        "_length",
        "_error_body",
    )

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future
        self.sent_at = 0.0
        self.first_at = 0.0
        self.done_at = 0.0
        self.last_at = 0.0
        self.max_gap = 0.0
        self.tokens = 0
        self.reads = 0  # data_received calls: how the bytes arrived (one chunk per read?)
        self.status = 0
        self.error: str | None = None
        self.saw_done = False
        self.keep_alive = True
        self.body_bytes = 0
        self.overhead_ms: float | None = None
        self.watch_tokens = 0
        self.watch_bytes = 0
        self.on_watch: Any = None
        self._head: bytes | None = b""
        self._tail = b"\r\n"  # so that an empty chunked body also ends on END
        self._length: int | None = None
        self._error_body = b""

    def feed(self, data: bytes) -> None:
        now = monotonic()
        self.reads += 1
        gap = now - self.last_at
        if gap > self.max_gap:
            self.max_gap = gap
        self.last_at = now
        if self._head is not None:
            head = self._head + data
            end = head.find(HEAD_END)
            if end < 0:
                self._head = head
                return
            self._head = None
            self._parse_head(head[:end])
            data = head[end + 4 :]
            if self.done_at:
                return
        self.body_bytes += len(data)
        if self._length is not None:
            if len(self._error_body) < 300:
                self._error_body += data[:300]
            self._length -= len(data)
            if self._length <= 0:
                self._finish(now)
            return
        buf = self._tail + data
        count = buf.count(CONTENT)
        if WINDOW[0] <= now <= WINDOW[1]:
            IN_WINDOW["tokens"] += count
            IN_WINDOW["reads"] += 1
        if count:
            if not self.tokens:
                self.first_at = now
            self.tokens += count
        if not self.saw_done and DONE in buf:
            self.saw_done = True
        if self.error is None and ERROR in buf:
            self.error = "SSE error event"
        if (
            self.on_watch is not None
            and self.tokens >= self.watch_tokens
            and self.body_bytes >= self.watch_bytes
        ):
            callback, self.on_watch = self.on_watch, None
            callback(self)
        if END in buf:
            self._finish(now)
            return
        self._tail = buf[-_TAIL:]

    def _parse_head(self, head: bytes) -> None:
        try:
            self.status = int(head[9:12])
        except ValueError:
            self.status = -1
        lower = head.lower()
        self.keep_alive = b"\r\nconnection: close" not in lower
        # The gateway's own account of the time it added (absent when talking to the upstream).
        start = lower.find(OVERHEAD)
        if start >= 0:
            stop = lower.find(b"\r\n", start + len(OVERHEAD))
            try:
                self.overhead_ms = float(lower[start + len(OVERHEAD) : stop if stop > 0 else None])
            except ValueError:
                pass
        if self.status != 200:
            self.error = f"HTTP {self.status}"
        if b"\r\ntransfer-encoding: chunked" in lower:
            return
        start = lower.find(b"\r\ncontent-length:")
        if start < 0:
            self.keep_alive = False
            self._length = 1 << 62  # read until the connection closes
            return
        stop = lower.find(b"\r\n", start + 2)
        self._length = int(lower[start + 17 : stop if stop > 0 else None].strip() or 0)
        if self.status == 200:
            self.error = "not a stream"
        if self._length <= 0:
            self._finish(monotonic())

    def _finish(self, now: float) -> None:
        if self.done_at:
            return
        self.done_at = now
        if self.error is None and not self.saw_done:
            self.error = "ended without [DONE]"
        if self._error_body and self.error and self.error.startswith("HTTP"):
            self.error += " " + self._error_body[:160].decode("utf-8", "replace")
        if not self.future.done():
            self.future.set_result(None)

    def fail(self, reason: str) -> None:
        if self.done_at:
            return
        self.done_at = monotonic()
        if self.error is None:
            self.error = reason
        if not self.future.done():
            self.future.set_result(None)


class Connection(asyncio.Protocol):
    """One keep-alive client connection carrying one response at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is not None:
            response.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        response = self.response
        if response is not None:
            response.fail("connection lost")

    def send(self, payload: bytes, response: Response) -> None:
        assert self.transport is not None
        self.response = response
        response.sent_at = response.last_at = monotonic()
        self.transport.write(payload)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def request_bytes(host: str, port: int, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"host: {host}:{port}",
        "content-type: application/json",
        "accept: text/event-stream",
        f"content-length: {len(body)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def connect(host: str, port: int, rcvbuf: int | None = None) -> Connection:
    loop = asyncio.get_running_loop()
    if rcvbuf is None:
        _, conn = await loop.create_connection(Connection, host, port)
        return conn
    # A small fixed receive buffer (it also turns off autotuning) models a slow client whose
    # unread bytes stop piling up in the kernel quickly.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    _, conn = await loop.create_connection(Connection, sock=sock)
    return conn


async def _sleep_until(instant: float) -> None:
    delay = instant - monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run_load(job: dict[str, Any]) -> dict[str, Any]:
    host, port = job["host"], job["port"]
    body = json.dumps(job["body"], separators=(",", ":")).encode()
    payload = request_bytes(host, port, job["path"], job.get("headers", {}), body)
    n = int(job["concurrency"])
    start_at = float(job.get("start_at") or monotonic())
    end_at = start_at + float(job["duration"])
    window_from = start_at + float(job.get("warmup", 0.0))
    hard_end = end_at + float(job.get("drain", 30.0))
    WINDOW[:] = [window_from, end_at]
    stagger = float(job.get("stagger", 0.0))
    responses: list[Response] = []
    errors: Counter[str] = Counter()
    connects = 0
    loop = asyncio.get_running_loop()

    async def client(index: int) -> None:
        nonlocal connects
        await _sleep_until(start_at + stagger * index / n)
        conn: Connection | None = None
        try:
            while monotonic() < end_at:
                if conn is None or conn.lost:
                    try:
                        async with asyncio.timeout(max(0.001, hard_end - monotonic())):
                            conn = await connect(host, port)
                        connects += 1
                    except (OSError, TimeoutError) as error:
                        errors[f"connect: {type(error).__name__}: {error}"[:120]] += 1
                        conn = None
                        await asyncio.sleep(0.05)
                        continue
                response = Response(loop.create_future())
                conn.send(payload, response)
                responses.append(response)
                try:
                    async with asyncio.timeout(max(0.001, hard_end - monotonic())):
                        await response.future
                except TimeoutError:
                    response.error = "unfinished at the drain deadline"
                    conn.abort()
                    conn = None
                    return
                if response.error or not response.keep_alive:
                    conn.abort()
                    conn = None
        finally:
            if conn is not None and conn.transport is not None:
                conn.transport.close()

    cpu0, wall0 = _cpu_seconds(), monotonic()
    await asyncio.gather(*(client(i) for i in range(n)))
    cpu1, wall1 = _cpu_seconds(), monotonic()

    expect = int(job.get("expect_tokens") or 0)
    stall_gap = float(job.get("stall_gap", 5.0))
    ttft: list[float] = []
    overhead: list[float] = []
    window_streams = window_tokens = window_reads = 0
    completed = short = unfinished = gap_stalled = 0
    max_gap = 0.0
    for r in responses:
        if r.error is None:
            completed += 1
            if expect and r.tokens != expect:
                short += 1
            if window_from <= r.sent_at < end_at and r.first_at:
                ttft.append(round((r.first_at - r.sent_at) * 1000, 4))
                if r.overhead_ms is not None:
                    overhead.append(r.overhead_ms)
            if window_from <= r.done_at <= end_at:
                window_streams += 1
                window_tokens += r.tokens
                window_reads += r.reads
        else:
            errors[r.error[:160]] += 1
            if r.error.startswith("unfinished"):
                unfinished += 1
        if r.max_gap > max_gap:
            max_gap = r.max_gap
        if r.max_gap > stall_gap:
            gap_stalled += 1
    return {
        "event": "result",
        "requests": len(responses),
        "completed": completed,
        "short": short,
        "unfinished": unfinished,
        "gap_stalled": gap_stalled,
        "max_gap_s": round(max_gap, 4),
        "errors": dict(errors.most_common(8)),
        "error_count": sum(errors.values()),
        "connects": connects,
        "ttft_ms": ttft,
        "overhead_ms": overhead,
        "window_s": round(end_at - window_from, 4),
        "window_streams": window_streams,
        "window_tokens": window_tokens,
        "window_reads": window_reads,
        # Every content token and read that arrived inside the window, from any stream.
        "received_tokens": IN_WINDOW["tokens"],
        "received_reads": IN_WINDOW["reads"],
        "cpu_s": round(cpu1 - cpu0, 4),
        "wall_s": round(wall1 - wall0, 4),
    }


def _emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


async def run_hold(job: dict[str, Any]) -> dict[str, Any]:
    host, port = job["host"], job["port"]
    n = int(job["n"])
    prefix = str(job.get("user_prefix", "hold-"))
    pause = bool(job.get("pause", False))
    rcvbuf = job.get("rcvbuf")
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    ready_count = 0
    conns: list[Connection | None] = [None] * n
    responses: list[Response | None] = [None] * n
    errors: Counter[str] = Counter()
    cpu0, wall0 = _cpu_seconds(), monotonic()

    def on_watch(response: Response, conn: Connection) -> None:
        nonlocal ready_count
        if pause and conn.transport is not None:
            conn.transport.pause_reading()
        ready_count += 1
        if ready_count >= n:
            ready.set()

    async def open_one(index: int) -> None:
        await asyncio.sleep(float(job.get("stagger", 0.0)) * index / n)
        try:
            conn = await connect(host, port, rcvbuf)
        except OSError as error:
            errors[f"connect: {type(error).__name__}"] += 1
            return
        conns[index] = conn
        body = dict(job["body"], user=f"{prefix}{index}")
        payload = request_bytes(
            host, port, job["path"], job.get("headers", {}), json.dumps(body).encode()
        )
        response = Response(loop.create_future())
        response.watch_tokens = int(job.get("ready_tokens", 1))
        response.watch_bytes = int(job.get("read_bytes", 0))
        response.on_watch = lambda r, c=conn: on_watch(r, c)
        responses[index] = response
        conn.send(payload, response)

    await asyncio.gather(*(open_one(i) for i in range(n)))
    try:
        async with asyncio.timeout(float(job.get("ready_timeout", 30.0))):
            await ready.wait()
    except TimeoutError:
        pass
    ready_at = monotonic()
    ended_early: Counter[str] = Counter(
        (r.error or "ended")[:120] for r in responses if r is not None and r.done_at
    )
    _emit(
        {
            "event": "ready",
            "ready": ready_count,
            "opened": sum(c is not None for c in conns),
            "ended_early": dict(ended_early),
            "connect_errors": dict(errors),
            "ready_after_s": round(ready_at - wall0, 4),
        }
    )
    if job.get("then", "wait") == "wait":
        await loop.run_in_executor(None, sys.stdin.readline)
    closed: list[tuple[str, float]] = []
    for index, conn in enumerate(conns):
        if conn is None:
            continue
        closed.append((f"{prefix}{index}", monotonic()))
        conn.abort()
    await asyncio.sleep(0)
    cpu1, wall1 = _cpu_seconds(), monotonic()
    return {
        "event": "result",
        "closed": closed,
        "tokens": [r.tokens if r is not None else 0 for r in responses],
        "cpu_s": round(cpu1 - cpu0, 4),
        "wall_s": round(wall1 - wall0, 4),
    }


async def main_async(job: dict[str, Any]) -> dict[str, Any]:
    if job["kind"] == "load":
        return await run_load(job)
    if job["kind"] == "hold":
        return await run_hold(job)
    raise ValueError(f"unknown job kind {job['kind']!r}")


def main() -> int:
    _raise_fd_limit()
    job = json.loads(sys.stdin.readline())
    _emit(asyncio.run(main_async(job)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
