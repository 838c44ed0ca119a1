"""The fake upstream in a process of its own, steered over stdin/stdout.

    python -m testbed.upstream_host        (the host)
    UpstreamHost(env)                       (starts one, from the test or benchmark)

The benchmark runs the fake upstream in its own process (so its CPU is not the gateway's or the
load generator's), but needs what the CLI server cannot give: change its pacing and faults between
phases, and read its per-request records (``closed_at`` for the disconnect storm, ``bytes_written``
for back-pressure). So this helper runs the server with ``running_in_thread()`` and answers one
JSON command per stdin line with one JSON line on stdout:

- ``{"op": "set", "attrs": {...}}``: set behaviour attributes (``tokens``, ``inter_token_delay``,
  ``ttft``, ``fault``, ``fault_after_tokens``, ``max_records``); answers ``{"ok": true}``.
- ``{"op": "clear"}``: forget the records.
- ``{"op": "stats"}``: connection counters.
- ``{"op": "records", "user_prefix": "..."}``: the records whose request body's ``user`` starts
  with the prefix (times are ``time.monotonic()``, one clock for every process on Linux), each
  with the gateway's ``X-Client-Request-Id`` as ``request_id`` (None if it sent none).
- ``{"op": "request_ids", "user_prefix": "..."}``: only those ids, one per record, in order:
  cheap enough to poll while a phase runs.

The first line written is ``{"base_url": ...}``; EOF on stdin stops the server.
:class:`UpstreamHost` is the other end: it starts the host and sends it these commands.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from collections.abc import Mapping
from typing import IO, Any

from testbed.fake_upstream import FakeUpstream, UpstreamRequest

SETTABLE = frozenset(
    {
        "tokens",
        "token_text",
        "inter_token_delay",
        "ttft",
        "fault",
        "fault_after_tokens",
        "max_records",
    }
)
DEFAULTS: dict[str, Any] = {"ttft": 0.0, "fault": None, "fault_after_tokens": 3, "max_records": 0}


CLIENT_REQUEST_ID = "x-client-request-id"  # the gateway's id of the call (headers are lower-cased)


def _matching(upstream: FakeUpstream, prefix: str) -> list[tuple[str, UpstreamRequest]]:
    """(user, record) for the records whose body's ``user`` starts with ``prefix``."""
    matching = []
    for record in list(upstream.requests):
        body = record.body
        user = body.get("user") if isinstance(body, dict) else None
        if isinstance(user, str) and user.startswith(prefix):
            matching.append((user, record))
    return matching


def _records(upstream: FakeUpstream, prefix: str) -> list[dict[str, Any]]:
    rows = []
    for user, record in _matching(upstream, prefix):
        rows.append(
            {
                "user": user,
                "request_id": record.headers.get(CLIENT_REQUEST_ID),
                "started_at": record.started_at,
                "first_chunk_at": record.first_chunk_at,
                "closed_at": record.closed_at,
                "client_disconnected": record.client_disconnected,
                "completed": record.completed,
                "content_chunks_sent": record.content_chunks_sent,
                "bytes_written": record.bytes_written,
                "write_blocked": record.write_blocked,
                "max_drain_wait": record.max_drain_wait,
            }
        )
    return rows


def _answer(upstream: FakeUpstream, command: dict[str, Any]) -> dict[str, Any]:
    op = command.get("op")
    if op == "set":
        attrs = command.get("attrs", {})
        unknown = set(attrs) - SETTABLE
        if unknown:
            return {"ok": False, "error": f"not settable: {sorted(unknown)}"}
        for name, value in attrs.items():
            setattr(upstream, name, value)
        return {"ok": True}
    if op == "clear":
        upstream.clear_requests()
        return {"ok": True}
    if op == "stats":
        return {
            "ok": True,
            "open_connections": upstream.open_connections,
            "total_connections": upstream.total_connections,
            "requests": len(upstream.requests),
        }
    if op == "records":
        return {"ok": True, "records": _records(upstream, str(command.get("user_prefix", "")))}
    if op == "request_ids":
        prefix = str(command.get("user_prefix", ""))
        ids = [record.headers.get(CLIENT_REQUEST_ID) for _, record in _matching(upstream, prefix)]
        return {"ok": True, "ids": ids}
    return {"ok": False, "error": f"unknown op {op!r}"}


def read_json_line(stream: IO[str], timeout: float, what: str) -> dict[str, Any]:
    """One JSON line from a child's stdout, waiting at most ``timeout`` seconds."""
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TimeoutError(f"{what} said nothing within {timeout:.0f} s")
    line = stream.readline()
    if not line:
        raise RuntimeError(f"{what} exited without answering")
    answer: dict[str, Any] = json.loads(line)
    return answer


class UpstreamHost:
    """Start ``python -m testbed.upstream_host`` and steer it (its stderr goes to ``log``)."""

    def __init__(self, env: Mapping[str, str], log: IO[bytes] | None = None) -> None:
        from testbed.gateway import ROOT

        self.process = subprocess.Popen(
            [sys.executable, "-m", "testbed.upstream_host"],
            cwd=ROOT,
            env=dict(env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        assert self.process.stdout is not None
        hello = read_json_line(self.process.stdout, 20, "the fake upstream")
        self.base_url: str = hello["base_url"]
        self.port = int(self.base_url.rsplit(":", 1)[1].split("/", 1)[0])

    @property
    def pid(self) -> int:
        return self.process.pid

    def command(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one command; return its answer, or raise if the host refused it."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        answer = read_json_line(self.process.stdout, 30, "the fake upstream")
        if not answer.get("ok"):
            raise RuntimeError(f"fake upstream refused {op}: {answer.get('error')}")
        return answer

    def configure(self, **attrs: Any) -> None:
        """Set behaviour attributes; those not given go back to ``DEFAULTS``."""
        self.command("set", attrs={**DEFAULTS, **attrs})

    def records(self, prefix: str) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = self.command("records", user_prefix=prefix)["records"]
        return records

    def stop(self) -> None:
        """Close its stdin (it stops serving and exits); kill it if it has not after 15 s."""
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def main() -> int:
    upstream = FakeUpstream(max_records=0)
    with upstream.running_in_thread():
        print(json.dumps({"base_url": upstream.base_url}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                answer = _answer(upstream, json.loads(line))
            except Exception as error:  # report, keep serving: the benchmark decides
                answer = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
